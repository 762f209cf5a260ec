"""Index commands: ``models``, ``build-index`` and ``info``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from embedsearch.cli.options import (
    batch_size_option,
    command,
    deprecation_note,
    device_option,
    dup_threshold_option,
    encoder_weights_option,
    exclude_option,
    index_option,
    json_option,
    model_option,
    precision_option,
    split_map_option,
    table_columns_options,
    workers_option,
)
from embedsearch.cli.output import echo_encoder, echo_json, progress_factory
from embedsearch.dedupe import KEEP_POLICIES


@command("models")
@json_option("one per encoder (spec, example, dim, weights, description, default)")
def models_cmd(as_json: bool) -> None:
    """List the encoders: spec, embedding dim, and where the weights come from."""
    from embedsearch.encoders import DEFAULT_ENCODER, entries

    for e in entries():
        spec = e.example if e.is_family and e.example else e.key
        if as_json:
            echo_json({"spec": e.key, "example": e.example, "dim": e.dim,
                       "weights": e.weights, "description": e.description,
                       "default": e.key == DEFAULT_ENCODER})
        else:
            click.echo(f"{spec:42s} dim {e.dim:>15s}  {e.description}")
            click.echo(f"{'':42s} weights: {e.weights}")
    if not as_json:
        click.echo("\nConcatenate encoders with A+B (or --model A --model B), e.g. "
                   "efficientnet-lite0+efficientnet-lite1+efficientnet-lite2: the "
                   "parts' L2-normalised embeddings joined in one bundle.")


@command("build-index", renamed={"--dedupe-threshold": "--dup-threshold",
                                 "--num-workers": "--ray-workers",
                                 "--worker-cpus": "--ray-worker-cpus",
                                 "--worker-gpus": "--ray-worker-gpus"})
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--name", help="Bundle name under ./indexes/ (default: the folder's name).")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder (instead of --name).")
@model_option("Default: efficientnet-lite0, or the bundle's encoder when it exists. Repeat "
              "(SPEC or SPEC=WEIGHTS), or write A+B, to concatenate several encoders' "
              "embeddings (input sizes may differ).",
              multiple=True)
@encoder_weights_option("")
@precision_option
@table_columns_options
@click.option("--follow-symlinks", is_flag=True, help="Follow symlinks: to folders wherever "
              "they point (loops are refused), to files inside DATA.")
@split_map_option
@click.option("--skip-missing", is_flag=True, help="Build even if a CSV lists missing files.")
@click.option("--overwrite", is_flag=True, help="Re-encode everything, even with another encoder.")
@click.option("--index-type", type=click.Choice(["auto", "flat", "ivf", "ivfpq", "hnsw"]),
              default="auto", show_default=True,
              help="faiss index: exact flat; IVF (recall@10 measured and recorded); IVF-PQ "
              "(compressed); HNSW. auto: flat up to 200,000 images, then IVF, then IVF-PQ.")
@batch_size_option
@workers_option
@device_option
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="Where images are encoded: this process, or a Ray "
              "cluster (needs the `ray` extra; same bundle).")
@click.option("--address", help="Ray cluster to join (HOST:PORT or ray://…); default: start a "
              "local Ray runtime. With --engine ray.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray encoder actors, each loading the encoder once. With --engine ray.")
@click.option("--ray-worker-cpus", type=click.FloatRange(min=0.01), default=1.0,
              show_default=True, help="CPUs per Ray encoder actor.")
@click.option("--ray-worker-gpus", type=click.FloatRange(min=0), default=0.0,
              show_default=True, help="GPUs per Ray encoder actor (0: encode on CPU).")
@click.option("--dedupe/--no-dedupe", default=None,
              help="Leave near-duplicates out of the index (recorded in the manifest; the "
              "choice sticks to the bundle). Default: as the bundle was built.")
@dup_threshold_option("calibrated on the collection, as dedupe does (with --dedupe)")
@click.option("--dedupe-keep", type=click.Choice(list(KEEP_POLICIES)),
              help="Which image of a duplicate group --dedupe keeps (default: resolution).")
@exclude_option
@click.option("--views", help="Also embed augmented views of the labelled training images "
              "for heads: flip and/or cropN, e.g. flip,crop2 (none: drop them). Sticks to "
              "the bundle.")
@json_option("the bundle's manifest (one record)")
@click.pass_context
def build_index_cmd(ctx: click.Context, data: Path, name: str | None, out: Path | None,
                    model: tuple[str, ...], weights: Path | None, precision: str | None,
                    path_col: str | None, label_col: str | None, split_col: str | None,
                    follow_symlinks: bool, split_map: str | None, skip_missing: bool,
                    overwrite: bool, index_type: str, batch_size: int | None,
                    workers: int | None, device: str, engine: str, address: str | None,
                    ray_workers: int, ray_worker_cpus: float, ray_worker_gpus: float,
                    dedupe: bool | None, dup_threshold: float | None,
                    dedupe_keep: str | None, exclude: Path | None, views: str | None,
                    as_json: bool) -> None:
    """Embed every image in DATA once and index it.

    DATA is a folder with one sub-folder per class (optionally below train/ val/ test/),
    an unlabelled folder, or a CSV/parquet of paths and labels. Re-running re-encodes only
    new or changed images; an interrupted run resumes.
    """
    from embedsearch.build_options import BuildOptions
    from embedsearch.engines.ray_engine import RayOptions
    from embedsearch.pipeline import build_index

    ray_options = RayOptions(address=address, num_workers=ray_workers,
                             batch_size=batch_size or RayOptions.batch_size,
                             num_cpus=ray_worker_cpus, num_gpus=ray_worker_gpus,
                             quiet=not ctx.obj.get("debug"))
    options = BuildOptions(
        model=list(model) or None, weights=weights, precision=precision, device=device,
        path_col=path_col, label_col=label_col, split_col=split_col,
        follow_symlinks=follow_symlinks, skip_missing=skip_missing, split_map=split_map,
        exclude=exclude, overwrite=overwrite, index_type=index_type, dedupe=dedupe,
        dedupe_threshold=dup_threshold, dedupe_keep=dedupe_keep, views=views,
        batch_size=batch_size, num_workers=workers, engine=engine, ray_options=ray_options,
        progress=progress_factory(ctx, "encoding"))
    result = build_index(data, out, options, name=name)
    m = result.manifest
    if as_json:
        echo_json(m)
        return
    click.echo(f"bundle   {result.path}")
    echo_encoder(m["encoder"])
    click.echo(f"images   {result.summary()}")
    click.echo(f"encoded  {result.encoded:,} new, {result.reused:,} reused from cache"
               + (f" ({result.from_shared:,} from the shared embedding cache)"
                  if result.from_shared else "")
               + (f", {result.images_per_second:.1f} images/s" if result.encoded else ""))
    if m["classes"]:
        counts = ", ".join(f"{c} {n}" for c, n in m["counts"]["by_class"].items())
        click.echo(f"classes  {len(m['classes'])}: {counts}")
        click.echo(f"splits   {', '.join(f'{s} {n}' for s, n in m['counts']['by_split'].items())}")
    else:
        click.echo("classes  none (unlabelled: similar-image search only)")
    if "held_out" in m["index"]:
        click.echo(f"held out {', '.join(m['index']['held_out']['splits'])}: "
                   f"{m['index']['held_out']['why']}")
    exact = "exact" if m["index"]["exact"] else "approximate"
    click.echo(f"index    {m['index']['type']} ({exact})"
               f", {m['index']['ntotal']:,} vectors, {m['index']['reference_rows']:,} used "
               "for classification")
    if "recall_at_10" in m["index"]:
        click.echo(f"recall   {m['index']['recall_at_10']:.3f} recall@10 vs exact search "
                   f"({m['index']['recall_queries']:,} held-out queries, "
                   f"nprobe {m['index']['nprobe']})")
    if "dedupe" in m:
        d = m["dedupe"]
        click.echo(f"dedupe   {d['removed']:,} duplicates left out ({d['groups']:,} groups, "
                   f"threshold {d.get('threshold', d['settings']['threshold']):g}"
                   f"{'' if d['settings']['threshold'] else ' calibrated'}); listed in "
                   f"{result.path / d['removed_file']}")
    if "views" in m:
        v = m["views"]
        click.echo(f"views    {v['rows']:,} views ({v['spec']}) of {v['images']:,} training "
                   f"images for heads, {result.views_encoded:,} newly encoded")
    for row in result.failures.head(10).itertuples():
        click.echo(f"  skipped {row.id}: {row.reason} {row.detail}", err=True)
    if len(result.failures) > 10:
        click.echo(f"  … {len(result.failures) - 10} more skipped files listed in "
                   f"{result.path / m['roles']['failures']}", err=True)
    click.echo(f"took     {result.seconds:.1f} s")


@command("info")
@click.argument("name", required=False, metavar="[NAME]")
@index_option()
@json_option("the bundle's manifest (one record)")
def info_cmd(name: str | None, index_name: str | None, as_json: bool) -> None:
    """Show a bundle's manifest (verifying its files).

    The bundle is given with --index NAME (the older `info NAME` still works for one
    release).
    """
    from embedsearch.bundle import load_bundle

    if name is not None:
        if index_name is not None:
            raise click.UsageError("give the bundle once: --index NAME")
        deprecation_note("info NAME", "info --index NAME")
        index_name = name
    if index_name is None:
        raise click.UsageError("which bundle? embedsearch info --index NAME")
    bundle = load_bundle(index_name)
    m = bundle.manifest
    if as_json:
        echo_json(m)
        return
    click.echo(f"bundle   {bundle.path} (generation {m['generation']}, {m['created']})")
    echo_encoder(m["encoder"])
    click.echo(f"source   {m['source']['path']}")
    click.echo(f"counts   {json.dumps(m['counts'])}")
    click.echo(f"index    {json.dumps(m['index'])}")
    if "views" in m:
        click.echo(f"views    {m['views']['rows']:,} ({m['views']['spec']}) of "
                   f"{m['views']['images']:,} training images")
    for head_name, h in m.get("heads", {}).items():
        v = h.get("validation", {})
        figures = (f"val accuracy {v['accuracy']:.3f}, macro-F1 {v['macro_f1']:.3f}"
                   if "accuracy" in v else "no validation figures")
        click.echo(f"head     {head_name} ({h['kind']}): {figures}, trained in "
                   f"{h.get('train_seconds') or 0:.1f} s")

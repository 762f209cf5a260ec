"""Command-line interface: parse → call one library function → render.

No torch, faiss or file formats here; heavy modules are imported inside commands so that
``embedsearch --help`` stays instant.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from embedsearch import __version__
from embedsearch.classify import DEFAULT_SELECT_BY, SELECT_BY
from embedsearch.errors import EmbedsearchError

log = logging.getLogger("embedsearch")


class _Group(click.Group):
    """Maps EmbedsearchError to a one-paragraph message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EmbedsearchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"error: {exc.message}", fg="red", err=True)
            if exc.hint:
                click.echo(f"  hint: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            # Disk full, permissions, a vanished file: the environment, not a bug, so a
            # message rather than a traceback (--debug still shows it).
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            click.secho(f"error: {where}{exc.strerror or exc}", fg="red", err=True)
            click.echo("  hint: check free disk space and permissions; run with --debug for "
                       "the traceback", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedsearch")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--backend", type=click.Choice(["auto", "torch", "openvino", "onnxruntime"]),
              envvar="EMBEDSEARCH_BACKEND", default="auto", show_default=True,
              help="Runtime of the encoder's forward pass for every command; auto: the "
              "fastest installed (OpenVINO, then ONNX Runtime, else torch), checked against "
              "torch on a reference image.")
@click.option("--cache-dir", help="Shared embedding cache folder, used by every command so "
              "that no image is encoded twice (default: $EMBEDSEARCH_CACHE_DIR, else the user "
              "cache folder, ~/.cache/embedsearch on Linux; 'off' turns it off).")
@click.option("--cache-size", help="Size limit of the shared embedding cache, e.g. 2GB "
              "(default: $EMBEDSEARCH_CACHE_SIZE, else 4GB); least recently used vectors go.")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool, backend: str, cache_dir: str | None,
         cache_size: str | None) -> None:
    """Classify, search and de-duplicate image collections with a frozen pretrained encoder
    and a FAISS index."""
    ctx.obj = {"debug": debug, "quiet": quiet}
    if cache_dir is not None or cache_size is not None:
        import os

        from embedsearch.store.shared import ENV_DIR, ENV_SIZE, parse_size

        # Through the environment, so that worker processes (Ray) see the same store.
        if cache_dir is not None:
            os.environ[ENV_DIR] = cache_dir
        if cache_size is not None:
            parse_size(cache_size)  # a clear error now rather than at the first write
            os.environ[ENV_SIZE] = cache_size
    if backend != "auto":
        from embedsearch.encoders.backends import set_default_backend

        set_default_backend(backend)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not debug:
        # Hub clients log every retry; our own error message says what to do instead.
        for noisy in ("huggingface_hub", "timm", "root"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _progress_factory(ctx: click.Context, desc: str
                      ) -> Callable[[int, int], Callable[[int], None]] | None:
    if ctx.obj.get("quiet"):
        return None

    def start(total: int, done: int) -> Callable[[int], None]:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done, desc=desc, unit="img", file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.1)
        return bar.update

    return start


def _echo_encoder(identity: dict[str, Any]) -> None:
    click.echo(f"encoder  {identity['spec']} ({identity['dim']}-d, "
               f"{identity.get('precision', 'fp32')}, weights: {identity['weights']['source']})")


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


F = Callable[..., Any]


def device_option(f: F) -> F:
    """``--device``, shared by every command that encodes images."""
    return click.option(
        "--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N|mps",
        help="Where images are encoded: auto picks a CUDA GPU, else Apple's MPS, else the CPU. "
        "Not part of a bundle's identity: a bundle built on a GPU is queried on a CPU.")(f)


_BATCH_HELP = "Images per batch (default: 32 on CPU, 256 on CUDA)."


# -- models ---------------------------------------------------------------------------
@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per encoder.")
def models_cmd(as_json: bool) -> None:
    """List the encoders: spec, embedding dim, and where the weights come from."""
    from embedsearch.encoders import DEFAULT_ENCODER, entries

    for e in entries():
        spec = e.example if e.is_family and e.example else e.key
        if as_json:
            _echo_json({"spec": e.key, "example": e.example, "dim": e.dim,
                        "weights": e.weights, "description": e.description,
                        "default": e.key == DEFAULT_ENCODER})
        else:
            click.echo(f"{spec:42s} dim {e.dim:>15s}  {e.description}")
            click.echo(f"{'':42s} weights: {e.weights}")


# -- build-index ----------------------------------------------------------------------
@main.command("build-index")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--name", help="Bundle name under ./indexes/ (default: the folder's name).")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder (instead of --name).")
@click.option("--model", "-m", multiple=True, help="Encoder spec (see `embedsearch models`). "
              "Default: efficientnet-lite0, or the bundle's encoder when it exists. Repeat "
              "(SPEC or SPEC=WEIGHTS) to concatenate several encoders' embeddings.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
              help="Local weights file for the encoder (.safetensors or a tensor-only .pt).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Encoder arithmetic: fp32, or bf16 / fp16 autocast (bf16: faster on CPUs "
              "with AVX-512 BF16; fp16: on GPUs; vectors differ slightly, and the bundle is "
              "always queried at its precision). Default: fp32, or the bundle's.")
@click.option("--path-col", help="CSV/parquet column with image paths.")
@click.option("--label-col", help="CSV/parquet column with labels.")
@click.option("--split-col", help="CSV/parquet column with train/val/test splits.")
@click.option("--follow-symlinks", is_flag=True, help="Follow symlinks: to folders wherever "
              "they point (loops are refused), to files inside DATA.")
@click.option("--split-map", help="Name splits that are not recognised, e.g. "
              "holdout=test,extra=train (folder names or split-column values). Recognised "
              "without it: names with the words train, val/valid/dev, test (sample_train, "
              "val2017, …).")
@click.option("--skip-missing", is_flag=True, help="Build even if a CSV lists missing files.")
@click.option("--overwrite", is_flag=True, help="Re-encode everything, even with another encoder.")
@click.option("--index-type", type=click.Choice(["auto", "flat", "ivf", "ivfpq", "hnsw"]),
              default="auto", show_default=True,
              help="faiss index: exact flat; IVF (recall@10 measured and recorded); IVF-PQ "
              "(compressed); HNSW. auto: flat up to 200,000 images, then IVF, then IVF-PQ.")
@click.option("--batch-size", type=click.IntRange(min=1), help=_BATCH_HELP)
@click.option("--workers", type=int, help="Image decoding threads on CPU, processes on a GPU "
              "(default: one per core; on a GPU all cores but one).")
@device_option
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="Where images are encoded: this process, or a Ray "
              "cluster (needs the `ray` extra; same bundle).")
@click.option("--address", help="Ray cluster to join (HOST:PORT or ray://…); default: start a "
              "local Ray runtime. With --engine ray.")
@click.option("--num-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray encoder actors, each loading the encoder once. With --engine ray.")
@click.option("--worker-cpus", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="CPUs per Ray encoder actor.")
@click.option("--worker-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs per Ray encoder actor (0: encode on CPU).")
@click.option("--dedupe/--no-dedupe", default=None,
              help="Leave near-duplicates out of the index (recorded in the manifest; the "
              "choice sticks to the bundle). Default: as the bundle was built.")
@click.option("--dedupe-threshold", type=float, help="Near-duplicate cosine for --dedupe "
              "(default: calibrated on the collection, as dedupe does).")
@click.option("--dedupe-keep", type=click.Choice(["resolution", "filesize", "path", "oldest"]),
              help="Which image of a duplicate group --dedupe keeps (default: resolution).")
@click.option("--exclude", type=click.Path(path_type=Path, dir_okay=False),
              help="Leave out the images a reviewed list names (CSV with an id column, "
              "e.g. from `embedsearch audit`; rows with a decision column count only when "
              "it says exclude). Listed as skipped with reason 'excluded'.")
@click.option("--views", help="Also embed augmented views of the labelled training images "
              "for heads: flip and/or cropN, e.g. flip,crop2 (none: drop them). Sticks to "
              "the bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def build_index_cmd(ctx: click.Context, data: Path, name: str | None, out: Path | None,
                    model: tuple[str, ...], weights: Path | None, precision: str | None,
                    path_col: str | None,
                    label_col: str | None, split_col: str | None, follow_symlinks: bool,
                    split_map: str | None,
                    skip_missing: bool, overwrite: bool, index_type: str,
                    batch_size: int | None, workers: int | None, device: str, engine: str,
                    address: str | None,
                    num_workers: int, worker_cpus: float, worker_gpus: float,
                    dedupe: bool | None, dedupe_threshold: float | None,
                    dedupe_keep: str | None, exclude: Path | None, views: str | None,
                    as_json: bool) -> None:
    """Embed every image in DATA once and index it.

    DATA is a folder with one sub-folder per class (optionally below train/ val/ test/),
    an unlabelled folder, or a CSV/parquet of paths and labels. Re-running re-encodes only
    new or changed images; an interrupted run resumes.
    """
    from embedsearch.engines.ray_engine import RayOptions
    from embedsearch.pipeline import build_index

    ray_options = RayOptions(address=address, num_workers=num_workers,
                             batch_size=batch_size or RayOptions.batch_size,
                             num_cpus=worker_cpus, num_gpus=worker_gpus,
                             quiet=not ctx.obj.get("debug"))
    result = build_index(
        data, name=name, out=out, model=list(model) or None, weights=weights,
        precision=precision,
        path_col=path_col,
        label_col=label_col, split_col=split_col, follow_symlinks=follow_symlinks,
        skip_missing=skip_missing, split_map=split_map, overwrite=overwrite,
        index_type=index_type,
        batch_size=batch_size, num_workers=workers,
        progress=_progress_factory(ctx, "encoding"), engine=engine, ray_options=ray_options,
        dedupe=dedupe, dedupe_threshold=dedupe_threshold, dedupe_keep=dedupe_keep,
        exclude=exclude,
        views=views, device=device,
    )
    m = result.manifest
    if as_json:
        _echo_json(m)
        return
    click.echo(f"bundle   {result.path}")
    _echo_encoder(m["encoder"])
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


# -- predict --------------------------------------------------------------------------
def _collect_queries(inputs: tuple[str, ...]) -> tuple[list[Path], dict[str, str]]:
    """Expand files, folders (recursively) and '-' (paths on stdin) into query files."""
    from embedsearch.data.scan import scan_folder

    paths: list[Path] = []
    truth: dict[str, str] = {}
    for raw in inputs:
        if raw == "-":
            paths.extend(Path(line.strip()) for line in sys.stdin if line.strip())
            continue
        p = Path(raw)
        if p.is_dir():
            coll = scan_folder(p)
            for r in coll.records:
                paths.append(r.path)
                if r.label is not None:
                    truth[str(r.path)] = r.label
            for s in coll.skipped:
                click.echo(f"skipped {p / s.id}: {s.reason}", err=True)
        elif p.exists():
            paths.append(p)
        else:
            raise EmbedsearchError(f"{p}: no such file or folder")
    return paths, truth


@main.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--index", "index_name", required=True, help="Bundle name or path.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Neighbours that vote.")
@click.option("--neighbours", "-n", "n_neighbours", default=5, show_default=True,
              help="Neighbours to show per image.")
@click.option("--weighting", type=click.Choice(["similarity", "uniform"]),
              default="similarity", show_default=True, help="kNN vote weighting.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
              help="The encoder's weights file, if it moved since the build.")
@click.option("--batch-size", type=click.IntRange(min=1), help=_BATCH_HELP)
@click.option("--workers", type=int, help="Image decoding threads (default: one per core).")
@device_option
@click.option("--method", type=click.Choice(["auto", "knn", "head", "zeroshot", "all"]),
              default="auto", show_default=True,
              help="auto: the best available (a trained head that beat kNN on validation, "
              "else kNN, else zero-shot); all: every method side by side.")
@click.option("--head-name", help="Which trained head (default: the best on validation).")
@click.option("--classes", help="Zero-shot class names, comma-separated (default: the "
              "bundle's classes; needed for an unlabelled bundle).")
@click.option("--templates", "template_set", type=click.Choice(["photo", "art"]),
              help="Zero-shot prompt set (default photo).")
@click.option("--template", "templates", multiple=True,
              help="Custom zero-shot prompt with {} for the class name; repeatable.")
@click.option("--allow-self", is_flag=True, help="Let an indexed image be its own neighbour "
              "(similar-image search). By default a query that is an indexed image (same "
              "bytes, or cosine >= 0.9999) is left out of its own neighbours and votes.")
@click.option("--per-class", is_flag=True, help="With true labels: precision, recall, F1 and "
              "support per class.")
@click.option("--output", "-o", "output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write one row per image (id, true, predicted, confidence, method, per-method "
              "columns) to a .csv or .parquet file.")
@click.option("--confusion", type=click.Path(path_type=Path, dir_okay=False),
              help="With true labels: draw the confusion matrix of the chosen method (PNG).")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="Test-time augmentation: flip averages each image's embedding with its "
              "mirror image's (twice the encoding time).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one per image.")
@click.pass_context
def predict_cmd(ctx: click.Context, images: tuple[str, ...], index_name: str, k: int,
                n_neighbours: int, weighting: str, weights: Path | None,
                batch_size: int | None, workers: int | None, device: str, method: str,
                head_name: str | None, classes: str | None,
                template_set: str | None, templates: tuple[str, ...], allow_self: bool,
                per_class: bool, output: Path | None, confusion: Path | None, tta: str,
                as_json: bool) -> None:
    """Classify IMAGES (files, folders, or - for paths on stdin) with kNN, a trained head or
    CLIP zero-shot over an index.

    On an unlabelled index this is a similar-image search (or zero-shot with --classes on
    a CLIP index). When a folder has class sub-folders, their names are taken as true
    labels and accuracy, balanced accuracy and macro-F1 are printed (per method with
    --method all). A query that is an indexed image never votes for itself (--allow-self
    for search), and a head is not scored on images it was trained on.
    """
    from embedsearch.bundle import load_bundle
    from embedsearch.predict import Predictor

    bundle = load_bundle(index_name)
    bundle.device = device
    bundle.image_encoder(weights)
    predictor = Predictor(bundle)
    paths, truth = _collect_queries(images)
    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    prompt_templates = ([*([template_set] if template_set else []), *templates]
                        or None)
    preds = predictor.predict(paths, k=k, n_neighbours=n_neighbours, weighting=weighting,
                              batch_size=batch_size, num_workers=workers, method=method,
                              head_name=head_name, classes=class_list,
                              templates=prompt_templates, allow_self=allow_self, tta=tta)
    if method == "all" and not as_json:
        _print_side_by_side(preds, truth)
    else:
        _print_predictions(preds, truth, as_json)
    if not ctx.obj.get("quiet"):
        c = predictor.embed_counts
        click.echo(f"queries  {c['encoded']:,} encoded, {c['reused']:,} reused (same bytes in "
                   "the index or the shared embedding cache)", err=True)
    _print_evaluation(bundle, preds, truth, allow_self, per_class, output, confusion)


def _print_predictions(preds: list[Any], truth: dict[str, str], as_json: bool) -> None:
    for p in preds:
        true = truth.get(p.id)
        if as_json:
            _echo_json({**p.as_dict(), **({"true_label": true} if true is not None else {})})
        elif p.status != "ok":
            click.echo(f"{p.id}\tSKIPPED {p.status}: {p.detail}")
        else:
            neigh = ", ".join(f"{n['label'] or n['id']} {n['similarity']:.2f}"
                              for n in p.neighbours)
            head = f"{p.label} {p.confidence:.2f}" if p.label is not None else "search"
            mark = "" if true is None else ("  ok" if p.label == true else f"  (true: {true})")
            click.echo(f"{p.id}\t{head}{mark}\t[{neigh}]")
    bad = sum(p.status != "ok" for p in preds)
    summary = f"{len(preds)} images, {len(preds) - bad} predicted, {bad} unreadable"
    chosen = next((p.method for p in preds if p.method), None)
    if chosen:
        summary += f"; method {chosen}"
    click.echo(summary, err=True)


def _print_evaluation(bundle: Any, preds: list[Any], truth: dict[str, str], allow_self: bool,
                      per_class: bool, output: Path | None, confusion: Path | None) -> None:
    """Self-match counts, figures per method, and the requested files (on stderr, so
    stdout stays one line or JSON object per image)."""
    from embedsearch.report.predictions import (
        confusion_png,
        evaluate_predictions,
        predictions_frame,
        write_predictions,
    )

    ev = evaluate_predictions(preds, truth, bundle)
    if ev.in_index and not allow_self:
        click.echo(f"{ev.in_index} queries were in the index: excluded from their own votes",
                   err=True)
    elif ev.self_votes:
        click.echo(f"{ev.self_votes} queries are in the index and voted for themselves "
                   "(--allow-self): left out of the figures", err=True)
    for key, sc in ev.scores.items():
        f = sc.figures
        left = f" ({sc.left_out} {sc.why} left out)" if sc.left_out else ""
        if not f.get("n"):
            click.echo(f"{key:16s} no images to score{left}", err=True)
            continue
        click.echo(f"{key:16s} accuracy {f['accuracy']:.3f}  balanced accuracy "
                   f"{f['balanced_accuracy']:.3f}  macro-F1 {f['macro_f1']:.3f}  on {f['n']} "
                   f"images with true labels{left}  {sc.description}", err=True)
    # The chosen method's table and matrix, else the first method with images to score.
    scored = [sc for sc in ev.scores.values() if sc.figures.get("n")]
    shown = next((sc for sc in scored if sc.key == ev.chosen), scored[0] if scored else None)
    if per_class and shown is not None:
        width = max(len(c) for c in [*shown.labels, "class"])
        click.echo(f"per class ({shown.key}):", err=True)
        click.echo(f"  {'class':{width}s} {'precision':>9s} {'recall':>7s} {'F1':>6s} "
                   f"{'support':>8s} {'predicted':>9s}", err=True)
        for c, r in shown.figures["per_class"].items():
            click.echo(f"  {c:{width}s} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} "
                       f"{r['support']:8d} {r['predicted']:9d}", err=True)
    elif per_class:
        click.echo("per class: no images with true labels to score", err=True)
    if output is not None:
        path = write_predictions(predictions_frame(preds, truth), output)
        click.echo(f"predictions written to {path}", err=True)
    if confusion is not None:
        if shown is None:
            raise EmbedsearchError("--confusion needs images with true labels (class folders) "
                                   "that did not vote for themselves")
        png = confusion_png(shown, confusion, f"{bundle.name}: {shown.description}")
        click.echo(f"confusion matrix written to {png}", err=True)


def _print_side_by_side(preds: list[Any], truth: dict[str, str]) -> None:
    """--method all: one row per image, one 'label probability' column per method."""
    keys: list[str] = []
    for p in preds:
        keys.extend(k for k in p.methods if k not in keys)
    has_truth = any(p.id in truth for p in preds)
    rows = [["image", *(["true"] if has_truth else []), *keys]]
    for p in preds:
        cells = [p.id, *([truth.get(p.id, "")] if has_truth else [])]
        for k in keys:
            r = p.methods.get(k, {})
            if p.status != "ok":
                cells.append(f"SKIPPED {p.status}")
            elif r.get("label") is None:
                cells.append("error" if r.get("error") else "-")
            else:
                cells.append(f"{r['label']} {r['confidence']:.2f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    n_ok = sum(p.status == "ok" for p in preds)
    chosen = next((p.method for p in preds if p.method), None)
    click.echo(f"{len(preds)} images, {n_ok} predicted, {len(preds) - n_ok} unreadable"
               + (f"; best available: {chosen}" if chosen else ""), err=True)
    for k in keys:
        errors = [p.methods[k]["error"] for p in preds if p.methods.get(k, {}).get("error")]
        if errors:
            click.echo(f"  {k:16s} {errors[0]}", err=True)


# -- train ------------------------------------------------------------------------------
@main.command("train")
@click.option("--index", "index_name", required=True, help="Bundle name or path.")
@click.option("--head", "kind", type=click.Choice(["linear", "mlp", "auto"]), default="linear",
              show_default=True, help="linear: logistic regression; mlp: one hidden layer; "
              "auto: train both, keep the better on the --select-by metric.")
@click.option("--head-name", help="Name to save it under (default: the kind); several heads "
              "can live side by side.")
@click.option("--select-by", type=click.Choice(list(SELECT_BY)), default=DEFAULT_SELECT_BY,
              show_default=True, help="Metric every setting (C, epochs, class prior "
              "correction) and --head auto are chosen by, on validation.")
@click.option("--class-weight", type=click.Choice(["auto", "balanced", "none"]),
              default="auto", show_default=True,
              help="auto: search a post-hoc class-prior correction (0 = none … 1 = balanced) "
              "by --select-by; balanced: scikit-learn's balanced weights; none: neither.")
@click.option("--seed", default=0, show_default=True, help="Seed of splits and initialisation.")
@click.option("-C", "C", type=click.FloatRange(min=0, min_open=True),
              help="linear: fixed inverse regularisation strength, "
              "scikit-learn's C on standardised inputs (default: searched 0.003-0.3, "
              "extended at an edge).")
@click.option("--hidden", type=click.IntRange(min=1), help="mlp: hidden units (default 512).")
@click.option("--max-epochs", type=click.IntRange(min=1),
              help="mlp: length of the cosine schedule (default: "
              "about 600 optimizer steps, 15-40 epochs, doubled when the best is the last).")
@click.option("--no-refit", is_flag=True, help="Keep the train-only model instead of refitting "
              "on train + validation with the chosen setting.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(min=1),
              help="k of the kNN baseline shown beside it.")
@click.option("--views/--no-views", "use_views", default=True, show_default=True,
              help="Add the bundle's augmented views (build-index --views) as training rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
def train_cmd(index_name: str, kind: str, head_name: str | None, select_by: str,
              class_weight: str, seed: int, C: float | None, hidden: int | None,
              max_epochs: int | None, no_refit: bool, k: int, use_views: bool,
              as_json: bool) -> None:
    """Train a head on the bundle's cached embeddings (no image is re-encoded) and save it
    inside the bundle. Validation rows choose its settings; test rows are never used for
    training and are scored for the report only."""
    from embedsearch.bundle import load_bundle
    from embedsearch.training import fit_head

    params: dict[str, Any] = {"refit": not no_refit}
    for key, value in (("C", C), ("hidden", hidden), ("max_epochs", max_epochs)):
        if value is not None:
            if kind != "auto" and (key == "C") != (kind == "linear"):
                raise EmbedsearchError(f"--{key.lower().replace('_', '-')} does not apply to "
                                       f"a {kind} head")
            params[key] = value
    bundle = load_bundle(index_name)
    from embedsearch.views import bundle_views

    extra = bundle_views(bundle) if use_views else None
    res = fit_head(bundle, kind, name=head_name, class_weight=class_weight,
                   select_by=select_by, seed=seed, k=k, extra_train=extra, **params)
    if as_json:
        _echo_json(res.as_dict())
        return
    _echo_train(res, k, select_by)


def _echo_train(res: Any, k: int, select_by: str) -> None:
    """The ``train`` summary: what was chosen, by what, and each figure's protocol."""
    info = res.head.info
    sel, cw, trained = info["selection"], info["class_weight"], info["trained_on"]
    kind = res.head.kind
    click.echo(f"head      {res.name} ({kind}) saved in {res.path}")
    splits = [s for s in ("train", "val", "test") if s in res.counts]
    width = max(len(str(c)) for c in res.head.classes_)
    click.echo(f"classes   {len(res.head.classes_)}; images per class:")
    click.echo(f"  {'':{width}s}" + "".join(f"{s:>8s}" for s in splits))
    for c in res.head.classes_:
        click.echo(f"  {c:{width}s}" + "".join(f"{res.counts[s].get(str(c), 0):8d}"
                                               for s in splits))
    default = " (the default; --select-by to change)" if select_by == DEFAULT_SELECT_BY else ""
    click.echo(f"select    by validation {select_by}{default}, ties to the lower log loss, "
               f"on {sel['protocol']}")
    if res.choice:
        scores = ", ".join(f"{kd} {v:.3f}" for kd, v in res.choice["scores"].items())
        click.echo(f"head      kept {res.choice['chosen']} ({select_by}: {scores}; "
                   "linear on a tie)")
    n = list(res.counts["train"].values())
    ratio = f"largest class {max(n)} is {max(n) / max(min(n), 1):.1f}x the smallest {min(n)}"
    if cw["used"] == "prior correction":
        click.echo(f"classes   prior correction tau={sel['tau']:g} chosen from 0 (none) to 1 "
                   f"(~balanced) by {select_by} ({ratio})")
    else:
        click.echo(f"classes   weighting {cw['used']} ({ratio})")
    if kind == "linear":
        tried = sorted({g["C"] for g in sel["grid"]})
        click.echo(f"chose     C={sel['C']:g} (tried {', '.join(f'{c:g}' for c in tried)}; "
                   "scikit-learn's C on standardised inputs)")
    elif sel["best_epoch"] == 0:
        click.echo(f"chose     epoch 0: its linear base alone (C={sel['C']:g}); no epoch of the "
                   f"hidden layer's {sel['epochs']}-epoch schedule improved validation "
                   f"{select_by}")
    else:
        base = f" over its linear base (C={sel['C']:g})" if "C" in sel else ""
        click.echo(f"chose     epoch {sel['best_epoch']} of a {sel['epochs']}-epoch cosine "
                   f"schedule{base} (epoch 0 and the annealed second half searched)")
    for note in sel.get("notes", []):
        click.echo(f"edge      {note}")
    click.echo(f"refit     on {trained['rows']:,} rows"
               + (" (train + validation)" if trained.get("refit_on_train_and_val") else "")
               + (f", {trained['extra_rows']:,} extra views" if trained.get("extra_rows")
                  else ""))

    def figures(f: dict[str, Any]) -> str:
        return (f"accuracy {f['accuracy']:.3f}  balanced accuracy {f['balanced_accuracy']:.3f}"
                f"  macro-F1 {f['macro_f1']:.3f}") if f.get("n") else "n/a"

    if res.validation:
        click.echo(f"val       {figures(res.validation)}  ({res.validation['n']} images, "
                   f"{sel['protocol']}: models that never saw them)")
    if res.knn_validation:
        click.echo(f"  {k}-NN    {figures(res.knn_validation)}  "
                   f"({res.knn_validation['protocol']})")
    if res.test:
        click.echo(f"test      {figures(res.test)}  ({res.test['n']} held-out test images, "
                   "report only)")
        click.echo(f"  {k}-NN    {figures(res.knn_test)}  ({res.knn_test['protocol']})")
    if res.choice:
        each = " + ".join(f"{kd} {t:.1f} s" for kd, t in res.choice["seconds"].items())
        click.echo(f"took      {sum(res.choice['seconds'].values()):.1f} s to train ({each}), "
                   "selection included")
    else:
        click.echo(f"took      {res.seconds:.1f} s to train, selection included")


# -- finetune -------------------------------------------------------------------------
@main.command("finetune")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for weights.safetensors + finetune.json.")
@click.option("--model", "-m", help="Backbone: an encoder spec (default: the default encoder).")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
              help="Local weights file for the backbone.")
@click.option("--blocks", type=click.Choice(["last", "all"]), default="last", show_default=True,
              help="Train the last 2 stages (+ final conv) or the whole backbone.")
@click.option("--epochs", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--budget-minutes", type=float,
              help="Stop training after this much wall time (the schedule is fitted to it).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="cuda trains with bf16 autocast.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=3e-4, show_default=True, help="Backbone learning rate (head: 10x).")
@click.option("--seed", default=0, show_default=True)
@click.option("--path-col", help="CSV/parquet column with image paths.")
@click.option("--label-col", help="CSV/parquet column with labels.")
@click.option("--split-col", help="CSV/parquet column with train/val/test splits.")
@click.option("--json", "as_json", is_flag=True, help="Print finetune.json.")
def finetune_cmd(data: Path, out: Path, model: str | None, weights: Path | None, blocks: str,
                 epochs: int, budget_minutes: float | None, device: str, batch_size: int,
                 lr: float, seed: int, path_col: str | None, label_col: str | None,
                 split_col: str | None, as_json: bool) -> None:
    """Fine-tune the encoder's backbone with a linear classifier on DATA (train images
    train, val images pick the epoch, test images are scored): the trained-model baseline
    that frozen embeddings + a head are compared with."""
    from embedsearch.finetune import finetune

    res = finetune(data, out=out, model=model, weights=weights, blocks=blocks, epochs=epochs,
                   budget_minutes=budget_minutes, device=device, batch_size=batch_size, lr=lr,
                   seed=seed, path_col=path_col, label_col=label_col, split_col=split_col,
                   on_step=lambda msg: click.echo(msg, err=True))
    info = res.info
    if as_json:
        _echo_json(info)
        return
    s, tm, n = info["settings"], info["timings"], info["parameters"]
    click.echo(f"saved     {res.path}")
    click.echo(f"backbone  {info['base_encoder']['spec']}, blocks {s['blocks']} "
               f"({n['trainable']:,} of {n['total']:,} parameters trained), {s['device']}, "
               f"{s['precision']}")
    click.echo(f"trained   {info['epochs_run']:g} epochs ({info['steps']} steps, stopped by "
               f"{info['stopped_by']}), best epoch {info['best_epoch']} on validation")
    for h in info["history"]:
        click.echo(f"  epoch {h['epoch']}: loss {h['train_loss']:.3f}"
                   + (f", val accuracy {h['val_accuracy']:.3f}" if "val_accuracy" in h else ""))
    if res.test:
        t = res.test
        click.echo(f"test      accuracy {t['accuracy']:.3f}  balanced accuracy "
                   f"{t['balanced_accuracy']:.3f}  macro-F1 {t['macro_f1']:.3f}  "
                   f"({t['n']} images)")
    gpu = f", {tm['train_gpu_seconds']:.0f} GPU-s" if tm["train_gpu_seconds"] is not None else ""
    click.echo(f"cost      {tm['train_wall_seconds']:.0f} s wall, "
               f"{tm['train_cpu_seconds']:.0f} CPU-s{gpu}; "
               f"model {info['model_bytes'] / 1e6:.1f} MB")


# -- info -----------------------------------------------------------------------------
@main.command("info")
@click.argument("index_name")
@click.option("--json", "as_json", is_flag=True)
def info_cmd(index_name: str, as_json: bool) -> None:
    """Show a bundle's manifest (verifying its files)."""
    from embedsearch.bundle import load_bundle

    bundle = load_bundle(index_name)
    m = bundle.manifest
    if as_json:
        _echo_json(m)
        return
    click.echo(f"bundle   {bundle.path} (generation {m['generation']}, {m['created']})")
    _echo_encoder(m["encoder"])
    click.echo(f"source   {m['source']['path']}")
    click.echo(f"counts   {json.dumps(m['counts'])}")
    click.echo(f"index    {json.dumps(m['index'])}")
    if "views" in m:
        click.echo(f"views    {m['views']['rows']:,} ({m['views']['spec']}) of "
                   f"{m['views']['images']:,} training images")
    for name, h in m.get("heads", {}).items():
        v = h.get("validation", {})
        figures = (f"val accuracy {v['accuracy']:.3f}, macro-F1 {v['macro_f1']:.3f}"
                   if "accuracy" in v else "no validation figures")
        click.echo(f"head     {name} ({h['kind']}): {figures}, trained in "
                   f"{h.get('train_seconds') or 0:.1f} s")


# -- serve ----------------------------------------------------------------------------
@main.command("serve")
@click.option("--index", "index_name", required=True, help="Bundle name or path.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 exposes the index and its images to the "
              "network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("-k", default=10, show_default=True, type=click.IntRange(1, 100),
              help="Neighbours that vote.")
@click.option("--neighbours", "-n", "n_neighbours", default=12, show_default=True,
              type=click.IntRange(1, 100), help="Neighbours shown per query.")
@click.option("--max-upload-mb", default=10.0, show_default=True,
              type=click.FloatRange(0.01, 1024), help="Largest accepted upload.")
@click.option("--max-pixels", default=40_000_000, show_default=True,
              type=click.IntRange(1), help="Largest accepted image (width × height).")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
              help="The encoder's weights file, if it moved since the build.")
@device_option
@click.pass_context
def serve_cmd(ctx: click.Context, index_name: str, host: str, port: int, k: int,
              n_neighbours: int, max_upload_mb: float, max_pixels: int,
              weights: Path | None, device: str) -> None:
    """Serve an index: a web page and HTTP API to classify an image and browse its
    nearest neighbours (API docs at /docs)."""
    try:
        import uvicorn

        from embedsearch.serve import create_app
    except ImportError as exc:
        raise EmbedsearchError(f"serving needs FastAPI and uvicorn ({exc.name} is missing)",
                               hint='pip install -e ".[serve]"') from exc

    from embedsearch.bundle import load_bundle

    bundle = load_bundle(index_name)
    bundle.device = device
    app = create_app(bundle, k=k, n_neighbours=n_neighbours, weights=weights,
                     max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels)
    # Load the model before binding the port, so a broken bundle is a clear CLI error.
    app.state.service.load()
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {app.state.service.bundle.path} at http://{shown}:{port}/ "
               f"(API docs: http://{shown}:{port}/docs); Ctrl+C stops", err=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.secho(f"warning: listening on {host}: anyone who can reach this port can query "
                    "the index and view its images", fg="yellow", err=True)
    from embedsearch.serve.guard import server_config

    uvicorn.Server(server_config(app, host, port, log_level="debug" if ctx.obj.get("debug")
                                 else "info", access_log=not ctx.obj.get("quiet"))).run()


# -- benchmark ------------------------------------------------------------------------
def _parse_ks(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give comma-separated integers, e.g. 1,5,10") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter("k values must be positive integers")
    return ks


@main.command("benchmark")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--model", "-m", "models", multiple=True,
              help="Encoder spec, repeatable (several encoders in one study); SPEC=FILE "
              "gives a weights file. Default: efficientnet-lite0.")
@click.option("--weights", "weights", multiple=True, type=click.Path(path_type=Path,
              dir_okay=False), help="Weights file, repeatable, matched to --model by position.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Report folder (default: reports/<data folder name>).")
@click.option("--bundles", type=click.Path(path_type=Path),
              help="Where the index bundles go, reused by later runs (default: OUT/bundles).")
@click.option("--seed", default=0, show_default=True, help="Split, heads and bootstrap seed.")
@click.option("--k", "ks", default="1,5,10,20,50", show_default=True, callback=_parse_ks,
              help="kNN k values to sweep.")
@click.option("--cv-folds", type=click.IntRange(2, 50),
              help="k-fold cross-validation instead of one test split (small collections).")
@click.option("--no-dedupe", is_flag=True,
              help="Do not group duplicate images (they may then straddle splits).")
@click.option("--near-threshold", type=float,
              help="Cosine similarity above which two images count as near duplicates.")
@click.option("--no-heads", is_flag=True, help="Skip the trained heads.")
@click.option("--select-by", type=click.Choice(list(SELECT_BY)), default=DEFAULT_SELECT_BY,
              show_default=True, help="Metric the heads' settings are chosen by on validation.")
@click.option("--no-zero-shot", is_flag=True, help="Skip CLIP zero-shot.")
@click.option("--title", help="Report title.")
@click.option("--batch-size", type=click.IntRange(min=1), help=_BATCH_HELP)
@click.option("--workers", type=int, help="Image decoding threads (default: one per core).")
@device_option
@click.option("--path-col", help="CSV/parquet column with image paths.")
@click.option("--label-col", help="CSV/parquet column with labels.")
@click.option("--split-col", help="CSV/parquet column with train/val/test splits.")
@click.option("--exclude", type=click.Path(path_type=Path, dir_okay=False),
              help="Leave out the images a reviewed list names (as build-index --exclude).")
@click.option("--split-map", help="Name splits that are not recognised, e.g. holdout=test.")
@click.option("--views", help="Embed augmented views of the training images (e.g. "
              "flip,crop2) and add every head trained with them too.")
@click.option("--finetune", "do_finetune", is_flag=True,
              help="Also fine-tune the first encoder's backbone on the same splits (slow on "
              "CPU: give it --budget-minutes).")
@click.option("--finetune-blocks", type=click.Choice(["last", "all"]), default="last",
              show_default=True, help="What --finetune trains.")
@click.option("--finetune-epochs", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--budget-minutes", type=float, help="Wall-time budget of --finetune.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary rows as JSON lines.")
@click.pass_context
def benchmark_cmd(ctx: click.Context, data: Path, models: tuple[str, ...],
                  weights: tuple[Path, ...], out: Path | None, bundles: Path | None, seed: int,
                  ks: tuple[int, ...], cv_folds: int | None, no_dedupe: bool,
                  near_threshold: float | None, no_heads: bool, select_by: str,
                  no_zero_shot: bool, title: str | None, batch_size: int | None,
                  workers: int | None, device: str,
                  path_col: str | None, label_col: str | None, split_col: str | None,
                  split_map: str | None, exclude: Path | None, views: str | None, do_finetune: bool,
                  finetune_blocks: str, finetune_epochs: int,
                  budget_minutes: float | None, as_json: bool) -> None:
    """Benchmark kNN against trained heads (and CLIP zero-shot) on a labelled collection.

    Encodes DATA once per --model, then compares a majority baseline, a kNN k sweep (plain
    and similarity-weighted vote), linear and MLP heads and, for CLIP encoders, zero-shot,
    on the collection's own test split (else a seeded stratified split, or --cv-folds).
    Writes OUT/report.md, a self-contained OUT/report.html and OUT/results.json.
    """
    from embedsearch.report.study import DEFAULT_HEADS, run_benchmark

    def stage(msg: str) -> None:
        if not ctx.obj.get("quiet"):
            click.echo(msg, err=True)

    result = run_benchmark(
        data, list(models) or ["efficientnet-lite0"], weights=list(weights) or None, out=out,
        bundles=bundles, seed=seed, ks=ks, cv_folds=cv_folds, dedupe=not no_dedupe,
        near_duplicate_threshold=near_threshold, heads=() if no_heads else DEFAULT_HEADS,
        head_options={kind: {"select_by": select_by} for kind in DEFAULT_HEADS},
        zero_shot=not no_zero_shot, title=title, batch_size=batch_size,
        num_workers=workers, path_col=path_col, label_col=label_col, split_col=split_col,
        split_map=split_map, command=sys.argv, progress=_progress_factory(ctx, "encoding"),
        on_stage=stage,
        finetune={"blocks": finetune_blocks, "epochs": finetune_epochs,
                  "budget_minutes": budget_minutes, "device": device} if do_finetune else None,
        views=views, device=device, exclude=exclude)
    rows = result.rows()
    if as_json:
        for row in rows:
            _echo_json(row)
    else:
        for row in rows:
            lo, hi = row["accuracy_ci"]
            click.echo(f"{row['encoder'][:36]:36s} {row['method'][:34]:34s} "
                       f"acc {row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  "
                       f"bal {row['balanced_accuracy']:.3f}  F1 {row['macro_f1']:.3f}")
    click.echo(f"report   {result.markdown}", err=True)
    click.echo(f"         {result.html}", err=True)
    click.echo(f"         {result.json}", err=True)


# -- dedupe ---------------------------------------------------------------------------
def _dedupe_bundle_arg(ctx: click.Context, data: Path | None, index_name: str | None,
                       model: str | None, device: str = "auto") -> Any:
    """The bundle to deduplicate: --index NAME, or DATA embedded (or refreshed) first; with
    both, DATA reuses the vectors NAME holds for the same images."""
    from embedsearch.bundle import load_bundle

    if data is None and index_name is None:
        raise EmbedsearchError("give an image folder (or CSV) DATA, or --index NAME",
                               hint="embedsearch dedupe ./images   or   embedsearch dedupe "
                               "--index covers")
    if data is None:
        return load_bundle(index_name)
    from embedsearch.pipeline import build_index, share_bundle_vectors

    encoder: dict[str, Any] = {"model": model}
    if index_name is not None:
        source = load_bundle(index_name)
        share_bundle_vectors(source)
        encoder = _same_encoder(source, model)
    result = build_index(data, progress=_progress_factory(ctx, "encoding"), device=device,
                         **encoder)
    _echo_reuse(result)
    return load_bundle(result.path)


@main.command("dedupe")
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--index", "index_name", help="Use this bundle (name or path) instead of DATA; "
              "with DATA, DATA's images that it holds reuse its vectors.")
@click.option("--threshold", "-t", type=float,
              help="Cosine similarity at which two images are near-duplicates. Default: "
              "calibrated on the collection (above its look-alike background; the value "
              "and its evidence are printed). Check it with --sweep and the report.")
@click.option("--keep", type=click.Choice(["resolution", "filesize", "path", "oldest"]),
              default="resolution", show_default=True,
              help="Which image of a group to keep: largest resolution, largest file, first "
              "in path order, or oldest modification time.")
@click.option("--sweep", is_flag=True, help="Print pairs found, groups and precision proxies "
              "across thresholds and stop.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Report folder (default: reports/dedupe-<bundle name>).")
@click.option("--no-html", is_flag=True, help="Skip report.html (thumbnails).")
@click.option("--move-to", type=click.Path(path_type=Path),
              help="Move removed duplicates here, keeping relative paths; writes an undo "
              "manifest first (embedsearch dedupe-undo MANIFEST).")
@click.option("--copy-clean-to", type=click.Path(path_type=Path),
              help="Copy every image except removed duplicates here (see --link).")
@click.option("--link", type=click.Choice(["copy", "hardlink", "symlink"]), default="copy",
              show_default=True, help="How --copy-clean-to places files.")
@click.option("--delete", is_flag=True,
              help="Delete removed duplicates in place. Only with this flag is anything "
              "deleted; a log of every deleted file (sha256, kept copy) is written first.")
@click.option("--leakage", is_flag=True,
              help="Report duplicates across splits (train/val/test) instead.")
@click.option("--model", "-m", help="Encoder when DATA has to be embedded (default: the "
              "bundle's, else efficientnet-lite0).")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per group "
              "(members, kept, similarities, reasons), then the summary.")
@click.pass_context
def dedupe_cmd(ctx: click.Context, data: Path | None, index_name: str | None,
               threshold: float | None, keep: str, sweep: bool, out: Path | None,
               no_html: bool, move_to: Path | None, copy_clean_to: Path | None, link: str,
               delete: bool, leakage: bool, model: str | None, device: str,
               as_json: bool) -> None:
    """Find exact and near-duplicate images in DATA (or an index) and report them.

    Writes groups.csv/parquet, label_conflicts.csv and report.html (thumbnails side by
    side). By default nothing on disk changes: --move-to, --copy-clean-to or --delete act.
    """
    from embedsearch import dedupe as dd
    from embedsearch.dedupe.actions import check_action_args

    check_action_args(move_to, copy_clean_to, delete)
    bundle = _dedupe_bundle_arg(ctx, data, index_name, model, device)
    if leakage:
        t = dd.DEFAULT_THRESHOLD if threshold is None else threshold
        ctx.invoke(leakage_cmd, folders=(), index_names=(str(bundle.path),), between=None,
                   threshold=t, out=out, no_html=no_html, model=None, fail_on_leak=False,
                   device=device, as_json=as_json)
        return
    if sweep:
        table = dd.sweep_bundle(bundle, keep=keep)
        if as_json:
            for row in table.to_dict("records"):
                _echo_json(row)
            return
        chosen = table.attrs.get("calibrated")
        click.echo(f"{'threshold':>9s} {'pairs':>7s} {'hash ok':>7s} {'in-group':>8s} "
                   f"{'groups':>7s} {'removed':>8s} {'largest':>8s} {'conflicts':>9s}")
        for r in table.itertuples():
            mark = "  <- calibrated" if chosen is not None and abs(r.threshold - chosen) < 1e-9 \
                else ""
            click.echo(f"{r.threshold:9.3f} {r.pairs:7d} {r.hash_agrees:7.3f} "
                       f"{r.pair_precision_proxy:8.3f} {r.groups:7d} {r.removed:8d} "
                       f"{r.largest_group:8d} {r.label_conflict_groups:9d}{mark}")
        click.echo("pairs: image pairs at or above the threshold; hash ok: share of them the "
                   "perceptual hash also calls copies; in-group: share of the pairs whose two "
                   "images end up in one group (both precision proxies: they fall where "
                   "look-alikes start to pass)", err=True)
        return
    result = dd.dedupe_bundle(bundle, threshold=threshold, keep=keep)
    t = result.threshold
    out = out or Path("reports") / f"dedupe-{bundle.name}"
    files = dd.write_report(result, out, html_page=not no_html,
                            title=f"Duplicates in {bundle.name} (threshold {t:g})")
    action = None
    if move_to:
        action = dd.move_to(result, move_to)
    elif copy_clean_to:
        action = dd.copy_clean_to(result, copy_clean_to, mode=link)
    elif delete:
        action = dd.delete_in_place(result, out)
    s = result.summary()
    calibration = result.extra.get("calibration")
    if as_json:
        for group in dd.groups_as_records(result):
            _echo_json(group)
        _echo_json({"summary": s, "files": {k: str(v) for k, v in files.items()},
                    "action": action.summary() if action else None})
        return
    click.echo(f"bundle     {bundle.path} ({s['images']:,} images, "
               f"{bundle.encoder_identity.get('spec')})")
    if calibration:
        from embedsearch.dedupe.calibrate import Calibration

        click.echo(f"threshold  {Calibration(t, calibration).describe()}; keep {keep} "
                   "(override: --threshold)")
    else:
        click.echo(f"threshold  {t:g} (given), keep {keep}")
    if s.get("links_by_hash") or s.get("links_by_rotation") or s.get("links_by_margin"):
        click.echo(f"second     pairs below the threshold linked by the perceptual hash "
                   f"{s['links_by_hash']:,} (greyscale, resized, mirrored copies), as rotated "
                   f"copies {s['links_by_rotation']:,}, as lone matches "
                   f"{s['links_by_margin']:,} (crops)")
    if s.get("skipped") or s.get("not_indexed"):
        click.echo(f"not read   {s.get('not_indexed', 0):,} undecodable, "
                   f"{s.get('skipped', 0):,} skipped files: see the bundle's failures table "
                   "(embedsearch info)")
    click.echo(f"groups     {s['groups']:,}; {s['removed']:,} duplicates to remove "
               f"({s['removed_exact']:,} exact, {s['removed_near']:,} near); largest group "
               f"{s['largest_group']}")
    if s["label_conflict_groups"]:
        click.echo(f"conflicts  {s['label_conflict_groups']:,} groups hold images with "
                   f"different labels (label noise): {files['label_conflicts']}")
    click.echo(f"report     {files.get('html', files['groups_csv'])}")
    if "html" in files:  # with --no-html, groups.csv is the report line itself
        click.echo(f"           {files['groups_csv']}")
    if action is None:
        click.echo("action     none (report only). To act: --move-to DIR (undoable), "
                   "--copy-clean-to DIR, or --delete")
    else:
        a = action.summary()
        click.echo(f"action     {a['action']}: {a['done']:,} files, {a['skipped']:,} skipped; "
                   f"log {a['log']}")
        for ex in a["skipped_examples"]:
            click.echo(f"  skipped {ex}", err=True)
        if action.action == "move":
            click.echo(f"undo       embedsearch dedupe-undo {a['log']}")


@main.command("dedupe-undo")
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def dedupe_undo_cmd(manifest: Path, as_json: bool) -> None:
    """Move the files of a `dedupe --move-to` back (MANIFEST: the undo JSON it wrote)."""
    from embedsearch.dedupe import undo

    report = undo(manifest)
    if as_json:
        _echo_json(report.summary())
        return
    click.echo(f"restored {len(report.done):,} files; {len(report.skipped):,} skipped")
    for item_id, why in report.skipped[:20]:
        click.echo(f"  skipped {item_id}: {why}", err=True)


def _same_encoder(bundle: Any, model: str | None) -> dict[str, Any]:
    """build_index arguments for the bundle's encoder (spec, weights file, precision), so
    that a folder compared with it is embedded alike (and reuses its vectors)."""
    if model:
        return {"model": model}
    ident = bundle.encoder_identity
    w = ident.get("weights", {})
    return {"model": ident["spec"], "precision": ident.get("precision", "fp32"),
            "weights": w.get("path") if w.get("source") == "file" else None}


def _folder_bundle(ctx: click.Context, folder: Path, encoder: dict[str, Any]) -> Any:
    """A folder's own bundle, saying how many images had to be encoded."""
    from embedsearch.dedupe import folder_bundle

    bundle, res = folder_bundle(folder, progress=_progress_factory(ctx, "encoding"), **encoder)
    _echo_reuse(res)
    return bundle


def _echo_reuse(res: Any) -> None:
    if click.get_current_context().obj.get("quiet"):
        return
    click.echo(f"{res.path}: encoded {res.encoded:,} images, reused {res.reused:,}"
               + (f" ({res.from_shared:,} from the shared embedding cache)"
                  if res.from_shared else ""), err=True)


@main.command("leakage")
@click.argument("folders", nargs=-1, type=click.Path(path_type=Path, file_okay=False))
@click.option("--index", "index_names", multiple=True,
              help="A bundle with splits (train/ val/ test/ folders or a split column); with "
              "one folder, or given twice, one side each (its vectors are reused).")
@click.option("--between", help="Two splits to compare, e.g. train,test "
              "(default: every two splits).")
@click.option("--threshold", "-t", type=float,
              help="Default: calibrated on both sides together, as dedupe does.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Report folder (default: reports/leakage-<name>).")
@click.option("--no-html", is_flag=True)
@click.option("--model", "-m", help="Encoder when folders have to be embedded.")
@device_option
@click.option("--fail-on-leak", is_flag=True, help="Exit with status 1 when a pair is found.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one per pair.")
@click.pass_context
def leakage_cmd(ctx: click.Context, folders: tuple[Path, ...], index_names: tuple[str, ...],
                between: str | None, threshold: float | None, out: Path | None,
                no_html: bool, model: str | None, device: str, fail_on_leak: bool,
                as_json: bool) -> None:
    """Duplicates that sit on both sides of a train/test split.

    Two sides: two folders (TRAIN_DIR TEST_DIR), a folder and --index NAME, or --index A
    --index B; a folder is embedded into a bundle of its own (images any command already
    encoded are not encoded again). Or one --index NAME built with splits.
    """
    from embedsearch import dedupe as dd
    from embedsearch.bundle import load_bundle

    t = threshold
    if len(index_names) == 1 and not folders:
        bundle = load_bundle(index_names[0])
        pairs = dd.leakage_bundle(bundle, threshold=t, between=between)
        roots: tuple[Path, Path] = (dd.items_root(bundle), dd.items_root(bundle))
        name = bundle.name
    elif len(folders) + len(index_names) == 2:
        from embedsearch.pipeline import share_bundle_vectors

        sides = [load_bundle(n) for n in index_names]
        for side in sides:  # a folder's images that the index holds are not encoded again
            share_bundle_vectors(side)
        encoder = _same_encoder(sides[0], model) if sides else {"model": model}
        sides += [_folder_bundle(ctx, f, {**encoder, "device": device}) for f in folders]
        pairs = dd.leakage_bundles(sides[0], sides[1], threshold=t,
                                   names=(sides[0].name, sides[1].name) if index_names
                                   else (folders[0].name, folders[1].name))
        roots = (dd.items_root(sides[0]), dd.items_root(sides[1]))
        name = "-".join(Path(str(s.manifest["source"]["path"])).name for s in sides)
    else:
        raise EmbedsearchError("give two sides (TRAIN_DIR TEST_DIR, a folder and --index "
                               "NAME, or --index A --index B) or one --index NAME with splits",
                               hint="embedsearch leakage data/train data/test")
    files = dd.write_leakage(pairs, out or Path("reports") / f"leakage-{name}", *roots,
                             html_page=not no_html)
    if as_json:
        for row in pairs.to_dict("records"):
            _echo_json(row)
    else:
        for r in pairs.head(50).itertuples():
            click.echo(f"{r.similarity:.3f}{' exact' if r.exact else '      '}  "
                       f"{r.split_a}:{r.id_a}  <->  {r.split_b}:{r.id_b}")
        if len(pairs) > 50:
            click.echo(f"… {len(pairs) - 50} more in {files['leakage_csv']}")
    n_exact = int(pairs["exact"].sum()) if len(pairs) else 0
    from embedsearch.dedupe.calibrate import Calibration

    chosen = pairs.attrs["threshold"]
    how = "given" if threshold is not None else Calibration(chosen, pairs.attrs[
        "calibration"]).describe().partition(", ")[2]
    click.echo(f"{len(pairs)} duplicate pairs across splits ({n_exact} byte-identical) at "
               f"threshold {chosen:.3f} ({how}; override: --threshold); "
               f"{files['leakage_csv']}", err=True)
    if fail_on_leak and len(pairs):
        ctx.exit(1)


# -- audit ----------------------------------------------------------------------------
def _issue_list(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    from embedsearch.audit.core import ISSUE_TYPES

    chosen = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in chosen if v not in ISSUE_TYPES]
    if bad or not chosen:
        raise click.BadParameter(f"{', '.join(bad) or value!r}: choose from "
                                 f"{', '.join(ISSUE_TYPES)}")
    return chosen


@main.command("audit")
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--index", "index_name", help="Audit this bundle (name or path) instead of DATA.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Report folder (default: reports/audit-<bundle name>).")
@click.option("--no-html", is_flag=True, help="Skip report.html (thumbnails).")
@click.option("--relabel-csv", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the likely label errors with their suggested labels as a CSV to "
              "review (fill in its decision column; pass it to build-index --exclude).")
@click.option("--quarantine-to", type=click.Path(path_type=Path),
              help="Move the flagged images here, keeping relative paths (never deletes); "
              "undo with embedsearch dedupe-undo MANIFEST.")
@click.option("--quarantine-issues", default="outlier,spurious,duplicate", show_default=True,
              callback=_issue_list, help="Which issue types --quarantine-to moves "
              "(label, outlier, spurious, duplicate, conflict, leak).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2, 50),
              help="Folds of the out-of-fold linear head.")
@click.option("-k", default=20, show_default=True, type=click.IntRange(1, 200),
              help="Neighbours that vote on each image's label.")
@click.option("--dup-threshold", type=float,
              help="Near-duplicate cosine (default: the dedupe default, 0.90).")
@click.option("--seed", default=0, show_default=True)
@click.option("--model", "-m", help="Encoder when DATA has to be embedded (default: the "
              "bundle's, else efficientnet-lite0).")
@click.option("--json", "as_json", is_flag=True,
              help="JSON lines, one per flagged image (with --all: every image).")
@click.option("--all", "all_rows", is_flag=True, help="With --json: every image.")
@click.pass_context
def audit_cmd(ctx: click.Context, data: Path | None, index_name: str | None, out: Path | None,
              no_html: bool, relabel_csv: Path | None, quarantine_to: Path | None,
              quarantine_issues: tuple[str, ...], folds: int, k: int,
              dup_threshold: float | None, seed: int, model: str | None, as_json: bool,
              all_rows: bool) -> None:
    """Find what is wrong with a labelled collection before anyone trains on it.

    From cached embeddings (DATA is embedded first, re-encoding only what is new) and
    pixel statistics stored at decode time: likely label errors with suggested labels,
    outliers / off-topic images, low-information images (flat colour, noise, one texture,
    text only, dark, bright, blurry, tiny, extreme aspect), duplicates, label conflicts,
    cross-split leakage and class imbalance. Writes issues.csv/.parquet (one row per image,
    a score column per issue type), summary.json and report.html. Nothing on disk changes
    unless --quarantine-to is given.
    """
    from embedsearch.audit import audit, quarantine, write_audit, write_relabel_csv
    from embedsearch.audit.report import json_records, summary_lines

    result = audit(data, index=index_name, model=model,
                   progress=_progress_factory(ctx, "encoding"), folds=folds, k=k,
                   dup_threshold=dup_threshold, seed=seed)
    out = out or Path("reports") / f"audit-{result.name}"
    files = write_audit(result, out, html_page=not no_html)
    relabel = write_relabel_csv(result, relabel_csv) if relabel_csv else None
    action = quarantine(result, quarantine_to, quarantine_issues) if quarantine_to else None
    if as_json:
        for rec in json_records(result, all_rows):
            _echo_json(rec)
    else:
        s = result.summary
        click.echo(f"bundle   {result.extra['bundle']} ({s['images']:,} images, "
                   f"{s['labelled']:,} labelled, {result.extra['encoder']})")
        for line in summary_lines(result):
            click.echo(line)
    click.echo(f"report   {files.get('html', files['issues_csv'])}", err=True)
    click.echo(f"         {files['issues_csv']}", err=True)
    if relabel:
        click.echo(f"relabel  {relabel} (fill in the decision column)", err=True)
    if action is not None:
        a = action.summary()
        click.echo(f"moved    {a['done']:,} files to {quarantine_to}, {a['skipped']:,} "
                   f"skipped; undo: embedsearch dedupe-undo {a['log']}", err=True)
        for ex in a["skipped_examples"]:
            click.echo(f"  skipped {ex}", err=True)


if __name__ == "__main__":
    main()

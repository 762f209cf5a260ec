"""Duplicate commands: ``dedupe``, ``dedupe-undo`` and ``leakage``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from embedsearch.cli.options import (
    command,
    deprecation_note,
    device_option,
    dup_threshold_option,
    index_option,
    json_option,
    model_option,
    no_html_option,
    out_option,
)
from embedsearch.cli.output import echo_json, echo_reuse, progress_factory
from embedsearch.dedupe import KEEP_POLICIES
from embedsearch.errors import EmbedsearchError

_FOLDER_MODEL = "Used when DATA has to be embedded (default: the bundle's, else " \
    "efficientnet-lite0)."


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

    bundle, res = folder_bundle(folder, progress=progress_factory(ctx, "encoding"), **encoder)
    echo_reuse(res)
    return bundle


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
    result = build_index(data, progress=progress_factory(ctx, "encoding"), device=device,
                         **encoder)
    echo_reuse(result)
    return load_bundle(result.path)


@command("dedupe", renamed={"--threshold": "--dup-threshold"})
@click.argument("data", required=False, type=click.Path(path_type=Path))
@index_option(extra="Used instead of DATA; with DATA, DATA's images that it holds reuse its "
              "vectors.")
@dup_threshold_option("calibrated on the collection (above its look-alike background; the "
                      "value and its evidence are printed). Check it with --sweep and the "
                      "report")
@click.option("--keep", type=click.Choice(list(KEEP_POLICIES)),
              default="resolution", show_default=True,
              help="Which image of a group to keep: largest resolution, largest file, first "
              "in path order, or oldest modification time.")
@click.option("--sweep", is_flag=True, help="Print pairs found, groups and precision proxies "
              "across thresholds and stop.")
@out_option("Report folder (default: reports/dedupe-<bundle name>).")
@no_html_option
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
@click.option("--leakage", is_flag=True, hidden=True,
              help="Deprecated: use the leakage command (duplicates across splits).")
@model_option(_FOLDER_MODEL)
@device_option
@json_option("one per duplicate group (members, kept, similarities, reasons), then one "
             "summary record (summary, files, action); with --sweep one per threshold")
@click.pass_context
def dedupe_cmd(ctx: click.Context, data: Path | None, index_name: str | None,
               dup_threshold: float | None, keep: str, sweep: bool, out: Path | None,
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
        deprecation_note("dedupe --leakage", "embedsearch leakage --index NAME")
        ctx.invoke(leakage_cmd, folders=(), index_names=(str(bundle.path),), between=None,
                   dup_threshold=dup_threshold, out=out, no_html=no_html, model=None,
                   fail_on_leak=False, device=device, as_json=as_json)
        return
    if sweep:
        table = dd.sweep_bundle(bundle, keep=keep)
        if as_json:
            for row in table.to_dict("records"):
                echo_json(row)
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
    result = dd.dedupe_bundle(bundle, threshold=dup_threshold, keep=keep)
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
            echo_json(group)
        echo_json({"summary": s, "files": {k: str(v) for k, v in files.items()},
                    "action": action.summary() if action else None})
        return
    click.echo(f"bundle     {bundle.path} ({s['images']:,} images, "
               f"{bundle.encoder_identity.get('spec')})")
    if calibration:
        from embedsearch.dedupe.calibrate import Calibration

        click.echo(f"threshold  {Calibration(t, calibration).describe()}; keep {keep} "
                   "(override: --dup-threshold)")
    else:
        click.echo(f"threshold  {t:g} (given), keep {keep}")
    if s.get("links_by_hash") or s.get("links_by_rotation") or s.get("links_by_margin") \
            or s.get("links_by_geometry"):
        geo = result.extra.get("geometry") or {}
        click.echo(f"second     pairs below the threshold linked by the perceptual hash "
                   f"{s['links_by_hash']:,} (greyscale, resized, mirrored copies), as rotated "
                   f"copies {s['links_by_rotation']:,}, as lone matches "
                   f"{s['links_by_margin']:,} (crops), by local features "
                   f"{s.get('links_by_geometry', 0):,} of {geo.get('checked', 0):,} pairs "
                   "checked (crops, rotations)")
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


@command("dedupe-undo")
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@json_option("the undo summary (one record: files restored and skipped)")
def dedupe_undo_cmd(manifest: Path, as_json: bool) -> None:
    """Move the files of a `dedupe --move-to` back (MANIFEST: the undo JSON it wrote)."""
    from embedsearch.dedupe import undo

    report = undo(manifest)
    if as_json:
        echo_json(report.summary())
        return
    click.echo(f"restored {len(report.done):,} files; {len(report.skipped):,} skipped")
    for item_id, why in report.skipped[:20]:
        click.echo(f"  skipped {item_id}: {why}", err=True)


@command("leakage", renamed={"--threshold": "--dup-threshold"})
@click.argument("folders", nargs=-1, type=click.Path(path_type=Path, file_okay=False))
@index_option(multiple=True, extra="One with splits (train/ val/ test/ folders or a split "
              "column); with one folder, or given twice, one side each (its vectors are "
              "reused).")
@click.option("--between", help="Two splits to compare, e.g. train,test "
              "(default: every two splits).")
@dup_threshold_option("calibrated on both sides together, as dedupe does")
@out_option("Report folder (default: reports/leakage-<name>).")
@no_html_option
@model_option("Used when folders have to be embedded.")
@device_option
@click.option("--fail-on-leak", is_flag=True, help="Exit with status 1 when a pair is found.")
@json_option("one per duplicate pair across splits (similarity, exact, both ids and splits)")
@click.pass_context
def leakage_cmd(ctx: click.Context, folders: tuple[Path, ...], index_names: tuple[str, ...],
                between: str | None, dup_threshold: float | None, out: Path | None,
                no_html: bool, model: str | None, device: str, fail_on_leak: bool,
                as_json: bool) -> None:
    """Duplicates that sit on both sides of a train/test split.

    Two sides: two folders (TRAIN_DIR TEST_DIR), a folder and --index NAME, or --index A
    --index B; a folder is embedded into a bundle of its own (images any command already
    encoded are not encoded again). Or one --index NAME built with splits.
    """
    from embedsearch import dedupe as dd
    from embedsearch.bundle import load_bundle

    t = dup_threshold
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
            echo_json(row)
    else:
        for r in pairs.head(50).itertuples():
            click.echo(f"{r.similarity:.3f}{' exact' if r.exact else '      '}  "
                       f"{r.split_a}:{r.id_a}  <->  {r.split_b}:{r.id_b}")
        if len(pairs) > 50:
            click.echo(f"… {len(pairs) - 50} more in {files['leakage_csv']}")
    n_exact = int(pairs["exact"].sum()) if len(pairs) else 0
    from embedsearch.dedupe.calibrate import Calibration

    chosen = pairs.attrs["threshold"]
    how = "given" if dup_threshold is not None else Calibration(chosen, pairs.attrs[
        "calibration"]).describe().partition(", ")[2]
    click.echo(f"{len(pairs)} duplicate pairs across splits ({n_exact} byte-identical) at "
               f"threshold {chosen:.3f} ({how}; override: --dup-threshold); "
               f"{files['leakage_csv']}", err=True)
    if fail_on_leak and len(pairs):
        ctx.exit(1)

"""``predict``: classify or search query images over an index."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from embedsearch.cli.options import (
    batch_size_option,
    command,
    device_option,
    encoder_weights_option,
    index_option,
    json_option,
    k_option,
    neighbours_option,
    workers_option,
)
from embedsearch.cli.output import echo_json
from embedsearch.errors import EmbedsearchError


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


@command("predict")
@click.argument("images", nargs=-1, required=True)
@index_option(required=True)
@k_option(10)
@neighbours_option(5)
@click.option("--weighting", type=click.Choice(["similarity", "uniform"]),
              default="similarity", show_default=True, help="kNN vote weighting.")
@encoder_weights_option("Only if it moved since the build.")
@batch_size_option
@workers_option
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
@json_option("one per query image (id, status, label, confidence, method, neighbours, "
             "per-method results; true_label when its folder names it)")
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
            echo_json({**p.as_dict(), **({"true_label": true} if true is not None else {})})
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

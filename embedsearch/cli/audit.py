"""``audit``: what is wrong with a labelled collection before anyone trains on it."""

from __future__ import annotations

from pathlib import Path

import click

from embedsearch.cli.options import (
    command,
    dup_threshold_option,
    index_option,
    json_option,
    k_option,
    model_option,
    no_html_option,
    out_option,
    seed_option,
)
from embedsearch.cli.output import echo_json, progress_factory


def _issue_list(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    from embedsearch.audit.core import ISSUE_TYPES

    chosen = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in chosen if v not in ISSUE_TYPES]
    if bad or not chosen:
        raise click.BadParameter(f"{', '.join(bad) or value!r}: choose from "
                                 f"{', '.join(ISSUE_TYPES)}")
    return chosen



@command("audit")
@click.argument("data", required=False, type=click.Path(path_type=Path))
@index_option(extra="Audited instead of DATA.")
@out_option("Report folder (default: reports/audit-<bundle name>).")
@no_html_option
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
@k_option(20, max_k=200, what="Neighbours that vote on each image's label (kNN k).")
@dup_threshold_option("calibrated on the collection, as dedupe does (the value and its "
                      "evidence are printed)")
@seed_option("the folds and the head")
@model_option("Used when DATA has to be embedded (default: the bundle's, else "
              "efficientnet-lite0).")
@json_option("one per flagged image (with --all: every image): id, label, issues and their "
             "scores, suggested label")
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
                   progress=progress_factory(ctx, "encoding"), folds=folds, k=k,
                   dup_threshold=dup_threshold, seed=seed)
    out = out or Path("reports") / f"audit-{result.name}"
    files = write_audit(result, out, html_page=not no_html)
    relabel = write_relabel_csv(result, relabel_csv) if relabel_csv else None
    action = quarantine(result, quarantine_to, quarantine_issues) if quarantine_to else None
    if as_json:
        for rec in json_records(result, all_rows):
            echo_json(rec)
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

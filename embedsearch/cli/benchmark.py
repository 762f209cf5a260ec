"""``benchmark``: kNN against trained heads (and zero-shot) on a labelled collection."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from embedsearch.cli.options import (
    batch_size_option,
    command,
    device_option,
    dup_threshold_option,
    exclude_option,
    json_option,
    k_sweep_option,
    model_option,
    out_option,
    seed_option,
    select_by_option,
    split_map_option,
    table_columns_options,
    workers_option,
)
from embedsearch.cli.output import echo_json, progress_factory


@command("benchmark", renamed={"--near-threshold": "--dup-threshold",
                               "--no-dedupe": "--no-group-duplicates"})
@click.argument("data", type=click.Path(path_type=Path))
@model_option("Repeatable (several encoders in one study); SPEC=FILE gives a weights file; "
              "A+B the concatenation of A's and B's embeddings (e.g. "
              "efficientnet-lite0+efficientnet-lite2). Default: efficientnet-lite0.",
              multiple=True, dest="models")
@click.option("--weights", "weights", multiple=True, type=click.Path(path_type=Path,
              dir_okay=False), help="Local weights file of an encoder, repeatable, matched to "
              "--model by position.")
@out_option("Report folder (default: reports/<data folder name>).")
@click.option("--bundles", type=click.Path(path_type=Path),
              help="Where the index bundles go, reused by later runs (default: OUT/bundles).")
@seed_option("the split, the heads and the bootstrap")
@k_sweep_option()
@click.option("--cv-folds", type=click.IntRange(2, 50),
              help="k-fold cross-validation instead of one test split (small collections).")
@click.option("--group-duplicates/--no-group-duplicates", default=True, show_default=True,
              help="Keep exact and near-duplicate images together on one side of every split "
              "(without it, copies may straddle train and test and inflate the figures).")
@dup_threshold_option("calibrated on the collection as dedupe does, raised when the "
                      "encoder chains look-alikes into implausibly large groups")
@click.option("--no-heads", is_flag=True, help="Skip the trained heads.")
@select_by_option("the heads' settings are")
@click.option("--no-zero-shot", is_flag=True, help="Skip CLIP zero-shot.")
@click.option("--title", help="Report title.")
@batch_size_option
@workers_option
@device_option
@table_columns_options
@exclude_option
@split_map_option
@click.option("--views", help="Embed augmented views of the training images (e.g. "
              "flip,crop2) and add every head trained with them too.")
@click.option("--finetune", "do_finetune", is_flag=True,
              help="Also fine-tune the first encoder's backbone on the same splits (slow on "
              "CPU: give it --budget-minutes).")
@click.option("--finetune-blocks", type=click.Choice(["last", "all"]), default="last",
              show_default=True, help="What --finetune trains.")
@click.option("--finetune-epochs", default=4, show_default=True, type=click.IntRange(min=1),
              help="Epochs of --finetune.")
@click.option("--budget-minutes", type=float, help="Wall-time budget of --finetune.")
@json_option("one per encoder and method (the summary table's rows: accuracy with its "
             "confidence interval, balanced accuracy, macro-F1)")
@click.pass_context
def benchmark_cmd(ctx: click.Context, data: Path, models: tuple[str, ...],
                  weights: tuple[Path, ...], out: Path | None, bundles: Path | None, seed: int,
                  ks: tuple[int, ...], cv_folds: int | None, group_duplicates: bool,
                  dup_threshold: float | None, no_heads: bool, select_by: str,
                  no_zero_shot: bool, title: str | None, batch_size: int | None,
                  workers: int | None, device: str,
                  path_col: str | None, label_col: str | None, split_col: str | None,
                  exclude: Path | None, split_map: str | None, views: str | None,
                  do_finetune: bool, finetune_blocks: str, finetune_epochs: int,
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
        bundles=bundles, seed=seed, ks=ks, cv_folds=cv_folds, dedupe=group_duplicates,
        near_duplicate_threshold=dup_threshold, heads=() if no_heads else DEFAULT_HEADS,
        head_options={kind: {"select_by": select_by} for kind in DEFAULT_HEADS},
        zero_shot=not no_zero_shot, title=title, batch_size=batch_size,
        num_workers=workers, path_col=path_col, label_col=label_col, split_col=split_col,
        split_map=split_map, command=sys.argv, progress=progress_factory(ctx, "encoding"),
        on_stage=stage,
        finetune={"blocks": finetune_blocks, "epochs": finetune_epochs,
                  "budget_minutes": budget_minutes, "device": device} if do_finetune else None,
        views=views, device=device, exclude=exclude)
    rows = result.rows()
    if as_json:
        for row in rows:
            echo_json(row)
    else:
        for row in rows:
            lo, hi = row["accuracy_ci"]
            click.echo(f"{row['encoder'][:36]:36s} {row['method'][:34]:34s} "
                       f"acc {row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  "
                       f"bal {row['balanced_accuracy']:.3f}  F1 {row['macro_f1']:.3f}")
    click.echo(f"report   {result.markdown}", err=True)
    click.echo(f"         {result.html}", err=True)
    click.echo(f"         {result.json}", err=True)

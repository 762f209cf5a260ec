"""Training commands: ``train`` (a head on cached embeddings) and ``finetune`` (the
backbone, the baseline heads are compared with)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from embedsearch.classify import DEFAULT_SELECT_BY
from embedsearch.cli.options import (
    command,
    encoder_weights_option,
    index_option,
    json_option,
    k_option,
    model_option,
    seed_option,
    select_by_option,
    table_columns_options,
)
from embedsearch.cli.output import echo_json
from embedsearch.errors import EmbedsearchError


@command("train")
@index_option(required=True)
@click.option("--head", "kind", type=click.Choice(["linear", "mlp", "auto"]), default="linear",
              show_default=True, help="linear: logistic regression; mlp: one hidden layer; "
              "auto: train both, keep the better on the --select-by metric.")
@click.option("--head-name", help="Name to save it under (default: the kind); several heads "
              "can live side by side.")
@select_by_option("every setting (C, epochs, class prior correction) and --head auto are")
@click.option("--class-weight", type=click.Choice(["auto", "balanced", "none"]),
              default="auto", show_default=True,
              help="auto: search a post-hoc class-prior correction (0 = none … 1 = balanced) "
              "by --select-by; balanced: scikit-learn's balanced weights; none: neither.")
@seed_option("splits and initialisation")
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
@k_option(10, what="k of the kNN baseline shown beside it.")
@click.option("--views/--no-views", "use_views", default=True, show_default=True,
              help="Add the bundle's augmented views (build-index --views) as training rows.")
@json_option("the training summary (one record: head, settings chosen, validation and test "
             "figures beside kNN's)")
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
        echo_json(res.as_dict())
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


@command("finetune")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for weights.safetensors + finetune.json.")
@model_option("The backbone (default: the default encoder).")
@encoder_weights_option("The backbone's.")
@click.option("--blocks", type=click.Choice(["last", "all"]), default="last", show_default=True,
              help="Train the last 2 stages (+ final conv) or the whole backbone.")
@click.option("--epochs", default=4, show_default=True, type=click.IntRange(min=1),
              help="Training epochs (fewer when --budget-minutes runs out).")
@click.option("--budget-minutes", type=float,
              help="Stop training after this much wall time (the schedule is fitted to it).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the backbone trains; cuda trains with bf16 "
              "autocast.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images per training step.")
@click.option("--lr", default=3e-4, show_default=True, help="Backbone learning rate (head: 10x).")
@seed_option("the data order and the classifier's initialisation")
@table_columns_options
@json_option("finetune.json (one record: settings, history, test figures, cost)")
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
        echo_json(info)
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

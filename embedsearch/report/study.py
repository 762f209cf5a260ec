"""run_benchmark: the kNN-vs-trained-head study on one labelled image collection.

One encoding pass per encoder (an index bundle, reused when it is already there), then
every method works from the cached embeddings:

* majority-class baseline;
* kNN over a k sweep with a plain and a similarity-weighted vote, plus the (k, vote)
  chosen on the validation split (reference = train) and re-run with train + val;
* linear and MLP heads (validation picks their settings, then they refit on train + val);
* CLIP zero-shot when the encoder has a text tower.

Everything is evaluated on the same test images with scikit-learn metrics and a paired
bootstrap; results go to ``results.json`` (every figure, the predictions, provenance),
``report.md`` (PNGs beside it) and a self-contained ``report.html``.

This module only runs the steps in order. Compute: :mod:`.encoding` (bundles, the study's
table), :mod:`.duplicates`, :mod:`.splits`, :mod:`.methods` with :mod:`.knn`,
:mod:`.heads`, :mod:`.finetune` and :mod:`.timing`, :mod:`.metrics`, :mod:`.provenance`.
Shared types and the results.json format: :mod:`.results`. Render: :mod:`.figures` (with
:mod:`.plots`) and :mod:`.build` (with :mod:`embedsearch.render.document`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from embedsearch.encoders.choice import ModelChoice, parse_models
from embedsearch.errors import InputError
from embedsearch.report.build import write_report
from embedsearch.report.duplicates import duplicate_groups
from embedsearch.report.encoding import (
    Encoded,
    Progress,
    dataset_info,
    encode_collection,
    study_table,
)
from embedsearch.report.figures import draw_figures
from embedsearch.report.heads import DEFAULT_HEADS
from embedsearch.report.knn import usable_ks
from embedsearch.report.methods import comparisons, evaluate_encoder
from embedsearch.report.metrics import N_BOOTSTRAP, label_set
from embedsearch.report.provenance import command_line, environment, load_average
from embedsearch.report.results import (
    RESULTS_FORMAT,
    RESULTS_SCHEMA,
    BenchmarkResult,
    Results,
    StudyTable,
)
from embedsearch.report.splits import DEFAULT_FRACTIONS, SplitPlan, plan_splits

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10, 20, 50)


# -- inputs -------------------------------------------------------------------------------
def encoder_slug(choice: ModelChoice) -> str:
    base = re.sub(r"[^A-Za-z0-9.]+", "-", choice.spec).strip("-").lower()
    if choice.weights is not None:
        base += "--" + re.sub(r"[^A-Za-z0-9.]+", "-", choice.weights.stem).strip("-").lower()
    return base or "encoder"


# -- the study ----------------------------------------------------------------------------
def run_benchmark(
    data: str | os.PathLike[str],
    models: Sequence[str] = ("efficientnet-lite0",),
    *,
    weights: Sequence[str | os.PathLike[str] | None] | dict[str, str | os.PathLike[str]]
    | None = None,
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    cv_folds: int | None = None,
    dedupe: bool = True,
    near_duplicate_threshold: float | None = None,
    bundles: str | os.PathLike[str] | None = None,
    heads: Sequence[str] = DEFAULT_HEADS,
    head_options: dict[str, dict[str, Any]] | None = None,
    zero_shot: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    n_bootstrap: int = N_BOOTSTRAP,
    gallery_size: int = 12,
    title: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    path_col: str | None = None,
    label_col: str | None = None,
    split_col: str | None = None,
    split_map: str | dict[str, str] | None = None,
    command: Sequence[str] | None = None,
    progress: Progress | None = None,
    on_stage: Callable[[str], None] | None = None,
    finetune: dict[str, Any] | None = None,
    views: str | None = None,
    device: str = "auto",
    exclude: str | os.PathLike[str] | None = None,
) -> BenchmarkResult:
    """Run the whole study on ``data`` and write ``out``/report.md, report.html,
    results.json and figures/.

    ``models``: encoder specs (``SPEC=FILE`` gives a weights file; ``A+B`` the
    concatenation of two or more encoders, see :mod:`embedsearch.encoders.combine`);
    ``weights``: weights files matched to ``models`` by position or by spec. Bundles go to
    ``bundles`` (default ``out/bundles``) and are reused by later runs. ``cv_folds`` switches to
    k-fold cross-validation (every image is a test image once). ``head_options`` passes
    settings to a head, e.g. ``{"mlp": {"hidden": 256}}``. ``seed`` fixes the split,
    the heads' initialisation and the bootstrap: the same seed gives the same
    results.json apart from its ``timings`` key. ``split_map`` names splits that are not
    recognised from their words ("holdout=test"). ``finetune`` (e.g. ``{"budget_minutes":
    10}``, options of :func:`embedsearch.finetune.finetune_split`) adds the first encoder's
    backbone fine-tuned on the same train/val images and scored on the same test images.
    ``views`` (e.g. ``"flip,crop2"``) embeds augmented views of the training images into
    each bundle and adds every head trained with them too (``linear-views``, ``mlp-views``).
    ``device`` is where images (and zero-shot prompts) are encoded ("auto", "cpu",
    "cuda[:N]", "mps").
    ``exclude``: a reviewed list of ids to leave out (see :mod:`embedsearch.audit.exclude`).
    """
    t_start = time.perf_counter()
    load_start = load_average()
    stage = on_stage or (lambda msg: log.info("%s", msg))
    data_path = Path(data)
    if not data_path.exists():
        raise InputError(f"{data_path}: no such file or folder",
                         hint="give a labelled image folder or a CSV/parquet of paths and labels")
    choices = parse_models(list(models), weights)
    if finetune is not None and "+" in choices[0].spec:
        raise InputError(f"--finetune fine-tunes the first --model's backbone, and "
                         f"{choices[0].spec} is a concatenation",
                         hint="put a single encoder first, e.g. --model efficientnet-lite0 "
                         f"--model {choices[0].spec}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"k values must be positive integers, got {list(ks)}")
    unknown_heads = set(heads) - set(DEFAULT_HEADS)
    if unknown_heads:
        raise InputError(f"unknown head(s) {sorted(unknown_heads)}",
                         hint=f"use {', '.join(DEFAULT_HEADS)}")
    name = data_path.stem if data_path.is_file() else data_path.resolve().name
    out_dir = Path(out) if out else Path("reports") / name
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle_root = Path(bundles) if bundles else out_dir / "bundles"
    slugs: list[str] = []
    for c in choices:
        s = encoder_slug(c)
        slugs.append(s if s not in slugs else f"{s}-{len(slugs)}")

    encoded: list[Encoded] = []
    for choice, slug in zip(choices, slugs, strict=True):
        stage(f"encoding {data_path} with {choice.label}")
        enc = encode_collection(data_path, choice.spec, choice.weights, slug, bundle_root,
                                batch_size, num_workers, progress, path_col, label_col,
                                split_col, split_map, views, device, exclude)
        shared_spec = sum(c.spec == choice.spec for c in choices) > 1
        enc.label = choice.label if shared_spec else choice.spec
        encoded.append(enc)
    table = study_table(encoded)
    classes = label_set(table.labels)
    if len(classes) < 2:
        raise InputError(f"{data_path} has {len(classes)} class(es); a benchmark needs two "
                         "or more")
    stage("finding duplicate groups" if dedupe else "duplicate detection is off")
    groups, dup_info = duplicate_groups(table, encoded, dedupe, near_duplicate_threshold)
    plan = plan_splits(table.labels, table.given, groups, seed=seed, cv_folds=cv_folds,
                       fractions=fractions)
    ks_used, ks_notes = usable_ks(ks, plan)
    plan.notes.extend(ks_notes)
    for f in plan.folds:
        known = set(table.labels[f.train]) | set(table.labels[f.val])
        unseen = sorted(set(table.labels[f.test]) - known)
        note = (f"class(es) {', '.join(unseen)} occur in the test images but not in train "
                "or validation: only zero-shot can predict them; they still count in every "
                "metric")
        if unseen and note not in plan.notes:
            plan.notes.append(note)

    test_rows = np.sort(np.concatenate([f.test for f in plan.folds]))
    if len(test_rows) == 0:
        raise InputError("the test split is empty", hint="label more images")
    enc_results, timings_enc, all_samples = [], {}, {}
    for enc in encoded:
        stage(f"evaluating methods on {enc.label}")
        res, tim, samples = evaluate_encoder(enc, table, plan, ks_used, seed, heads,
                                             head_options or {}, zero_shot, n_bootstrap,
                                             classes, test_rows,
                                             finetune if enc is encoded[0] else None)
        enc_results.append(res)
        timings_enc[enc.slug] = tim
        all_samples[enc.slug] = samples
    compared = comparisons(enc_results, all_samples)

    results: Results = {
        "format": RESULTS_FORMAT,
        "schema_version": RESULTS_SCHEMA,
        "title": title or f"Benchmark: {name}",
        "command": command_line(command),
        "call": {"data": str(data), "models": [c.spec for c in choices],
                 "weights": [str(c.weights) if c.weights else None for c in choices],
                 "seed": seed, "ks": list(ks), "cv_folds": cv_folds, "dedupe": dedupe,
                 "near_duplicate_threshold": near_duplicate_threshold,
                 "heads": list(heads), "head_options": head_options or {},
                 "zero_shot": zero_shot, "fractions": list(fractions),
                 "n_bootstrap": n_bootstrap, "finetune": finetune, "views": views},
        "seed": seed,
        "dataset": dataset_info(data_path, name, table, encoded, classes),
        "splits": {**plan.describe(table.labels), "duplicates": {**dup_info, **plan.duplicates},
                   "ks_evaluated": ks_used},
        "encoders": enc_results,
        "comparisons": compared,
        "predictions": {
            "note": "test images in id order; y_pred/confidence per encoder and method",
            "ids": [str(i) for i in table.ids[test_rows]],
            "y_true": [str(v) for v in table.labels[test_rows]],
            "fold": _fold_of(plan, test_rows) if len(plan.folds) > 1 else None,
        },
        "environment": environment(),
    }
    for res in enc_results:
        results["predictions"][res["slug"]] = res.pop("_predictions")

    results["splits"]["assignment"] = {"file": "splits.csv",
                                       "sha256": _write_splits(out_dir / "splits.csv", table,
                                                               plan)}
    stage("drawing figures")
    figures = draw_figures(results, [table.paths[r] for r in test_rows], out_dir,
                           gallery_size)
    results["timings"] = {
        "note": "wall-clock figures: they vary run to run; everything outside this key is "
                "determined by the data, the encoders and the seed",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "load_average_1min": {"start": load_start, "end": load_average()},
        "encoders": timings_enc,
    }
    stage("writing the report")
    md, html_path, json_path = write_report(results, out_dir)
    return BenchmarkResult(out_dir, results, md, html_path, json_path, figures,
                           {e.slug: e.bundle.path for e in encoded})


def _fold_of(plan: SplitPlan, test_rows: np.ndarray) -> list[int]:
    where = {}
    for i, f in enumerate(plan.folds):
        for r in f.test:
            where[int(r)] = i
    return [where[int(r)] for r in test_rows]


def _write_splits(path: Path, table: StudyTable, plan: SplitPlan) -> str:
    """splits.csv: every labelled image's id, label and split (or test fold), by id.
    Returns its sha256."""
    import csv
    import hashlib
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if len(plan.folds) == 1:
        role = np.full(len(table.ids), "excluded", dtype=object)
        for r in ("train", "val", "test"):
            role[getattr(plan.folds[0], r)] = r
        w.writerow(["id", "label", "split"])
        w.writerows(zip(table.ids, table.labels, role, strict=True))
    else:
        fold = np.full(len(table.ids), -1)
        for i, f in enumerate(plan.folds):
            fold[f.test] = i
        w.writerow(["id", "label", "test_fold"])
        w.writerows(zip(table.ids, table.labels, fold, strict=True))
    data = buf.getvalue().encode("utf-8")
    from embedsearch.store.io import atomic_write

    atomic_write(path, lambda fh: fh.write(data))
    return hashlib.sha256(data).hexdigest()


__all__ = ["DEFAULT_HEADS", "DEFAULT_KS", "BenchmarkResult", "encoder_slug", "run_benchmark"]

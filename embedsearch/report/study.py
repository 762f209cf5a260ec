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
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.encoders.choice import ModelChoice, parse_models
from embedsearch.errors import EmbedsearchError, InputError
from embedsearch.report.metrics import (
    METRICS,
    N_BOOTSTRAP,
    evaluate,
    label_set,
    majority_class,
    paired_difference,
)
from embedsearch.report.splits import DEFAULT_FRACTIONS, Fold, SplitPlan, connected_groups

if TYPE_CHECKING:
    from embedsearch.bundle import Bundle

log = logging.getLogger(__name__)

RESULTS_FORMAT = "embedsearch-benchmark"
RESULTS_SCHEMA = 1
DEFAULT_KS = (1, 5, 10, 20, 50)
DEFAULT_HEADS = ("linear", "mlp")
#: Single-image predictions timed per method (the median is reported).
SINGLE_QUERIES = 64
VOTES = {"plain": "uniform", "weighted": "similarity"}
METHOD_NAMES = {"majority": "majority class", "knn": "kNN, k chosen on val",
                "linear": "linear head", "mlp": "MLP head", "zeroshot": "CLIP zero-shot",
                "finetune": "fine-tuned backbone", "linear-views": "linear head + views",
                "mlp-views": "MLP head + views"}
#: Methods shown in the headline table, bar chart and confusion matrices.
HEADLINE = ("majority", "knn-1-plain", "knn", "linear", "mlp", "linear-views", "mlp-views",
            "zeroshot", "finetune")
#: Trained heads compared with kNN (``-views``: trained with the augmented views too).
HEAD_METHODS = ("linear", "mlp", "linear-views", "mlp-views")
#: Methods that get a gallery of their most confident mistakes.
GALLERY = ("knn", "linear", "mlp", "zeroshot")

Progress = Callable[[int, int], Callable[[int], None]]


# -- inputs -------------------------------------------------------------------------------
def encoder_slug(choice: ModelChoice) -> str:
    base = re.sub(r"[^A-Za-z0-9.]+", "-", choice.spec).strip("-").lower()
    if choice.weights is not None:
        base += "--" + re.sub(r"[^A-Za-z0-9.]+", "-", choice.weights.stem).strip("-").lower()
    return base or "encoder"


# -- outputs ------------------------------------------------------------------------------
@dataclass
class BenchmarkResult:
    """What :func:`run_benchmark` wrote, and the ``results.json`` content."""

    out: Path
    results: dict[str, Any]
    markdown: Path
    html: Path
    json: Path
    figures: list[Path] = field(default_factory=list)
    #: Index bundle folder per encoder slug (reusable by later runs and by ``load_bundle``).
    bundles: dict[str, Path] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One row per (encoder, headline method): name, metrics and CI, costs."""
        out = []
        for enc in self.results["encoders"]:
            timing = self.results["timings"]["encoders"][enc["slug"]]["methods"]
            for mid, m in enc["methods"].items():
                if mid not in HEADLINE:
                    continue
                fig = m["metrics"]
                out.append({
                    "encoder": enc["label"], "method": m["name"], "id": mid,
                    **{k: fig[k] for k in METRICS}, "accuracy_ci": fig["ci"]["accuracy"],
                    "fit_seconds": timing[mid]["fit_seconds"],
                    "predict_ms_per_image": timing[mid]["predict_ms_per_image_batched"],
                    "model_bytes": m["model_bytes"],
                })
        return out


@dataclass
class _Encoded:
    choice: ModelChoice
    slug: str
    bundle: Bundle
    build: dict[str, Any]
    #: Display name: the spec, plus the weights file when two encoders share a spec.
    label: str = ""


@dataclass
class _Table:
    """Every labelled image of the study, sorted by id, and its row in each bundle."""

    ids: np.ndarray
    labels: np.ndarray
    given: np.ndarray
    sha256: np.ndarray
    paths: list[Path]
    rows: dict[str, np.ndarray]


@dataclass
class _Outcome:
    id: str
    name: str
    family: str
    params: dict[str, Any]
    pred: np.ndarray
    conf: np.ndarray
    fit_seconds: float
    batch_ms: float
    single_ms: float
    model_bytes: int
    selection: dict[str, Any] = field(default_factory=dict)
    #: More wall/CPU/GPU figures, reported under results["timings"] only.
    timings: dict[str, Any] = field(default_factory=dict)


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

    ``models``: encoder specs (``SPEC=FILE`` gives a weights file); ``weights``: weights
    files matched to ``models`` by position or by spec. Bundles go to ``bundles``
    (default ``out/bundles``) and are reused by later runs. ``cv_folds`` switches to
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
    load_start = _load_average()
    stage = on_stage or (lambda msg: log.info("%s", msg))
    data_path = Path(data)
    if not data_path.exists():
        raise InputError(f"{data_path}: no such file or folder",
                         hint="give a labelled image folder or a CSV/parquet of paths and labels")
    choices = parse_models(list(models), weights)
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

    encoded = []
    for choice, slug in zip(choices, slugs, strict=True):
        stage(f"encoding {data_path} with {choice.label}")
        enc = _encode(data_path, choice, slug, bundle_root, batch_size, num_workers,
                      progress, path_col, label_col, split_col, split_map, views, device,
                      exclude)
        shared_spec = sum(c.spec == choice.spec for c in choices) > 1
        enc.label = choice.label if shared_spec else choice.spec
        encoded.append(enc)
    table = _study_table(encoded)
    classes = label_set(table.labels)
    if len(classes) < 2:
        raise InputError(f"{data_path} has {len(classes)} class(es); a benchmark needs two "
                         "or more")
    stage("finding duplicate groups" if dedupe else "duplicate detection is off")
    groups, dup_info = _duplicate_groups(table, encoded, dedupe, near_duplicate_threshold)
    from embedsearch.report.splits import plan_splits

    plan = plan_splits(table.labels, table.given, groups, seed=seed, cv_folds=cv_folds,
                       fractions=fractions)
    ks_used, ks_notes = _usable_ks(ks, plan)
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
        res, tim, samples = _evaluate_encoder(enc, table, plan, ks_used, seed, heads,
                                              head_options or {}, zero_shot, n_bootstrap,
                                              classes, test_rows,
                                              finetune if enc is encoded[0] else None)
        enc_results.append(res)
        timings_enc[enc.slug] = tim
        all_samples[enc.slug] = samples
    comparisons = _comparisons(enc_results, all_samples)

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "schema_version": RESULTS_SCHEMA,
        "title": title or f"Benchmark: {name}",
        "command": _command(command),
        "call": {"data": str(data), "models": [c.spec for c in choices],
                 "weights": [str(c.weights) if c.weights else None for c in choices],
                 "seed": seed, "ks": list(ks), "cv_folds": cv_folds, "dedupe": dedupe,
                 "near_duplicate_threshold": near_duplicate_threshold,
                 "heads": list(heads), "head_options": head_options or {},
                 "zero_shot": zero_shot, "fractions": list(fractions),
                 "n_bootstrap": n_bootstrap, "finetune": finetune, "views": views},
        "seed": seed,
        "dataset": _dataset_info(data_path, name, table, encoded, classes),
        "splits": {**plan.describe(table.labels), "duplicates": {**dup_info, **plan.duplicates},
                   "ks_evaluated": ks_used},
        "encoders": enc_results,
        "comparisons": comparisons,
        "predictions": {
            "note": "test images in id order; y_pred/confidence per encoder and method",
            "ids": [str(i) for i in table.ids[test_rows]],
            "y_true": [str(v) for v in table.labels[test_rows]],
            "fold": _fold_of(plan, test_rows) if len(plan.folds) > 1 else None,
        },
        "environment": _environment(),
    }
    for res in enc_results:
        results["predictions"][res["slug"]] = res.pop("_predictions")

    results["splits"]["assignment"] = {"file": "splits.csv",
                                       "sha256": _write_splits(out_dir / "splits.csv", table,
                                                               plan)}
    stage("drawing figures")
    from embedsearch.report.build import draw_figures, write_report

    figures = draw_figures(results, table, test_rows, out_dir, gallery_size)
    results["timings"] = {
        "note": "wall-clock figures: they vary run to run; everything outside this key is "
                "determined by the data, the encoders and the seed",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "load_average_1min": {"start": load_start, "end": _load_average()},
        "encoders": timings_enc,
    }
    stage("writing the report")
    md, html_path, json_path = write_report(results, out_dir)
    return BenchmarkResult(out_dir, results, md, html_path, json_path, figures,
                           {e.slug: e.bundle.path for e in encoded})


# -- encoding -----------------------------------------------------------------------------
def _encode(data: Path, choice: ModelChoice, slug: str, root: Path, batch_size: int | None,
            num_workers: int | None, progress: Progress | None, path_col: str | None,
            label_col: str | None, split_col: str | None,
            split_map: str | dict[str, str] | None = None, views: str | None = None,
            device: str = "auto",
            exclude: str | os.PathLike[str] | None = None) -> _Encoded:
    from embedsearch.bundle import load_bundle
    from embedsearch.pipeline import build_index

    path = root / slug
    res = build_index(data, out=path, model=choice.spec, weights=choice.weights,
                      batch_size=batch_size, num_workers=num_workers, progress=progress,
                      path_col=path_col, label_col=label_col, split_col=split_col,
                      split_map=split_map, views=views, device=device, exclude=exclude)
    gen = res.manifest["generation"]
    if res.encoded > 0:
        build = {"generation": gen, "images": res.encoded,
                 "seconds": round(res.encode_seconds, 3),
                 "images_per_second": round(res.images_per_second, 2),
                 "batch_size": batch_size, "num_workers": num_workers, "measured_now": True}
    else:
        # The manifest keeps the throughput measured when these vectors were encoded (by
        # this bundle, or by whichever command first put them in the shared cache).
        build = {"generation": gen, "images": 0, "measured_now": False,
                 "note": "every embedding was reused (bundle or shared embedding cache)"}
        recorded = res.manifest.get("encoding") or {}
        if recorded.get("images_per_second"):
            build.update({k: recorded[k] for k in ("images", "seconds", "images_per_second")})
            build["note"] += "; throughput as recorded when they were encoded"
    build["reused"] = res.reused
    bundle = load_bundle(path)
    bundle.device = device
    return _Encoded(choice, slug, bundle, build)


def _study_table(encoded: list[_Encoded]) -> _Table:
    import pandas as pd

    common: set[str] | None = None
    for e in encoded:
        items = e.bundle.items
        ids = set(items.loc[items["label"].notna(), "id"].astype(str))
        common = ids if common is None else common & ids
    if not common:
        raise InputError("the collection has no labelled images that every encoder could "
                         "read, so there is nothing to benchmark",
                         hint="put images in one sub-folder per class, or give a label column")
    ids = np.array(sorted(common), dtype=object)
    first = encoded[0].bundle
    items = first.items.set_index(first.items["id"].astype(str))
    labels = items.loc[ids, "label"].astype(str).to_numpy()
    given = items.loc[ids, "split"].fillna("").astype(str).to_numpy()
    sha = items.loc[ids, "sha256"].fillna("").astype(str).to_numpy()
    src = first.manifest.get("source", {})
    root = Path(src.get("path", "."))
    if src.get("kind") != "folder":
        root = root.parent
    paths = [root / str(i) for i in ids]
    rows = {}
    for e in encoded:
        pos = pd.Series(np.arange(len(e.bundle.items)), index=e.bundle.items["id"].astype(str))
        rows[e.slug] = pos.loc[ids].to_numpy(np.int64)
    return _Table(ids, labels, given, sha, paths, rows)


def _duplicate_groups(table: _Table, encoded: list[_Encoded], enabled: bool,
                      threshold: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Group ids: connected components over byte-identical files and near-duplicates."""
    n = len(table.ids)
    if not enabled:
        return np.arange(n), {"enabled": False, "groups": 0, "straddling_groups": 0,
                              "note": "duplicate detection was switched off "
                                      "(--no-group-duplicates)"}
    order = np.argsort(table.sha256, kind="stable")
    s = table.sha256[order]
    same = np.flatnonzero((s[1:] == s[:-1]) & (s[1:] != ""))
    exact = np.stack([order[same], order[same + 1]], axis=1) if len(same) \
        else np.zeros((0, 2), np.int64)
    info: dict[str, Any] = {"enabled": True, "exact_pairs": len(exact)}
    near_groups, near_info = _near_duplicates(table, encoded, threshold)
    info.update(near_info)
    pairs = [exact]
    if near_groups is not None:
        pairs.append(_component_pairs(near_groups))
    groups = connected_groups(n, np.concatenate(pairs))
    # Duplicates filed under different classes: worth a look, whatever the split.
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.r_[True, groups[order][1:] != groups[order][:-1], True])
    conflicts = []
    for a, b in itertools.pairwise(bounds):
        members = order[a:b]
        if len(members) > 1 and len(set(table.labels[members])) > 1:
            conflicts.append([f"{table.ids[m]} ({table.labels[m]})" for m in members])
    info["label_conflicts"] = len(conflicts)
    info["label_conflict_examples"] = conflicts[:10]
    return groups, info


def _component_pairs(groups: np.ndarray) -> np.ndarray:
    """Pairs (first member, other member) that rebuild the given components."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.r_[True, g[1:] != g[:-1]]
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(g)), 0))]
    keep = ~starts
    return np.stack([first[keep], order[keep]], axis=1).astype(np.int64)


#: Thresholds tried in turn when duplicates chain into implausibly large groups.
NEAR_LADDER = (0.90, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


def max_plausible_group(n: int) -> int:
    """Largest connected duplicate group still taken for real duplicates (bursts of one
    scene); beyond it a threshold is too low for that encoder and chains look-alikes."""
    return max(10, int(np.ceil(0.005 * n)))


def _near_duplicates(table: _Table, encoded: list[_Encoded], threshold: float | None
                     ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Near-duplicate components from :mod:`embedsearch.dedupe`, with one encoder.

    The dedupe threshold is calibrated for the default encoder, so that encoder is used
    when it is in the study (else the first). Without an explicit ``threshold`` the dedupe
    default is tried first and raised step by step while duplicates chain into a connected
    group larger than :func:`max_plausible_group`: a generic encoder finds whole clusters
    of look-alikes there, and keeping those together would empty a split.
    """
    try:
        from embedsearch.dedupe import DEFAULT_THRESHOLD, find_duplicates, group_labels
    except ImportError:
        return None, {"near": "not available (embedsearch.dedupe missing): only "
                              "byte-identical files were grouped"}
    from embedsearch.encoders import DEFAULT_ENCODER

    n = len(table.ids)
    limit = max_plausible_group(n)
    enc = next((e for e in encoded if e.choice.spec == DEFAULT_ENCODER and
                e.choice.weights is None), encoded[0])
    X = np.asarray(enc.bundle.embeddings)[table.rows[enc.slug]]
    ladder = [threshold] if threshold is not None else \
        [t for t in NEAR_LADDER if t >= DEFAULT_THRESHOLD] or [DEFAULT_THRESHOLD]
    notes: list[str] = []
    for t in ladder:
        result = find_duplicates(X, [str(i) for i in table.ids], threshold=t,
                                 sha256=list(table.sha256))
        comp = np.unique(group_labels(result), return_inverse=True)[1].ravel()
        biggest = int(np.bincount(comp).max()) if n else 0
        if biggest <= limit or threshold is not None:
            break
    else:
        return None, {"near": "not used", "near_encoder": enc.label,
                      "near_notes": [f"near duplicates not used: even at cosine {ladder[-1]} "
                                     f"{enc.label} chains look-alike images into "
                                     f"groups of {biggest}"],
                      "max_plausible_group": limit}
    if t != ladder[0]:
        notes.append(f"near-duplicate threshold raised from {ladder[0]} to {t}: at lower "
                     f"ones {enc.label} chained look-alike images into groups of "
                     f"more than {limit}")
    elif threshold is not None and biggest > limit:
        notes.append(f"at the requested threshold {t} the largest duplicate group has "
                     f"{biggest} images; check that it is not too low")
    sizes = np.bincount(comp)
    return comp, {"near": "embedsearch.dedupe.find_duplicates (similarity of the embeddings)",
                  "near_encoder": enc.label, "near_threshold": t,
                  "near_groups": int(np.sum(sizes > 1)),
                  "near_images": int(sizes[sizes > 1].sum()),
                  "near_notes": notes, "max_plausible_group": limit}


def _usable_ks(ks: list[int], plan: SplitPlan) -> tuple[list[int], list[str]]:
    n_ref = min(len(f.train) + len(f.val) for f in plan.folds)
    used = [k for k in ks if k <= n_ref]
    notes = []
    if len(used) < len(ks):
        dropped = [k for k in ks if k > n_ref]
        notes.append(f"k = {', '.join(map(str, dropped))} skipped: only {n_ref} reference "
                     "images")
    if not used:
        used = [n_ref]
    return used, notes


# -- methods on one fold -------------------------------------------------------------------
def _time_predict(fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], Xt: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Predictions, median batched ms/image over 5 runs, median single-image ms (one
    image per call, BLAS/OpenMP limited to one thread)."""
    runs, first = [], None
    for _ in range(5):
        t = time.perf_counter()
        res = fn(Xt)
        runs.append(time.perf_counter() - t)
        first = first or res
    assert first is not None
    from threadpoolctl import threadpool_limits

    singles = []
    m = min(len(Xt), SINGLE_QUERIES)
    # One image per call on one thread: threading a single small product gains nothing,
    # and on a busy machine every call would wait for a second core to be scheduled.
    with threadpool_limits(limits=1):
        if m:
            fn(Xt[:1])
        for i in range(m):
            t = time.perf_counter()
            fn(Xt[i:i + 1])
            singles.append(time.perf_counter() - t)
    n = max(len(Xt), 1)
    return (first[0], first[1], 1000 * statistics.median(runs) / n,
            1000 * statistics.median(singles) if singles else 0.0)


def _proba_fn(clf: Any) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def fn(Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        proba = clf.predict_proba(Q)
        best = proba.argmax(axis=1)
        return clf.classes_[best].astype(str), proba[np.arange(len(best)), best]

    return fn


def _select_knn(X: np.ndarray, y: np.ndarray, fold: Fold, ks: list[int]
                ) -> tuple[tuple[int, str], list[dict[str, Any]]]:
    """(k, vote) with the best validation accuracy, reference = train only."""
    from embedsearch.classify.knn import KNNClassifier, vote
    from embedsearch.index import Neighbours

    usable = [k for k in ks if k <= len(fold.train)]
    if len(fold.val) == 0 or not usable:
        k = max([k for k in ks if k <= 10] or [ks[0]])
        return (k, "weighted"), []
    classes, y_idx = np.unique(y[fold.train], return_inverse=True)
    kmax = max(usable)
    neigh = KNNClassifier(kmax).fit(X[fold.train], y[fold.train]).kneighbors(X[fold.val], kmax)
    scores = []
    for k in usable:
        trimmed = Neighbours([i[:k] for i in neigh.ids], [s[:k] for s in neigh.similarities])
        for v in ("plain", "weighted"):
            proba = vote(trimmed, y_idx, len(classes), VOTES[v])
            acc = float(np.mean(classes[proba.argmax(axis=1)] == y[fold.val]))
            scores.append({"k": k, "vote": v, "val_accuracy": acc})
    best = max(scores, key=lambda s: s["val_accuracy"])  # first max: smallest k, plain
    return (best["k"], best["vote"]), scores


def _run_fold(X: np.ndarray, y: np.ndarray, fold: Fold, ks: list[int], seed: int,
              heads: Sequence[str], head_options: dict[str, dict[str, Any]],
              zs: tuple[Any, float] | None, notes: list[str],
              views: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, _Outcome]:
    from embedsearch.classify.knn import KNNClassifier

    ref = np.sort(np.concatenate([fold.train, fold.val]))
    Xr, yr, Xt = X[ref], y[ref], X[fold.test]
    out: dict[str, _Outcome] = {}

    t = time.perf_counter()
    label = majority_class(yr)
    prior = float(np.mean(yr == label))
    fit = time.perf_counter() - t

    def majority(Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.full(len(Q), label, dtype=object).astype(str), np.full(len(Q), prior)

    pred, conf, bms, sms = _time_predict(majority, Xt)
    out["majority"] = _Outcome("majority", METHOD_NAMES["majority"], "baseline",
                               {"class": label, "trained_on": "train+val"}, pred, conf, fit,
                               bms, sms, 0)

    chosen, scores = _select_knn(X, y, fold, ks)
    for k in ks:
        for v in ("plain", "weighted"):
            t = time.perf_counter()
            clf = KNNClassifier(k, VOTES[v]).fit(Xr, yr)
            fit = time.perf_counter() - t
            pred, conf, bms, sms = _time_predict(_proba_fn(clf), Xt)
            mid = f"knn-{k}-{v}"
            out[mid] = _Outcome(mid, f"kNN k={k} {v}", "knn",
                                {"k": k, "vote": v, "reference": "train+val",
                                 "reference_images": len(ref)},
                                pred, conf, fit, bms, sms, int(Xr.shape[0] * Xr.shape[1] * 4))
    src = out[f"knn-{chosen[0]}-{chosen[1]}"]
    out["knn"] = _Outcome(
        "knn", f"{src.name}, chosen on val", "knn", dict(src.params), src.pred, src.conf,
        src.fit_seconds, src.batch_ms, src.single_ms, src.model_bytes,
        {"protocol": "best validation accuracy with train as reference"
                     if scores else "no validation rows: default k",
         "k": chosen[0], "vote": chosen[1], "grid": scores})

    for mid, kind, extra in _head_variants(heads, views, fold, y):
        from embedsearch.classify.heads import LinearHead, MLPHead

        cls = {"linear": LinearHead, "mlp": MLPHead}[kind]
        head = cls(**{"seed": seed, **head_options.get(kind, {})})
        has_val = len(fold.val) > 0
        t = time.perf_counter()
        try:
            head.fit(X[fold.train], y[fold.train], X[fold.val] if has_val else None,
                     y[fold.val] if has_val else None, extra_train=extra)
        except EmbedsearchError as exc:
            notes.append(f"{METHOD_NAMES[mid]} skipped: {exc.message}")
            continue
        fit = time.perf_counter() - t
        pred, conf, bms, sms = _time_predict(_proba_fn(head), Xt)
        info = head.info
        selection = {k: info[k] for k in ("selection", "trained_on", "class_weight")
                     if k in info}
        out[mid] = _Outcome(mid, METHOD_NAMES[mid], "head", head.hyperparameters(), pred,
                             conf, fit, bms, sms,
                             int(sum(p.nbytes for p in head.params.values())), selection)

    if zs is not None:
        clf, fit = zs
        pred, conf, bms, sms = _time_predict(_proba_fn(clf), Xt)
        out["zeroshot"] = _Outcome(
            "zeroshot", METHOD_NAMES["zeroshot"], "zeroshot",
            {"templates": len(clf.templates), "classes": len(clf.classes_),
             "trained_on": "nothing (class names only)"},
            pred, conf, fit, bms, sms, int(clf.text_embeddings.nbytes))
    return out


def _head_variants(heads: Sequence[str], views: tuple[np.ndarray, np.ndarray] | None,
                   fold: Fold, y: np.ndarray) -> list[tuple[str, str, Any]]:
    """(method id, head kind, extra_train) per head: plain, then with the views of the
    fold's training images (``views`` = vectors, table row of each view)."""
    out: list[tuple[str, str, Any]] = [(kind, kind, None) for kind in heads]
    if views is not None:
        vX, vrow = views
        pos = np.full(int(max(vrow.max(initial=-1), fold.train.max(initial=-1))) + 1, -1)
        pos[fold.train] = np.arange(len(fold.train))
        keep = pos[vrow] >= 0
        extra = (vX[keep], y[vrow[keep]], pos[vrow[keep]])
        out += [(f"{kind}-views", kind, extra) for kind in heads]
    return out


def _table_views(enc: _Encoded, table: _Table) -> tuple[np.ndarray, np.ndarray] | None:
    """The bundle's views as (vectors, row of their image in the study's table)."""
    from embedsearch.views import bundle_views

    got = bundle_views(enc.bundle)
    if got is None:
        return None
    vX, _, brow = got
    table_row = np.full(len(enc.bundle.items), -1)
    table_row[table.rows[enc.slug]] = np.arange(len(table.rows[enc.slug]))
    keep = table_row[brow] >= 0
    return np.asarray(vX[keep], np.float32), table_row[brow[keep]]


def _merge(per_fold: list[dict[str, _Outcome]], folds: list[Fold]) -> dict[str, _Outcome]:
    """One outcome per method with predictions in test-row order (pooled over folds)."""
    if len(per_fold) == 1:
        return per_fold[0]
    test_rows = np.concatenate([f.test for f in folds])
    order = np.argsort(test_rows, kind="stable")
    merged = {}
    for mid in per_fold[0]:
        if not all(mid in pf for pf in per_fold):
            continue
        outs = [pf[mid] for pf in per_fold]
        o = outs[0]
        same_params = all(x.params == o.params for x in outs)
        name = o.name if all(x.name == o.name for x in outs) else METHOD_NAMES[mid] + \
            " per fold"
        merged[mid] = _Outcome(
            mid, name, o.family,
            o.params if same_params else {"per_fold": [x.params for x in outs]},
            np.concatenate([x.pred for x in outs])[order],
            np.concatenate([x.conf for x in outs])[order],
            float(np.mean([x.fit_seconds for x in outs])),
            float(np.mean([x.batch_ms for x in outs])),
            float(np.median([x.single_ms for x in outs])),
            int(np.mean([x.model_bytes for x in outs])),
            {"per_fold": [x.selection for x in outs]} if o.selection else {})
    return merged


def _zero_shot(enc: _Encoded, classes: list[str]) -> tuple[Any, float] | None:
    if not enc.bundle.encoder_identity.get("supports_text"):
        return None
    from embedsearch.classify.zeroshot import ZeroShotClassifier

    t = time.perf_counter()
    clf = ZeroShotClassifier(enc.bundle.encoder(enc.choice.weights), classes).fit()
    return clf, time.perf_counter() - t


def _evaluate_encoder(enc: _Encoded, table: _Table, plan: SplitPlan, ks: list[int],
                      seed: int, heads: Sequence[str], head_options: dict[str, dict[str, Any]],
                      zero_shot: bool, n_boot: int,
                      classes: list[str], test_rows: np.ndarray,
                      finetune: dict[str, Any] | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    X = np.ascontiguousarray(np.asarray(enc.bundle.embeddings)[table.rows[enc.slug]],
                             dtype=np.float32)
    y = table.labels
    notes: list[str] = []
    zs = _zero_shot(enc, classes) if zero_shot else None
    views = _table_views(enc, table)
    per_fold = [_run_fold(X, y, f, ks, seed, heads, head_options, zs, notes, views)
                for f in plan.folds]
    outcomes = _merge(per_fold, plan.folds)
    if finetune is not None:
        if len(plan.folds) == 1:
            outcomes["finetune"] = _finetune(enc, table, plan.folds[0], seed, finetune)
        else:
            notes.append("fine-tuned backbone skipped: it runs on a single train/val/test "
                         "split, not per cross-validation fold")
    y_true = y[test_rows]
    order = ["majority", "knn", *(f"knn-{k}-{v}" for k in ks for v in ("plain", "weighted")),
             *HEAD_METHODS, "zeroshot", "finetune"]
    methods, timings, samples, preds = {}, {}, {}, {}
    for mid in order:
        if mid not in outcomes:
            continue
        o = outcomes[mid]
        figures, boot = evaluate(y_true, o.pred, classes, seed, n_boot)
        samples[mid] = boot
        methods[mid] = {"name": o.name, "family": o.family, "params": o.params,
                        "metrics": figures, "model_bytes": o.model_bytes,
                        **({"selection": o.selection} if o.selection else {})}
        timings[mid] = {"fit_seconds": round(o.fit_seconds, 4),
                        "predict_ms_per_image_batched": round(o.batch_ms, 5),
                        "predict_ms_per_image_single": round(o.single_ms, 4), **o.timings}
        preds[mid] = {"y_pred": [str(v) for v in o.pred],
                      "confidence": [round(float(c), 4) for c in o.conf]}
    ident = enc.bundle.encoder_identity
    sweep = {v: {"k": ks, **{m: [methods[f"knn-{k}-{v}"]["metrics"][m] for k in ks]
                             for m in METRICS},
                 "accuracy_ci": [methods[f"knn-{k}-{v}"]["metrics"]["ci"]["accuracy"]
                                 for k in ks]}
             for v in ("plain", "weighted")}
    m = enc.bundle.manifest
    result = {
        "slug": enc.slug,
        "label": enc.label,
        "spec": enc.choice.spec,
        "identity": ident,
        "bundle": {"format": m.get("format"), "counts": m.get("counts"),
                   "index": m.get("index")},
        "methods": methods,
        "k_sweep": sweep,
        "notes": sorted(set(notes)),
        "_predictions": preds,
    }
    timing = {"encode": enc.build, "methods": timings,
              **({"zero_shot_prompt_seconds": round(zs[1], 3)} if zs else {})}
    return result, timing, samples


def _finetune(enc: _Encoded, table: _Table, fold: Fold, seed: int, options: dict[str, Any]
              ) -> _Outcome:
    """The encoder's backbone fine-tuned on the fold's train images (val picks the epoch),
    predicting its test images in test-row order; costs from its own record."""
    from embedsearch.finetune import finetune_split

    def split(rows: np.ndarray) -> tuple[list[Path], list[str]]:
        rows = np.sort(rows)
        return [table.paths[i] for i in rows], [str(v) for v in table.labels[rows]]

    res = finetune_split(split(fold.train), split(fold.val) if len(fold.val) else None,
                         split(fold.test), model=enc.choice.spec, weights=enc.choice.weights,
                         seed=seed, **options)
    info, tm = res.info, res.info["timings"]
    params = {**info["settings"], "parameters": info["parameters"],
              "trained_on": "train (val picks the epoch)"}
    conf = res.test_proba.max(1) if len(res.test_proba) else np.zeros(0)
    ms = float(tm["test_ms_per_image"] or 0.0)
    return _Outcome("finetune", METHOD_NAMES["finetune"], "finetune", params,
                    res.test_pred.astype(str), conf, float(tm["train_wall_seconds"]), ms, ms,
                    int(info["model_bytes"]), {},
                    {"train_cpu_seconds": tm["train_cpu_seconds"],
                     "train_gpu_seconds": tm["train_gpu_seconds"],
                     "epochs_run": info["epochs_run"], "best_epoch": info["best_epoch"],
                     "stopped_by": info["stopped_by"], "history": info["history"]})


def _comparisons(enc_results: list[dict[str, Any]], samples: dict[str, Any]
                 ) -> list[dict[str, Any]]:
    """Paired-bootstrap differences: each head (and zero-shot) against the val-chosen kNN,
    and each encoder against the first on the same method."""
    out = []
    for res in enc_results:
        s, methods = samples[res["slug"]], res["methods"]
        if "knn" not in methods:
            continue
        for mid in (*HEAD_METHODS, "zeroshot"):
            if mid not in methods:
                continue
            for metric in METRICS:
                d = paired_difference(s[mid][metric], s["knn"][metric],
                                      methods[mid]["metrics"][metric],
                                      methods["knn"]["metrics"][metric])
                out.append({"encoder": res["slug"], "a": mid, "b": "knn", "metric": metric,
                            **d})
    base = enc_results[0]
    for res in enc_results[1:]:
        for mid in ("knn", "linear", "mlp"):
            if mid not in res["methods"] or mid not in base["methods"]:
                continue
            d = paired_difference(samples[res["slug"]][mid]["accuracy"],
                                  samples[base["slug"]][mid]["accuracy"],
                                  res["methods"][mid]["metrics"]["accuracy"],
                                  base["methods"][mid]["metrics"]["accuracy"])
            out.append({"method": mid, "a": res["slug"], "b": base["slug"],
                        "metric": "accuracy", **d})
    return out


# -- provenance ---------------------------------------------------------------------------
def _command(command: Sequence[str] | None) -> str | None:
    argv = list(command) if command is not None else list(sys.argv)
    if not argv:
        return None
    argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def _environment() -> dict[str, Any]:
    from embedsearch.report.provenance import git_revision, machine, package_versions

    return {"packages": package_versions(), "machine": machine(), "git": git_revision()}


def _dataset_info(path: Path, name: str, table: _Table, encoded: list[_Encoded],
                  classes: list[str]) -> dict[str, Any]:
    from embedsearch.report.provenance import dataset_fingerprint

    first = encoded[0].bundle
    items = first.items
    items = items[items["id"].astype(str).isin(set(table.ids))]
    counts = first.manifest.get("counts", {})
    fps = {e.slug: dataset_fingerprint(e.bundle.items[
        e.bundle.items["id"].astype(str).isin(set(table.ids))]) for e in encoded}
    return {
        "name": name,
        "source": str(path),
        "fingerprint": dataset_fingerprint(items),
        "fingerprint_method": "sha256 over sorted (id, file sha256, label, split) rows of "
                              "the labelled images used",
        "fingerprints_agree": len(set(fps.values())) == 1,
        "images": len(table.ids),
        "classes": classes,
        "class_counts": {c: int(np.sum(table.labels == c)) for c in classes},
        "scanned": counts.get("scanned"),
        "not_used": {"unreadable_or_skipped": int(counts.get("failed", 0))
                     + int(counts.get("skipped", 0)),
                     "by_reason": counts.get("by_reason", {}),
                     "unlabelled": int(first.items["label"].isna().sum())},
    }


def _load_average() -> float | None:
    """1-minute load average: timings taken while the machine was busy read slower."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _fold_of(plan: SplitPlan, test_rows: np.ndarray) -> list[int]:
    where = {}
    for i, f in enumerate(plan.folds):
        for r in f.test:
            where[int(r)] = i
    return [where[int(r)] for r in test_rows]


def _write_splits(path: Path, table: _Table, plan: SplitPlan) -> str:
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

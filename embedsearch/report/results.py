"""The study's shared result types and the ``results.json`` format.

Compute modules (:mod:`.encoding`, :mod:`.duplicates`, :mod:`.knn`, :mod:`.heads`,
:mod:`.finetune`, :mod:`.methods`) produce :class:`Outcome` records over a
:class:`StudyTable`; :func:`embedsearch.report.study.run_benchmark` assembles them into the
``results`` document; the render side (:mod:`.figures`, :mod:`.build`) reads only that
document. :func:`dumps` / :func:`load_results` write and read it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from embedsearch.report.metrics import METRICS

RESULTS_FORMAT = "embedsearch-benchmark"
RESULTS_SCHEMA = 1
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


# -- the results document (results.json) -------------------------------------------------
# Typed views of the JSON the study writes and the render side reads; the keys and values
# are exactly those of results.json (schema RESULTS_SCHEMA).
class MethodResult(TypedDict, total=False):
    """results["encoders"][i]["methods"][method id]."""

    name: str
    family: str  # baseline, knn, head, zeroshot, finetune
    params: dict[str, Any]
    #: accuracy, balanced_accuracy, macro_f1, ci, per_class, confusion (report.metrics).
    metrics: dict[str, Any]
    model_bytes: int
    #: How validation chose the settings (kNN grid; head selection record).
    selection: dict[str, Any]


class MethodTiming(TypedDict, total=False):
    """results["timings"]["encoders"][slug]["methods"][method id]."""

    fit_seconds: float
    predict_ms_per_image_batched: float
    predict_ms_per_image_single: float


class EncoderResult(TypedDict, total=False):
    """results["encoders"][i]: one encoder's methods, k sweep and notes."""

    slug: str
    label: str
    spec: str
    identity: dict[str, Any]
    bundle: dict[str, Any]
    methods: dict[str, MethodResult]
    #: vote ("plain", "weighted") → {"k": [...], metric: [...], "accuracy_ci": [...]}.
    k_sweep: dict[str, dict[str, Any]]
    notes: list[str]
    #: "confusion" / "mistakes" → method id → PNG path relative to the report folder.
    figures: dict[str, dict[str, str]]


class Results(TypedDict, total=False):
    """The whole results.json document."""

    format: str
    schema_version: int
    title: str
    command: str | None
    call: dict[str, Any]
    seed: int
    dataset: dict[str, Any]
    splits: dict[str, Any]
    encoders: list[EncoderResult]
    #: Paired-bootstrap differences (method vs kNN; encoder vs the first).
    comparisons: list[dict[str, Any]]
    #: ids, y_true, fold, and per encoder slug: method id → y_pred, confidence.
    predictions: dict[str, Any]
    environment: dict[str, Any]
    figures: dict[str, str]
    timings: dict[str, Any]


def headline(methods: dict[str, Any]) -> list[str]:
    """The headline methods among ``methods``, in headline order."""
    return [m for m in HEADLINE if m in methods]


@dataclass
class StudyTable:
    """Every labelled image of the study, sorted by id, and its row in each bundle."""

    ids: np.ndarray
    labels: np.ndarray
    given: np.ndarray
    sha256: np.ndarray
    paths: list[Path]
    #: Encoder slug → row of each image in that encoder's bundle.
    rows: dict[str, np.ndarray]


@dataclass
class Outcome:
    """One method's test predictions and costs (on one fold, or pooled over folds)."""

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


@dataclass
class BenchmarkResult:
    """What :func:`~embedsearch.report.study.run_benchmark` wrote, and the
    ``results.json`` content."""

    out: Path
    results: Results
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


# -- results.json -------------------------------------------------------------------------
def plain(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN to null."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, indent: int = 0) -> str:
    """Indented JSON whose lists of numbers or strings stay on one line."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        inner = ",\n".join(f"{pad}  {json.dumps(k, ensure_ascii=False)}: "
                           f"{dumps(v, indent + 2)}" for k, v in obj.items())
        return "{\n" + inner + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj, ensure_ascii=False)
        inner = ",\n".join(f"{pad}  {dumps(v, indent + 2)}" for v in obj)
        return "[\n" + inner + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def load_results(path: str | Path) -> Results:
    """Read a results.json written by :func:`embedsearch.report.build.write_report`."""
    from embedsearch.errors import EmbedsearchError
    from embedsearch.store.io import read_json

    data = read_json(Path(path))
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise EmbedsearchError(f"{path} is not an embedsearch benchmark results file")
    return data  # type: ignore[return-value]


__all__ = ["GALLERY", "HEADLINE", "HEAD_METHODS", "METHOD_NAMES", "RESULTS_FORMAT",
           "RESULTS_SCHEMA", "BenchmarkResult", "EncoderResult", "MethodResult", "MethodTiming",
           "Outcome", "Results", "StudyTable", "dumps", "headline", "load_results", "plain"]

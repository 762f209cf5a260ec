"""The fine-tuned backbone in the study: the first encoder's backbone trained on the same
train images (validation picks the epoch) and scored on the same test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embedsearch.report.encoding import Encoded
from embedsearch.report.results import METHOD_NAMES, Outcome, StudyTable
from embedsearch.report.splits import Fold


def finetune_outcome(enc: Encoded, table: StudyTable, fold: Fold, seed: int,
                     options: dict[str, Any]) -> Outcome:
    """The encoder's backbone fine-tuned on the fold's train images (val picks the epoch),
    predicting its test images in test-row order; costs from its own record."""
    from embedsearch.finetune import finetune_split

    def split(rows: np.ndarray) -> tuple[list[Path], list[str]]:
        rows = np.sort(rows)
        return [table.paths[i] for i in rows], [str(v) for v in table.labels[rows]]

    res = finetune_split(split(fold.train), split(fold.val) if len(fold.val) else None,
                         split(fold.test), model=enc.spec, weights=enc.weights,
                         seed=seed, **options)
    info, tm = res.info, res.info["timings"]
    params = {**info["settings"], "parameters": info["parameters"],
              "trained_on": "train (val picks the epoch)"}
    conf = res.test_proba.max(1) if len(res.test_proba) else np.zeros(0)
    ms = float(tm["test_ms_per_image"] or 0.0)
    return Outcome("finetune", METHOD_NAMES["finetune"], "finetune", params,
                   res.test_pred.astype(str), conf, float(tm["train_wall_seconds"]), ms, ms,
                   int(info["model_bytes"]), {},
                   {"train_cpu_seconds": tm["train_cpu_seconds"],
                    "train_gpu_seconds": tm["train_gpu_seconds"],
                    "epochs_run": info["epochs_run"], "best_epoch": info["best_epoch"],
                    "stopped_by": info["stopped_by"], "history": info["history"]})


__all__ = ["finetune_outcome"]

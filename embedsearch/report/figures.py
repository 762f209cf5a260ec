"""The report's PNGs, drawn from the ``results`` document: the methods × metric bars, the
k sweep, and per encoder a confusion matrix per headline method and a gallery of the most
confident mistakes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedsearch.report.metrics import METRICS
from embedsearch.report.plots import (
    Bar,
    Mistake,
    SweepLine,
    confusion_matrix_png,
    k_sweep_png,
    metric_bars_png,
    mistakes_gallery_png,
)
from embedsearch.report.results import GALLERY, Results, headline

FIGURES = "figures"


def draw_figures(results: Results, test_paths: Sequence[Path], out: Path,
                 gallery_size: int) -> list[Path]:
    """Draw every PNG under ``out/figures`` and record their relative paths in results.

    ``test_paths[i]`` is the file of the i-th test image (``results["predictions"]["ids"]``).
    """
    fig_dir = out / FIGURES
    for old in fig_dir.glob("**/*.png") if fig_dir.is_dir() else []:
        old.unlink()
    written: list[Path] = []
    classes = results["dataset"]["classes"]
    test_ids = results["predictions"]["ids"]
    y_true = np.asarray(results["predictions"]["y_true"])
    single_split = len(results["splits"]["folds"]) == 1
    bar_panels, sweep_panels = [], []
    for enc in results["encoders"]:
        methods = enc["methods"]
        head = headline(methods)
        bar_panels.append((enc["label"], [
            Bar(methods[m]["name"],
                      {k: methods[m]["metrics"][k] for k in METRICS},
                      methods[m]["metrics"]["ci"]) for m in head]))
        sweep = enc["k_sweep"]
        lines = [SweepLine(v, sweep[v]["k"], sweep[v]["accuracy"], sweep[v]["accuracy_ci"])
                 for v in ("plain", "weighted")]
        refs = {methods[m]["name"]: methods[m]["metrics"]["accuracy"]
                for m in ("linear", "mlp", "zeroshot") if m in methods}
        sel = methods.get("knn", {}).get("selection", {})
        chosen = (sel["k"], sel["vote"]) if single_split and "k" in sel else None
        sweep_panels.append((enc["label"], lines, refs, chosen))

        figs: dict[str, dict[str, str]] = {"confusion": {}, "mistakes": {}}
        preds = results["predictions"][enc["slug"]]
        for mid in head:
            m = methods[mid]
            acc = m["metrics"]["accuracy"]
            p = confusion_matrix_png(
                m["metrics"]["confusion"], classes,
                f"{enc['label']}\n{m['name']} · accuracy {acc:.3f}",
                fig_dir / enc["slug"] / f"confusion-{mid}.png")
            written.append(p)
            figs["confusion"][mid] = p.relative_to(out).as_posix()
            if mid not in GALLERY:
                continue
            pred = np.asarray(preds[mid]["y_pred"])
            conf = np.asarray(preds[mid]["confidence"], np.float64)
            wrong = np.flatnonzero(pred != y_true)
            order = wrong[np.lexsort((wrong, -conf[wrong]))][:gallery_size]
            mistakes = [Mistake(test_paths[i], str(test_ids[i]), str(y_true[i]),
                                      str(pred[i]), float(conf[i])) for i in order]
            p = mistakes_gallery_png(
                mistakes, f"{enc['label']} · {m['name']}: the "
                f"{len(mistakes)} most confident of {len(wrong)} mistakes",
                fig_dir / enc["slug"] / f"mistakes-{mid}.png")
            written.append(p)
            figs["mistakes"][mid] = p.relative_to(out).as_posix()
        enc["figures"] = figs
    p = metric_bars_png(bar_panels, fig_dir / "methods.png")
    written.append(p)
    q = k_sweep_png(sweep_panels, fig_dir / "k-sweep.png")
    written.append(q)
    results["figures"] = {"methods": p.relative_to(out).as_posix(),
                          "k_sweep": q.relative_to(out).as_posix()}
    return written


__all__ = ["FIGURES", "draw_figures"]

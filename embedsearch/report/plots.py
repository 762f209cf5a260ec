"""Report figures drawn with matplotlib's object API on the Agg canvas.

``pyplot`` is never imported, so drawing a report does not switch the backend of a
notebook that calls it. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.render.thumbnails import thumbnail_square

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 90
METRIC_COLOURS = {"accuracy": "#1f77b4", "balanced_accuracy": "#ff7f0e", "macro_f1": "#2ca02c"}
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                 "macro_f1": "macro-F1"}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path, dpi: int = DPI, palette: bool = True) -> Path:
    """Write the figure as PNG; ``palette`` stores it in 256 colours (a third of the bytes
    or less, which matters for reports that are committed or mailed; charts lose nothing
    visible, thumbnails very little)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from embedsearch.store.io import atomic_write

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    data = buf.getvalue()
    if palette:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            out = io.BytesIO()
            im.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(
                out, format="PNG", optimize=True)
            data = out.getvalue()
    atomic_write(path, lambda fh: fh.write(data))
    return path


def wrap(text: str, width: int = 48) -> str:
    """Long titles (encoder specs with weights files) broken over lines, not cut off."""
    import textwrap

    return "\n".join(textwrap.fill(line, width, break_on_hyphens=False, break_long_words=True)
                     for line in text.split("\n"))


def shorten(label: str, width: int = 22) -> str:
    """Keep tick labels legible: long class names are cut with an ellipsis."""
    return label if len(label) <= width else label[: width - 1] + "…"


def confusion_matrix_png(counts: Sequence[Sequence[int]], labels: Sequence[str], title: str,
                         path: Path) -> Path:
    """Confusion matrix normalised by true class (each row sums to 100 %).

    The figure grows with the number of classes; x labels are rotated; rows show the
    support so a 100 % on three images is not mistaken for one on three hundred.
    """
    cm = np.asarray(counts, np.float64)
    k = len(labels)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(support[:, None] > 0, cm / support[:, None], np.nan)
    side = min(max(3.2 + 0.42 * k, 4.5), 26.0)
    fig = _figure(side + 1.4, side)
    ax = fig.add_subplot()
    cmap = _cmap("Blues")
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap=cmap, interpolation="nearest")
    font = 9 if k <= 12 else 7 if k <= 25 else 5
    if k <= 40:
        for i in range(k):
            for j in range(k):
                v = norm[i, j]
                if np.isnan(v) or (v == 0 and i != j):
                    continue
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=font,
                        color="white" if v > 0.55 else "black")
    ticks = np.arange(k)
    ax.set_xticks(ticks, [shorten(c) for c in labels], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=font + 1)
    ax.set_yticks(ticks, [f"{shorten(c)} ({int(n)})" for c, n in zip(labels, support,
                                                                     strict=True)],
                  fontsize=font + 1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (test images)")
    ax.set_title(wrap(title, max(40, int(7 * side))), fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label("% of the true class", fontsize=8)
    cb.set_ticks([0, 0.25, 0.5, 0.75, 1.0], labels=["0", "25", "50", "75", "100"])
    return _save(fig, path)


def _cmap(name: str) -> Any:
    import matplotlib

    # Grey: rows of classes absent from the test set.
    return matplotlib.colormaps[name].with_extremes(bad="#e8e8e8")


@dataclass
class Bar:
    """One method's figures for the bar chart."""

    name: str
    values: dict[str, float]
    ci: dict[str, list[float]]


def metric_bars_png(panels: Sequence[tuple[str, Sequence[Bar]]], path: Path,
                    metrics: Sequence[str] = tuple(METRIC_LABELS)) -> Path:
    """Methods × metric: one panel per encoder, horizontal bars with 95 % CI whiskers."""
    n_methods = max((len(bars) for _, bars in panels), default=1)
    height = 1.2 + 0.28 * n_methods * len(metrics) + 0.2 * n_methods
    fig = _figure(1.8 + 4.6 * len(panels), height)
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    bar_h = 0.8 / len(metrics)
    for p, (ax, (title, bars)) in enumerate(zip(axes, panels, strict=True)):
        y = np.arange(len(bars))[::-1].astype(float)
        for j, m in enumerate(metrics):
            vals = np.array([b.values.get(m, np.nan) for b in bars])
            pos = y + 0.4 - bar_h * (j + 0.5)
            lo = np.array([b.ci.get(m, [np.nan, np.nan])[0] for b in bars])
            hi = np.array([b.ci.get(m, [np.nan, np.nan])[1] for b in bars])
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
            ax.barh(pos, vals, height=bar_h * 0.92, color=METRIC_COLOURS.get(m),
                    label=METRIC_LABELS.get(m, m) if p == 0 else None,
                    xerr=np.nan_to_num(err), error_kw={"elinewidth": 0.8, "capsize": 1.5,
                                                       "ecolor": "#333333"})
            for yy, v, top in zip(pos, vals, np.fmax(vals, hi), strict=True):
                if not np.isnan(v):
                    ax.text(min(top, 1.0) + 0.012, yy, f"{v:.3f}", va="center", fontsize=6.5,
                            color="#333333")
        ax.set_yticks(y, [b.name for b in bars] if p == 0 else [""] * len(bars), fontsize=9)
        ax.set_xlim(0, 1.12)
        ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_title(wrap(title), fontsize=10)
        ax.set_xlabel("score on the test images (95 % bootstrap CI)", fontsize=8)
    fig.legend(loc="outside lower center", ncol=len(metrics), fontsize=8, frameon=False)
    return _save(fig, path)


@dataclass
class SweepLine:
    """k-sweep accuracy for one vote weighting."""

    label: str
    ks: list[int]
    accuracy: list[float]
    ci: list[list[float]]


def k_sweep_png(panels: Sequence[tuple[str, Sequence[SweepLine], dict[str, float],
                                       tuple[int, str] | None]], path: Path) -> Path:
    """Accuracy against k, plain vs similarity-weighted vote, one panel per encoder.

    Each panel also draws the other methods' test accuracy as labelled horizontal lines
    and marks the k chosen on the validation split.
    """
    fig = _figure(1.2 + 4.6 * len(panels), 4.6)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    styles = {"plain": ("#1f77b4", "o"), "weighted": ("#d62728", "s")}
    ref_colours = ["#2ca02c", "#9467bd", "#8c564b", "#7f7f7f"]
    for ax, (title, lines, refs, chosen) in zip(axes, panels, strict=True):
        all_k: list[int] = []
        for line in lines:
            colour, marker = styles.get(line.label, ("#333333", "^"))
            ks = np.array(line.ks, float)
            acc = np.array(line.accuracy)
            ci = np.array(line.ci, float).reshape(-1, 2)
            ax.fill_between(ks, ci[:, 0], ci[:, 1], color=colour, alpha=0.12, linewidth=0)
            ax.plot(ks, acc, marker=marker, color=colour, label=f"kNN, {line.label} vote",
                    markersize=4, linewidth=1.4)
            all_k.extend(line.ks)
            if chosen is not None and chosen[1] == line.label and chosen[0] in line.ks:
                i = line.ks.index(chosen[0])
                ax.plot([chosen[0]], [acc[i]], marker="*", markersize=13, color=colour,
                        markeredgecolor="black", linestyle="none",
                        label=f"k chosen on val (k={chosen[0]}, {chosen[1]})")
        for (name, value), colour in zip(refs.items(), ref_colours * 3, strict=False):
            ax.axhline(value, color=colour, linestyle="--", linewidth=1.1,
                       label=f"{name} {value:.3f}")
        if all_k:
            uniq = sorted(set(all_k))
            ax.set_xscale("log")
            ax.set_xticks(uniq, [str(k) for k in uniq])
            ax.minorticks_off()
        ax.set_xlabel("k (neighbours that vote)")
        ax.set_title(wrap(title), fontsize=10)
        ax.grid(color="#e5e5e5", linewidth=0.6)
        # Below the axes: inside, the legend would hide the small-k points.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
                  frameon=False)
    axes[0].set_ylabel("test accuracy (95 % CI band)")
    return _save(fig, path)


@dataclass
class Mistake:
    """One wrongly classified test image for the gallery."""

    path: Path
    id: str
    true: str
    pred: str
    confidence: float


def mistakes_gallery_png(mistakes: Sequence[Mistake], title: str, path: Path,
                         columns: int = 6, thumb: int = 150) -> Path:
    """A grid of thumbnails: the most confident wrong predictions first."""
    n = max(len(mistakes), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = _figure(1.95 * cols, 2.35 * rows + 0.45)
    fig.suptitle(wrap(title, 16 * cols), fontsize=10)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not mistakes:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center",
                        transform=axes[0, 0].transAxes)
    for ax, m in zip(axes.ravel(), mistakes, strict=False):
        ax.imshow(thumbnail_square(m.path, thumb))
        ax.set_title(f"true: {shorten(m.true, 18)}\npred: {shorten(m.pred, 18)} "
                     f"({m.confidence:.2f})", fontsize=7.5, color="#b00020", loc="left")
        ax.text(0.0, -0.04, shorten(Path(m.id).name, 28), transform=ax.transAxes, fontsize=6,
                color="#555555", va="top")
    return _save(fig, path, dpi=80)


"""Audit outputs: issues.csv/.parquet (one row per image), summary.json, one self-contained
HTML page with thumbnails per issue type, the relabel CSV, and the quarantine action.

Thumbnails and the page shell and style come from :mod:`embedsearch.render.html`, the
duplicate / leakage sub-reports from :mod:`embedsearch.dedupe.report`; the quarantine
moves files with the dedupe actions' undoable
:func:`~embedsearch.dedupe.actions.move_files` (undo: ``embedsearch dedupe-undo``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.audit.pixels import SPURIOUS_CATEGORIES, SPURIOUS_THRESHOLDS
from embedsearch.render.html import GALLERY_CSS, Thumbnails, escape, page
from embedsearch.store.io import atomic_write, write_json, write_parquet

if TYPE_CHECKING:
    from embedsearch.audit.core import AuditResult
    from embedsearch.dedupe.actions import ActionReport

#: Images per section of the HTML page (the CSV always has every image).
MAX_HTML_ROWS = 60
#: Neighbours shown beside each label-error / outlier image.
SHOWN_NEIGHBOURS = 4
THUMB, SMALL_THUMB = 150, 96
#: Issue types that --quarantine-to moves by default: images that should not be trained on
#: whatever their label. Label errors are for relabelling (--relabel-csv) instead.
DEFAULT_QUARANTINE = ("outlier", "spurious", "duplicate")
RELABEL_COLUMNS = ["id", "given_label", "suggested_label", "suggested_prob", "label_score",
                   "decision", "new_label"]


def write_audit(result: AuditResult, out: str | os.PathLike[str], *, html_page: bool = True,
                max_rows: int = MAX_HTML_ROWS) -> dict[str, Path]:
    """issues.csv, issues.parquet, summary.json, report.html, and the duplicate (and,
    with splits, leakage) sub-reports in ``duplicates/`` and ``leakage/``."""
    from embedsearch import dedupe as dd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = result.frame
    paths = {"issues_csv": out / "issues.csv", "issues_parquet": out / "issues.parquet",
             "summary": out / "summary.json"}
    data = frame.to_csv(index=False).encode()
    atomic_write(paths["issues_csv"], lambda fh: fh.write(data))
    write_parquet(paths["issues_parquet"], frame)
    write_json(paths["summary"], {**result.summary, **result.extra})
    dup_files = dd.write_report(result.dedupe, out / "duplicates", root=result.root,
                                html_page=html_page, title=f"Duplicates in {result.name}")
    paths["duplicates"] = dup_files.get("html", dup_files["groups_csv"])
    if result.leakage is not None:
        leak = dd.write_leakage(result.leakage, out / "leakage", result.root, result.root,
                                html_page=html_page)
        paths["leakage"] = leak.get("leakage_html", leak["leakage_csv"])
    if html_page:
        paths["html"] = out / "report.html"
        page = render_html(result, max_rows=max_rows, links={
            k: os.path.relpath(v, out) for k, v in paths.items() if k in ("duplicates",
                                                                          "leakage")})
        atomic_write(paths["html"], lambda fh: fh.write(page.encode()))
    return paths


def write_relabel_csv(result: AuditResult, path: str | os.PathLike[str]) -> Path:
    """The label suggestions as a CSV a person edits: one row per flagged image, most
    likely wrong first; ``decision`` is empty (fill in relabel / keep / exclude) and
    ``new_label`` starts as the suggestion."""
    import pandas as pd

    rows = result.ranked("label")
    table = pd.DataFrame({
        "id": rows["id"], "given_label": rows["label"],
        "suggested_label": rows["suggested_label"],
        "suggested_prob": rows["suggested_prob"].round(4),
        "label_score": rows["label_score"].round(4), "decision": "",
        "new_label": rows["suggested_label"]}, columns=RELABEL_COLUMNS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = table.to_csv(index=False).encode()
    atomic_write(path, lambda fh: fh.write(data))
    return path


def quarantine(result: AuditResult, dest: str | os.PathLike[str],
               issues: tuple[str, ...] | list[str] = DEFAULT_QUARANTINE) -> ActionReport:
    """Move the images flagged with any of ``issues`` to ``dest/<id>`` (never deletes).
    The undo manifest is written first; ``embedsearch dedupe-undo MANIFEST`` restores
    them. Duplicates move only while the copy they duplicate is still in place."""
    from embedsearch.dedupe.actions import move_files

    frame = result.frame.set_index("id")
    entries = []
    for item_id in result.flagged_ids(list(issues)):
        row = frame.loc[item_id]
        entry = {"id": item_id, "sha256": row["sha256"], "issues": row["issues"]}
        if "duplicate" in issues and bool(row["duplicate"]) and row["dup_of"]:
            entry["kept_id"] = row["dup_of"]
        entries.append(entry)
    return move_files(entries, dest, result.root,
                      {"audit": result.name, "issues": list(issues)}, what="--quarantine-to")


# -- HTML ------------------------------------------------------------------------------
_CSS_EXTRA = """
.row{display:flex;gap:1em;align-items:flex-start;border-bottom:1px solid #eee;padding:.5em 0}
.row figure.main img{border-color:#d33}
.neigh{display:flex;gap:.4em;flex-wrap:wrap}
.neigh figure{width:110px}.neigh figure img{max-width:96px;max-height:96px;border-width:2px}
.agree img{border-color:#2a2 !important}.differ img{border-color:#d80 !important}
.score{font-weight:bold}.note{color:#555;max-width:60em}
nav a{margin-right:1em}
"""


def render_html(result: AuditResult, *, max_rows: int = MAX_HTML_ROWS,
                links: dict[str, str] | None = None) -> str:
    """The audit page: a summary, then per issue type the flagged images, most severe
    first, each with its given label, the suggested label and its nearest neighbours."""
    e = escape
    s = result.summary
    thumbs = Thumbnails(result.root, size=THUMB, lazy=True)
    frame = result.frame
    labels = frame["label"].to_numpy(dtype=object)
    ids = frame["id"].to_numpy(dtype=object)
    title = f"Audit of {result.name}"
    parts = ["<nav>" + "".join(f"<a href='#{k}'>{k}</a>" for k in
                               ("labels", "outliers", "spurious", "duplicates", "balance"))
             + "</nav>", _summary_table(s)]

    def caption(i: int, extra: str = "") -> str:
        lab = "" if labels[i] is None or labels[i] != labels[i] else \
            f"<br>label: <b>{e(str(labels[i]))}</b>"
        return f"<figcaption>{e(str(ids[i]))}{lab}{extra}</figcaption>"

    def neighbours(i: int, given: Any) -> str:
        out = []
        for j, sim in zip(result.neighbours.ids[i][:SHOWN_NEIGHBOURS],
                          result.neighbours.sims[i][:SHOWN_NEIGHBOURS], strict=True):
            if j < 0:
                continue
            cls = "agree" if labels[j] == given else "differ"
            out.append(f"<figure class='{cls}'>{thumbs.img(ids[j], SMALL_THUMB)}"
                       f"{caption(int(j), f'<br>similarity {sim:.2f}')}</figure>")
        return "<div class='neigh'>" + "".join(out) + "</div>"

    # Label errors
    rows = result.ranked("label")
    parts.append(f"<h2 id='labels'>Likely label errors ({len(rows)})</h2><p class='note'>"
                 "Ranked by how unlikely the given label is under the average of an "
                 "out-of-fold linear head and the vote of the nearest neighbours. Green "
                 "border: a neighbour with the same label as the image; orange: another "
                 "label. Edit the suggestions with <code>--relabel-csv</code>.</p>")
    index_of = {v: k for k, v in enumerate(ids.tolist())}
    for r in rows.head(max_rows).itertuples():
        i = index_of[r.id]
        extra = (f"<br>suggested: <b>{e(str(r.suggested_label))}</b> "
                 f"({r.suggested_prob:.2f})<br><span class='score'>label score "
                 f"{r.label_score:.2f}</span>")
        parts.append(f"<div class='row'><figure class='main'>{thumbs.img(r.id)}"
                     f"{caption(i, extra)}</figure>{neighbours(i, labels[i])}</div>")
    # Outliers
    rows = result.ranked("outlier")
    parts.append(f"<h2 id='outliers'>Outliers / off-topic ({len(rows)})</h2><p class='note'>"
                 "Furthest from this collection, in its robust standard deviations: the "
                 "larger of the Mahalanobis distance to the nearest class mean (finds groups "
                 "of off-topic images) and the distance to the nearest neighbours (finds "
                 f"lone ones); flagged above {s['outlier_cut']:g}.</p>")
    for r in rows.head(max_rows).itertuples():
        i = index_of[r.id]
        parts.append(f"<div class='row'><figure class='main'>{thumbs.img(r.id)}"
                     f"{caption(i, f'<br>outlier score {r.outlier_score:.2f}')}</figure>"
                     f"{neighbours(i, labels[i])}</div>")
    # Spurious
    parts.append("<h2 id='spurious'>Low-information images</h2><p class='note'>From the "
                 "pixels: thresholds per category in the table; images flagged in "
                 "several categories appear in each.</p>")
    quiet = []
    for cat in SPURIOUS_CATEGORIES:
        col = f"spurious_{cat}"
        flagged = frame[frame["spurious"].str.split(",").apply(lambda f, c=cat: c in f)]
        if not len(flagged):
            quiet.append(cat)
            continue
        flagged = flagged.sort_values(col, ascending=False, kind="stable")
        parts.append(f"<h3>{e(cat)} ({len(flagged)}; score ≥ "
                     f"{SPURIOUS_THRESHOLDS[cat]:g})</h3><div class='members'>")
        for r in flagged.head(max_rows).itertuples():
            parts.append(f"<figure class='removed'>{thumbs.img(r.id)}"
                         f"{caption(index_of[r.id], f'<br>{cat} {getattr(r, col):.2f}')}"
                         "</figure>")
        parts.append("</div>")
    if quiet:
        parts.append(f"<p>None flagged: {e(', '.join(quiet))}.</p>")
    # Duplicates, conflicts, leakage
    links = links or {}
    parts.append(f"<h2 id='duplicates'>Duplicates, label conflicts, leakage</h2><p>"
                 f"{s['duplicates']:,} removable copies in {s['duplicate_groups']:,} groups "
                 f"(threshold {e(dup_threshold_text(s))}); {s['label_conflict_groups']:,} groups "
                 f"hold different labels; {s['leak_pairs']:,} pairs cross splits.")
    for key, text in (("duplicates", "all groups"), ("leakage", "pairs across splits")):
        if key in links:
            parts.append(f" <a href='{e(links[key])}'>{text}</a>")
    parts.append("</p>")
    conflicts = result.ranked("conflict")
    for _gid, grp in list(conflicts.groupby("dup_group", sort=True))[:max_rows // 3]:
        parts.append("<div class='group conflict'><div class='members'>")
        for r in grp.itertuples():
            parts.append(f"<figure>{thumbs.img(r.id)}{caption(index_of[r.id])}</figure>")
        parts.append("</div></div>")
    # Balance
    imb = s.get("imbalance") or {}
    parts.append("<h2 id='balance'>Class balance</h2>")
    if imb:
        top = max(imb["classes"].values())
        parts.append("<table><tr><th>class</th><th>images</th><th></th></tr>" + "".join(
            f"<tr><td>{e(c)}</td><td>{n:,}</td><td><div style='background:#48c;height:10px;"
            f"width:{int(300 * n / top)}px'></div></td></tr>"
            for c, n in imb["classes"].items()) + "</table>"
            f"<p>Largest / smallest: {imb['ratio_largest_smallest']:g}. Under a third of the "
            f"largest class: {e(', '.join(imb['under_represented']) or 'none')}.</p>")
    else:
        parts.append("<p>No labels.</p>")
    return page(title, "".join(parts), GALLERY_CSS + _CSS_EXTRA)


def _summary_table(s: dict[str, Any]) -> str:
    e = escape
    rows = [("images", s["images"]), ("labelled", s["labelled"]),
            ("likely label errors", s["label_issues"]), ("outliers", s["outliers"]),
            ("low-information", s["spurious"]), ("removable duplicates", s["duplicates"]),
            ("label-conflict groups", s["label_conflict_groups"]),
            ("pairs across splits", s["leak_pairs"]),
            ("images with any issue", s["flagged_images"])]
    return "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{v:,}</td></tr>" for k, v in rows) \
        + "</table>"


def summary_lines(result: AuditResult) -> list[str]:
    """The stdout summary table: one line per issue type with its count and top example."""
    s = result.summary
    lines = [f"{'issue':24s} {'images':>7s}  top example"]

    def top(issue: str, what: str) -> str:
        rows = result.ranked(issue)
        if not len(rows):
            return ""
        r = rows.iloc[0]
        return f"{r['id']} ({what.format(**r.to_dict())})"

    spur = ", ".join(f"{k} {v}" for k, v in s["spurious_by_category"].items())
    table = [
        ("likely label errors", s["label_issues"],
         top("label", "{label} -> {suggested_label} {suggested_prob:.2f}")),
        ("outliers / off-topic", s["outliers"], top("outlier", "score {outlier_score:.2f}")),
        ("low-information", s["spurious"], spur),
        ("removable duplicates", s["duplicates"], top("duplicate", "copy of {dup_of}")),
        ("label-conflict groups", s["label_conflict_groups"], ""),
        ("pairs across splits", s["leak_pairs"], top("leak", "duplicates {leak_with}")),
    ]
    lines += [f"{k:24s} {v:7,d}  {ex}" for k, v, ex in table]
    imb = s.get("imbalance") or {}
    if imb:
        lines.append(f"{'class imbalance':24s} {imb['ratio_largest_smallest']:7g}x "
                     f"largest/smallest; under a third of the largest: "
                     f"{', '.join(imb['under_represented']) or 'none'}")
    lines.append(f"{'duplicate threshold':24s} {dup_threshold_text(s)}")
    stats = s["pixel_stats"]
    if stats["computed_from_files"]:
        lines.append(f"pixel statistics: {stats['computed_from_files']:,} images decoded "
                     "(bundle built before they were stored; rebuild to store them)")
    return lines


def dup_threshold_text(summary: dict[str, Any]) -> str:
    """The duplicate threshold and where it came from, as ``dedupe`` prints it."""
    from embedsearch.dedupe.calibrate import Calibration

    t = float(summary["dup_threshold"])
    evidence = summary.get("dup_calibration")
    if evidence:
        return f"{Calibration(t, evidence).describe()} (override: -t/--dup-threshold)"
    return f"{t:g} (given)"


def json_records(result: AuditResult, all_rows: bool = False) -> list[dict[str, Any]]:
    """One JSON-ready dict per image (only flagged images unless ``all_rows``)."""
    frame = result.frame if all_rows else result.frame[result.frame["issues"] != ""]
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v

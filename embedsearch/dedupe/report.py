"""Dedupe reports: groups as CSV + parquet, label conflicts, a summary, and one
self-contained HTML page with the members of each group side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedsearch.dedupe.group import DedupeResult
from embedsearch.render.html import GALLERY_CSS, Thumbnails, escape, page
from embedsearch.store.io import atomic_write, write_json, write_parquet

if TYPE_CHECKING:
    import pandas as pd

#: Groups drawn in the HTML page (the CSV always has all of them).
MAX_HTML_GROUPS = 400


def write_report(result: DedupeResult, out: str | os.PathLike[str], *,
                 root: str | os.PathLike[str] | None = None, html_page: bool = True,
                 max_groups: int = MAX_HTML_GROUPS, title: str | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write groups.csv, groups.parquet, label_conflicts.csv, summary.json and report.html
    into ``out``; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"groups_csv": out / "groups.csv", "groups_parquet": out / "groups.parquet",
             "label_conflicts": out / "label_conflicts.csv", "summary": out / "summary.json"}
    _write_csv(paths["groups_csv"], result.groups)
    write_parquet(paths["groups_parquet"], result.groups)
    _write_csv(paths["label_conflicts"], result.label_conflicts)
    if result.near_misses is not None:
        paths["near_misses"] = out / "near_misses.csv"
        _write_csv(paths["near_misses"], result.near_misses)
    write_json(paths["summary"], {**result.summary(), **(extra or {})})
    if html_page:
        base = Path(root) if root is not None else Path(result.extra.get("root", "."))
        paths["html"] = out / "report.html"
        page = render_html(result, base, max_groups=max_groups, title=title)
        atomic_write(paths["html"], lambda fh: fh.write(page.encode()))
    return paths


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    data = df.to_csv(index=False).encode()
    atomic_write(path, lambda fh: fh.write(data))


def render_html(result: DedupeResult, root: Path, *, max_groups: int = MAX_HTML_GROUPS,
                title: str | None = None) -> str:
    """The report page. Groups with the lowest similarity come first: those are the ones
    that tell whether the threshold is right."""
    e = escape
    g = result.groups
    s = result.summary()
    thumbs = Thumbnails(root)
    conflicts = set(result.label_conflicts["group"].tolist())
    parts = ["<table>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>"
                                 for k, v in s.items()) + "</table>",
             "<p>Green border: kept. Orange: removed (a duplicate of the kept image). "
             "Groups are ordered from the least similar member up, so the first groups are "
             "the borderline ones: if they are true duplicates the threshold could go lower, "
             "if not it should go higher (<code>embedsearch dedupe --sweep</code>).</p>"]
    near = _near_miss_section(result, thumbs)
    if not len(g):
        parts.append(f"<p>No duplicates at this threshold.</p>{near}")
        return _page(title, parts)
    order = g.groupby("group")["similarity"].min().sort_values(kind="stable")
    shown = order.index[:max_groups]
    if len(order) > max_groups:
        parts.append(f"<p>Showing the {max_groups} least similar of {len(order)} groups; "
                     "groups.csv lists all.</p>")
    by_group = dict(tuple(g.groupby("group")))
    for gid in shown:
        rows = by_group[gid]
        labels = sorted({str(v) for v in rows["label"].dropna()})
        conflict = gid in conflicts
        head = (f"group {gid}: {len(rows)} images, lowest similarity to kept "
                f"{order[gid]:.3f}")
        if labels:
            head += f"; labels: {', '.join(labels)}"
        if conflict:
            head += " — LABEL CONFLICT"
        parts.append(f"<div class='group{' conflict' if conflict else ''}'><h3>{e(head)}</h3>"
                     "<div class='members'>")
        for r in rows.itertuples():
            img = thumbs.img(r.id)
            tag = "kept" if r.kept else f"removed · {r.similarity:.3f}"
            dims = "" if _missing(r.width) or _missing(r.height) else f"{r.width}×{r.height}"
            label = "" if _missing(r.label) else f"<br>label: {e(str(r.label))}"
            parts.append(
                f"<figure class='{'kept' if r.kept else 'removed'}'>{img}<figcaption>"
                f"<span class='tag'>{e(tag)}</span><br>{e(r.id)}<br>{e(dims)}{label}"
                f"<br><i>{e(r.reason)}</i></figcaption></figure>")
        parts.append("</div></div>")
    parts.append(near)
    return _page(title, parts)


def _page(title: str | None, parts: list[str]) -> str:
    return page(title or "embedsearch dedupe report", "".join(parts), GALLERY_CSS,
                title or "Duplicate groups")


#: Near-miss pairs drawn in the HTML page (near_misses.csv has up to MAX_NEAR_MISSES).
MAX_HTML_NEAR_MISSES = 40


def _near_miss_section(result: DedupeResult, thumbs: Thumbnails) -> str:
    """Pairs just below the threshold that were left apart: what a person should look at
    to decide whether the threshold could go lower."""
    e = escape
    nm = result.near_misses
    head = "<h2 id='near-misses'>Near misses</h2>"
    if nm is None or not len(nm):
        return head + "<p>No pair just below the threshold.</p>"
    parts = [head, f"<p>{len(nm)} pairs just below the threshold {result.threshold:.3f} were "
             "left in different groups (most similar first). If these are copies, lower "
             "<code>--dup-threshold</code>; if they are distinct look-alikes, the threshold is "
             "right.</p>"]
    for r in nm.head(MAX_HTML_NEAR_MISSES).itertuples():
        parts.append(f"<div class='group'><h3>{e(f'cosine {r.similarity:.3f}')}</h3>"
                     "<div class='members'>")
        for rid in (r.id_a, r.id_b):
            parts.append(f"<figure>{thumbs.img(rid, alt='')}<figcaption>{e(str(rid))}"
                         "</figcaption></figure>")
        parts.append("</div></div>")
    return "".join(parts)


def _missing(value: object) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def write_leakage(pairs: pd.DataFrame, out: str | os.PathLike[str],
                  root_a: Path | None = None, root_b: Path | None = None,
                  html_page: bool = True, max_pairs: int = MAX_HTML_GROUPS) -> dict[str, Path]:
    """leakage.csv (+ leakage.html with both images of each pair side by side)."""
    e = escape
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"leakage_csv": out / "leakage.csv"}
    _write_csv(paths["leakage_csv"], pairs)
    if html_page and root_a is not None:
        thumbs = (Thumbnails(root_a), Thumbnails(root_b or root_a))
        body = [f"<p>{len(pairs)} pairs.</p>"]
        for r in pairs.head(max_pairs).itertuples():
            body.append("<div class='group'><h3>" + e(
                f"{r.split_a} vs {r.split_b}: similarity {r.similarity:.3f}"
                + (" (byte-identical)" if r.exact else "")) + "</h3><div class='members'>")
            for rid, side, lab in ((r.id_a, thumbs[0], r.label_a), (r.id_b, thumbs[1],
                                                                   r.label_b)):
                body.append(f"<figure>{side.img(rid, alt='')}<figcaption>{e(str(rid))}"
                            f"{'' if _missing(lab) else '<br>label: ' + e(str(lab))}"
                            "</figcaption></figure>")
            body.append("</div></div>")
        paths["leakage_html"] = out / "leakage.html"
        html = page("leakage", "".join(body), GALLERY_CSS, "Duplicates across splits")
        atomic_write(paths["leakage_html"], lambda fh: fh.write(html.encode()))
    return paths

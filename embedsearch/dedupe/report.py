"""Dedupe reports: groups as CSV + parquet, label conflicts, a summary, and one
self-contained HTML page with the members of each group side by side."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedsearch.dedupe.group import DedupeResult
from embedsearch.store.io import atomic_write, write_json, write_parquet

if TYPE_CHECKING:
    import pandas as pd

#: Groups drawn in the HTML page (the CSV always has all of them).
MAX_HTML_GROUPS = 400
THUMB = 160


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


def thumbnail_data_uri(path: Path, size: int = THUMB) -> str | None:
    """A small JPEG of the image as a data: URI, or None when it cannot be read."""
    from embedsearch.data.images import LoadFailure, load_image

    loaded = load_image(path, target_size=size)
    if isinstance(loaded, LoadFailure):
        return None
    img = loaded.image
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.group{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.6em}
.group.conflict{border-color:#d33}
.members{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:170px;font-size:12px;word-break:break-all}
figure img{max-width:160px;max-height:160px;display:block;border:3px solid #bbb}
figure.kept img{border-color:#2a2}
figure.removed img{border-color:#d80}
.tag{font-weight:bold}.kept .tag{color:#2a2}.removed .tag{color:#d80}
.conflict h3{color:#d33}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
"""


def render_html(result: DedupeResult, root: Path, *, max_groups: int = MAX_HTML_GROUPS,
                title: str | None = None) -> str:
    """The report page. Groups with the lowest similarity come first: those are the ones
    that tell whether the threshold is right."""
    e = html.escape
    g = result.groups
    s = result.summary()
    conflicts = set(result.label_conflicts["group"].tolist())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>"
             f"{e(title or 'embedsearch dedupe report')}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(title or 'Duplicate groups')}</h1>",
             "<table>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>"
                                 for k, v in s.items()) + "</table>",
             "<p>Green border: kept. Orange: removed (a duplicate of the kept image). "
             "Groups are ordered from the least similar member up, so the first groups are "
             "the borderline ones: if they are true duplicates the threshold could go lower, "
             "if not it should go higher (<code>embedsearch dedupe --sweep</code>).</p>"]
    near = _near_miss_section(result, root)
    if not len(g):
        parts.append(f"<p>No duplicates at this threshold.</p>{near}</body></html>")
        return "".join(parts)
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
            src = thumbnail_data_uri(_path(root, r.id))
            img = (f"<img src='{src}' alt='{e(r.id)}'>" if src
                   else "<div>(image not readable)</div>")
            tag = "kept" if r.kept else f"removed · {r.similarity:.3f}"
            dims = "" if _missing(r.width) or _missing(r.height) else f"{r.width}×{r.height}"
            label = "" if _missing(r.label) else f"<br>label: {e(str(r.label))}"
            parts.append(
                f"<figure class='{'kept' if r.kept else 'removed'}'>{img}<figcaption>"
                f"<span class='tag'>{e(tag)}</span><br>{e(r.id)}<br>{e(dims)}{label}"
                f"<br><i>{e(r.reason)}</i></figcaption></figure>")
        parts.append("</div></div>")
    parts.append(near + "</body></html>")
    return "".join(parts)


#: Near-miss pairs drawn in the HTML page (near_misses.csv has up to MAX_NEAR_MISSES).
MAX_HTML_NEAR_MISSES = 40


def _near_miss_section(result: DedupeResult, root: Path) -> str:
    """Pairs just below the threshold that were left apart: what a person should look at
    to decide whether the threshold could go lower."""
    e = html.escape
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
            src = thumbnail_data_uri(_path(root, rid))
            img = f"<img src='{src}' alt=''>" if src else "<div>(not readable)</div>"
            parts.append(f"<figure>{img}<figcaption>{e(str(rid))}</figcaption></figure>")
        parts.append("</div></div>")
    return "".join(parts)


def _missing(value: object) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def _path(root: Path, item_id: str) -> Path:
    p = Path(item_id)
    return p if p.is_absolute() else root / p


def write_leakage(pairs: pd.DataFrame, out: str | os.PathLike[str],
                  root_a: Path | None = None, root_b: Path | None = None,
                  html_page: bool = True, max_pairs: int = MAX_HTML_GROUPS) -> dict[str, Path]:
    """leakage.csv (+ leakage.html with both images of each pair side by side)."""
    e = html.escape
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"leakage_csv": out / "leakage.csv"}
    _write_csv(paths["leakage_csv"], pairs)
    if html_page and root_a is not None:
        rb = root_b or root_a
        body = [f"<!doctype html><html><head><meta charset='utf-8'><title>leakage</title>"
                f"<style>{_CSS}</style></head><body><h1>Duplicates across splits</h1>"
                f"<p>{len(pairs)} pairs.</p>"]
        for r in pairs.head(max_pairs).itertuples():
            body.append("<div class='group'><h3>" + e(
                f"{r.split_a} vs {r.split_b}: similarity {r.similarity:.3f}"
                + (" (byte-identical)" if r.exact else "")) + "</h3><div class='members'>")
            for rid, base, lab in ((r.id_a, root_a, r.label_a), (r.id_b, rb, r.label_b)):
                src = thumbnail_data_uri(_path(base, rid))
                img = f"<img src='{src}' alt=''>" if src else "<div>(not readable)</div>"
                body.append(f"<figure>{img}<figcaption>{e(str(rid))}"
                            f"{'' if _missing(lab) else '<br>label: ' + e(str(lab))}"
                            "</figcaption></figure>")
            body.append("</div></div>")
        body.append("</body></html>")
        paths["leakage_html"] = out / "leakage.html"
        page = "".join(body)
        atomic_write(paths["leakage_html"], lambda fh: fh.write(page.encode()))
    return paths

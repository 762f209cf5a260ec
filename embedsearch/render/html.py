"""The HTML pieces every report page shares: the page shell, escaping, the gallery style of
the dedupe / leakage / audit pages, and thumbnails embedded as ``data:`` URIs.

Every page is self-contained (inline style, images as data URIs, no scripts), so it can be
mailed, committed or opened from a folder without a server.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from embedsearch.render.thumbnails import THUMB, thumbnail_data_uri

#: Style of the pages that show images side by side in groups (dedupe, leakage, audit).
GALLERY_CSS = """
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


def page(title: str, body: str, css: str = "", heading: str | None = None) -> str:
    """One self-contained HTML page: ``title`` in the tab, ``heading`` (default: the
    title) as its h1, then ``body`` (HTML, already escaped by the caller)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{css}</style></head>\n<body>\n"
            f"<h1>{escape(title if heading is None else heading)}</h1>\n{body}\n"
            "</body></html>\n")


class Thumbnails:
    """``<img>`` tags of a collection's images as data: URIs, each image decoded once per
    page; ids are paths relative to ``root`` (or absolute)."""

    def __init__(self, root: Path, *, size: int = THUMB, lazy: bool = False) -> None:
        self.root = Path(root)
        self.size = size
        self.lazy = lazy
        self._cache: dict[tuple[str, int], str | None] = {}

    def path(self, item_id: str) -> Path:
        p = Path(item_id)
        return p if p.is_absolute() else self.root / p

    def img(self, item_id: str, size: int | None = None, alt: str | None = None) -> str:
        """The image's ``<img>`` tag (``size``: default the page's), or a note when it
        cannot be read."""
        size = size or self.size
        key = (str(item_id), size)
        if key not in self._cache:
            self._cache[key] = thumbnail_data_uri(self.path(str(item_id)), size)
        src = self._cache[key]
        if not src:
            return "<div>(image not readable)</div>"
        lazy = " loading='lazy'" if self.lazy else ""
        return f"<img src='{src}' alt='{escape(str(item_id) if alt is None else alt)}'{lazy}>"


__all__ = ["GALLERY_CSS", "Thumbnails", "escape", "page"]

"""A tiny document model rendered twice: Markdown (PNGs as files beside it) and one
self-contained HTML page (PNGs embedded as base64).

Building the report once as blocks and rendering it twice keeps the two files in step;
every piece of text passes through one escaping function per format, so a class called
``<script>`` or ``a|b`` is shown, never interpreted.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embedsearch.render.html import page

# -- inline -------------------------------------------------------------------------------


@dataclass
class Code:
    text: str


@dataclass
class Bold:
    text: str


@dataclass
class Link:
    text: str
    href: str


Inline = str | Code | Bold | Link
Text = Inline | Sequence[Inline]

# -- blocks -------------------------------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str
    anchor: str | None = None


@dataclass
class Para:
    text: Text


@dataclass
class Bullets:
    items: list[Text]


@dataclass
class Table:
    header: list[str]
    rows: list[list[Text]]
    #: "l" or "r" per column ("r" for numbers).
    align: str = ""


@dataclass
class Image:
    path: Path  # absolute
    alt: str
    caption: str = ""


@dataclass
class ImageRow:
    """Images laid side by side in HTML (one after another in Markdown)."""

    images: list[Image]


@dataclass
class CodeBlock:
    text: str


@dataclass
class Details:
    summary: str
    blocks: list[Block] = field(default_factory=list)


Block = Heading | Para | Bullets | Table | Image | ImageRow | CodeBlock | Details


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


# -- Markdown -----------------------------------------------------------------------------
# Characters that would change the rendering: backslash, code, emphasis, HTML, table
# cells, a link opener "](", and an underscore that is not inside a word (GitHub ignores
# intraword ones, so mobilenet_v2 stays readable in the raw file).
_MD_SPECIAL = re.compile(r"([\\`*<>|]|\](?=\()|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def md_escape(text: str) -> str:
    out = _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")
    return "\\" + out if out.startswith(("#", "-", "+", ">")) else out


def _md_inline(text: Text) -> str:
    if isinstance(text, str):
        return md_escape(text)
    if isinstance(text, Code):
        body = str(text.text).replace("\n", " ")
        ticks = "``" if "`" in body else "`"
        return f"{ticks}{body}{ticks}" if ticks == "`" else f"`` {body} ``"
    if isinstance(text, Bold):
        return f"**{md_escape(text.text)}**"
    if isinstance(text, Link):
        return f"[{md_escape(text.text)}](<{text.href}>)"
    return "".join(_md_inline(t) for t in text)


def _md_block(block: Block, base: Path) -> list[str]:
    if isinstance(block, Heading):
        return ["#" * block.level + " " + md_escape(block.text), ""]
    if isinstance(block, Para):
        return [_md_inline(block.text), ""]
    if isinstance(block, Bullets):
        return [*("- " + _md_inline(t) for t in block.items), ""]
    if isinstance(block, Table):
        align = block.align or "l" * len(block.header)
        out = ["| " + " | ".join(md_escape(h) for h in block.header) + " |",
               "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
        out += ["| " + " | ".join(_md_inline(c) for c in row) + " |" for row in block.rows]
        return [*out, ""]
    if isinstance(block, Image):
        rel = block.path.relative_to(base).as_posix() if block.path.is_relative_to(base) \
            else block.path.as_posix()
        out = [f"![{md_escape(block.alt)}](<{rel}>)", ""]
        if block.caption:
            out += [f"*{md_escape(block.caption)}*", ""]
        return out
    if isinstance(block, ImageRow):
        return [line for im in block.images for line in _md_block(im, base)]
    if isinstance(block, CodeBlock):
        fence = "````" if "```" in block.text else "```"
        return [fence, block.text, fence, ""]
    if isinstance(block, Details):
        out = ["<details>", f"<summary>{html.escape(block.summary)}</summary>", ""]
        for b in block.blocks:
            out += _md_block(b, base)
        return [*out, "</details>", ""]
    raise TypeError(block)


def to_markdown(doc: Document, base: Path) -> str:
    """Markdown with image links relative to ``base`` (the folder the .md lives in)."""
    lines = [f"# {md_escape(doc.title)}", ""]
    for b in doc.blocks:
        lines += _md_block(b, base)
    return "\n".join(lines).rstrip() + "\n"


# -- HTML ---------------------------------------------------------------------------------
_CSS = """
body{font:15px/1.5 -apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;
 color:#1d1d1f;max-width:1180px;margin:2em auto;padding:0 1.2em;background:#fff}
h1{font-size:1.7em;border-bottom:2px solid #e3e3e3;padding-bottom:.3em}
h2{font-size:1.35em;margin-top:2em;border-bottom:1px solid #eee;padding-bottom:.2em}
h3{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;margin:.8em 0;font-size:13.5px}
th,td{border:1px solid #ddd;padding:4px 9px;vertical-align:top}
th{background:#f4f6f8;text-align:left}
td.r{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fafbfc}
code{background:#f2f2f2;padding:1px 4px;border-radius:3px;font-size:90%}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:12.5px;border-radius:4px}
figure{margin:1em 0}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.row figure{margin:.3em 0;flex:0 1 auto;max-width:49%}
img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
details{margin:.6em 0}
summary{cursor:pointer;font-weight:600}
"""


def _html_inline(text: Text) -> str:
    if isinstance(text, str):
        return html.escape(text)
    if isinstance(text, Code):
        return f"<code>{html.escape(text.text)}</code>"
    if isinstance(text, Bold):
        return f"<strong>{html.escape(text.text)}</strong>"
    if isinstance(text, Link):
        href = text.href
        # Report links are relative files or web pages; anything else is shown as text.
        if not re.match(r"^(https?://|[\w./#-]+$)", href):
            return html.escape(text.text)
        return f'<a href="{html.escape(href, quote=True)}">{html.escape(text.text)}</a>'
    return "".join(_html_inline(t) for t in text)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        anchor = html.escape(block.anchor or _slug(block.text), quote=True)
        return f'<h{block.level} id="{anchor}">{html.escape(block.text)}</h{block.level}>'
    if isinstance(block, Para):
        return f"<p>{_html_inline(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_html_inline(t)}</li>" for t in block.items) + "</ul>"
    if isinstance(block, Table):
        align = block.align or "l" * len(block.header)
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
        body = "".join(
            "<tr>" + "".join(f'<td class="{a}">{_html_inline(c)}</td>'
                             for a, c in zip(align, row, strict=True)) + "</tr>"
            for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Image):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        cap = f"<figcaption>{html.escape(block.caption)}</figcaption>" if block.caption else ""
        return (f'<figure><img src="data:image/png;base64,{data}" '
                f'alt="{html.escape(block.alt, quote=True)}">{cap}</figure>')
    if isinstance(block, ImageRow):
        return '<div class="row">' + "".join(_html_block(im) for im in block.images) + "</div>"
    if isinstance(block, CodeBlock):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    if isinstance(block, Details):
        inner = "\n".join(_html_block(b) for b in block.blocks)
        return f"<details><summary>{html.escape(block.summary)}</summary>\n{inner}\n</details>"
    raise TypeError(block)


def to_html(doc: Document) -> str:
    """One self-contained page: inline CSS, images as data URIs, no scripts."""
    return page(doc.title, "\n".join(_html_block(b) for b in doc.blocks), _CSS)

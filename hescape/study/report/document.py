"""A small report document: headings, paragraphs, lists, tables, images -> Markdown and HTML.

The HTML is one self-contained file (inline CSS, images embedded as data URIs), so it
renders in MLflow's artifact viewer, which shows an HTML artifact without its neighbours.
Inline markup in text: ```code```, ``**bold**`` and ``*italic*`` only.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;max-width:1200px;
 color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2}
code{background:#f4f4f4;padding:0 3px;border-radius:3px;font-size:90%}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:12px}
.warning{background:#fff4e0;border-left:4px solid #e69500;padding:.4em .8em;margin:.6em 0}
img{max-width:100%}figure{display:inline-block;margin:.4em}.tw{overflow-x:auto}
"""


@dataclass
class Block:
    kind: str  # heading | para | warning | bullets | table | image | code
    text: str = ""
    level: int = 2
    items: list[str] = field(default_factory=list)
    frame: pd.DataFrame | None = None
    index: bool = False
    path: Path | None = None


@dataclass
class Document:
    """An ordered list of blocks with two renderings (``markdown()`` and ``html()``)."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Block("heading", text, level=level))

    def para(self, text: str) -> None:
        self.blocks.append(Block("para", text))

    def warning(self, text: str) -> None:
        self.blocks.append(Block("warning", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(Block("bullets", items=list(items)))

    def table(self, frame: pd.DataFrame, *, index: bool = False) -> None:
        self.blocks.append(Block("table", frame=frame, index=index))

    def image(self, path: Path, alt: str = "") -> None:
        self.blocks.append(Block("image", alt or Path(path).stem, path=Path(path)))

    def code(self, text: str) -> None:
        self.blocks.append(Block("code", text))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            out += [_md(b), ""]
        return "\n".join(out)

    def html(self) -> str:
        body = "\n".join(_html(b) for b in self.blocks)
        title = html.escape(self.title)
        return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
                f"<title>{title}</title><style>{_CSS}</style></head>\n"
                f"<body><h1>{_inline(self.title)}</h1>\n{body}\n</body></html>\n")


def _fmt(v: object) -> object:
    if isinstance(v, float):
        return "" if v != v else f"{v:.3f}"  # NaN: blank
    return v


def _formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """Floats with 3 decimals, NaN blank (the same in both renderings)."""
    return frame.apply(lambda col: col.map(_fmt))


def _md(b: Block) -> str:
    if b.kind == "heading":
        return f"{'#' * (b.level)} {b.text}"
    if b.kind == "para":
        return b.text
    if b.kind == "warning":
        return f"> **Warning:** {b.text}"
    if b.kind == "bullets":
        return "\n".join(f"- {i}" for i in b.items)
    if b.kind == "table":
        if b.frame is None or b.frame.empty:
            return "(empty)"
        return _formatted(b.frame).to_markdown(index=b.index)
    if b.kind == "image":
        return f"![{b.text}]({b.path.name})"
    return f"```\n{b.text}\n```"


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(?<![*\w])\*([^*\s][^*]*)\*(?![*\w])", r"<em>\1</em>", out)


def _html(b: Block) -> str:
    if b.kind == "heading":
        return f"<h{b.level}>{_inline(b.text)}</h{b.level}>"
    if b.kind == "para":
        return f"<p>{_inline(b.text)}</p>"
    if b.kind == "warning":
        return f"<div class='warning'><strong>Warning:</strong> {_inline(b.text)}</div>"
    if b.kind == "bullets":
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>"
    if b.kind == "table":
        if b.frame is None or b.frame.empty:
            return "<p>(empty)</p>"
        table = _formatted(b.frame).to_html(index=b.index, na_rep="", border=0, escape=True)
        return f"<div class='tw'>{table}</div>"
    if b.kind == "image":
        data = base64.b64encode(b.path.read_bytes()).decode("ascii")
        alt = html.escape(b.text)
        return (f"<figure><img src='data:image/png;base64,{data}' alt='{alt}'>"
                f"<figcaption>{alt}</figcaption></figure>")
    return f"<pre>{html.escape(b.text)}</pre>"

"""The report's document model: a list of small blocks (heading, paragraph, items, table,
figure, code) rendered twice, as Markdown and as one self-contained HTML page, so that
``report.md`` and ``report.html`` always say the same thing."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

_CSS = ("body{font-family:sans-serif;max-width:75em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #bbb;"
        "padding:.2em .6em;text-align:left}pre{background:#f3f3f3;padding:.6em;"
        "overflow-x:auto}img{max-width:100%}figcaption{font-size:90%;color:#444}")


# ---------------------------------------------------------------------------- document model


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) of body cells


@dataclass
class Figure:
    path: str  # relative to the report
    caption: str


@dataclass
class Code:
    text: str


Block = Heading | Paragraph | Items | Table | Figure | Code


def to_markdown(blocks: list[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown."""
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _md(b.text))
        elif isinstance(b, Paragraph):
            out.append(_md(b.text))
        elif isinstance(b, Items):
            out.append("\n".join(f"- {_md(item)}" for item in b.items))
        elif isinstance(b, Table):
            lines = [[_md(c) for c in b.header], ["---"] * len(b.header)] + [
                [f"**{_md(c)}**" if (i, j) in b.bold else _md(c) for j, c in enumerate(row)]
                for i, row in enumerate(b.rows)]
            out.append("\n".join(
                "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in lines))
        elif isinstance(b, Figure):
            out.append(f"![{b.caption}]({b.path})\n\n*{b.caption}*")
        else:
            out.append(f"```\n{b.text}\n```")
    return "\n\n".join(out) + "\n"


def _md(text: str) -> str:
    # A "<" in an error message would open an HTML tag in rendered Markdown and hide the text.
    return text.replace("<", "&lt;")


def to_html(blocks: list[Block], title: str) -> str:
    """Render blocks as one self-contained HTML page (inline CSS, images by relative path)."""
    e = html.escape
    out = [f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>'
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Items):
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(c)}</th>" for c in b.header)
            body = "".join(
                "<tr>" + "".join(f"<td><b>{e(c)}</b></td>" if (i, j) in b.bold
                                 else f"<td>{e(c)}</td>" for j, c in enumerate(row)) + "</tr>"
                for i, row in enumerate(b.rows))
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Figure):
            out.append(f'<figure><img src="{e(b.path)}" alt="{e(b.caption)}">'
                       f"<figcaption>{e(b.caption)}</figcaption></figure>")
        else:
            out.append(f"<pre><code>{e(b.text)}</code></pre>")
    return "\n".join(out) + "\n</body></html>\n"

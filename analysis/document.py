"""A document as a list of blocks (headings, paragraphs, lists, tables, figures), rendered twice:
Markdown (figures as relative links) and one self-contained HTML page (figures as base64 PNG), so
both files say the same."""
from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path

Block = tuple  # ("h", level, text) | ("p", text) | ("ul", [text]) | ("table", header, rows) | ("fig", path, caption)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def render_markdown(doc: Sequence[Block], base: Path) -> str:
    out = []
    for b in doc:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "ul":
            out.append("\n".join(f"- {t}" for t in b[1]))
        elif b[0] == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
                     "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif b[0] == "fig":
            rel = os.path.relpath(b[1], base)
            alt = b[2].replace("[", "\\[").replace("]", "\\]")
            out.append(f"![{alt}]({rel})\n\n*{alt}*")
    return "\n\n".join(out) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #0072B2;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin-top:1.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f3f6f9}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
li{margin:.2em 0}
"""


def render_html(doc: Sequence[Block]) -> str:
    """A self-contained page: inline CSS, PNGs as base64 data URIs, no external resources."""
    title = next((b[2] for b in doc if b[0] == "h" and b[1] == 1), "Report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>"]
    for b in doc:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "fig":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"

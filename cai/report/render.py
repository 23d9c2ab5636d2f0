"""Rendering of a report: a small document model, Markdown and self-contained HTML, and plots.

:mod:`cai.report.build` decides *what* a report says (sections of tables, figures and notes); this
module decides how it looks. The same :class:`Document` renders to

- Markdown (``report.md``), with each figure written as a PNG beside it
  (``report_assets/<name>.png``) and linked, so the report reads well on GitHub, and
- HTML (``report.html``), one file with inline CSS and every figure embedded as a base64
  PNG: it can be mailed or archived and opens offline.

Plots use matplotlib's Agg backend (no display needed) and are imported only when a figure is
drawn. Colours follow the arm order, so an arm has the same colour in every plot.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ASSETS_DIR = "report_assets"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    name: str  # file stem, unique within a report
    png: bytes
    caption: str


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # "not shown because ..." lines
    details: list[Table] = field(default_factory=list)  # long tables, collapsed in HTML
    warnings: list[str] = field(default_factory=list)  # findings that limit the conclusion: a boxed list
    figure_row: bool = False  # figures side by side (HTML), so the answer fits one screen


@dataclass
class Document:
    title: str
    summary: list[str]
    sections: list[Section]


# --------------------------------------------------------------------------- markdown
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    lines = [f"*{t.caption}*", ""] if t.caption else []
    lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    lines.append("|" + "|".join("---" for _ in t.columns) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return lines + [""]


def render_markdown(doc: Document) -> tuple[str, dict[str, bytes]]:
    """The Markdown text and the PNG files it links (``report_assets/<name>.png`` -> bytes)."""
    out = [f"# {doc.title}", ""] + [f"- {line}" for line in doc.summary] + [""]
    assets: dict[str, bytes] = {}
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        if s.warnings:
            out += ["> **Warnings**", ">"] + [f"> - {w}" for w in s.warnings] + [""]
        for note in s.notes:
            out += [f"> {note}", ""]
        for t in s.tables:
            out += _md_table(t)
        for f in s.figures:
            rel = f"{ASSETS_DIR}/{f.name}.png"
            assets[rel] = f.png
            out += [f"![{f.caption}]({rel})", "", f"*{f.caption}*", ""]
        for t in s.details:
            out += _md_table(t)
    return "\n".join(out).rstrip() + "\n", assets


# --------------------------------------------------------------------------- html
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1rem auto;max-width:84rem;
padding:0 1rem;color:#1b1b1b;background:#fff;line-height:1.45}
h1{font-size:1.7rem;border-bottom:2px solid #1f77b4;padding-bottom:.3rem}
h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.88rem}
th,td{border:1px solid #ccc;padding:.3rem .55rem;text-align:left;vertical-align:top}
th{background:#eef3f8}tr:nth-child(even) td{background:#fafafa}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.3rem}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #e3e3e3}
figcaption{font-style:italic;font-size:.9rem;color:#444}
.note{color:#6b5600;background:#fff8dc;border-left:4px solid #e0c200;padding:.35rem .7rem;margin:.5rem 0}
code{font-size:.85rem}ul.summary{padding-left:1.2rem;margin:.3rem 0;font-size:.85rem;color:#444}
h1{margin:.2rem 0 .3rem}#answer h2{margin-top:.8rem}
#answer table{font-size:.82rem;margin:.3rem 0 .5rem}#answer th,#answer td{padding:.2rem .45rem}
#answer td{white-space:nowrap}
.lead{font-size:.82rem;color:#444;margin:.2rem 0}
.figrow{display:flex;gap:1rem;align-items:flex-start}.figrow figure{flex:1;margin:.3rem 0}
.figrow figure img{max-height:330px;width:auto;max-width:100%}
.warnings{background:#fff4f0;border:2px solid #d9541e;border-radius:4px;padding:.5rem .9rem;margin:.6rem 0}
.warnings strong{color:#a33a0c}.warnings ul{margin:.3rem 0 0;padding-left:1.2rem}
"""


def _html_table(t: Table) -> str:
    e = html.escape
    cap = f"<caption>{e(t.caption)}</caption>" if t.caption else ""
    head = "".join(f"<th>{e(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(doc: Document) -> str:
    """One self-contained HTML page (inline CSS, figures as base64 PNG data URIs)."""
    e = html.escape
    parts = [f"<h1>{e(doc.title)}</h1>", '<ul class="summary">']
    parts += [f"<li>{e(line)}</li>" for line in doc.summary] + ["</ul>"]
    for s in doc.sections:
        slug = "".join(ch if ch.isalnum() else "-" for ch in s.title.lower()).strip("-")
        parts.append(f'<section id="{e(slug)}"><h2>{e(s.title)}</h2>')
        if not s.figure_row:
            parts += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        if s.warnings:
            parts.append('<div class="warnings" role="alert"><strong>Warnings</strong><ul>'
                         + "".join(f"<li>{e(w)}</li>" for w in s.warnings) + "</ul></div>")
        parts += [f'<p class="note">{e(n)}</p>' for n in s.notes]
        parts += [_html_table(t) for t in s.tables]
        if s.figure_row:  # the answer: its paragraph reads as the table's caption, below it
            parts += [f'<p class="lead">{e(p)}</p>' for p in s.paragraphs]
            parts.append('<div class="figrow">')
        for f in s.figures:
            data = base64.b64encode(f.png).decode("ascii")
            parts.append(f'<figure id="fig-{e(f.name)}"><img alt="{e(f.caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{e(f.caption)}</figcaption></figure>")
        if s.figure_row:
            parts.append("</div>")
        for t in s.details:
            parts.append(f"<details><summary>{e(t.caption or 'details')}</summary>{_html_table(t)}</details>")
        parts.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(doc.title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


@dataclass(frozen=True)
class Bar:
    """One bar: its value and interval (NaN when there is none)."""

    value: float
    low: float = math.nan
    high: float = math.nan


def bar_chart(groups: Sequence[str], series: Mapping[str, Sequence[Bar | None]], *, ylabel: str,
              reference: float | None = None, ylim: tuple[float, float] | None = None) -> bytes:
    """Grouped bars (``groups`` on the x axis, one bar per series = arm) with error bars."""
    import numpy as np

    plt = _pyplot()
    n_series = max(1, len(series))
    width = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) * max(1, n_series) ** 0.5 + 2), 3.6))
    x = np.arange(len(groups))
    for i, (name, bars) in enumerate(series.items()):
        vals = np.array([b.value if b else np.nan for b in bars], dtype=float)
        low = np.array([b.value - b.low if b and math.isfinite(b.low) else 0.0 for b in bars])
        high = np.array([b.high - b.value if b and math.isfinite(b.high) else 0.0 for b in bars])
        ax.bar(x + (i - (n_series - 1) / 2) * width, vals, width, label=name,
               color=PALETTE[i % len(PALETTE)], yerr=np.vstack([low, high]), capsize=3)
    if reference is not None:
        ax.axhline(reference, color="#555", linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


Series = Sequence[tuple[Sequence[float], Sequence[float]]]  # one (xs, ys) per seed


def _colour(name: str, names: Sequence[str], colours: Mapping[str, str] | None) -> str:
    if colours and name in colours:
        return colours[name]
    return PALETTE[list(names).index(name) % len(PALETTE)] if name in names else PALETTE[0]


def line_panels(panels: Mapping[str, Mapping[str, Series]], *, xlabel: str = "step",
                colours: Mapping[str, str] | None = None, cols: int = 3) -> bytes:
    """One subplot per panel title; in each, one series per name, drawn with markers (a series of
    one point shows). A series of several seeds (several ``(xs, ys)``) is their mean at each x, with
    the band from the lowest to the highest seed."""
    import numpy as np

    plt = _pyplot()
    n = max(1, len(panels))
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 2.8 * rows), squeeze=False)
    names: list[str] = []
    for lines in panels.values():
        names += [k for k in lines if k not in names]
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for name, seeds in lines.items():
            colour = _colour(name, names, colours)
            xs = sorted({float(x) for x_s, _ in seeds for x in x_s})
            table = [dict(zip(map(float, x_s), map(float, y_s))) for x_s, y_s in seeds]
            ys = [[t[x] for t in table if x in t] for x in xs]
            mean = np.array([np.mean(v) for v in ys])
            ax.plot(xs, mean, label=name + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""), color=colour,
                    linewidth=1.4, marker="o", markersize=3.5)
            if len(seeds) > 1:
                ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=colour, alpha=0.18,
                                linewidth=0)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)  # whose line it is, also when one artifact is shared by arms
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def forest_plot(rows: Sequence[tuple[str, Bar]], *, colours: Sequence[str], xlabel: str,
                reference: float = 0.5) -> bytes:
    """One row per label (top to bottom): a point at its value with its interval, and a dashed line
    at ``reference``; the x axis spans [0, 1]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 0.42 * max(1, len(rows)) + 1.0))
    for i, ((_, bar), colour) in enumerate(zip(rows, colours)):
        y = len(rows) - 1 - i
        if math.isfinite(bar.low) and math.isfinite(bar.high):
            ax.plot([bar.low, bar.high], [y, y], color=colour, linewidth=2.2, solid_capstyle="butt")
            for end in (bar.low, bar.high):
                ax.plot([end, end], [y - 0.15, y + 0.15], color=colour, linewidth=1.4)
        if math.isfinite(bar.value):
            ax.plot([bar.value], [y], marker="D", color=colour, markersize=7)
            ax.annotate(f"{bar.value:.2f}", (bar.value, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7.5, color=colour)
    ax.axvline(reference, color="#555", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in reversed(rows)], fontsize=8.5)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(xlabel, fontsize=8.5)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def xy_panels(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], *, xlabel: str,
              ylabel: str, colours: Mapping[str, str] | None = None) -> bytes:
    """One subplot per panel title (side by side); in each, one path per series name through its
    ``(xs, ys)`` points in order, with markers, its first point hollow and its last one filled."""
    plt = _pyplot()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(min(11.0, 3.0 * n + 1.2), 2.9), squeeze=False, sharey=True)
    names: list[str] = []
    for lines in panels.values():
        names += [k for k in lines if k not in names]
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for name, (xs, ys) in lines.items():
            colour = _colour(name, names, colours)
            ax.plot(xs, ys, color=colour, linewidth=1.2, marker="o", markersize=3, label=name, alpha=0.9)
            if xs:
                ax.plot(xs[:1], ys[:1], marker="o", markersize=7, markerfacecolor="white", color=colour)
                ax.plot(xs[-1:], ys[-1:], marker="o", markersize=7, color=colour)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=6.5, frameon=False)
    axes.flat[0].set_ylabel(ylabel, fontsize=8)
    fig.tight_layout()
    return _png(fig)

"""``cai report PATH``: one run or a whole sweep -> ``report.md`` and a self-contained ``report.html``.

Read-only over what :mod:`cai.pipeline` wrote, through :mod:`cai.report.runs` (which finds the run
directories under ``PATH``, reads their records and groups them into arms over seeds). It loads
no model and changes nothing but the report files. An arm's metric over several seeds is shown
as the mean with a Student-t 95% interval (:func:`cai.stats.seed_summary`), a single run's
metric with the interval its stage wrote (``<metric>_ci_low`` / ``<metric>_ci_high``), if any.

Sections (:mod:`cai.report.sections`): runs, arms (headline metrics with intervals; every
metric under a fold), win rates, head to head and paired tests between arms
(:mod:`cai.report.h2h`; the first from ``head_to_head.json``, written by ``cai compare``),
training curves, label agreement per principle, cost,
constitution, config differences, and artifacts: per stage, which runs share which artifact, by
arm and seed, and what makes keys differ (:mod:`cai.report.artifacts`). A section whose data no
run has yet says so in one line instead of being drawn empty. Rendering (Markdown, HTML, plots)
lives in :mod:`cai.report.render`.

Entry points: :func:`write_report` (``-> (md_path, html_path)``), :func:`main` (``cai report``),
and the Hydra callback :class:`cai.cli.ReportCallback`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cai.errors import CaiError
from cai.report.render import Document, Section, render_html, render_markdown
from cai.report.runs import ReportData, collect

log = logging.getLogger(__name__)

def build_document(data: ReportData) -> Document:
    from cai.report.sections import SECTION_BUILDERS  # it reads this module's types

    experiments = sorted({str(r.info.get("experiment", "?")) for r in data.runs})
    summary = [
        f"source: {data.root}",
        f"experiment: {', '.join(experiments)}",
        f"{len(data.runs)} run(s) in {len(data.arms)} arm(s): "
        + "; ".join(f"{a.name} ({len(a.runs)} run{'s' if len(a.runs) != 1 else ''})" for a in data.arms),
    ]
    sections: list[Section] = [build(data) for build in SECTION_BUILDERS]
    return Document(f"cai report: {', '.join(experiments)}", summary, sections)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_report(path: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``report_assets/*.png``) and ``report.html`` for the run(s) under
    ``path`` into ``out_dir`` (default: ``path``). Returns ``(md_path, html_path)``."""
    data = collect(path)
    out = Path(out_dir).expanduser() if out_dir is not None else data.root
    out.mkdir(parents=True, exist_ok=True)
    doc = build_document(data)
    md_text, assets = render_markdown(doc)
    assets_dir = out / "report_assets"
    if assets_dir.is_dir():  # drop figures of an earlier report that this one no longer has
        for old in assets_dir.glob("*.png"):
            if f"report_assets/{old.name}" not in assets:
                old.unlink()
    for rel, png in assets.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / rel, png)
    md_path, html_path = out / "report.md", out / "report.html"
    _write_atomic(md_path, md_text.encode("utf-8"))
    _write_atomic(html_path, render_html(doc).encode("utf-8"))
    log.info("report: %s, %s", md_path, html_path)
    return md_path, html_path


def main(argv: list[str] | None = None) -> int:
    """``cai report PATH [-o OUT_DIR]``; returns the exit status (2 on a user mistake)."""
    p = argparse.ArgumentParser(prog="cai report", description="Write report.md and report.html for a "
                                "run directory or a sweep folder (read-only over the runs).")
    p.add_argument("path", help="a run directory (with run.json) or a folder of runs (a sweep)")
    p.add_argument("-o", "--out", default=None, help="where to write the report (default: PATH)")
    args = p.parse_args(argv)
    try:
        md_path, html_path = write_report(args.path, args.out)
    except CaiError as e:
        print(f"cai: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {md_path}\nwrote {html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


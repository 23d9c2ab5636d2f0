"""Hydra callbacks: write the report when ``cai run`` finishes.

:class:`ReportCallback` is configured in ``conf/hydra/default.yaml`` under ``callbacks:``. When
a sweep (``cai run -m``) ends it writes ``report.md`` / ``report.html`` into the sweep folder,
covering every job; when a single run ends, into the run's folder. A report is a by-product:
if it cannot be written the reason is logged and the run's own result (and exit status) stand.
Turn it off with ``hydra.callbacks.report.on_run=false`` / ``on_multirun=false``.

Before the sweep's report (and a single run's, when the run added arms beside itself), the
callback judges the arms head to head (``cai compare``, :mod:`cai.compare`) so the report has its
"Head to head" section; ``head_to_head=false`` skips that. A comparison that fails is logged and the report is written without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("cai.report")


def _write(folder: str | Path | None, what: str) -> Path | None:
    from cai.errors import CaiError
    from cai.report import RUN_FILE, find_run_dirs, write_report

    if not folder:
        log.warning("report: no output folder known for this %s; skipped", what)
        return None
    folder = Path(folder)
    if not folder.is_dir() or not find_run_dirs(folder):
        log.info("report: %s has no finished run (no %s); skipped", folder, RUN_FILE)
        return None
    try:
        _, html_path = write_report(folder)
    except (CaiError, OSError, ValueError) as e:
        log.warning("report: could not write the report of %s %s: %s", what, folder, e)
        return None
    return html_path


def _compare(folder: str | Path | None) -> Path | None:
    """``cai compare`` on the sweep folder; logs and returns None when it cannot be done."""
    from cai.compare import compare
    from cai.errors import CaiError
    from cai.report import find_run_dirs

    if not folder or not Path(folder).is_dir() or not find_run_dirs(Path(folder)):
        return None
    try:
        result, out = compare(folder)
    except (CaiError, OSError, ValueError) as e:
        log.warning("head to head: could not compare the arms of %s: %s", folder, e)
        return None
    for reason in result.skipped:
        log.info("head to head: skipped %s", reason)
    return out


class ReportCallback(Callback):
    """Writes ``report.md`` and ``report.html`` at the end of a run and of a sweep (after
    judging the sweep's arms head to head, unless ``head_to_head`` is false)."""

    def __init__(self, on_run: bool = True, on_multirun: bool = True, head_to_head: bool = True) -> None:
        self.on_run = on_run
        self.on_multirun = on_multirun
        self.head_to_head = head_to_head

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.on_run:
            return
        job_return = kwargs.get("job_return")
        hydra_cfg = getattr(job_return, "hydra_cfg", None) or config
        folder = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None)
        if self.head_to_head and folder and (Path(folder) / "arms").is_dir():
            _compare(folder)  # a run that added arms (the human-label arm): judge them against each other
        _write(folder, "run")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.on_multirun:
            return
        folder = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if self.head_to_head:
            _compare(folder)
        _write(folder, "sweep")

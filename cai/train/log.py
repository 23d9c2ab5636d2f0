"""Training logs and throughput for every loop in :mod:`cai.train` (re-exported by :mod:`cai.train.common`).

- :class:`MetricsLogger` writes ``train_log.jsonl`` (one JSON row per logged step), console
  lines, and TensorBoard / W&B when installed and asked for. On resume it keeps only the rows of
  steps up to the checkpoint (a row cut by a kill mid-write is dropped too), so the file reads
  like one uninterrupted run.
- :func:`read_train_log` reads such a file back.
- :class:`Throughput` measures tokens/s and samples/s per logging window and overall.

Kept apart from the optimisation and batching helpers of :mod:`cai.train.common`: this is
the part that writes files and talks to trackers, the rest is pure computation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class Throughput:
    """Tokens/s and samples/s since the last :meth:`rates` call (and overall)."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter()
        self.tokens = self.samples = 0
        self._window_tokens = self._window_samples = 0

    def update(self, tokens: int, samples: int) -> None:
        self.tokens += tokens
        self.samples += samples
        self._window_tokens += tokens
        self._window_samples += samples

    def rates(self) -> dict[str, float]:
        """``{"tokens_per_s", "samples_per_s"}`` over the window since the previous call."""
        now = time.perf_counter()
        dt = max(now - self._last, 1e-9)
        out = {"tokens_per_s": self._window_tokens / dt, "samples_per_s": self._window_samples / dt}
        self._last, self._window_tokens, self._window_samples = now, 0, 0
        return out

    def overall(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return {"tokens_per_s": self.tokens / dt, "samples_per_s": self.samples / dt}


def _read_log_rows(path: Path, keep_through: int) -> list[str]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write; it is rewritten by the resumed run
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= keep_through:
            rows.append(line)
    return rows


class MetricsLogger:
    """One JSON row per logged step in ``path`` (``train_log.jsonl``), plus console and trackers.

    ``resume_step``: keep the rows of steps ``<= resume_step`` already in the file (a resumed
    run); ``None`` starts a fresh file. ``console_every``: print every n-th logged step (0: never).
    ``tensorboard_dir``: also write TensorBoard scalars (needs the ``tensorboard`` package).
    ``wandb_project``: also log to Weights & Biases (needs ``wandb``; off unless named).
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None, console_every: int = 10,
                 console_keys: Iterable[str] | None = None,
                 tensorboard_dir: str | os.PathLike | None = None, wandb_project: str | None = None,
                 run_name: str | None = None, config: Mapping[str, Any] | None = None,
                 enabled: bool = True) -> None:
        self.path = Path(path)
        self.console_every = console_every
        # the console line shows these keys only (the file keeps every metric); None: all
        self.console_keys = None if console_keys is None else frozenset(console_keys)
        self.enabled = enabled
        self._n = 0
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = _read_log_rows(self.path, resume_step) if resume_step is not None and self.path.exists() else []
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            self._tb = self._make_tensorboard(tensorboard_dir)
        if wandb_project:
            self._wandb = self._make_wandb(wandb_project, run_name, config)

    @staticmethod
    def _make_tensorboard(logdir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; skipping TensorBoard logging (pip install tensorboard)")
            return None
        return SummaryWriter(log_dir=str(logdir))

    @staticmethod
    def _make_wandb(project, run_name, config):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; skipping W&B logging (pip install wandb)")
            return None
        return wandb.init(project=project, name=run_name, config=dict(config or {}))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write ``{"step": step, **metrics}``; floats are rounded to 7 significant digits on
        the console only (the file keeps full precision)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain_number(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        self._n += 1
        if self.console_every and self._n % self.console_every == 0:
            shown = {k: v for k, v in metrics.items() if self.console_keys is None or k in self.console_keys}
            log.info("step %d  %s", step, "  ".join(f"{k}={_short(v)}" for k, v in shown.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_train_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``train_log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plain_number(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)



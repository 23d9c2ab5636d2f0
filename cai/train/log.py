"""Training logs and throughput for every loop in :mod:`cai.train` (re-exported by :mod:`cai.train.common`).

- :class:`MetricsLogger` writes ``train_log.jsonl`` (one JSON row per logged step), the loop's
  progress bar, console lines at the cadence every loop shares (:mod:`cai.progress`), and
  TensorBoard / W&B when the run asks (``log.tensorboard``, ``log.wandb_project``) through
  accelerate's trackers. On resume it keeps only the rows of steps up to the checkpoint (a row
  cut by a kill mid-write is dropped too), so the file reads like one uninterrupted run.
- :func:`open_wandb` / :func:`wandb_summary`: the one W&B run of a cai run (opened by the pipeline).
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
    """One JSON row per logged step in ``path`` (``train_log.jsonl``), plus bar, console and trackers.

    ``resume_step``: keep the rows of steps ``<= resume_step`` already in the file (a resumed
    run); ``None`` starts a fresh file. ``name``: the loop (``sft``, ``rm``, ``dpo``, ``ppo``),
    the progress bar's label. ``total_steps``: the loop's length; with it the logger shows a
    tqdm bar (:func:`cai.progress.bar`; call :meth:`advance` after every step) and treats that
    step as the last for the console cadence. ``console``: print metrics lines at all; when
    it does, :class:`cai.progress.Cadence` decides which logged steps get one (the same rule for
    every loop), showing ``console_keys`` only (None: all; the file keeps every metric).
    ``part``: a sub-run of the stage (``member_1`` of a reward ensemble).

    Trackers come from the run's :class:`cai.progress.Telemetry` (``log.tensorboard``,
    ``log.wandb_project``): TensorBoard event files in ``<run>/tensorboard/<stage>[/<part>]``
    through accelerate's ``TensorBoardTracker``, and the run's one W&B run, where this loop's
    metrics are namespaced by stage with their own step axis. Only the main process logs.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None, name: str = "train",
                 total_steps: int | None = None, console: bool = True, console_keys: Iterable[str] | None = None,
                 part: str | None = None, enabled: bool = True) -> None:
        from cai import progress

        telemetry = progress.active()
        self.path = Path(path)
        self.name = name
        self.total_steps = total_steps
        self.console = console
        # the console line shows these keys only (the file keeps every metric); None: all
        self.console_keys = None if console_keys is None else frozenset(console_keys)
        self.cadence = progress.Cadence(telemetry.console_every_s)
        self.enabled = enabled
        self._tb = self._wandb = self._bar = None
        stage = telemetry.stage or name
        self.namespace = f"{stage}/{part}" if part else stage
        self._defined: set[str] = set()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = _read_log_rows(self.path, resume_step) if resume_step is not None and self.path.exists() else []
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        if total_steps:
            self._bar = progress.bar(total=total_steps, initial=resume_step or 0, desc=name, unit="step")
        if telemetry.tensorboard_dir is not None:
            self._tb = tensorboard_tracker(Path(telemetry.tensorboard_dir), self.namespace)
        self._wandb = telemetry.wandb

    def advance(self, n: int = 1) -> None:
        """One more step done (the progress bar's count)."""
        if self._bar is not None:
            self._bar.update(n)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write ``{"step": step, **metrics}``; floats are rounded to 4 significant digits on
        the console only (the file keeps full precision)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain_number(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        if self._tb is not None:
            self._tb.log(numbers, step=int(step))
        if self._wandb is not None:
            self._log_wandb(int(step), numbers)
        shown = {k: v for k, v in row.items() if k != "step" and (self.console_keys is None or k in self.console_keys)}
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix({k.rsplit("/", 1)[-1]: _short(v) for k, v in list(shown.items())[:4]},
                                  refresh=False)
        final = self.total_steps is not None and step >= self.total_steps
        if self.console and self.cadence.due(final=final):
            log.info("%s step %d%s  %s", self.name, step, f"/{self.total_steps}" if self.total_steps else "",
                     "  ".join(f"{k}={_short(v)}" for k, v in shown.items()))

    def _log_wandb(self, step: int, numbers: Mapping[str, float]) -> None:
        """This loop's metrics under ``<stage>[/<part>]/`` (unless the name starts so already),
        against their own step axis ``<namespace>/step``: every stage of a run counts from 1."""
        ns = self.namespace
        step_key = f"{ns}/step"
        values = {(k if k.startswith(ns + "/") else f"{ns}/{k}"): v for k, v in numbers.items()}
        run = getattr(self._wandb, "run", None)
        if run is not None and ns not in self._defined:
            run.define_metric(step_key)
            run.define_metric(f"{ns}/*", step_metric=step_key)
            self._defined.add(ns)
        self._wandb.log({**values, step_key: step})

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.finish()


def check_tensorboard() -> None:
    """Raise a :class:`~cai.errors.ConfigError` naming ``log.tensorboard`` when TensorBoard cannot
    be written (checked before a run builds anything)."""
    from cai.errors import ConfigError

    try:
        from torch.utils import tensorboard  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"log.tensorboard=true: TensorBoard cannot be written ({e}); "
                          "pip install 'cai[tensorboard]', or leave log.tensorboard off") from None


def tensorboard_tracker(root: Path, namespace: str):
    """accelerate's TensorBoard tracker writing to ``root/<namespace>``, started; None (with a
    warning naming the extra) when TensorBoard is not installed."""
    from accelerate.tracking import TensorBoardTracker
    from accelerate.utils import is_tensorboard_available

    if not is_tensorboard_available():
        log.warning("log.tensorboard=true but tensorboard is not installed; no event files are written "
                    "(pip install 'cai[tensorboard]')")
        return None
    tracker = TensorBoardTracker(namespace, root)
    tracker.start()
    return tracker


def open_wandb(project: str, *, name: str, group: str, job_type: str, config: Mapping[str, Any],
               log_dir: str | os.PathLike):
    """One W&B run for one cai run (accelerate's ``WandBTracker``, started): named ``name``,
    grouped by ``group`` (experiment/arm) and ``job_type`` (the seed), with the resolved config;
    its files go under ``log_dir``. ``WANDB_MODE=offline`` needs no account. Raises a
    :class:`~cai.errors.ConfigError` naming the field when wandb is not installed."""
    from accelerate.state import PartialState
    from accelerate.tracking import WandBTracker
    from accelerate.utils import is_wandb_available

    from cai.errors import ConfigError

    if not is_wandb_available():
        raise ConfigError(f"log.wandb_project={project!r}: wandb is not installed (pip install wandb), "
                          "or leave log.wandb_project unset")
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    PartialState()  # accelerate's trackers log through its state: one per process, made here if not yet
    tracker = WandBTracker(project, name=name, group=group, job_type=job_type, config=dict(config),
                           dir=str(log_dir))
    tracker.start()
    return tracker


def wandb_summary(tracker, metrics: Mapping[str, Any]) -> None:
    """The run's numeric metrics (``metrics.json``: win rates, KL, label counts...) as the W&B
    run's summary."""
    run = getattr(tracker, "run", None)
    if run is None:
        return
    run.summary.update({k: _plain_number(v) for k, v in metrics.items()
                        if isinstance(_plain_number(v), (int, float)) and not isinstance(v, bool)})


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



"""What a run shows while it runs: progress bars, the console cadence, repeated-warning summaries.

One rule for every loop of cai (training, sampling, critique, labelling, evaluation):

- :func:`bar`: a tqdm bar on stderr with rate and ETA. ``log.progress`` decides: ``auto`` shows
  it when stderr is a terminal, ``on`` always (a log file, a test), ``off`` never; processes
  other than the main one never show one.
- :class:`Cadence`: when a training loop prints its metrics line: at its first and last logged
  step, and otherwise at most once every ``log.console_every_s`` seconds (0: every logged step).
  ``train_log.jsonl`` and the trackers still get every logged step.
- :func:`summarise_repeats`: while one stage builds, a warning that comes again with the same
  text template (a per-batch "prompts were cut" warning, say) is shown the first time only; when
  the stage ends, one line says how often it came.

What the run asks for is a :class:`Telemetry` (made from the run-time ``log`` config section by
:mod:`cai.pipeline`; never part of an artifact key), made current for the run with
:func:`activate` and read by the loops with :func:`active`. Outside a pipeline run (the
``python -m cai.train.*`` command lines, tests) the default applies: bars in ``auto`` mode, a
console line every 30 s, no trackers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cai.config import PROGRESS_MODES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Telemetry:
    """What a run shows and where its training curves go (all run-time: no key sees it)."""

    progress: str = "auto"
    """bars: auto (when stderr is a terminal), on, off"""
    console_every_s: float = 30.0
    """a training loop's metrics line at most this often (plus its first and last); 0: every logged step"""
    tensorboard_dir: Path | None = None
    """TensorBoard event files go to <this>/<stage>[/<part>]; None: no TensorBoard"""
    wandb: Any = None
    """a started W&B tracker (one per run) the loops log to; None: no W&B"""
    stage: str | None = None
    """the pipeline stage being built (names TensorBoard folders and W&B namespaces)"""

    def __post_init__(self) -> None:
        if self.progress not in PROGRESS_MODES:
            raise ValueError(f"log.progress: expected one of {', '.join(PROGRESS_MODES)}, got {self.progress!r}")
        if self.console_every_s < 0:
            raise ValueError(f"log.console_every_s: expected >= 0, got {self.console_every_s!r}")


_lock = threading.Lock()
_stack: list[Telemetry] = [Telemetry()]


def active() -> Telemetry:
    """The telemetry of the run in progress (a plain module global, so worker threads see it too)."""
    return _stack[-1]


@contextlib.contextmanager
def activate(telemetry: Telemetry) -> Iterator[Telemetry]:
    """Make ``telemetry`` current for the block (nests: the previous one comes back after)."""
    with _lock:
        _stack.append(telemetry)
    try:
        yield telemetry
    finally:
        with _lock:
            _stack.remove(telemetry)


@contextlib.contextmanager
def stage(name: str) -> Iterator[Telemetry]:
    """The current telemetry, naming ``name`` as the stage being built, with its repeated warnings
    summarised (:func:`summarise_repeats`)."""
    with activate(replace(active(), stage=name)) as t, summarise_repeats(name):
        yield t


def is_main_process() -> bool:
    """Whether this is the main process of a ``torchrun`` / ``accelerate launch`` group (or alone)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def bar_disabled(enabled: bool = True) -> bool | None:
    """tqdm's ``disable`` for the current mode: True (off), False (on), None (only on a terminal)."""
    mode = active().progress
    if not enabled or mode == "off" or not is_main_process():
        return True
    return False if mode == "on" else None


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        initial: int = 0, enabled: bool = True, **kwargs: Any):
    """A tqdm bar on stderr (rate and ETA included) that follows ``log.progress``; ``enabled=False``
    turns it off whatever the mode (a caller that shows its own bar around this loop)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr,
                disable=bar_disabled(enabled), dynamic_ncols=True, **kwargs)


class _AboveBars(logging.StreamHandler):
    """A console handler that prints through ``tqdm.write``: a log line goes above the live bars
    instead of cutting one in half."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


@contextlib.contextmanager
def log_above_bars() -> Iterator[None]:
    """While the block runs, the root logger's console handlers (stdout/stderr) print above the
    bars; level, formatter and filters are kept. Nothing changes when bars are off."""
    root = logging.getLogger()
    if active().progress == "off":
        yield
        return
    original = list(root.handlers)
    swapped = []
    for h in original:
        if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stdout, sys.stderr):
            new = _AboveBars(h.stream)
            new.setLevel(h.level)
            new.setFormatter(h.formatter)
            for f in h.filters:
                new.addFilter(f)
            swapped.append(new)
        else:
            swapped.append(h)
    root.handlers = swapped
    try:
        yield
    finally:
        root.handlers = original


class Cadence:
    """When a loop prints its metrics line: the first and the last time it is asked, and otherwise
    once ``every_s`` seconds have passed since the previous line (0: every time)."""

    def __init__(self, every_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = active().console_every_s if every_s is None else float(every_s)
        self.clock = clock
        self._last: float | None = None

    def due(self, final: bool = False) -> bool:
        now = self.clock()
        if self._last is None or final or self.every_s == 0 or now - self._last >= self.every_s:
            self._last = now
            return True
        return False


class RepeatFilter(logging.Filter):
    """Lets the first warning of each (logger, message template) through and counts the rest.

    Installed on every handler of the root logger; one record passes each handler, so the
    decision is stored on the record and it is counted once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[str, str], int] = {}
        self.first: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._mark = f"_cai_repeat_{id(self)}"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        seen = getattr(record, self._mark, None)
        if seen is not None:
            return seen
        with self._lock:
            key = (record.name, str(record.msg))
            n = self.counts.get(key, 0) + 1
            self.counts[key] = n
            if n == 1:
                self.first[key] = record.getMessage()
        setattr(record, self._mark, n == 1)
        return n == 1

    def repeated(self) -> dict[str, int]:
        """``{first message: how often its template came}`` of the warnings that came more than once."""
        return {self.first[k]: n for k, n in self.counts.items() if n > 1}


@contextlib.contextmanager
def summarise_repeats(stage_name: str) -> Iterator[RepeatFilter]:
    """Show each repeated warning of the block once, then one line per repeated warning with its
    count (``responses: 95 warnings like this one, shown once: 3 of 16 prompts were cut ...``)."""
    filt = RepeatFilter()
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(filt)
    try:
        yield filt
    finally:
        for h in handlers:
            h.removeFilter(filt)
        for message, n in filt.repeated().items():
            log.warning("%s: %d warnings like this one, shown once: %s", stage_name, n, message)

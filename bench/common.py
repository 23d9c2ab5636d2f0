"""Shared helpers of the benchmarks: environment record, interleaved timing, tables, models.

Rules every benchmark here follows (so numbers are comparable between runs and machines):

- On CPU, one thread (``OMP_NUM_THREADS=1`` set by ``run.py`` before torch is imported, and
  ``torch.set_num_threads(1)``): results then do not depend on how many cores are free.
- Candidates are run interleaved (A, B, C, A, B, C, ...) after two warm-ups each, so slow drift
  of the machine (other jobs, thermal state) hits every candidate alike; medians are quoted.
- Every timed function ends with its results on the host (Python lists), which also
  synchronises CUDA.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cai.tiny import TinyModelConfig, build_tiny_causal_lm, default_tiny_corpus

MODEL_SIZES = {
    "tiny": TinyModelConfig(vocab_size=2048, n_layer=2, n_head=4, n_embd=128, n_positions=512),
    "small": TinyModelConfig(vocab_size=8192, n_layer=12, n_head=12, n_embd=768, n_positions=1024),
}


@dataclass
class Timing:
    """Seconds per repeat of one candidate."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """Relative half-range of the middle half of the repeats (a rough noise level)."""
        if len(self.times) < 4:
            return (max(self.times) - min(self.times)) / 2 / self.median
        q = statistics.quantiles(self.times, n=4)
        return (q[2] - q[0]) / 2 / self.median


def interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, Timing]:
    """Time each candidate ``repeats`` times, interleaved, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(ts) for name, ts in times.items()}


def set_threads(device: str) -> None:
    if not device.startswith("cuda"):
        torch.set_num_threads(1)


def environment(device: str) -> dict:
    """What the numbers were measured on."""
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device,
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def bench_corpus(n_words: int = 60_000, seed: int = 0) -> list[str]:
    """Text with enough distinct pseudo-words for a BPE vocabulary of up to 8192 tokens.

    The default tiny corpus alone yields only a few hundred merges; benchmark models should
    have a realistic vocabulary, because the output projection and the sampling math scale
    with it.
    """
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(words))
        if len(line) >= rng.randint(6, 16):
            lines.append(" ".join(line) + ".")
            line = []
    return default_tiny_corpus() + lines


def build_bench_model(size: str, seed: int = 0) -> Path:
    """Build the benchmark model of ``size`` (see ``MODEL_SIZES``) in a temporary directory."""
    cfg = MODEL_SIZES[size]
    cfg = TinyModelConfig(**{**cfg.__dict__, "seed": seed})
    out = Path(tempfile.mkdtemp(prefix=f"cai-bench-{size}-"))
    return build_tiny_causal_lm(out, bench_corpus(), cfg)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A fixed-width text table; ``columns`` are (key, header) pairs."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return "" if value is None else str(value)

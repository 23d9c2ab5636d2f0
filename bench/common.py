"""Shared helpers of the benchmarks: environment record, interleaved timing, tables, models.

Rules every benchmark here follows (so numbers are comparable between runs and machines):

- On CPU, one thread (``OMP_NUM_THREADS=1`` set by ``run.py`` before torch is imported, and
  ``torch.set_num_threads(1)``): results then do not depend on how many cores are free.
- Candidates are run interleaved (A, B, C, A, B, C, ...) after two warm-ups each, so slow drift
  of the machine (other jobs, thermal state) hits every candidate alike; medians are quoted.
- Every timed function ends with its results on the host (Python lists), which also
  synchronises CUDA.

The model-FLOP estimate (``TransformerShape``, ``forward_flops``, ``ppo_step_flops``) and the
peak table behind MFU (``peak_tflops``, ``mfu``) live here too, so every benchmark counts work
the same way.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cai.config import TinyConfig
from cai.tiny import build_tiny_causal_lm, default_tiny_corpus

MODEL_SIZES = {
    "tiny": TinyConfig(vocab_size=2048, n_layer=2, n_head=4, n_embd=128, n_positions=512),
    "small": TinyConfig(vocab_size=8192, n_layer=12, n_head=12, n_embd=768, n_positions=1024),
}


def quiet_logs(cai_level: int = logging.WARNING) -> None:
    """Keep the tables readable: cai at ``cai_level``, transformers / TRL / accelerate at ERROR."""
    logging.getLogger("cai").setLevel(cai_level)
    for name in ("transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32  # fp32 matmuls on tensor cores?
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
    cfg = TinyConfig(**{**cfg.__dict__, "seed": seed})
    out = Path(tempfile.mkdtemp(prefix=f"cai-bench-{size}-"))
    return build_tiny_causal_lm(out, bench_corpus(), cfg)


# ----------------------------------------------------------------------------- model FLOPs and MFU
@dataclass(frozen=True)
class TransformerShape:
    """What the FLOPs of a GPT-2-style decoder (non-gated MLP ``d_ff`` wide) depend on."""

    n_layer: int
    d_model: int
    d_ff: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> TransformerShape:
        """From a transformers config (GPT-2 names first, then the generic ones)."""
        d = getattr(config, "n_embd", None) or config.hidden_size
        layers = getattr(config, "n_layer", None) or config.num_hidden_layers
        d_ff = getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None) or 4 * d
        return cls(int(layers), int(d), int(d_ff), int(config.vocab_size))

    @property
    def block_params(self) -> int:
        """N: the weight matrices of the blocks (attention 4·d², MLP 2·d·d_ff per layer). Embeddings,
        biases and norms are left out: a lookup is no matmul, the rest is well under 1% of the FLOPs."""
        return self.n_layer * (4 * self.d_model ** 2 + 2 * self.d_model * self.d_ff)


def forward_flops(shape: TransformerShape, tokens: float, outputs: float, out_width: int) -> float:
    """Model FLOPs of one causal forward over a sequence of ``tokens`` tokens.

    ``2·N·tokens`` for the block matmuls, ``2·n_layer·d·tokens·(tokens+1)`` for attention (the
    query at position i scores and mixes i+1 keys: 4·d·(i+1) per layer; the same with or without
    a KV cache), and ``2·d·out_width`` per output row of the head (``vocab`` for an LM head at the
    positions whose logits are needed, 1 for a scalar value or reward head).
    """
    attention = 2 * shape.n_layer * shape.d_model * tokens * (tokens + 1)
    return 2 * shape.block_params * tokens + attention + 2 * shape.d_model * out_width * outputs


@dataclass(frozen=True)
class PPOFlops:
    """Model FLOPs of one PPO step, by phase (the phases of ``cai.train.ppo``'s log)."""

    generate: float
    score: float
    train: float

    @property
    def total(self) -> float:
        return self.generate + self.score + self.train


def ppo_step_flops(policy: TransformerShape, rows: Sequence[tuple[float, float]], epochs: int,
                   value: TransformerShape | None = None, reward: TransformerShape | None = None) -> PPOFlops:
    """Model FLOPs of one PPO step over ``rows`` = (prompt tokens, response tokens) per rollout row.

    With T = prompt + response and R = response tokens of a row:

    - generate: the policy reads the prompt and all but the last sampled token (T - 1 tokens,
      prefill plus KV-cached decode) and produces R rows of logits;
    - score: no-grad forwards over T tokens of the policy and the reference (R logit rows each),
      the value model (R values) and the reward model (one score);
    - train: per PPO epoch, forward and backward (3x the forward) of policy and value over T.

    ``value`` and ``reward`` default to the policy's shape (the benchmark's setup). Padding is
    not counted: it is work the hardware does, not work the algorithm needs.
    """
    value, reward = value or policy, reward or policy
    gen = score = train = 0.0
    for i, (p, r) in enumerate(rows):
        if p < 1 or r < 1:
            raise ValueError(f"ppo_step_flops: row {i} has {p} prompt and {r} response tokens; expected >= 1 each")
        t = p + r
        lm = forward_flops(policy, t, r, policy.vocab)
        v = forward_flops(value, t, r, 1)
        gen += forward_flops(policy, t - 1, r, policy.vocab)
        score += 2 * lm + v + forward_flops(reward, t, 1, 1)
        train += epochs * 3 * (lm + v)
    return PPOFlops(gen, score, train)


#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, matched in order
#: as case-insensitive substrings of ``torch.cuda.get_device_name`` (so "L40S" before "L4").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
)


def peak_tflops(gpu_name: str | None, override: float | None = None) -> float | None:
    """The GPU's dense bf16 peak in TFLOP/s: ``override`` if given, else the table; None if unknown."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"--peak-tflops={override}: expected a positive number of TFLOP/s")
        return float(override)
    name = (gpu_name or "").lower()
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key.lower() in name), None)


def mfu(flops: float, seconds: float, peak_tflops_: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (None without a peak, e.g. on CPU)."""
    if peak_tflops_ is None:
        return None
    return flops / seconds / (peak_tflops_ * 1e12)


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

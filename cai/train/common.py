"""Shared training utilities for SFT, reward modelling, DPO and PPO (CleanRL-style, small).

Every training loop in :mod:`cai.train` is one readable function; the plumbing it needs lives
here so that the loops share one meaning of "seed", "checkpoint", "step" and "loss mask":

- **Seeds and devices.** :func:`seed_everything` seeds Python, NumPy and torch (CUDA too);
  :func:`make_accelerator` builds an ``accelerate.Accelerator`` (device, mixed precision).
- **Optimisation.** :func:`make_optimizer` (AdamW, no weight decay on biases and norm
  weights, trainable parameters only) and :func:`make_scheduler` (linear warmup, then linear,
  cosine or constant); :func:`resolve_warmup` reads ``warmup`` as a fraction (< 1) or steps.
- **Exact resume** lives in :mod:`cai.train.checkpoint` (``save_checkpoint`` /
  ``load_checkpoint``: trainable weights, optimizer, scheduler, every RNG state and the data
  position, atomically) and **logging** in :mod:`cai.train.log` (``MetricsLogger``,
  ``Throughput``, ``read_train_log``); the loops import them from there.
- **Batches.** :func:`encode_example` tokenizes (prompt, full text) the way the sampling
  engine does (prompt alone, continuation appended), :func:`response_only_labels` masks the
  prompt with ``-100``, :func:`pad_and_mask` pads a batch (right or left), and
  :func:`token_logprobs` / :func:`masked_nll` turn logits into per-token quantities.
- **Command lines.** :func:`command_line` runs the ``main`` of a ``python -m cai.train.*``
  command line: a user mistake is one ``error:`` line and exit status 2, not a traceback.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cai.config import MIXED_PRECISION, SCHEDULES
from cai.errors import ConfigError

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- seeds, devices


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_accelerator(*, mixed_precision: str = "no", device: str = "auto"):
    """An ``accelerate.Accelerator`` for one training loop: ``mixed_precision`` (``no`` | ``bf16``
    | ``fp16``) on ``device`` (``auto`` | ``cpu`` | ``cuda``). Multi-GPU runs are launched with
    ``accelerate launch``, which sets the process group; gradient accumulation is done by the
    loops themselves (they know their token counts).
    """
    from accelerate import Accelerator

    mp, dev = mixed_precision or "no", device or "auto"
    if mp not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision={mp!r}, expected one of {', '.join(MIXED_PRECISION)}")
    if dev not in ("auto", "cpu") and not str(dev).startswith("cuda"):
        raise ConfigError(f"training device={dev!r}, expected auto, cpu or cuda")
    if str(dev).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training device={dev!r} but CUDA is not available here; use device=cpu or auto")
    cpu = dev == "cpu" or (dev == "auto" and not torch.cuda.is_available())
    if mp == "fp16" and cpu:
        raise ConfigError("mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    _release_accelerator_state(mp, cpu)
    return Accelerator(cpu=cpu, mixed_precision=mp)


def _release_accelerator_state(mixed_precision: str, cpu: bool) -> None:
    """Let this loop use other settings than an earlier loop of the same process.

    accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another
    precision or device (e.g. a bf16 reward model after an fp32 SFT in one pipeline run, or a
    TRL trainer in the same benchmark). The precision part is reset (transformers' Trainer does
    the same); the process group of a distributed launch is kept.
    """
    from accelerate.state import AcceleratorState

    if not AcceleratorState._shared_state:
        return
    current = AcceleratorState()
    wrong_device = cpu and current.device.type != "cpu"
    if current.mixed_precision == mixed_precision and not wrong_device:
        return
    if wrong_device and current.num_processes > 1:
        raise ConfigError("device=cpu was asked for inside a distributed GPU launch; use device=auto")
    AcceleratorState._reset_state(reset_partial_state=wrong_device)


# ----------------------------------------------------------------------------- optimisation


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights get no weight decay."""
    if lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {lr}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    if not decay and not no_decay:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters")
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def resolve_warmup(warmup: float, total_steps: int) -> int:
    """Warmup steps: ``warmup < 1`` is a fraction of ``total_steps``, else a step count."""
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0 (a fraction < 1 or a number of steps), got {warmup}")
    if warmup < 1:
        return int(math.ceil(warmup * total_steps))
    if warmup != int(warmup):
        raise ConfigError(f"warmup={warmup}: a step count must be a whole number")
    return int(warmup)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "linear",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR after ``step`` optimizer steps (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                   schedule: str = "linear", min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak LR, then ``linear``/``cosine`` decay to ``min_ratio`` or ``constant``."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"lr schedule={schedule!r}, expected one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ConfigError(f"total optimizer steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, schedule, min_ratio)
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- data order


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``(seed, epoch)``, the same on every machine."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [int(i) for i in np.random.default_rng([seed % (1 << 63), epoch]).permutation(n)]


# ----------------------------------------------------------------------------- batches


@dataclass
class Encoded:
    """One tokenized training example; ``labels`` is ``-100`` on prompt (and dropped) tokens."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def response_only_labels(prompt_len: int, full_ids: Sequence[int]) -> list[int]:
    """Labels for causal-LM training: ``-100`` on the first ``prompt_len`` tokens, ids after."""
    if not 0 <= prompt_len <= len(full_ids):
        raise ValueError(f"prompt_len={prompt_len} outside 0..{len(full_ids)}")
    return [IGNORE_INDEX] * prompt_len + [int(t) for t in full_ids[prompt_len:]]


def _prompt_ids(tokenizer, prompt_text: str) -> list[int]:
    bos = tokenizer.bos_token
    special = not (bool(bos) and prompt_text.startswith(bos))  # as the sampling engine encodes prompts
    # verbose=False: a prompt longer than the model is expected here, encode_example cuts it itself
    return list(tokenizer(prompt_text, add_special_tokens=special, verbose=False)["input_ids"])


def encode_example(tokenizer, prompt_text: str, full_text: str, max_length: int,
                   add_eos: bool = True) -> Encoded:
    """Tokenize a (prompt, full text) pair as generation sees it: the prompt on its own, then
    the continuation ``full_text[len(prompt_text):]`` without special tokens, then EOS.

    Too long: the response is cut on the right, keeping the whole prompt when it leaves at
    least a quarter of ``max_length`` for the response; otherwise the prompt is cut from the left.
    """
    if not full_text.startswith(prompt_text):
        raise ValueError("full_text must start with prompt_text")
    prompt = _prompt_ids(tokenizer, prompt_text)
    response = list(tokenizer(full_text[len(prompt_text):], add_special_tokens=False, verbose=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        response.append(int(tokenizer.eos_token_id))
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        room = max(max_length - len(prompt), min(len(response), max(1, max_length // 4)))
        response = response[:room]
        prompt = prompt[len(prompt) - (max_length - len(response)):] if max_length > len(response) else []
    ids = prompt + response
    return Encoded(ids, response_only_labels(len(prompt), ids), len(prompt), truncated)


def pad_and_mask(batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int,
                 pad_to_multiple_of: int | None = None, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ``[{"input_ids", "labels"?}]`` into ``input_ids``, ``attention_mask``, ``labels``.

    Padding gets ``pad_id`` in ``input_ids``, 0 in ``attention_mask`` and ``-100`` in
    ``labels``; rows without ``labels`` are trained on every token. ``padding_side="left"``
    puts every row's last token in the last column (pass ``position_ids = cumsum(mask) - 1``
    to the model then, so a padded row sees the positions it would see alone).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not batch:
        raise ValueError("pad_and_mask: empty batch")
    width = max(len(row["input_ids"]) for row in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        row_labels = row.get("labels", row["input_ids"])
        if len(row_labels) != n:
            raise ValueError(f"pad_and_mask: row {i} has {n} input_ids but {len(row_labels)} labels")
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, cols] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        mask[i, cols] = 1
        labels[i, cols] = torch.as_tensor(row_labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(label_t | tokens < t)`` and the mask of trained tokens.

    ``logits`` ``[B, T, V]`` and ``labels`` ``[B, T]`` are aligned like a model's input (the
    shift happens here). Returns ``(logprobs [B, T-1], mask [B, T-1])``; masked positions are 0.
    Sum over the last axis for sequence log-probs (DPO), divide by the mask sum for means.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained tokens, and how many there were (a tensor,
    so that no host sync is forced; ``int(n)`` when needed).

    Divide the sums of all micro-batches of an optimizer step by their total token count to get
    the same gradient as one big batch (what gradient accumulation should mean).
    """
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.size(-1))
    loss = torch.nn.functional.cross_entropy(flat.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of ``size`` (the last may be shorter)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ----------------------------------------------------------------------------- command lines


def command_line(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run the ``main`` of a ``python -m cai.train.*`` command line and return its exit status: a
    user mistake (a :class:`~cai.errors.CaiError`: a bad ``key=value`` override, a missing file)
    is one ``error: ...`` line on stderr and status 2, never a traceback.

    Every such command line also takes the run-time ``log`` settings of ``cai run`` as flags:
    ``--progress auto|on|off``, ``--console-every-s S`` and ``--tensorboard DIR`` (event files
    in ``DIR/<loop>``)."""
    import argparse
    import sys
    from pathlib import Path

    from cai import progress
    from cai.errors import CaiError

    def seconds(text: str) -> float:
        value = float(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"expected >= 0, got {text}")
        return value

    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flags.add_argument("--progress", choices=progress.PROGRESS_MODES, default="auto")
    flags.add_argument("--console-every-s", type=seconds, default=30.0)
    flags.add_argument("--tensorboard", default=None)
    known, rest = flags.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    telemetry = progress.Telemetry(progress=known.progress, console_every_s=known.console_every_s,
                                   tensorboard_dir=Path(known.tensorboard) if known.tensorboard else None)
    try:
        if known.tensorboard:
            from cai.train.log import check_tensorboard

            check_tensorboard()
        with progress.activate(telemetry), progress.log_above_bars():
            return main(rest)
    except CaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

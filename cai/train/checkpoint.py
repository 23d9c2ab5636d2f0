"""Exact-resume checkpoints for the training loops (re-exported by :mod:`cai.train.common`).

A checkpoint is a directory: ``state.json`` (step, epoch, data position, loop extras; JSON),
``model.pt`` (the *trainable* parameters only: frozen ones come from the base model, which the
same artifact build always loads, so a LoRA checkpoint is a few MB), ``optimizer.pt``,
``scheduler.pt`` and ``rng_<process>.pt`` (Python, NumPy, torch CPU and CUDA RNG states of each
process). Restoring all of it and skipping the examples already consumed makes a resumed run
continue the loss curve of an uninterrupted one exactly on CPU.

Writes are atomic: everything goes into ``.<name>.tmp`` beside the checkpoint, is fsynced and
renamed into place; the previous checkpoint is moved aside first and deleted after, and a run
killed between those two renames finds the old one again (:func:`load_checkpoint`). Under
several processes every process writes its RNG file, the main process the rest, with barriers.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cai.errors import CaiError

CHECKPOINT_FORMAT = 1


@dataclass
class TrainState:
    """Where a loop stands: ``step`` optimizer steps done; the next example is
    ``epoch_order(n, seed, epoch)[data_position]``; ``extra`` holds loop-specific counters."""

    step: int = 0
    epoch: int = 0
    data_position: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step can consume, as plain types and tensors."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(accelerator, model):
    return accelerator.unwrap_model(model) if accelerator is not None else model


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (what a checkpoint needs; frozen ones come from the base model)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rank_info(accelerator) -> tuple[int, bool]:
    if accelerator is None:
        return 0, True
    return accelerator.process_index, accelerator.is_main_process


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def save_checkpoint(
    directory: str | os.PathLike,
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    epoch: int,
    data_position: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a resumable checkpoint to ``directory`` (replacing an older one).

    Layout: ``state.json`` (step, epoch, data position, extra; JSON), ``model.pt`` (trainable
    parameters), ``optimizer.pt``, ``scheduler.pt``, ``rng_<process>.pt``. Everything is
    written into ``.<name>.tmp`` beside it and renamed into place.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    rank, main = _rank_info(accelerator)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(accelerator)
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    if main:
        torch.save(trainable_state_dict(_unwrap(accelerator, model)), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict() if scheduler is not None else {}, tmp / "scheduler.pt")
        state = TrainState(step, epoch, data_position, dict(extra or {}))
        info = {"format": CHECKPOINT_FORMAT, **asdict(state)}
        (tmp / "state.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    _barrier(accelerator)
    if main:
        _replace_dir(tmp, directory)
    _barrier(accelerator)
    return directory


def _replace_dir(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst``: at every moment one whole checkpoint exists (old or new)."""
    for f in src.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def _recover_interrupted_replace(directory: Path) -> None:
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and (old / "state.json").is_file():
        old.rename(directory)  # killed between the two renames: the old checkpoint is whole


def load_checkpoint(
    directory: str | os.PathLike,
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
) -> TrainState | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; ``None`` when there is none.

    Restores the trainable weights, optimizer, scheduler and this process's RNG states, and
    returns the :class:`TrainState` the loop continues from.
    """
    directory = Path(directory)
    _recover_interrupted_replace(directory)
    if not (directory / "state.json").is_file():
        return None
    rank, _ = _rank_info(accelerator)
    try:
        info = json.loads((directory / "state.json").read_text())
        weights = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        opt_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        sched_state = torch.load(directory / "scheduler.pt", map_location="cpu", weights_only=True)
        rng_file = directory / f"rng_{rank}.pt"
        rng = torch.load(rng_file if rng_file.exists() else directory / "rng_0.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CaiError(f"checkpoint {directory} is unreadable ({e}); delete it to start over") from e
    if info.get("format") != CHECKPOINT_FORMAT:
        raise CaiError(f"checkpoint {directory}: format {info.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    target = _unwrap(accelerator, model)
    expected = {n for n, p in target.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CaiError(
            f"checkpoint {directory} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; it was written by another model or LoRA setting"
        )
    with torch.no_grad():
        params = dict(target.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(opt_state)
    if scheduler is not None and sched_state:
        scheduler.load_state_dict(sched_state)
    set_rng_state(rng)
    return TrainState(info["step"], info["epoch"], info["data_position"], info.get("extra", {}))

"""Reward model: Bradley-Terry on human or AI preference labels, one loop read top to bottom.

A reward model is any Hugging Face backbone with a scalar head
(``AutoModelForSequenceClassification``, ``num_labels=1``; loaded by
:func:`cai.models.load_sequence_classifier` from a hub name or a local path), optionally with
LoRA adapters. The loop (:func:`train_reward_model`):

1. Pairs come from :mod:`cai.train.pairs` (joined, validated, split by prompt, tokenised as the
   policy sees them). Both sides of ``B`` pairs go through the model in one batch.
2. Loss per pair, with ``d = r_chosen - r_rejected``, ``q = P(chosen is better)`` and margin ``m``::

       loss = -q * log sigmoid(d - m) - (1 - q) * log sigmoid(-d - m)   [+ c * (r_chosen + r_rejected)^2]

   Hard labels (``q = 1``) give the classic Bradley-Terry loss (TRL's ``RewardTrainer`` loss,
   margin and ``center_rewards_coefficient`` included: ``tests/test_trl_parity.py`` checks
   equality to 1e-5); soft AI labels give the cross-entropy against ``p(a > b)``.
3. One optimizer step = one global batch of ``batch_size`` pairs, split over processes and into
   micro-batches; the loss is a per-pair mean over the global batch whatever the split, so one
   process and ``accelerate launch --num_processes 2`` follow the same curve.
4. AdamW with warmup and decay, gradient clipping, a checkpoint every ``checkpoint_every``
   steps (weights, optimizer, schedule, RNG, data position: exact resume).

Ensembles (``ensemble_size > 1``): ``seeds`` trains k models (head init and data order from
k seeds); ``heads`` trains one backbone with k scalar heads, each pair weighted per head by a
seeded Poisson(1) draw (an online bootstrap, so heads disagree where data is thin). The reward
is the members' mean; their standard deviation is reported as uncertainty.

Scoring, metrics (accuracy with a bootstrap CI, ECE against soft labels) and the pipeline
stage ``reward`` live in :mod:`cai.train.reward_stage`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from cai.errors import ConfigError, DataError
from cai.train import common as C
from cai.train.pairs import (
    EncodedPair,
    LoraOptions,
    as_dataclass,
    chosen_rejected,
    collate_pairs,
    disable_dropout,
    iter_steps,
    loss_scale,
    micro_batches,
    no_cache_kwargs,
    optimizer_step,
    orient,
    reduce_sums,
    step_share,
    steps_per_epoch,
)

log = logging.getLogger(__name__)

LABEL_SOURCES = ("human", "ai")
ENSEMBLE_KINDS = ("seeds", "heads")


@dataclass
class RewardConfig:
    """Reward-model training (Hydra group ``reward``)."""

    # which labels train the RM: human (stage human_pairs) | ai (stage ai_labels)
    labels_from: str = "human"
    # tiny (built from the policy's tokenizer) | a hub name | a local path
    backbone: str = "tiny"
    revision: Optional[str] = None
    dtype: str = "float32"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda: where training runs (not part of the artifact key)
    trust_remote_code: bool = False
    chat_format: str = "auto"  # how prompt + response are rendered: auto | template | hh
    max_length: int = 512  # tokens per side (prompt cut from the left, response from the right)
    lora: LoraOptions = field(default_factory=LoraOptions)
    epochs: int = 1
    batch_size: int = 16  # pairs per optimizer step, over all processes
    micro_batch_size: int = 16  # pairs per forward pass (gradient accumulation below batch_size)
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup: float = 0.0  # a fraction (< 1) of the steps, or a step count
    schedule: str = "linear"  # linear | cosine | constant
    max_grad_norm: float = 1.0  # <= 0: no clipping
    margin: float = 0.0  # Bradley-Terry margin m
    # TRL's center_rewards_coefficient: c * mean((r_chosen + r_rejected)^2); None: off
    center_rewards_coefficient: Optional[float] = None
    soft_labels: bool = True  # False: q = 1 for the preferred side (ties stay 0.5)
    ensemble_size: int = 1
    ensemble_kind: str = "seeds"  # seeds | heads
    test_fraction: float = 0.2  # share of prompts held out for evaluation
    split_salt: str = ""
    eval_batch_size: int = 32
    bootstrap_resamples: int = 2000  # for the accuracy's 95% CI
    mixed_precision: str = "no"  # no | bf16 | fp16
    disable_dropout: bool = True
    log_every: int = 10
    checkpoint_every: int = 100  # optimizer steps; 0: never

    def __post_init__(self) -> None:
        if isinstance(self.lora, Mapping):
            self.lora = as_dataclass(LoraOptions, self.lora)
        checks = [
            (self.labels_from in LABEL_SOURCES, "labels_from", "human or ai"),
            (self.ensemble_kind in ENSEMBLE_KINDS, "ensemble_kind", "seeds or heads"),
            (self.ensemble_size >= 1, "ensemble_size", ">= 1"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 1 and self.micro_batch_size >= 1, "batch_size/micro_batch_size", ">= 1"),
            (self.margin >= 0, "margin", ">= 0"),
            (self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
             "center_rewards_coefficient", "None or >= 0"),
            (self.eval_batch_size >= 1, "eval_batch_size", ">= 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"reward.{name}={getattr(self, name.split('/')[0])!r}: expected {expected}")

    @property
    def n_heads(self) -> int:
        return self.ensemble_size if self.ensemble_kind == "heads" else 1


def coerce_reward_config(cfg: RewardConfig | Mapping[str, Any]) -> RewardConfig:
    return as_dataclass(RewardConfig, cfg)


# ----------------------------------------------------------------------------- loss
def reward_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor, margin: float = 0.0,
                center_coef: float | None = None, soft: bool = True) -> torch.Tensor:
    """Per-pair Bradley-Terry loss; ``r_a``/``r_b`` are ``[B]`` or ``[B, heads]``, ``p_a`` is ``[B]``.

    The mean over pairs of the hard-label case is TRL ``RewardTrainer``'s loss (with its
    ``margin`` and ``center_rewards_coefficient``).
    """
    a_chosen, q = orient(p_a)
    if not soft:
        q = torch.where(q > 0.5, torch.ones_like(q), q)
    if r_a.dim() == 2:
        a_chosen, q = a_chosen[:, None], q[:, None]
    r_c, r_r = chosen_rejected(r_a, r_b, a_chosen)
    d = r_c - r_r
    loss = -q * F.logsigmoid(d - margin) - (1.0 - q) * F.logsigmoid(-d - margin)
    if center_coef:
        loss = loss + center_coef * (r_c + r_r) ** 2
    return loss


def batch_rewards(model, batch: Mapping[str, torch.Tensor], device, autocast=contextlib.nullcontext,
                  extra: Mapping[str, Any] | None = None):
    """``(r_a, r_b)``, each ``[B, heads]`` in float32, from one forward over both sides.
    ``extra``: more forward arguments (see :func:`~cai.train.pairs.no_cache_kwargs`)."""
    with autocast():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    **(extra or {}))
    rewards = out.logits.float()
    return rewards.chunk(2)


def _batch_sums(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> dict[str, float]:
    """Additive statistics of a micro-batch (summed over processes before dividing)."""
    ra, rb = r_a.mean(-1), r_b.mean(-1)
    a_chosen, _ = orient(p_a)
    rc, rr = chosen_rejected(ra, rb, a_chosen)
    decided = p_a != 0.5
    both = torch.cat([ra, rb])
    return {
        "pairs": float(len(p_a)),
        "decided": float(decided.sum()),
        "correct": float(((rc > rr) & decided).sum()),
        "margin": float((rc - rr).sum()),
        "reward": float(both.sum()),
        "reward_sq": float((both ** 2).sum()),
    }


def _step_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    n = max(sums["pairs"], 1.0)
    mean = sums["reward"] / (2 * n)
    var = max(sums["reward_sq"] / (2 * n) - mean ** 2, 0.0)
    return {
        "rm/loss": sums["loss"] / n,
        "rm/accuracy": sums["correct"] / sums["decided"] if sums["decided"] else float("nan"),
        "rm/margin": sums["margin"] / n,
        "rm/reward_mean": mean,
        "rm/reward_std": var ** 0.5,
    }


def head_bootstrap_weights(n: int, heads: int, seed: int) -> torch.Tensor | None:
    """``[n, heads]`` Poisson(1) weights (an online bootstrap per head); ``None`` for one head."""
    if heads <= 1:
        return None
    rng = np.random.default_rng([seed % (1 << 63), 0xB007])
    return torch.as_tensor(rng.poisson(1.0, size=(n, heads)), dtype=torch.float32)


# ----------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    """A trained member: the (unwrapped) model, its step count and summary metrics."""

    model: Any
    steps: int
    metrics: dict[str, float]
    resumed_from: int | None


def train_reward_model(
    model,
    tokenizer,
    train: Sequence[EncodedPair],
    cfg: RewardConfig | Mapping[str, Any],
    *,
    seed: int,
    state_dir: str | Path,
    accelerator=None,
    head_weights: torch.Tensor | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` (a sequence classifier) on ``train``; resumes from ``state_dir/checkpoint``.

    ``state_dir`` also receives ``train_log.jsonl``. ``head_weights`` ``[len(train), heads]``
    weight each pair per head (see :func:`head_bootstrap_weights`). ``on_step(step, metrics)``
    runs after each optimizer step and its checkpoint.
    """
    cfg = coerce_reward_config(cfg)
    if not train:
        raise DataError("reward: no training pairs")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    C.seed_everything(seed)
    accelerator = accelerator or C.make_accelerator(mixed_precision=cfg.mixed_precision, device=cfg.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.disable_dropout:
        disable_dropout(model)
    n = len(train)
    total = steps_per_epoch(n, cfg.batch_size) * cfg.epochs
    optimizer = C.make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = C.make_scheduler(optimizer, C.resolve_warmup(cfg.warmup, total), total, cfg.schedule)
    extra = no_cache_kwargs(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = C.load_checkpoint(state_dir / "checkpoint", accelerator, model, optimizer, scheduler)
    resumed_from = state.step if state else None
    state = state or C.TrainState()
    logger = C.MetricsLogger(state_dir / "train_log.jsonl", resume_step=resumed_from,
                             enabled=accelerator.is_main_process)
    pad_id, device = tokenizer.pad_token_id, accelerator.device
    meter, step, last = C.Throughput(), state.step, {}
    model.train()
    for sb in iter_steps(n, cfg.batch_size, cfg.epochs, seed, state.epoch, state.data_position):
        rows, weight = step_share(sb.indices, rank, world)
        scale = loss_scale(len(sb.indices), world) * weight
        chunks = micro_batches(rows, cfg.micro_batch_size)
        sums: dict[str, float] = defaultdict(float)
        for j, chunk in enumerate(chunks):
            sync = contextlib.nullcontext() if j == len(chunks) - 1 else accelerator.no_sync(model)
            with sync:
                batch = collate_pairs([train[i] for i in chunk], pad_id)
                r_a, r_b = batch_rewards(model, batch, device, accelerator.autocast, extra)
                p_a = batch["p_a"].to(device)
                per = reward_loss(r_a, r_b, p_a, cfg.margin, cfg.center_rewards_coefficient, cfg.soft_labels)
                w = head_weights[chunk].to(device) if head_weights is not None else torch.ones_like(per)
                loss_sum = (per * w).mean(-1).sum()
                accelerator.backward(loss_sum * scale)
            for k, v in _batch_sums(r_a.detach(), r_b.detach(), p_a).items():
                sums[k] += v * weight
            sums["loss"] += float(per.detach().mean(-1).sum()) * weight
        lr = scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)
        step += 1
        n_tokens = sum(train[i].n_tokens for i in rows) if weight else 0
        meter.update(n_tokens * world, len(sb.indices))
        if step % cfg.log_every == 0 or step == total:
            last = _step_metrics(reduce_sums(accelerator, dict(sums)))
            rates = meter.rates()
            last.update({"rm/lr": lr, "rm/grad_norm": grad_norm,
                         "rm/epoch": sb.epoch + (sb.position + len(sb.indices)) / n,
                         "rm/pairs_per_s": rates["samples_per_s"], "rm/tokens_per_s": rates["tokens_per_s"]})
            logger.log(step, last)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            C.save_checkpoint(state_dir / "checkpoint", accelerator, model, optimizer, scheduler,
                              step, *sb.next_position(n))
        if on_step is not None:
            on_step(step, last)
    logger.close()
    trainable, total_params = C.count_parameters(accelerator.unwrap_model(model))
    summary = {"rm/steps": step, "rm/processes": world, "rm/pairs_per_s": meter.overall()["samples_per_s"],
               "rm/trainable_params": trainable, "rm/total_params": total_params}
    if last:
        summary["rm/final_loss"] = last["rm/loss"]
    return TrainResult(accelerator.unwrap_model(model), step, summary, resumed_from)


if __name__ == "__main__":  # [accelerate launch] python -m cai.train.reward --help
    import sys

    from cai.errors import CaiError
    from cai.train.reward_stage import main

    try:
        raise SystemExit(main())
    except CaiError as e:  # a user mistake: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

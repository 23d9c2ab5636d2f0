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

Scoring, metrics (accuracy with a bootstrap CI, ECE against soft labels), the pipeline stage
``reward`` (:func:`run`) and the command line (:func:`main`) follow the loop, below.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cai.config import RewardConfig, StageConfig, build
from cai.data import Prompt, write_jsonl
from cai.data.pair_files import load_pair_files
from cai.errors import DataError
from cai.report.reward_eval import pair_set_metrics
from cai.train import common as C
from cai.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cai.train.log import MetricsLogger, Throughput
from cai.train.pairs import (
    ADAPTER_DIR,
    Encoded,
    EncodedPair,
    LabelledPair,
    PreferenceData,
    chosen_rejected,
    collate_pairs,
    disable_dropout,
    encode_pairs,
    encode_response,
    front_specials,
    iter_steps,
    load_labelled_pairs,
    loss_scale,
    merged_for_saving,
    micro_batches,
    no_cache_kwargs,
    optimizer_step,
    orient,
    preference_data,
    reduce_sums,
    sharded_map,
    split_pairs,
    step_share,
    steps_per_epoch,
)

log = logging.getLogger(__name__)


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
    cfg: RewardConfig,
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
    state = load_checkpoint(state_dir / "checkpoint", accelerator, model, optimizer, scheduler)
    resumed_from = state.step if state else None
    state = state or TrainState()
    member = state_dir.name if state_dir.name.startswith("member_") and state_dir.name != "member_0" else None
    logger = MetricsLogger(state_dir / "train_log.jsonl", resume_step=resumed_from, name="rm", total_steps=total,
                           part=member, enabled=accelerator.is_main_process)
    pad_id, device = tokenizer.pad_token_id, accelerator.device
    meter, step, last = Throughput(), state.step, {}
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
        logger.advance()
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
            save_checkpoint(state_dir / "checkpoint", accelerator, model, optimizer, scheduler,
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

# ============================================================================= stage, scoring and command line
# Reward models after the loop: scoring, evaluation, the saved artifact, the pipeline stage.
#
# - :func:`preference_metrics`: accuracy on decided pairs with a 95% interval
#   (:func:`cai.stats.rate_ci`; an exact reward tie counts half), the soft Bradley-Terry loss,
#   the expected calibration error of ``sigmoid(r_a - r_b)`` against the labels' ``p_a`` (ECE,
#   10 equal-width bins), reward mean/std and, for ensembles, the mean spread of the members.
# - :func:`run_reward`: train every ensemble member (:func:`cai.train.reward.train_reward_model`),
#   score train / held-out / human held-out pairs, save the artifact:
#   ``model/`` (member 0, or the k-head model), ``ensemble/member_<i>/`` (more seeds),
#   ``reward_stats.json`` (mean/std of the reward over the training responses -- PPO normalises
#   with them -- plus what a scorer needs), ``train_log.jsonl``, ``heldout_scores.jsonl``.
# - :class:`RewardScorer`: load that artifact and score (conversation, response) texts.
# - Stage ``reward`` (:func:`run`; its row in :data:`cai.pipeline.STAGES` says what it reads and
#   which label artifacts are its inputs) and a command line for
#   ``accelerate launch -m cai.train.reward ...`` (:func:`main`). The pieces the ``dpo`` and
#   ``ppo`` command lines share with it live here once: :func:`cli_parser`, :func:`cli_data`,
#   :func:`finish_cli`.
STATS_FILE = "reward_stats.json"


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_rows(model, rows: Sequence[Encoded], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """Rewards ``[N, heads]`` (float32, CPU) of tokenised sequences, batched by length."""
    model.eval()
    extra = no_cache_kwargs(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    out = torch.empty((len(rows), int(model.config.num_labels)), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = C.pad_and_mask([{"input_ids": rows[i].input_ids} for i in idx], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device), **extra).logits
        out[idx] = logits.float().cpu()
    return out


def score_pairs(model, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int, accelerator=None):
    """``(r_a, r_b)`` ``[N, heads]`` for every pair; with several processes each scores a share."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device

    def score(idx: list[int]) -> torch.Tensor:
        rows = [pairs[i].a for i in idx] + [pairs[i].b for i in idx]
        r = score_rows(model, rows, pad_id, batch_size, device)
        return torch.stack([r[:len(idx)], r[len(idx):]], 1)  # [n, 2, heads]

    both = sharded_map(accelerator, len(pairs), score)
    return both[:, 0], both[:, 1]


# ----------------------------------------------------------------------------- metrics
def expected_calibration_error(pred: torch.Tensor, target: torch.Tensor, n_bins: int = 10) -> float:
    """Sum over equal-width bins of predicted p of (bin share) * |mean predicted - mean target|."""
    bins = torch.clamp((pred * n_bins).long(), max=n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += float(m.float().mean()) * abs(float(pred[m].mean()) - float(target[m].mean()))
    return ece


def preference_metrics(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor, prefix: str, *,
                       seed: int = 0, n_boot: int = 2000) -> dict[str, float]:
    """Held-out metrics of member rewards ``[N, k]`` against labels ``p_a`` ``[N]``."""
    from cai.stats import rate_ci

    ra, rb = r_a.mean(-1), r_b.mean(-1)
    d = ra - rb
    decided = p_a != 0.5
    # an exact reward tie (d == 0) prefers neither side: it counts half, not as 'b preferred'
    correct = torch.where(d == 0, torch.full_like(d, 0.5), ((d > 0) == (p_a > 0.5)).float())[decided].numpy()
    a_chosen, q = orient(p_a)
    dc = torch.where(a_chosen, d, -d)
    loss = -(q * torch.nn.functional.logsigmoid(dc) + (1 - q) * torch.nn.functional.logsigmoid(-dc))
    both = torch.cat([ra, rb])
    out = {f"{prefix}/pairs": int(len(p_a)), f"{prefix}/decided_pairs": int(decided.sum()),
           f"{prefix}/loss": float(loss.mean()), f"{prefix}/ece": expected_calibration_error(torch.sigmoid(d), p_a),
           f"{prefix}/margin": float(dc.mean()), f"{prefix}/reward_mean": float(both.mean()),
           f"{prefix}/reward_std": float(both.std(unbiased=False))}
    if len(correct):
        low, high = rate_ci(correct, n=n_boot, seed=seed)
        out.update({f"{prefix}/accuracy": float(correct.mean()), f"{prefix}/accuracy_ci_low": low,
                    f"{prefix}/accuracy_ci_high": high})
    if r_a.shape[1] > 1:
        out[f"{prefix}/ensemble_std"] = float(torch.cat([r_a, r_b]).std(-1).mean())
    return out


# ----------------------------------------------------------------------------- run
def _member_dir(out_dir: Path, i: int) -> Path:
    return out_dir / "model" if i == 0 else out_dir / "ensemble" / f"member_{i}"


def run_reward(cfg: RewardConfig, data: PreferenceData, load_backbone: Callable, *, seed: int,
               out_dir: str | Path, state_dir: str | Path, accelerator=None,
               pair_sets: Mapping[str, Sequence[Any]] | None = None) -> dict[str, float]:
    """Train, score and save a reward model (all members); returns flat ``rm/...`` metrics.

    ``load_backbone(num_labels, seed) -> (model, tokenizer)``. ``pair_sets``: set name -> pairs
    (``response_a`` the human's choice) of ``cfg.eval_sets``, scored as ``rm/sets/<name>/...``
    (:func:`cai.report.reward_eval.pair_set_metrics`). Only the main process writes.
    """
    from cai.models import resolve_chat_format

    out_dir, state_dir = Path(out_dir), Path(state_dir)
    accelerator = accelerator or C.make_accelerator(mixed_precision=cfg.mixed_precision, device=cfg.device)
    main = accelerator.is_main_process
    members = cfg.ensemble_size if cfg.ensemble_kind == "seeds" else 1
    model, tok = load_backbone(cfg.n_heads, seed)
    chat_format = resolve_chat_format(tok, cfg.chat_format)
    metrics: dict[str, float] = dict(data.metrics)
    same = data.human_test is data.test  # the human arm: its held-out pairs are the human ones
    sets = {"train": data.train, "eval": data.test, **({} if same else {"human": data.human_test})}
    encoded: dict[str, list[EncodedPair]] = {}
    for name, items in sets.items():
        encoded[name], metrics[f"rm/data/{name}_truncated"] = encode_pairs(items, tok, chat_format, cfg.max_length)
        metrics[f"rm/data/{name}_pairs"] = len(items)
    extra = {name: encode_pairs([LabelledPair(p, 1.0) for p in pairs], tok, chat_format, cfg.max_length)[0]
             for name, pairs in (pair_sets or {}).items()}
    extra_scores: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in extra}
    scores: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in sets}
    for i in range(members):
        member_seed = seed + 1000 * i
        if i > 0:
            model, _ = load_backbone(cfg.n_heads, member_seed)
        weights = head_bootstrap_weights(len(encoded["train"]), cfg.n_heads, member_seed)
        result = train_reward_model(model, tok, encoded["train"], cfg, seed=member_seed,
                                    state_dir=state_dir / f"member_{i}", accelerator=accelerator, head_weights=weights)
        metrics.update({k if i == 0 else f"{k}_member_{i}": v for k, v in result.metrics.items()})
        for name, enc in encoded.items():
            if enc:
                scores[name].append(score_pairs(result.model, enc, tok.pad_token_id, cfg.eval_batch_size, accelerator))
        for name, enc in extra.items():
            extra_scores[name].append(score_pairs(result.model, enc, tok.pad_token_id, cfg.eval_batch_size,
                                                  accelerator))
        if main:
            adapter = out_dir / ADAPTER_DIR if members == 1 else None  # an ensemble exports merged members
            merged_for_saving(result.model, adapter).save_pretrained(_member_dir(out_dir, i))
            tok.save_pretrained(_member_dir(out_dir, i))
            log_name = "train_log.jsonl" if i == 0 else f"train_log_member_{i}.jsonl"
            shutil.copyfile(state_dir / f"member_{i}" / "train_log.jsonl", out_dir / log_name)
        accelerator.wait_for_everyone()
        accelerator.free_memory()
        del model, result
    stacked = {name: (torch.cat([s[0] for s in ss], -1), torch.cat([s[1] for s in ss], -1))
               for name, ss in scores.items() if ss}
    if same and "eval" in stacked:
        encoded["human"], stacked["human"] = encoded["eval"], stacked["eval"]
    r_train = torch.cat(stacked["train"]).mean(-1)
    stats = {"mean": float(r_train.mean()), "std": float(r_train.std(unbiased=False)),
             "n_responses": int(len(r_train)), "ensemble_kind": cfg.ensemble_kind,
             "ensemble_size": cfg.ensemble_size, "heads": cfg.n_heads,
             "members": [str(_member_dir(Path("."), i)) for i in range(members)],
             "chat_format": chat_format, "max_length": cfg.max_length}
    metrics.update({"rm/train_reward_mean": stats["mean"], "rm/train_reward_std": stats["std"]})
    for name, prefix in (("eval", "rm/eval"), ("human", "rm/human")):
        if name in stacked:
            p_a = torch.tensor([e.p_a for e in encoded[name]])
            metrics.update(preference_metrics(*stacked[name], p_a, prefix, seed=seed, n_boot=cfg.bootstrap_resamples))
    for name, ss in extra_scores.items():  # the ensemble mean, as for the held-out pairs
        r_chosen, r_rejected = (torch.cat([s[j] for s in ss], -1).mean(-1).tolist() for j in (0, 1))
        pairs = pair_sets[name]
        metrics.update(pair_set_metrics(r_chosen, r_rejected, [len(p.response_a) for p in pairs],
                                        [len(p.response_b) for p in pairs], f"rm/sets/{name}"))
    if main:
        (out_dir / STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        _write_heldout(out_dir / "heldout_scores.jsonl", encoded, {k: v for k, v in stacked.items()
                                                                   if k == "eval" or not same})
    return metrics


def _write_heldout(path: Path, encoded: Mapping[str, list[EncodedPair]], stacked: Mapping[str, Any]) -> None:
    rows = []
    for name in ("eval", "human"):
        if name not in stacked:
            continue
        r_a, r_b = stacked[name]
        for e, ra, rb in zip(encoded[name], r_a, r_b):
            rows.append({"set": name, "pair_id": e.pair_id, "p_a": e.p_a, "r_a": float(ra.mean()),
                         "r_b": float(rb.mean()), "std_a": float(ra.std(unbiased=False)),
                         "std_b": float(rb.std(unbiased=False))})
    write_jsonl(path, rows)


# ----------------------------------------------------------------------------- scorer
@dataclass
class RewardScores:
    """Per response: the ensemble-mean reward, the members' spread, and the normalised reward."""

    rewards: list[float]
    std: list[float]
    normalised: list[float]


class RewardScorer:
    """A trained reward artifact, ready to score (conversation, response) pairs (PPO, evaluation)."""

    def __init__(self, models: list, tokenizer, stats: Mapping[str, Any], device: torch.device):
        self.models, self.tokenizer, self.stats, self.device = models, tokenizer, dict(stats), device
        self._front = front_specials(tokenizer)

    @classmethod
    def load(cls, artifact_dir: str | Path, device: str = "auto", dtype: str = "auto") -> RewardScorer:
        from cai.models import ModelSpec, load_sequence_classifier, resolve_device

        root = Path(artifact_dir)
        if not (root / STATS_FILE).is_file():
            raise DataError(f"{root}: not a reward artifact (no {STATS_FILE})")
        stats = json.loads((root / STATS_FILE).read_text())
        models, tok = [], None
        for member in stats["members"]:
            spec = ModelSpec(str(root / member), dtype=dtype, device=device, max_length=stats["max_length"])
            model, tok = load_sequence_classifier(spec, num_labels=int(stats["heads"]))
            models.append(model.eval())
        return cls(models, tok, stats, resolve_device(spec))

    def score(self, conversations: Sequence[Prompt | list[dict]], responses: Sequence[str],
              batch_size: int = 32) -> RewardScores:
        if len(conversations) != len(responses):
            raise DataError(f"score: {len(conversations)} conversations but {len(responses)} responses")
        rows = [encode_response(self.tokenizer, c.messages_as_dicts() if isinstance(c, Prompt) else list(c), r,
                                self.stats["chat_format"], int(self.stats["max_length"]), self._front)
                for c, r in zip(conversations, responses)]
        r = torch.cat([score_rows(m, rows, self.tokenizer.pad_token_id, batch_size, self.device)
                       for m in self.models], -1)
        mean, std = r.mean(-1), r.std(-1, unbiased=False)
        norm = (mean - self.stats["mean"]) / max(self.stats["std"], 1e-8)
        return RewardScores(mean.tolist(), std.tolist(), norm.tolist())


# ----------------------------------------------------------------------------- data, backbone
def backbone_loader(cfg: RewardConfig, location: str) -> Callable:
    """``load(num_labels, seed) -> (model, tokenizer)`` for the backbone at ``location`` (on CPU;
    the accelerator places it)."""
    from cai.models import ModelSpec, load_sequence_classifier, lora_spec

    spec = ModelSpec(location, revision=cfg.revision, dtype=cfg.dtype, device="cpu",
                     trust_remote_code=cfg.trust_remote_code, chat_format=cfg.chat_format,
                     max_length=cfg.max_length, lora=lora_spec(cfg.lora))

    def load(num_labels: int, seed: int):
        if num_labels == 1:
            return load_sequence_classifier(spec, num_labels=1, seed=seed)
        return _load_multi_head(spec, num_labels, seed)

    return load


def _load_multi_head(spec, num_labels: int, seed: int):
    """A ``num_labels``-head classifier from any checkpoint (a 1-head RM or a causal LM): the
    head is re-initialised (seeded) when its size differs from the checkpoint's."""
    from transformers import AutoModelForSequenceClassification

    from cai.errors import ModelLoadError
    from cai.models import apply_lora, load_tokenizer, resolve_dtype
    from cai.tiny import seeded

    tok = load_tokenizer(spec, padding_side="right")
    try:
        with seeded(seed):
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True, dtype=resolve_dtype(spec),
                revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a {num_labels}-head reward model from {spec.describe()}: {e}") from e
    model.config.pad_token_id = tok.pad_token_id
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, seed=seed)
    return model, tok


def tiny_backbone(inputs: Mapping[str, Path], data: PreferenceData, build_dir: Path, seed: int) -> str:
    """``backbone: tiny``: the tiny policy's checkpoint (its tokenizer; a fresh scalar head), or,
    without a tiny policy, a tiny classifier whose tokenizer is trained on the pairs' text."""
    if "policy_model" in inputs:
        return str(inputs["policy_model"] / "model")
    from cai.config import TinyConfig
    from cai.tiny import (
        build_tiny_sequence_classifier,
        default_tiny_corpus,
    )

    corpus = default_tiny_corpus() + [t for x in data.train for t in
                                      (x.pair.prompt.hh_text, x.pair.response_a, x.pair.response_b)]
    if not (build_dir / "config.json").is_file():
        build_tiny_sequence_classifier(build_dir, corpus, TinyConfig(seed=seed))
    return str(build_dir)


# ----------------------------------------------------------------------------- stage, CLI
def build_reward_model(rcfg: RewardConfig, seed: int, inputs: Mapping[str, Path], ctx: Any) -> None:
    """Train the reward model ``rcfg`` on its labels (``inputs``: ``human_pairs``, or ``ai_labels``
    and ``ai_pairs``; ``policy_model`` for a tiny backbone), evaluate it on held-out pairs and
    write the artifact into ``ctx.dir``: the body of stage ``reward`` (and of ``eval_reward``)."""
    with ctx.phase("load_data"):
        data = preference_data(rcfg.labels_from, inputs, rcfg.test_fraction, rcfg.split_salt, "rm")
        pair_sets = {f.name: f.pairs for f in load_pair_files(rcfg.eval_sets)}
    location = tiny_backbone(inputs, data, ctx.state_dir / "tiny_backbone", seed) if rcfg.backbone == "tiny" \
        else rcfg.backbone
    with ctx.phase("train"):
        metrics = run_reward(rcfg, data, backbone_loader(rcfg, location), seed=seed, out_dir=ctx.dir,
                             state_dir=ctx.state_dir, pair_sets=pair_sets)
    ctx.set_metrics(metrics)


def run(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage ``reward``: train the RM ``cfg.reward`` on the configured labels (``reward.labels_from``),
    evaluate on held-out (and held-out human) pairs."""
    build_reward_model(cfg.reward, cfg.seed, inputs, ctx)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, RewardConfig]:
    """The command line's arguments and its :class:`~cai.config.RewardConfig` (``key=value``
    overrides in the grammar of ``cai run``: ``epochs=2 lora.enabled=true``)."""
    p = cli_parser("python -m cai.train.reward", main.__doc__, ("--backbone", "the backbone"),
                   "model/, reward_stats.json, ...", "RewardConfig fields, e.g. epochs=2 lr=1e-4 lora.enabled=true")
    args = p.parse_intermixed_args(argv)
    return args, build(RewardConfig, {"backbone": args.backbone}, overrides=args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``[accelerate launch] python -m cai.train.reward --pairs P --labels L --backbone B --out DIR [key=value ...]``"""
    args, rcfg = parse_args(argv)
    data = cli_data(args.pairs, args.labels, rcfg.test_fraction, rcfg.split_salt, "rm")
    accelerator = C.make_accelerator(mixed_precision=rcfg.mixed_precision, device=rcfg.device)
    metrics = run_reward(rcfg, data, backbone_loader(rcfg, args.backbone), seed=args.seed, out_dir=args.out,
                         state_dir=args.out / "state", accelerator=accelerator,
                         pair_sets={f.name: f.pairs for f in load_pair_files(rcfg.eval_sets)})
    return finish_cli(accelerator, args.out, metrics, "rm")


def cli_parser(prog: str, doc: str | None, model: tuple[str, str], outputs: str, overrides: str,
               ) -> argparse.ArgumentParser:
    """The arguments of both preference command lines: ``--pairs``, ``--labels``, the model to
    start from (``model``: flag, what it is), ``--out``, ``--seed`` and ``key=value`` overrides."""
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("--pairs", type=Path, required=True, help="pairs.jsonl")
    p.add_argument("--labels", type=Path, required=True, help="labels.jsonl (human or AI)")
    p.add_argument(model[0], required=True, help=f"hub name or local path of {model[1]}")
    p.add_argument("--out", type=Path, required=True, help=f"output directory ({outputs})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help=overrides)
    return p


def cli_data(pairs: Path, labels: Path, test_fraction: float, salt: str, prefix: str) -> PreferenceData:
    """The command lines' data: one pairs/labels file pair, split by prompt; no human held-out set."""
    items, stats = load_labelled_pairs(pairs, labels)
    train, test = split_pairs(items, test_fraction, salt)
    return PreferenceData(train, test, [], stats.metrics(f"{prefix}/data"))


def finish_cli(accelerator, out: Path, metrics: Mapping[str, Any], prefix: str,
               shown: Callable[[str], bool] | None = None) -> int:
    """End a command-line run: the main process writes ``metrics.json`` and prints the metrics
    ``shown`` selects (default: the held-out metrics and the final loss); then every process
    leaves the process group together."""
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        shown = shown or (lambda k: "/eval/" in k or k == f"{prefix}/final_loss")
        print(json.dumps({k: v for k, v in metrics.items() if shown(k)}, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: gloo aborts at exit otherwise
    return 0


if __name__ == "__main__":  # [accelerate launch] python -m cai.train.reward --help
    raise SystemExit(C.command_line(main))

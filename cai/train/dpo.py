"""Direct preference optimisation (DPO, optionally IPO) on human or AI labels, one loop.

The loop, top to bottom (:func:`train_dpo`):

1. Pairs come from :mod:`cai.train.pairs`, tokenised as the policy samples: the formatted
   prompt, the response, EOS; only response tokens (and EOS) count in a sequence log-prob.
2. The reference is the *initial* policy, frozen: its sequence log-probs of every pair are
   computed once before the first step and kept in ``state_dir`` (a resumed run reuses them,
   never the half-trained policy's). No second model stays in memory. With LoRA the initial
   policy is the base model (fresh adapters are zero).
3. Per pair, with log-ratios ``l = log pi(y|x) - log ref(y|x)``, ``z = beta * (l_chosen - l_rejected)``
   and ``q = P(chosen is better)``::

       sigmoid (DPO):  loss = -q * log sigmoid(z) - (1 - q) * log sigmoid(-z)
       ipo:            loss = (l_chosen/n_chosen - l_rejected/n_rejected - (q - 1/2) / beta)^2

   With hard labels (``q = 1``) these are TRL ``DPOTrainer``'s ``sigmoid`` and ``ipo`` losses
   (IPO's log-ratios averaged per completion token, as TRL does); ``tests/test_trl_parity.py``
   checks equality to 1e-5. Soft labels make each pair's own ``p`` its label smoothing (the
   "conservative DPO" form); ``label_smoothing`` adds a global epsilon on top.
4. One optimizer step = one global batch of ``batch_size`` pairs, split over processes and
   micro-batches, loss averaged per pair over the global batch; the LM head runs only on the
   positions that predict response tokens (``logits_to_keep``).
5. AdamW, warmup and decay, clipping, exact-resume checkpoints every ``checkpoint_every`` steps.

Metrics use TRL's names under ``dpo/``: ``rewards/chosen``, ``rewards/rejected`` (``beta * l``),
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; the held-out
pairs get the same under ``dpo/eval/`` (at step 0 every margin is 0: policy == reference).

Simplification: no separate reference checkpoint (the reference is always the starting policy,
e.g. the SFT model); pairs that do not fit ``max_length`` are truncated (counted), not dropped.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cai.config import CHAT_FORMATS, DPOConfig, ModelConfig, StageConfig, build
from cai.errors import ConfigError, DataError
from cai.train import common as C
from cai.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cai.train.log import MetricsLogger, Throughput
from cai.train.pairs import (
    ADAPTER_DIR,
    EncodedPair,
    PreferenceData,
    chosen_rejected,
    collate_pairs,
    disable_dropout,
    encode_pairs,
    iter_steps,
    loss_scale,
    merged_for_saving,
    micro_batches,
    no_cache_kwargs,
    optimizer_step,
    orient,
    preference_data,
    reduce_sums,
    sharded_map,
    step_share,
    steps_per_epoch,
)
from cai.train.reward import cli_data, cli_parser, finish_cli

log = logging.getLogger(__name__)

LOSSES = ("sigmoid", "ipo")


# ----------------------------------------------------------------------------- loss
@dataclass
class DPOTerms:
    """Per-pair loss and the quantities TRL logs (``beta * log-ratio`` rewards, log-probs)."""

    loss: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    logps_chosen: torch.Tensor
    logps_rejected: torch.Tensor


def dpo_loss(logp_a: torch.Tensor, logp_b: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor,
             p_a: torch.Tensor, beta: float, loss: str = "sigmoid", soft: bool = True,
             label_smoothing: float = 0.0, n_a: torch.Tensor | None = None,
             n_b: torch.Tensor | None = None) -> DPOTerms:
    """Per-pair DPO / IPO loss from sequence log-probs of both sides under policy and reference.

    ``n_a``/``n_b`` (response token counts) are needed for ``ipo``.
    """
    a_chosen, q = orient(p_a)
    if not soft:
        q = torch.where(q > 0.5, torch.ones_like(q), q)
    q = q * (1.0 - label_smoothing) + (1.0 - q) * label_smoothing
    l_c, l_r = chosen_rejected(logp_a - ref_a, logp_b - ref_b, a_chosen)
    if loss == "sigmoid":
        z = beta * (l_c - l_r)
        per = -q * F.logsigmoid(z) - (1.0 - q) * F.logsigmoid(-z)
    elif loss == "ipo":
        if n_a is None or n_b is None:
            raise ValueError("ipo needs the response token counts n_a and n_b")
        n_c, n_r = chosen_rejected(n_a.clamp(min=1), n_b.clamp(min=1), a_chosen)
        per = (l_c / n_c - l_r / n_r - (q - 0.5) / beta) ** 2
    else:
        raise ConfigError(f"dpo.loss={loss!r}: expected one of {', '.join(LOSSES)}")
    lp_c, lp_r = chosen_rejected(logp_a, logp_b, a_chosen)
    return DPOTerms(per, beta * l_c.detach(), beta * l_r.detach(), lp_c.detach(), lp_r.detach())


def keeps_logits(model) -> bool:
    """Whether the (unwrapped, base) model's forward takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def sequence_logps(model, batch: Mapping[str, torch.Tensor], device, keep_logits: bool,
                   autocast=contextlib.nullcontext, extra: Mapping[str, Any] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled (response) tokens per row, and their counts.
    ``extra``: more forward arguments (see :func:`~cai.train.pairs.no_cache_kwargs`)."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    kwargs: dict[str, Any] = dict(extra or {})
    if keep_logits:  # the LM head only where a response token is predicted
        first = int((labels != C.IGNORE_INDEX).float().argmax(1).min())
        keep = min(ids.shape[1], ids.shape[1] - first + 1)
        kwargs["logits_to_keep"] = keep
        labels = labels[:, ids.shape[1] - keep:]
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    lp, m = C.token_logprobs(logits, labels)
    return lp.sum(-1), m.sum(-1)


@torch.no_grad()
def pair_logps(model, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int, accelerator=None,
               desc: str | None = None) -> torch.Tensor:
    """``[N, 4]``: log-prob of a, of b, and the response token counts of a and b, per pair
    (``desc``: show a progress bar of this process's share under that name)."""
    from cai import progress

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    keep, extra = keeps_logits(model), no_cache_kwargs(model)
    was_training = model.training
    model.eval()

    def compute(idx: list[int]) -> torch.Tensor:
        out = torch.empty((len(idx), 4))
        order = sorted(range(len(idx)), key=lambda j: pairs[idx[j]].n_tokens)
        bar = progress.bar(total=len(order), desc=desc or "", unit="pair", enabled=desc is not None)
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            lp, n = sequence_logps(model, collate_pairs([pairs[idx[j]] for j in chunk], pad_id), device, keep,
                                   extra=extra)
            k = len(chunk)
            out[chunk] = torch.stack([lp[:k], lp[k:], n[:k].float(), n[k:].float()], 1).float().cpu()
            bar.update(k)
        bar.close()
        return out

    result = sharded_map(accelerator, len(pairs), compute)
    model.train(was_training)
    return result


def _sums(terms: DPOTerms) -> dict[str, float]:
    return {"pairs": float(len(terms.loss)), "loss": float(terms.loss.detach().sum()),
            "rewards/chosen": float(terms.rewards_chosen.sum()),
            "rewards/rejected": float(terms.rewards_rejected.sum()),
            "rewards/accuracies": float((terms.rewards_chosen > terms.rewards_rejected).float().sum()),
            "rewards/margins": float((terms.rewards_chosen - terms.rewards_rejected).sum()),
            "logps/chosen": float(terms.logps_chosen.sum()), "logps/rejected": float(terms.logps_rejected.sum())}


def _means(sums: Mapping[str, float], prefix: str) -> dict[str, float]:
    n = max(sums["pairs"], 1.0)
    return {f"{prefix}/{k}": v / n for k, v in sums.items() if k != "pairs"}


def evaluate_dpo(model, pairs: Sequence[EncodedPair], reference: torch.Tensor, cfg: DPOConfig, pad_id: int,
                 accelerator=None, prefix: str = "dpo/eval") -> dict[str, float]:
    """TRL-named DPO metrics of ``model`` on held-out pairs against precomputed reference log-probs."""
    if not pairs:
        return {}
    pol = pair_logps(model, pairs, pad_id, cfg.eval_batch_size, accelerator)
    p_a = torch.tensor([e.p_a for e in pairs])
    terms = dpo_loss(pol[:, 0], pol[:, 1], reference[:, 0], reference[:, 1], p_a, cfg.beta, cfg.loss,
                     cfg.soft_labels, cfg.label_smoothing, pol[:, 2], pol[:, 3])
    out = _means(_sums(terms), prefix)
    out[f"{prefix}/pairs"] = len(pairs)
    return out


# ----------------------------------------------------------------------------- the loop
@dataclass
class DPOResult:
    model: Any
    steps: int
    metrics: dict[str, float]
    resumed_from: int | None


def reference_logps(model, sets: Mapping[str, Sequence[EncodedPair]], pad_id: int, cfg: DPOConfig,
                    state_dir: Path, accelerator) -> dict[str, torch.Tensor]:
    """The initial policy's ``pair_logps`` of every set, computed once and kept in ``state_dir``."""
    path = state_dir / "reference_logps.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if all(name in saved and len(saved[name]) == len(pairs) for name, pairs in sets.items()):
            return saved
        raise DataError(f"{path} does not match the pairs of this run; delete {state_dir} to start over")
    out = {name: pair_logps(model, pairs, pad_id, cfg.eval_batch_size, accelerator, desc=f"dpo reference {name}")
           for name, pairs in sets.items()}
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(out, tmp)
        tmp.replace(path)
    accelerator.wait_for_everyone()
    return out


def train_dpo(
    model,
    tokenizer,
    train: Sequence[EncodedPair],
    cfg: DPOConfig,
    *,
    seed: int,
    state_dir: str | Path,
    eval_sets: Mapping[str, Sequence[EncodedPair]] | None = None,
    accelerator=None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> DPOResult:
    """Train the policy ``model`` with DPO on ``train``; resumes from ``state_dir/checkpoint``.

    ``eval_sets`` (name -> pairs) are scored after training as ``dpo/<name>/*``. ``state_dir``
    holds the reference log-probs, the checkpoint and ``train_log.jsonl``.
    """
    if not train:
        raise DataError("dpo: no training pairs")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    C.seed_everything(seed)
    accelerator = accelerator or C.make_accelerator(mixed_precision=cfg.mixed_precision, device=cfg.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.disable_dropout:
        disable_dropout(model)
    pad_id, device = tokenizer.pad_token_id, accelerator.device
    model.to(device)
    eval_sets = {name: list(pairs) for name, pairs in (eval_sets or {}).items() if pairs}
    refs = reference_logps(model, {"train": train, **eval_sets}, pad_id, cfg, state_dir, accelerator)
    n = len(train)
    total = steps_per_epoch(n, cfg.batch_size) * cfg.epochs
    optimizer = C.make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = C.make_scheduler(optimizer, C.resolve_warmup(cfg.warmup, total), total, cfg.schedule)
    keep, extra = keeps_logits(model), no_cache_kwargs(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = load_checkpoint(state_dir / "checkpoint", accelerator, model, optimizer, scheduler)
    resumed_from = state.step if state else None
    state = state or TrainState()
    logger = MetricsLogger(state_dir / "train_log.jsonl", resume_step=resumed_from, name="dpo", total_steps=total,
                           enabled=accelerator.is_main_process)
    ref = refs["train"]
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
                lp, ntok = sequence_logps(model, batch, device, keep, accelerator.autocast, extra)
                k = len(chunk)
                r = ref[chunk].to(device)
                terms = dpo_loss(lp[:k], lp[k:], r[:, 0], r[:, 1], batch["p_a"].to(device), cfg.beta, cfg.loss,
                                 cfg.soft_labels, cfg.label_smoothing, ntok[:k], ntok[k:])
                accelerator.backward(terms.loss.sum() * scale)
            for key, v in _sums(terms).items():
                sums[key] += v * weight
        lr = scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)
        step += 1
        logger.advance()
        meter.update(sum(train[i].n_tokens for i in rows) * world if weight else 0, len(sb.indices))
        if step % cfg.log_every == 0 or step == total:
            last = _means(reduce_sums(accelerator, dict(sums)), "dpo")
            rates = meter.rates()
            last.update({"dpo/lr": lr, "dpo/grad_norm": grad_norm,
                         "dpo/epoch": sb.epoch + (sb.position + len(sb.indices)) / n,
                         "dpo/pairs_per_s": rates["samples_per_s"], "dpo/tokens_per_s": rates["tokens_per_s"]})
            logger.log(step, last)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            save_checkpoint(state_dir / "checkpoint", accelerator, model, optimizer, scheduler,
                            step, *sb.next_position(n))
        if on_step is not None:
            on_step(step, last)
    logger.close()
    unwrapped = accelerator.unwrap_model(model)
    trainable, total_params = C.count_parameters(unwrapped)
    summary = {"dpo/steps": step, "dpo/processes": world, "dpo/pairs_per_s": meter.overall()["samples_per_s"],
               "dpo/trainable_params": trainable, "dpo/total_params": total_params}
    if last:
        summary["dpo/final_loss"] = last["dpo/loss"]
    for name, pairs in eval_sets.items():
        summary.update(evaluate_dpo(unwrapped, pairs, refs[name], cfg, pad_id, accelerator, f"dpo/{name}"))
    return DPOResult(unwrapped, step, summary, resumed_from)

# ============================================================================= stage and command line
# The pipeline stage ``dpo`` (:func:`run`) and the command line
# ``[accelerate launch] python -m cai.train.dpo`` (:func:`main`).
#
# Stage inputs (its row in :data:`cai.pipeline.STAGES`): the labels (``human_pairs`` or
# ``ai_labels`` + ``ai_pairs``, by ``dpo.labels_from``), the human pairs for a held-out human
# evaluation when configured, and the starting policy (``dpo.start_from``): the ``sft`` artifact
# (``sft``), else the initial policy (the ``policy_model`` artifact for
# ``policy.name_or_path: tiny``). The starting policy is also the frozen reference.
#
# Outputs: ``model/`` (the trained policy, LoRA merged, with its tokenizer) and
# ``train_log.jsonl``; metrics ``dpo/...`` (data counts, training summary, ``dpo/eval/*`` on the
# held-out split of the training labels, ``dpo/human/*`` on held-out human pairs).
def load_policy(policy: ModelConfig, location: str, dcfg: DPOConfig, seed: int):
    """``(model, tokenizer, chat_format)`` of the starting policy ``policy`` loaded from ``location``,
    with DPO's LoRA settings."""
    from cai.generation.stages import training_model_spec
    from cai.models import load_causal_lm, lora_spec, resolve_chat_format

    # on the CPU: the accelerator places it
    spec = training_model_spec(policy, location, not dcfg.lora.enabled, device="cpu")
    spec.lora = lora_spec(dcfg.lora)
    model, tok = load_causal_lm(spec, lora_seed=seed)
    return model, tok, resolve_chat_format(tok, spec.chat_format)


def run_dpo(dcfg: DPOConfig, data: PreferenceData, model, tok, chat_format: str, *, seed: int,
            out_dir: Path, state_dir: Path, accelerator=None) -> dict[str, Any]:
    """Encode, train, evaluate and save; returns flat ``dpo/...`` metrics."""
    metrics: dict[str, Any] = dict(data.metrics)
    encoded = {}
    for name, items in (("train", data.train), ("eval", data.test), ("human", data.human_test)):
        encoded[name], metrics[f"dpo/data/{name}_truncated"] = encode_pairs(items, tok, chat_format, dcfg.max_length)
        metrics[f"dpo/data/{name}_pairs"] = len(items)
    if data.human_test is data.test:
        encoded.pop("human")  # the human arm's held-out pairs are its eval pairs
    result = train_dpo(model, tok, encoded.pop("train"), dcfg, seed=seed, state_dir=state_dir,
                       eval_sets=encoded, accelerator=accelerator)
    metrics.update(result.metrics)
    if data.human_test is data.test:  # the human arm: its held-out pairs are the human ones
        metrics.update({k.replace("dpo/eval/", "dpo/human/"): v for k, v in result.metrics.items()
                        if k.startswith("dpo/eval/")})
    metrics["dpo/resumed_from_step"] = result.resumed_from or 0
    if accelerator is None or accelerator.is_main_process:
        merged_for_saving(result.model, out_dir / ADAPTER_DIR).save_pretrained(out_dir / "model")
        tok.save_pretrained(out_dir / "model")
        shutil.copyfile(state_dir / "train_log.jsonl", out_dir / "train_log.jsonl")
    return metrics


def run(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage ``dpo``: train the starting policy (``dpo.start_from``) with DPO (``cfg.dpo``) on the
    configured labels."""
    from cai.generation.stages import policy_location

    dcfg, seed = cfg.dpo, cfg.seed
    with ctx.phase("load_data"):
        data = preference_data(dcfg.labels_from, inputs, dcfg.test_fraction, dcfg.split_salt, "dpo")
    with ctx.phase("load_model"):
        location = str(inputs["sft"] / "model") if "sft" in inputs else policy_location(cfg.policy, inputs)
        model, tok, chat_format = load_policy(cfg.policy, location, dcfg, seed)
    with ctx.phase("train"):
        metrics = run_dpo(dcfg, data, model, tok, chat_format, seed=seed, out_dir=ctx.dir, state_dir=ctx.state_dir)
    ctx.set_metrics(metrics)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, DPOConfig]:
    """The command line's arguments and its :class:`~cai.config.DPOConfig` (``key=value``
    overrides in the grammar of ``cai run``: ``beta=0.1 lora.enabled=true``)."""
    p = cli_parser("python -m cai.train.dpo", main.__doc__, ("--policy", "the starting policy"),
                   "model/, train_log.jsonl, ...", "DPOConfig fields, e.g. beta=0.1 loss=ipo lora.enabled=true")
    p.add_argument("--chat-format", default="auto", choices=CHAT_FORMATS)
    args = p.parse_intermixed_args(argv)
    return args, build(DPOConfig, overrides=args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``[accelerate launch] python -m cai.train.dpo --pairs P --labels L --policy M --out DIR [key=value ...]``"""
    args, dcfg = parse_args(argv)
    data = cli_data(args.pairs, args.labels, dcfg.test_fraction, dcfg.split_salt, "dpo")
    accelerator = C.make_accelerator(mixed_precision=dcfg.mixed_precision, device=dcfg.device)
    policy = ModelConfig(name_or_path=args.policy, chat_format=args.chat_format, max_length=dcfg.max_length)
    model, tok, chat_format = load_policy(policy, args.policy, dcfg, args.seed)
    metrics = run_dpo(dcfg, data, model, tok, chat_format, seed=args.seed, out_dir=args.out,
                      state_dir=args.out / "state", accelerator=accelerator)
    return finish_cli(accelerator, args.out, metrics, "dpo")


if __name__ == "__main__":  # [accelerate launch] python -m cai.train.dpo --help
    raise SystemExit(C.command_line(main))

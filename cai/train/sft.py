"""Supervised fine-tuning on (conversation, response): SL-CAI on revisions, or "distil the judge".

The loop, top to bottom (:func:`train_sft`):

1. Each example is formatted with :func:`cai.models.format_example` and tokenized the way the
   sampling engine reads a prompt (:func:`cai.train.common.encode_example`): the prompt alone,
   then the response, then EOS. Labels are ``-100`` on prompt tokens, so the loss is on the
   response only.
2. One optimizer step consumes ``batch_size`` examples -- over all processes, as for the reward
   model and DPO -- in the order :func:`~cai.train.common.epoch_order` fixes for
   ``(seed, epoch)`` (:func:`cai.train.pairs.iter_steps`). Each process takes a round-robin
   share, sorts it by length and cuts it into micro-batches of ``micro_batch_size`` (less
   padding). The loss of a step is the summed token NLL of all its micro-batches divided by
   their total number of response tokens: gradient accumulation and data parallelism give the
   gradient of one big batch, so one process and ``accelerate launch --num_processes 2``
   follow the same loss curve.
3. Batches are left-padded with ``position_ids`` from the mask, so every response sits at the
   end of its row and the LM head runs only on the last ``max response + 1`` positions
   (``logits_to_keep``): prompt positions need no vocabulary projection.
4. AdamW, linear warmup then linear/cosine decay, gradient clipping (the norm is logged either
   way). A checkpoint every ``checkpoint_every`` steps holds everything needed to continue the
   loss curve exactly (weights, optimizer, scheduler, RNG states, data position).

Simplifications: examples longer than ``max_length`` are truncated (counted), not packed.
With LoRA the trained adapters are merged into the saved model, so every later stage loads it
as a plain causal LM.

Stage ``sft`` (:func:`run`, its row in :data:`cai.pipeline.STAGES`): reads examples from the
``revisions`` or the ``judge_answers`` artifact (``sft.source``), optionally mixes in helpful
data, trains the policy and writes ``model/`` (weights and tokenizer) and ``train_log.jsonl``.
The command line (:func:`main`) runs the same loop on files, e.g. under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cai.config import CHAT_FORMATS, SFTConfig, StageConfig, build
from cai.errors import DataError
from cai.train import common as C
from cai.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cai.train.log import MetricsLogger, Throughput, read_train_log
from cai.train.pairs import (
    ADAPTER_DIR,
    iter_steps,
    merged_for_saving,
    micro_batches,
    optimizer_step,
    step_share,
    steps_per_epoch,
)
from cai.train.sft_data import (
    SFTExample,
    answer_examples,
    helpful_examples,
    mix_helpful,
    revision_examples,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- encoding


@dataclass
class EncodedSet:
    """Tokenized examples and what encoding left out or cut."""

    rows: list[C.Encoded]
    counts: Counter


def encode_examples(tokenizer, examples: list[SFTExample], max_length: int, chat_format: str) -> EncodedSet:
    """Format and tokenize ``examples``; rows with no response token left are counted and left out."""
    from cai.models import format_example

    rows: list[C.Encoded] = []
    counts = Counter({"truncated": 0, "no_response_tokens": 0})
    for ex in examples:
        prompt, full = format_example(tokenizer, ex.messages_as_dicts(), ex.response, chat_format)
        enc = C.encode_example(tokenizer, prompt, full, max_length)
        counts["truncated"] += int(enc.truncated)
        if all(t == C.IGNORE_INDEX for t in enc.labels[1:]):
            counts["no_response_tokens"] += 1
            continue
        rows.append(enc)
    return EncodedSet(rows, counts)


def _n_targets(row: C.Encoded) -> int:
    return sum(1 for t in row.labels[1:] if t != C.IGNORE_INDEX)


def _keeps_logits(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def batch_nll(model, rows: list[C.Encoded], pad_id: int, device, keep_logits: bool) -> torch.Tensor:
    """Summed response-token NLL of ``rows`` (left-padded; LM head on response positions only)."""
    batch = C.pad_and_mask([{"input_ids": r.input_ids, "labels": r.labels} for r in rows], pad_id,
                           padding_side="left")
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
    keep = min(ids.size(1), max(len(r.input_ids) - r.prompt_len for r in rows) + 1)
    kwargs = {"logits_to_keep": keep} if keep_logits else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                   **kwargs).logits
    loss, _ = C.masked_nll(logits, labels[:, -logits.size(1):])
    return loss


@torch.no_grad()
def evaluate_nll(model, tokenizer, rows: list[C.Encoded], batch_size: int = 8) -> float:
    """Mean response-token NLL of ``rows`` (the training objective), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for chunk in C.batches(rows, batch_size):
            total += float(batch_nll(model, list(chunk), tokenizer.pad_token_id, device, _keeps_logits(model)))
            n += sum(_n_targets(r) for r in chunk)
    finally:
        model.train(was_training)
    return total / max(n, 1)


# ----------------------------------------------------------------------------- the loop


@dataclass
class SFTResult:
    """What :func:`train_sft` did: the trained (unwrapped) model, steps and summary metrics."""

    model: Any
    steps: int
    metrics: dict[str, float]
    resumed_from: int | None


def plan_steps(n: int, cfg: SFTConfig) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` for ``n`` examples: ``batch_size`` examples per
    optimizer step, however many processes share them."""
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else per_epoch * cfg.epochs
    return per_epoch, total


def step_gradients(accelerator, model, rows: list[C.Encoded], step_ids: list[int], micro_batch_size: int,
                   pad_id: int, keep_logits: bool) -> float:
    """Backward for one optimizer step over the examples ``step_ids``: this process takes its
    round-robin share, sorted by length and cut into micro-batches. The gradient (after DDP's
    average over processes) is that of the step's summed NLL divided by its number of response
    tokens, which is also the loss returned (over all processes, detached)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n_targets = sum(_n_targets(rows[i]) for i in step_ids)
    mine, weight = step_share(step_ids, rank, world)
    chunks = micro_batches(sorted(mine, key=lambda i: len(rows[i].input_ids)), micro_batch_size)
    loss_sum = torch.zeros((), device=accelerator.device)
    for j, chunk in enumerate(chunks):
        with contextlib.nullcontext() if j == len(chunks) - 1 else accelerator.no_sync(model):
            nll = batch_nll(model, [rows[i] for i in chunk], pad_id, accelerator.device, keep_logits)
            accelerator.backward(nll * (weight * world / n_targets))
        loss_sum += nll.detach() * weight
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    return float(loss_sum) / n_targets


def train_sft(
    model,
    tokenizer,
    examples: list[SFTExample],
    cfg: SFTConfig,
    *,
    state_dir: str | Path,
    seed: int = 0,
    chat_format: str = "auto",
    device: str = "auto",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> SFTResult:
    """Fine-tune ``model`` on ``examples``; resumes from ``state_dir/checkpoint`` if present.

    ``state_dir`` holds the checkpoint and ``train_log.jsonl`` (kept across kills).
    ``on_step(step, metrics)`` is called after every optimizer step (and its checkpoint).
    """
    from cai.models import apply_lora, lora_spec

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    C.seed_everything(seed)
    accelerator = C.make_accelerator(mixed_precision=cfg.mixed_precision, device=device)
    encoded = encode_examples(tokenizer, examples, cfg.max_length, chat_format)
    rows, n = encoded.rows, len(encoded.rows)
    if not rows:
        raise DataError(f"sft: no trainable examples ({len(examples)} given; left out: {dict(encoded.counts)})")
    if cfg.lora.enabled:
        model = apply_lora(model, lora_spec(cfg.lora), seed=seed)
    steps_per_epoch, total_steps = plan_steps(n, cfg)
    optimizer = C.make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = C.make_scheduler(optimizer, C.resolve_warmup(cfg.warmup, total_steps), total_steps, cfg.schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = load_checkpoint(state_dir / "checkpoint", accelerator, model, optimizer, scheduler)
    resumed_from = state.step if state else None
    state = state or TrainState()
    logger = MetricsLogger(state_dir / "train_log.jsonl", resume_step=resumed_from, name="sft",
                           total_steps=total_steps, enabled=accelerator.is_main_process)
    keep_logits = _keeps_logits(accelerator.unwrap_model(model))
    meter, step = Throughput(), state.step
    tokens_seen = int(state.extra.get("tokens_seen", 0))
    model.train()
    epochs = -(-total_steps // steps_per_epoch)  # max_steps may stop inside an epoch, or run past `epochs`
    for sb in iter_steps(n, cfg.batch_size, epochs, seed, state.epoch, state.data_position):
        if step >= total_steps:
            break
        loss = step_gradients(accelerator, model, rows, sb.indices, cfg.micro_batch_size, tokenizer.pad_token_id,
                              keep_logits)
        lr = scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)
        step += 1
        logger.advance()
        n_tokens = sum(len(rows[i].input_ids) for i in sb.indices)
        tokens_seen += n_tokens
        meter.update(n_tokens, len(sb.indices))
        metrics = {"sft/loss": loss, "sft/lr": lr, "sft/grad_norm": grad_norm,
                   "sft/epoch": sb.epoch + (sb.position + len(sb.indices)) / n}
        if step % cfg.log_every == 0 or step == total_steps:
            metrics.update({f"sft/{k}": v for k, v in meter.rates().items()})
            logger.log(step, metrics)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
            save_checkpoint(state_dir / "checkpoint", accelerator, model, optimizer, scheduler,
                            step, *sb.next_position(n), {"tokens_seen": tokens_seen})
        if on_step is not None:
            on_step(step, metrics)
    logger.close()
    trainable, total = C.count_parameters(accelerator.unwrap_model(model))
    overall = meter.overall()
    summary = {
        "sft/examples": n, "sft/steps": step, "sft/steps_per_epoch": steps_per_epoch,
        "sft/processes": accelerator.num_processes, "sft/tokens_seen": tokens_seen,
        "sft/tokens_per_s": overall["tokens_per_s"], "sft/samples_per_s": overall["samples_per_s"],
        "sft/trainable_params": trainable, "sft/total_params": total,
        **{f"sft/{k}": v for k, v in encoded.counts.items()},
    }
    return SFTResult(accelerator.unwrap_model(model), step, summary, resumed_from)


def save_sft_model(model, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` the model (LoRA adapters merged) and its tokenizer into ``out_dir``."""
    out_dir = Path(out_dir)
    merged_for_saving(model, out_dir.parent / ADAPTER_DIR).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- the stage


def load_sft_examples(cfg: SFTConfig, inputs: Mapping[str, Path], seed: int) -> tuple[list[SFTExample], dict]:
    """The stage's training examples (source + helpful mix) and counters for the metrics."""
    if cfg.source == "revisions":
        examples, counts = revision_examples(inputs["revisions"] / "revisions.jsonl", cfg.revision_round)
    else:
        examples, counts = answer_examples(inputs["answers"] / "answers.jsonl")
    metrics = {f"sft/source_{k}": v for k, v in counts.items()}
    if cfg.helpful_source and cfg.helpful_ratio > 0:
        helpful, hcounts = helpful_examples(cfg.helpful_source, cfg.helpful_limit)
        examples, mixed = mix_helpful(examples, helpful, cfg.helpful_ratio, seed)
        metrics.update({f"sft/helpful_{k}": v for k, v in hcounts.items()})
        metrics.update({f"sft/{k}": v for k, v in mixed.items()})
    return examples, metrics


def run(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage ``sft``: train the policy (``cfg.policy``) on the configured source (``cfg.sft``) and
    write ``model/``. Inputs: ``revisions`` or ``answers`` (by ``sft.source``), and
    ``policy_model`` for ``policy.name_or_path: tiny``."""
    from cai.generation.stages import policy_location, training_model_spec
    from cai.models import load_causal_lm

    scfg = cfg.sft
    seed = cfg.seed + scfg.seed_offset
    with ctx.phase("load_data"):
        examples, metrics = load_sft_examples(scfg, inputs, seed)
    with ctx.phase("load_model"):
        spec = training_model_spec(cfg.policy, policy_location(cfg.policy, inputs), not scfg.lora.enabled)
        model, tok = load_causal_lm(spec)
    with ctx.phase("train"):
        result = train_sft(model, tok, examples, scfg, state_dir=ctx.state_dir, seed=seed,
                           chat_format=spec.chat_format, device=cfg.policy.device)
    with ctx.phase("save"):
        save_sft_model(result.model, tok, ctx.dir / "model")
        shutil.copyfile(ctx.state_dir / "train_log.jsonl", ctx.dir / "train_log.jsonl")
    log_rows = read_train_log(ctx.dir / "train_log.jsonl")
    if log_rows:
        metrics["sft/first_loss"] = log_rows[0]["sft/loss"]
        metrics["sft/final_loss"] = log_rows[-1]["sft/loss"]
    metrics.update(result.metrics)
    metrics["sft/resumed_from_step"] = result.resumed_from or 0
    ctx.set_metrics(metrics)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, SFTConfig]:
    """The command line's arguments and its :class:`~cai.config.SFTConfig` (``key=value``
    overrides in the grammar of ``cai run``: ``lr=1e-4 lora.enabled=true``)."""
    parser = argparse.ArgumentParser(prog="python -m cai.train.sft", description=main.__doc__)
    parser.add_argument("--policy", required=True, help="hub name or local directory of the causal LM")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--revisions", type=Path)
    data.add_argument("--answers", type=Path)
    data.add_argument("--examples", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, help="checkpoints (default: OUT/state)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-format", default="auto", choices=CHAT_FORMATS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*",
                        help="SFTConfig fields, e.g. lr=1e-4 batch_size=16 micro_batch_size=4 lora.enabled=true")
    args = parser.parse_intermixed_args(argv)
    return args, build(SFTConfig, overrides=args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cai.train.sft --policy DIR --examples FILE --out DIR [key=value ...]``.

    Runs :func:`train_sft` outside the pipeline, e.g. on several processes with
    ``accelerate launch -m cai.train.sft ...``. Data: ``--revisions`` (revisions.jsonl),
    ``--answers`` (answers.jsonl) or ``--examples`` (a .jsonl of ``{messages, response}``).
    Writes ``model/``, ``train_log.jsonl`` and ``metrics.json`` into ``--out`` (main process).
    """
    import json

    from accelerate.state import PartialState

    from cai.models import ModelSpec, load_causal_lm

    args, cfg = parse_args(argv)
    if args.revisions:
        examples, counts = revision_examples(args.revisions, cfg.revision_round)
    elif args.answers:
        examples, counts = answer_examples(args.answers)
    else:
        examples, counts = helpful_examples(str(args.examples))
    dtype = "float32" if not cfg.lora.enabled else "auto"
    model, tok = load_causal_lm(ModelSpec(args.policy, dtype=dtype, device="cpu"))
    state_dir = args.state_dir or args.out / "state"
    result = train_sft(model, tok, examples, cfg, state_dir=state_dir, seed=args.seed,
                       chat_format=args.chat_format, device=args.device)
    if PartialState().is_main_process:
        save_sft_model(result.model, tok, args.out / "model")
        shutil.copyfile(state_dir / "train_log.jsonl", args.out / "train_log.jsonl")
        metrics = {**{f"sft/source_{k}": v for k, v in counts.items()}, **result.metrics}
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":  # [accelerate launch] python -m cai.train.sft --help
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(C.command_line(main))

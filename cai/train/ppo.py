"""PPO against a reward model (or online against a judge: d-RLAIF), one loop read top to bottom.

Each PPO step (:func:`train_ppo`):

1. **Rollout.** Take the next ``rollout_batch_size`` prompts (a seeded order per pass over the
   prompts; the data position is checkpointed) and sample one response each through
   :class:`cai.sampling.SamplingEngine` with ``temperature`` on the full distribution.
2. **Score.** One batched no-grad forward of the policy (``recompute_logprobs``, the default:
   the rollout's log-probs then come from exactly the function the update uses, so the first
   ratio is exactly 1 and the KL is exactly 0 while policy == reference), of the frozen
   reference (a copy, or the LoRA policy with its adapters disabled) and of the value function
   (a separate backbone with a scalar head, or a head on the policy's last hidden state). The
   ``reward_fn`` scores the responses: a reward model (:class:`cai.train.rewards.RMReward`,
   normalised with the RM's saved statistics, scaled, clipped) or a judge's expected 1-10 score
   (:class:`cai.train.rewards.JudgeScoreReward`, d-RLAIF). Responses that miss EOS can pay
   ``missing_eos_penalty``; responses whose reward failed are counted and left out of the update.
3. **Advantages.** Per-token ``-kl_coef * KL`` (``k1`` or ``k3``) plus the score on the last
   response token; GAE(γ, λ); advantages whitened over the batch (:mod:`cai.train.rl_math`).
4. **Update.** ``ppo_epochs`` passes over seeded shuffles of the batch in minibatches of
   ``mini_batch_size`` (one optimizer step each), accumulated from ``micro_batch_size`` rows;
   loss = clipped policy loss + ``vf_coef`` * clipped value loss.
5. **Bookkeeping.** The KL controller (fixed or adaptive) sees the batch KL; metrics under
   TRL's names (``ppo/objective/kl``, ``ppo/policy/clipfrac_avg``, ...) plus seconds and tokens/s
   per phase go to ``train_log.jsonl``; monitors (:mod:`cai.train.monitors`) warn with a
   diagnosis; every ``checkpoint_every`` steps everything a resumed run needs is saved.

Simplifications, on purpose: one response per prompt; the value of the state after the last
token is 0 (the episode ends there); the score sits on the last response token (TRL puts it one
past, where its value mask still reaches); one optimizer over policy and value parameters.
The batch layout, rollout scoring and the policy+value module live in :mod:`cai.train.rollout`;
the pipeline stage ``ppo`` and the reward functions in :mod:`cai.train.ppo` and
:mod:`cai.train.rewards`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from cai.config import CHAT_FORMATS, ModelConfig, PPOConfig, StageConfig, build
from cai.data import write_jsonl
from cai.errors import ConfigError
from cai.hashing import stable_hash
from cai.sampling import SamplingEngine, SamplingParams
from cai.train import common as C
from cai.train import rl_math as K
from cai.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cai.train.log import MetricsLogger
from cai.train.monitors import PPOMonitors, Warning_
from cai.train.pairs import (
    ADAPTER_DIR,
    disable_dropout,
    local_rows,
    merged_for_saving,
    micro_batches,
    reduce_sums,
)
from cai.train.rewards import JudgeScoreReward, RewardFn, RMReward
from cai.train.rollout import PolicyAndValue, Rollout, make_rollout

log = logging.getLogger(__name__)
# the console line of a step (train_log.jsonl keeps every metric)
CONSOLE_KEYS = ("ppo/objective/scores", "ppo/objective/kl", "ppo/objective/rlhf_reward", "ppo/kl_coef",
                "ppo/loss/policy_avg", "ppo/loss/value_avg", "ppo/policy/clipfrac_avg", "ppo/response_length",
                "ppo/eps")

REWARD_SOURCES = ("reward_model", "judge")
VALUE_MODELS = ("separate", "head")


# ----------------------------------------------------------------------------- result
@dataclass
class PPOResult:
    model: torch.nn.Module  # the trained policy (unwrapped; LoRA not merged)
    value: PolicyAndValue
    metrics: dict[str, float]
    warnings: list[Warning_]
    resumed_from: Optional[int] = None


def _next_prompts(n: int, size: int, seed: int, epoch: int, pos: int) -> tuple[list[int], int, int]:
    """``size`` prompt indices from ``(epoch, pos)`` in seeded per-epoch orders (wrapping)."""
    out, order = [], C.epoch_order(n, seed, epoch)
    while len(out) < size:
        if pos == n:
            epoch, pos, order = epoch + 1, 0, C.epoch_order(n, seed, epoch + 1)
        out.append(order[pos])
        pos += 1
    return out, epoch, pos


def _stream_seed(seed: int, *parts: int) -> int:
    return int(stable_hash([seed, *parts])[:15], 16)


# ----------------------------------------------------------------------------- advantages
@dataclass
class Advantages:
    kl: torch.Tensor
    non_score: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    values: torch.Tensor


def compute_advantages(ro: Rollout, cfg: PPOConfig, kl_coef: float, all_reduce=None) -> Advantages:
    """KL penalty, token rewards, GAE and whitening for one rollout (all on the rollout's masks).

    ``all_reduce`` (a sum over processes; None with one process) makes the whitening use the
    statistics of the global rollout batch rather than this process's share of it.
    """
    mask = ro.mask
    m = mask.to(ro.logprobs.dtype)
    kl = K.kl_penalty(ro.logprobs, ro.ref_logprobs, cfg.kl_estimator) * m
    end = (mask.sum(1) - 1).clamp(min=0)
    rewards, non_score = K.token_rewards(kl, ro.scores * ro.valid.to(m.dtype), kl_coef, end)
    rewards = rewards * m
    if cfg.whiten_rewards:
        rewards = K.masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce) * m
    values = ro.values * m
    advantages, returns = K.gae(rewards, values, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = K.masked_whiten(advantages, mask, all_reduce=all_reduce)
    return Advantages(kl, non_score, advantages * m, returns, values)


# ----------------------------------------------------------------------------- the loop
def train_ppo(policy, tokenizer, conversations: Sequence[list[dict]], reward_fn: RewardFn, cfg: PPOConfig, *,
              seed: int, state_dir: str | Path, chat_format: str = "hh", ref_model=None, value_backbone=None,
              accelerator=None, heldout_fn: Optional[Callable[[Sequence[list[dict]], Sequence[Any]], float]] = None,
              ) -> PPOResult:
    """Run PPO (see the module docstring); returns the trained policy, value model and metrics.

    ``policy``: the causal LM to train (a peft model when LoRA is on). ``ref_model``: the frozen
    reference; ``None`` with a LoRA policy uses the policy with adapters disabled (exactly the
    starting weights). ``value_backbone``: an ``AutoModel`` for ``value_model=separate``.
    ``heldout_fn(conversations, completions) -> mean score`` feeds the RM/judge divergence monitor.
    """
    from cai.models import format_prompt

    cfg = build(PPOConfig, cfg)
    state_dir = Path(state_dir)
    if not conversations:
        raise ConfigError("ppo: no prompts to train on")
    if ref_model is None and not hasattr(policy, "disable_adapter"):
        raise ConfigError("ppo: a reference model is needed (or a LoRA policy, whose adapters can be disabled)")
    if cfg.value_model == "separate" and value_backbone is None:
        raise ConfigError("ppo.value_model=separate needs a value backbone")
    if cfg.top_k or cfg.top_p < 1:
        log.warning("ppo: top_k/top_p truncate sampling, but log-probs are on the full distribution: the "
                    "ratio and KL are off-policy estimates; prefer top_k=0, top_p=1")
    accelerator = accelerator or C.make_accelerator(mixed_precision=cfg.mixed_precision, device=cfg.device)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    check_world_size(cfg, world)
    all_reduce = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None
    C.seed_everything(seed)
    for m in (policy, ref_model, value_backbone):
        if m is not None and cfg.disable_dropout:
            disable_dropout(m)
    container = PolicyAndValue(policy, value_backbone, seed)
    if ref_model is not None:
        ref_model.requires_grad_(False).eval().to(accelerator.device)
    optimizer = C.make_optimizer(container, cfg.lr, cfg.weight_decay)
    scheduler = C.make_scheduler(optimizer, C.resolve_warmup(cfg.warmup, cfg.steps), cfg.steps, cfg.schedule)
    container, optimizer = accelerator.prepare(container, optimizer)
    ckpt_dir = state_dir / "checkpoint"
    state = load_checkpoint(ckpt_dir, accelerator, container, optimizer, scheduler) or TrainState()
    resumed = state.step if state.step > 0 else None
    kl_ctl = K.make_kl_controller(cfg.kl_controller, cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    monitors = PPOMonitors(cfg.monitors, cfg.kl_target)
    if resumed:
        kl_ctl.load_state_dict(state.extra["kl_controller"])
        monitors.load_state_dict(state.extra["monitors"])
        log.info("ppo: resumed from step %d (%s)", state.step, ckpt_dir)
    logger = MetricsLogger(state_dir / "train_log.jsonl", resume_step=resumed, name="ppo", total_steps=cfg.steps,
                           console_keys=CONSOLE_KEYS, enabled=main)
    unwrapped: PolicyAndValue = accelerator.unwrap_model(container)
    engine = SamplingEngine(unwrapped.policy, tokenizer, batch_size=cfg.sample_batch_size,
                            device=accelerator.device, max_prompt_tokens=cfg.max_prompt_tokens)
    prompt_texts = [format_prompt(tokenizer, list(c), chat_format) for c in conversations]
    warnings: list[Warning_] = []
    metrics: dict[str, float] = {}
    episodes, t_start = 0, time.perf_counter()
    step, epoch, pos = state.step, state.epoch, state.data_position
    while step < cfg.steps:
        global_rows, epoch, pos = _next_prompts(len(prompt_texts), cfg.rollout_batch_size, seed, epoch, pos)
        rows = local_rows(global_rows, rank, world)
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, tuple(cfg.stop),
                                seed=_stream_seed(seed, step, rank))
        ro = make_rollout(engine, unwrapped, ref_model, [prompt_texts[i] for i in rows],
                          [conversations[i] for i in rows], params, reward_fn, cfg, accelerator)
        adv = compute_advantages(ro, cfg, kl_ctl.value, all_reduce)
        t0 = time.perf_counter()
        stats = _update(container, optimizer, accelerator, ro, adv, cfg, _stream_seed(seed, step, rank, 1),
                        cfg.mini_batch_size // world)
        scheduler.step()
        train_s = time.perf_counter() - t0
        step += 1
        episodes += cfg.rollout_batch_size
        metrics = _step_metrics(ro, adv, stats, kl_ctl.value, scheduler, accelerator)
        metrics.update({"ppo/time/generate_s": ro.times["generate"], "ppo/time/score_s": ro.times["score"],
                        "ppo/time/train_s": train_s,
                        "ppo/eps": episodes / max(time.perf_counter() - t_start, 1e-9),
                        "ppo/throughput/generate_tokens_per_s": ro.n_tokens / max(ro.times["generate"], 1e-9),
                        "ppo/throughput/train_tokens_per_s":
                            ro.n_tokens * cfg.ppo_epochs / max(train_s, 1e-9), **ro.extra})
        kl_ctl.update(metrics["ppo/objective/kl"], cfg.rollout_batch_size)
        step_warnings = monitors.check(step, metrics, ro.texts)
        if heldout_fn is not None and cfg.heldout_judge_every and step % cfg.heldout_judge_every == 0:
            judge_score = float(heldout_fn([conversations[i] for i in rows], ro.completions))
            metrics["ppo/heldout/judge_score"] = judge_score
            step_warnings += monitors.record_heldout(step, metrics["ppo/objective/scores"], judge_score)
        for w in step_warnings:
            log.warning("ppo step %d [%s]: %s", w.step, w.kind, w.message)
        warnings += step_warnings
        metrics["ppo/warnings"] = len(step_warnings)
        logger.advance()
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.log(step, metrics)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint(ckpt_dir, accelerator, container, optimizer, scheduler, step, epoch, pos,
                            extra={"kl_controller": kl_ctl.state_dict(), "monitors": monitors.state_dict()})
    logger.close()
    if world > 1:
        _check_replicas_agree(accelerator, container)
    final = {k: v for k, v in metrics.items() if not k.startswith("ppo/time/")}
    final["ppo/steps"] = step
    final["ppo/processes"] = world
    for kind in sorted({w.kind for w in warnings}):
        final[f"ppo/warnings/{kind}"] = sum(w.kind == kind for w in warnings)
    return PPOResult(unwrapped.policy, unwrapped, final, warnings, resumed)


def check_world_size(cfg: PPOConfig, world: int) -> None:
    """Batch sizes are global: every process must get the same share of a rollout and minibatch."""
    for name in ("rollout_batch_size", "mini_batch_size"):
        if getattr(cfg, name) % world:
            raise ConfigError(f"ppo.{name}={getattr(cfg, name)} is split over {world} processes: "
                              f"it must be a multiple of {world}")


def _check_replicas_agree(accelerator, container) -> None:
    """DDP keeps every process's weights equal; a checksum per process proves it at the end."""
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in container.parameters() if p.requires_grad)
    sums = accelerator.gather(torch.stack([total]).to(accelerator.device)).tolist()
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"ppo: the processes' weights diverged (checksums {sums}); data parallelism is broken")


def _update(container, optimizer, accelerator, ro: Rollout, adv: Advantages, cfg: PPOConfig,
            shuffle_seed: int, mini_batch_size: int) -> dict[str, float]:
    """``ppo_epochs`` passes of minibatch updates; returns TRL's averaged statistics.

    ``mini_batch_size`` is this process's share of a minibatch: every process takes the same
    number of rows per optimizer step, and DDP's gradient average over processes of each one's
    minibatch mean is the mean over the global minibatch. Gradients are synchronised once per
    minibatch (on its last micro-batch), not once per micro-batch.
    """
    n = ro.input_ids.size(0)
    gen = torch.Generator().manual_seed(shuffle_seed)
    sums: dict[str, float] = {}
    count = 0
    norms: list[float] = []
    container.train()
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=gen).tolist()
        for mb in micro_batches(perm, mini_batch_size):
            micros = micro_batches(mb, cfg.micro_batch_size)
            for i, micro in enumerate(micros):
                sync = contextlib.nullcontext() if i == len(micros) - 1 else accelerator.no_sync(container)
                with sync:
                    stats = _micro_step(container, accelerator, ro, adv, cfg, micro, len(micro) / len(mb))
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
            limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            norms.append(float(accelerator.clip_grad_norm_(container.parameters(), limit)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {**{k: v / count for k, v in sums.items()}, "grad_norm": sum(norms) / len(norms)}


def _micro_step(container, accelerator, ro: Rollout, adv: Advantages, cfg: PPOConfig, micro: list[int],
                weight: float) -> dict[str, float]:
    """Forward and backward of one micro-batch (its loss weighted by its share of the minibatch)."""
    idx = torch.tensor(micro, device=ro.input_ids.device)
    with accelerator.autocast():
        logits, values = container(ro.input_ids[idx], ro.attention_mask[idx], ro.position_ids[idx], ro.prompt_width)
    mask = ro.mask[idx]
    logp = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)  # once: log-probs and entropy
    # padding holds 0 like the rollout's log-probs, so every statistic sees ratio 1 there
    new_lp = logp.gather(-1, ro.responses[idx].unsqueeze(-1)).squeeze(-1) * mask
    pl = K.policy_loss(new_lp, ro.logprobs[idx], adv.advantages[idx], mask, cfg.cliprange)
    vl = K.value_loss(values.float(), adv.values[idx], adv.returns[idx], mask, cfg.cliprange_value)
    accelerator.backward((pl.loss + cfg.vf_coef * vl.loss) * weight)
    with torch.no_grad():
        ent = K.masked_mean(-(logp.exp() * logp).sum(-1), mask)
    return {k: float(v.detach()) for k, v in (
        ("policy/approxkl_avg", pl.approxkl), ("policy/clipfrac_avg", pl.clipfrac), ("loss/policy_avg", pl.loss),
        ("loss/value_avg", vl.loss), ("val/clipfrac_avg", vl.clipfrac), ("policy/entropy_avg", ent),
        ("val/ratio", pl.ratio_mean))}


def _step_metrics(ro: Rollout, adv: Advantages, stats: Mapping[str, float], kl_coef: float, scheduler,
                  accelerator) -> dict[str, float]:
    """TRL-named metrics of one step (means over this step's valid responses), prefixed ``ppo/``."""
    valid = ro.valid
    n_valid = max(int(valid.sum()), 1)
    m = ro.mask.to(ro.logprobs.dtype)

    def seq_mean(x: torch.Tensor) -> float:
        return float((x * m).sum(1)[valid].sum() / n_valid)

    scores = float(ro.scores[valid].sum() / n_valid)
    seq_kl = adv.kl.sum(1)[valid]
    local = {
        "objective/kl": seq_mean(adv.kl),
        "objective/kl_stderr": float(seq_kl.std() / len(seq_kl) ** 0.5) if len(seq_kl) > 1 else 0.0,
        "objective/entropy": seq_mean(-ro.logprobs),
        "objective/non_score_reward": seq_mean(adv.non_score),
        "objective/scores": scores,
        "objective/raw_scores": float(ro.raw_scores[valid].sum() / n_valid),
        "response_length": float(ro.mask.sum(1).float().mean()),
        "eos_rate": float(ro.ended.float().mean()),
        "sampler_logprob_gap": float((ro.sampler_logprobs - ro.logprobs).abs().mul(m).sum() / m.sum()),
        **stats,
    }
    local["objective/rlhf_reward"] = local["objective/non_score_reward"] + scores
    if accelerator.num_processes > 1:
        keys = sorted(local)
        t = accelerator.reduce(torch.tensor([local[k] for k in keys], device=accelerator.device), "mean")
        local = dict(zip(keys, t.tolist()))
    counts = reduce_sums(accelerator, {"reward_failed": int((~valid).sum()), "val/num_eos_tokens": int(ro.ended.sum())})
    out = {f"ppo/{k}": v for k, v in local.items()}
    out.update({f"ppo/{k}": int(v) for k, v in counts.items()})
    out.update({"ppo/kl_coef": kl_coef, "ppo/lr": scheduler.get_last_lr()[0]})
    return out

# ============================================================================= stage and command line
# The pipeline stage ``ppo`` (:func:`run`): load policy, reference, value backbone and reward;
# train; save.
#
# Inputs (its row in :data:`cai.pipeline.STAGES`): ``prompts`` (PPO trains on the train split),
# the starting policy (``ppo.start_from``: the ``sft`` artifact, else the initial policy, the
# ``policy_model`` artifact for ``policy.name_or_path: tiny``), which is also the frozen reference
# and (for ``value_model: separate``) the value backbone's initial weights; and the ``reward``
# artifact (``reward_from: reward_model``) or the configured judge and constitution
# (``reward_from: judge``, d-RLAIF). The judge also serves the held-out monitor when
# ``heldout_judge_every > 0``; a ``model: tiny`` judge is the tiny policy (its artifact is an input).
#
# Outputs: ``model/`` (the trained policy, LoRA merged, with its tokenizer), ``train_log.jsonl``
# (per-step metrics: the report's reward / KL / length curves), ``warnings.jsonl`` (monitor
# warnings); checkpoints stay in ``ctx.state_dir`` so a killed build resumes exactly.
def load_models(policy_cfg: ModelConfig, location: str, pcfg: PPOConfig, seed: int):
    """``(policy, reference or None, value backbone or None, tokenizer, chat_format)`` of the
    policy ``policy_cfg`` loaded from ``location``, with PPO's LoRA settings."""
    from transformers import AutoModel

    from cai.generation.stages import training_model_spec
    from cai.models import load_causal_lm, lora_spec, resolve_chat_format

    # on the CPU: the accelerator places them
    spec = training_model_spec(policy_cfg, location, not pcfg.lora.enabled, device="cpu")
    spec.lora = lora_spec(pcfg.lora)
    policy, tok = load_causal_lm(spec, lora_seed=seed)
    ref = None
    if spec.lora is None:  # with LoRA the reference is the policy with its adapters disabled
        # frozen: under bf16 mixed precision its weights need not stay fp32 (half the memory)
        ref_spec = replace(spec, dtype="bfloat16") if pcfg.mixed_precision == "bf16" else spec
        ref, _ = load_causal_lm(ref_spec)
    value = None
    if pcfg.value_model == "separate":
        value = AutoModel.from_pretrained(spec.name_or_path, revision=spec.revision,
                                          trust_remote_code=spec.trust_remote_code, dtype=policy.dtype)
    return policy, ref, value, tok, resolve_chat_format(tok, spec.chat_format)


def _judge_reward(cfg: StageConfig, inputs: Mapping[str, Path], seed: int) -> JudgeScoreReward:
    """The judge's 1-10 score of a response (``cfg.judge``, with ``cfg.constitution_file``'s principles)."""
    from cai.constitution import load_constitution
    from cai.judges import make_judge
    from cai.judges.config import stage_judge

    pcfg = cfg.ppo
    judge = make_judge(stage_judge(cfg.judge, inputs), cache_path=cfg.judge_cache, where="judge")
    constitution = load_constitution(cfg.constitution_file)
    return JudgeScoreReward(judge, constitution, pcfg.judge_principles, seed, pcfg.reward_scale, pcfg.reward_clip)


def _heldout_fn(cfg: StageConfig, inputs: Mapping[str, Path], seed: int):
    """The held-out judge's mean 1-10 score of a rollout (the RM/judge divergence monitor), or None."""
    if not cfg.ppo.heldout_judge_every:
        return None
    judge_fn = _judge_reward(cfg, inputs, seed)

    def heldout(conversations, completions) -> float:
        raw = [r for r in judge_fn(conversations, completions).raw if r is not None]
        return sum(raw) / len(raw) if raw else float("nan")

    return heldout


def run(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage ``ppo`` (see above): PPO of the starting policy (``ppo.start_from``) against the reward
    model or the judge (``ppo.reward_from``)."""
    from cai.generation.stages import policy_location, read_prompts
    from cai.train.reward import RewardScorer

    pcfg, seed = cfg.ppo, cfg.seed
    with ctx.phase("load_data"):
        prompts = read_prompts(inputs["prompts"], "train")
        conversations = [p.messages_as_dicts() for p in prompts]
    with ctx.phase("load_model"):
        location = str(inputs["sft"] / "model") if "sft" in inputs else policy_location(cfg.policy, inputs)
        policy, ref, value, tok, chat_format = load_models(cfg.policy, location, pcfg, seed)
        if pcfg.reward_from == "reward_model":
            scorer = RewardScorer.load(inputs["reward"], device=pcfg.device)
            reward_fn = RMReward(scorer, pcfg.reward_normalize, pcfg.reward_scale, pcfg.reward_clip)
        else:
            reward_fn = _judge_reward(cfg, inputs, seed)
    heldout = _heldout_fn(cfg, inputs, seed) if pcfg.reward_from == "reward_model" else None
    with ctx.phase("train"):
        result = train_ppo(policy, tok, conversations, reward_fn, pcfg, seed=seed, state_dir=ctx.state_dir,
                           chat_format=chat_format, ref_model=ref, value_backbone=value, heldout_fn=heldout)
    with ctx.phase("save"):
        merged_for_saving(result.model, ctx.dir / ADAPTER_DIR).save_pretrained(ctx.dir / "model")
        tok.save_pretrained(ctx.dir / "model")
        shutil.copyfile(ctx.state_dir / "train_log.jsonl", ctx.dir / "train_log.jsonl")
        write_jsonl(ctx.dir / "warnings.jsonl", [w.to_dict() for w in result.warnings])
    metrics = dict(result.metrics)
    metrics["ppo/resumed_from_step"] = result.resumed_from or 0
    metrics["ppo/prompts"] = len(conversations)
    ctx.set_metrics(metrics)


# ----------------------------------------------------------------------------- command line
def read_prompt_file(path: Path) -> list[list[dict]]:
    """Conversations from a ``prompts`` artifact directory (its train split) or a JSONL file of
    prompt records (``{"id", "messages", "source"}``, as the ``prompts`` stage writes them)."""
    from cai.data.records import Prompt, read_jsonl
    from cai.generation.stages import read_prompts

    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            raise ConfigError(f"--prompts {path}: a directory must be a prompts artifact (with train.jsonl)")
        prompts = read_prompts(path, "train")
    elif path.is_file():
        prompts = read_jsonl(path, Prompt)
    else:
        raise ConfigError(f"--prompts {path}: no such file or directory")
    return [p.messages_as_dicts() for p in prompts]


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, PPOConfig]:
    """The command line's arguments and its :class:`~cai.config.PPOConfig` (``key=value``
    overrides in the grammar of ``cai run``: ``steps=50 lora.enabled=true``)."""
    p = argparse.ArgumentParser(prog="python -m cai.train.ppo", description=main.__doc__)
    p.add_argument("--policy", required=True, help="hub name or local path of the starting policy (also the "
                   "reference and the value backbone's initial weights)")
    p.add_argument("--prompts", type=Path, required=True,
                   help="a prompts artifact directory (train split) or a JSONL file of prompt records")
    p.add_argument("--reward", type=Path, required=True, help="a reward artifact directory (the reward stage's output)")
    p.add_argument("--out", type=Path, required=True, help="output directory (model/, train_log.jsonl, state/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-format", default="auto", choices=CHAT_FORMATS)
    p.add_argument("overrides", nargs="*", help="PPOConfig fields, e.g. steps=50 kl_coef=0.1 lora.enabled=true")
    args = p.parse_intermixed_args(argv)
    return args, build(PPOConfig, overrides=args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``[accelerate launch] python -m cai.train.ppo --policy M --prompts P --reward DIR --out DIR [key=value ...]``"""
    from cai.train.reward import RewardScorer, finish_cli

    args, pcfg = parse_args(argv)
    if pcfg.reward_from != "reward_model":
        raise ConfigError("python -m cai.train.ppo trains against --reward; d-RLAIF (reward_from=judge) runs "
                          "through `cai run ppo.reward_from=judge`")
    conversations = read_prompt_file(args.prompts)
    policy_cfg = ModelConfig(name_or_path=args.policy, chat_format=args.chat_format)
    policy, ref, value, tok, chat_format = load_models(policy_cfg, args.policy, pcfg, args.seed)
    accelerator = C.make_accelerator(mixed_precision=pcfg.mixed_precision, device=pcfg.device)
    scorer = RewardScorer.load(args.reward, device=str(accelerator.device))
    reward_fn = RMReward(scorer, pcfg.reward_normalize, pcfg.reward_scale, pcfg.reward_clip)
    result = train_ppo(policy, tok, conversations, reward_fn, pcfg, seed=args.seed, state_dir=args.out / "state",
                       chat_format=chat_format, ref_model=ref, value_backbone=value, accelerator=accelerator)
    if accelerator.is_main_process:
        merged_for_saving(result.model, args.out / ADAPTER_DIR).save_pretrained(args.out / "model")
        tok.save_pretrained(args.out / "model")
        write_jsonl(args.out / "warnings.jsonl", [w.to_dict() for w in result.warnings])
    metrics = {**result.metrics, "ppo/resumed_from_step": result.resumed_from or 0, "ppo/prompts": len(conversations)}
    return finish_cli(accelerator, args.out, metrics, "ppo", shown=lambda k: k.startswith("ppo/objective/"))


if __name__ == "__main__":  # [accelerate launch] python -m cai.train.ppo --help
    raise SystemExit(C.command_line(main))

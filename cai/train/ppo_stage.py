"""The pipeline stage ``ppo``: load policy, reference, value backbone and reward; train; save.

Inputs: ``prompts`` (PPO trains on the train split), the starting policy (the ``sft`` artifact
when the experiment has an ``sft`` stage, else the policy itself: the ``policy_model`` artifact
for ``policy.name_or_path: tiny``), which is also the frozen reference and (for
``value_model: separate``) the value backbone's initial weights; and the ``reward`` artifact
(``reward_from: reward_model``) or the configured judge and constitution (``reward_from: judge``,
d-RLAIF; the judge then also serves the held-out monitor when ``heldout_judge_every > 0``).

Outputs: ``model/`` (the trained policy, LoRA merged, with its tokenizer), ``train_log.jsonl``
(per-step metrics: the report's reward / KL / length curves), ``warnings.jsonl`` (monitor
warnings); checkpoints stay in ``ctx.state_dir`` so a killed build resumes exactly.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cai.data import write_jsonl
from cai.errors import ConfigError
from cai.train import common as C
from cai.train.pairs import merged_for_saving
from cai.train.ppo import PPOConfig, coerce_ppo_config, train_ppo
from cai.train.ppo_rewards import JudgeScoreReward, RMReward

log = logging.getLogger(__name__)


def load_models(policy_cfg: dict[str, Any], location: str, pcfg: PPOConfig, seed: int):
    """``(policy, reference or None, value backbone or None, tokenizer, chat_format)``."""
    from transformers import AutoModel

    from cai.models import load_causal_lm, resolve_chat_format
    from cai.stages import training_model_spec

    # on the CPU: the accelerator places them
    spec = training_model_spec(policy_cfg, location, not pcfg.lora.enabled, device="cpu")
    spec.lora = pcfg.lora.spec()
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


def _judge_reward(cfg: dict[str, Any], inputs: Mapping[str, Path], pcfg: PPOConfig, runtime: Mapping[str, Any],
                  seed: int) -> JudgeScoreReward:
    from cai.constitution import load_constitution
    from cai.feedback.judges import make_judge
    from cai.feedback.label import _judge_config

    judge = make_judge(_judge_config(cfg, inputs, runtime), cache_path=runtime.get("cache_path"))
    constitution = load_constitution(runtime["constitution"])
    return JudgeScoreReward(judge, constitution, pcfg.judge_principles, seed, pcfg.reward_scale, pcfg.reward_clip)


def _heldout_fn(cfg: dict[str, Any], inputs: Mapping[str, Path], pcfg: PPOConfig, runtime: Mapping[str, Any],
                seed: int):
    """The held-out judge's mean 1-10 score of a rollout (the RM/judge divergence monitor), or None."""
    if not pcfg.heldout_judge_every or not runtime.get("constitution"):
        return None
    judge_fn = _judge_reward(cfg, inputs, pcfg, runtime, seed)

    def heldout(conversations, completions) -> float:
        raw = [r for r in judge_fn(conversations, completions).raw if r is not None]
        return sum(raw) / len(raw) if raw else float("nan")

    return heldout


def build_ppo(cfg: dict[str, Any], inputs: dict[str, Path], ctx: Any, runtime: Mapping[str, Any] | None = None) -> None:
    """Stage ``ppo`` (see the module docstring)."""
    from cai.stages import policy_location, read_prompts
    from cai.train.reward_stage import RewardScorer

    runtime = dict(runtime or {})
    pcfg = coerce_ppo_config({**cfg["ppo"], **(runtime.get("ppo") or {})})
    seed = int(cfg["seed"])
    with ctx.phase("load_data"):
        prompts = read_prompts(inputs["prompts"], "train")
        conversations = [p.messages_as_dicts() for p in prompts]
    with ctx.phase("load_model"):
        location = str(inputs["sft"] / "model") if "sft" in inputs else policy_location(cfg, inputs)
        policy, ref, value, tok, chat_format = load_models(cfg["policy"], location, pcfg, seed)
        if pcfg.reward_from == "reward_model":
            scorer = RewardScorer.load(inputs["reward"], device=pcfg.device)
            reward_fn = RMReward(scorer, pcfg.reward_normalize, pcfg.reward_scale, pcfg.reward_clip)
        else:
            reward_fn = _judge_reward(cfg, inputs, pcfg, runtime, seed)
    heldout = _heldout_fn(cfg, inputs, pcfg, runtime, seed) if pcfg.reward_from == "reward_model" else None
    with ctx.phase("train"):
        result = train_ppo(policy, tok, conversations, reward_fn, pcfg, seed=seed, state_dir=ctx.state_dir,
                           chat_format=chat_format, ref_model=ref, value_backbone=value, heldout_fn=heldout)
    with ctx.phase("save"):
        merged_for_saving(result.model).save_pretrained(ctx.dir / "model")
        tok.save_pretrained(ctx.dir / "model")
        shutil.copyfile(ctx.state_dir / "train_log.jsonl", ctx.dir / "train_log.jsonl")
        write_jsonl(ctx.dir / "warnings.jsonl", [w.to_dict() for w in result.warnings])
    metrics = dict(result.metrics)
    metrics["ppo/resumed_from_step"] = result.resumed_from or 0
    metrics["ppo/prompts"] = len(conversations)
    ctx.set_metrics(metrics)


def ppo_stage(cfg) -> Any:
    """Pipeline builder: the ``ppo`` stage for the composed config."""
    from omegaconf import OmegaConf

    from cai.artifacts import ArtifactStore
    from cai.config import CONSTITUTIONS_DIR
    from cai.constitution import resolve_constitution
    from cai.feedback.judges.config import coerce_config, judge_key, judge_runtime
    from cai.pipeline import Stage

    p = OmegaConf.to_container(cfg.ppo, resolve=True)
    pcfg = coerce_ppo_config(p)  # a bad value fails at planning, before any stage runs
    inputs = {"prompts": "prompts"}
    if "sft" in cfg.experiment.stages:
        inputs["sft"] = "sft"
    elif cfg.policy.name_or_path == "tiny":
        inputs["policy_model"] = "policy_model"
    uses_judge = pcfg.reward_from == "judge" or pcfg.heldout_judge_every > 0
    if pcfg.reward_from == "reward_model":
        inputs["reward"] = "reward"
    judge = OmegaConf.to_container(cfg.judge, resolve=True)
    if uses_judge and judge.get("model") == "tiny":
        inputs["policy_model"] = "policy_model"
    policy = {k: v for k, v in OmegaConf.to_container(cfg.policy, resolve=True).items() if k != "device"}
    key: dict[str, Any] = {"ppo": {k: v for k, v in p.items() if k != "device"}, "policy": policy,
                           "seed": int(cfg.seed)}
    runtime: dict[str, Any] = {"ppo": {"device": p["device"]}}
    if uses_judge:
        if not cfg.constitution.path:
            raise ConfigError("ppo with a judge (reward_from=judge or heldout_judge_every > 0) needs constitution.path")
        coerce_config(judge, "judge")  # a bad judge setting fails at planning, before any stage is built
        key["judge"] = judge_key(judge)
        root = cfg.store.root or ArtifactStore.default_root()
        runtime.update({"judge": judge_runtime(judge),
                        "constitution": str(resolve_constitution(cfg.constitution.path, [CONSTITUTIONS_DIR])),
                        "cache_path": str(Path(root).expanduser() / "judge_cache.sqlite")})
    fn = functools.partial(build_ppo, runtime=runtime)
    return Stage("ppo", fn, key, inputs, uses_constitution=uses_judge)


# ----------------------------------------------------------------------------- command line
def _nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"lora.r": 8}`` -> ``{"lora": {"r": 8}}`` (PPOConfig's groups: lora, monitors)."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} is a value, not a group")
        node[leaf] = value
    return out


def read_prompt_file(path: Path) -> list[list[dict]]:
    """Conversations from a ``prompts`` artifact directory (its train split) or a JSONL file of
    prompt records (``{"id", "messages", "source"}``, as the ``prompts`` stage writes them)."""
    from cai.records import Prompt, read_jsonl
    from cai.stages import read_prompts

    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            raise ConfigError(f"--prompts {path}: a directory must be a prompts artifact (with train.jsonl)")
        prompts = read_prompts(path, "train")
    elif path.is_file():
        prompts = read_jsonl(path, Prompt)
    else:
        raise ConfigError(f"--prompts {path}: no such file or directory")
    return [p.messages_as_dicts() for p in prompts]


def main(argv: Sequence[str] | None = None) -> int:
    """``[accelerate launch] python -m cai.train.ppo --policy M --prompts P --reward DIR --out DIR [key=value ...]``"""
    from cai.train.reward_stage import RewardScorer, finish_cli, parse_overrides

    p = argparse.ArgumentParser(prog="python -m cai.train.ppo", description=main.__doc__)
    p.add_argument("--policy", required=True, help="hub name or local path of the starting policy (also the "
                   "reference and the value backbone's initial weights)")
    p.add_argument("--prompts", type=Path, required=True,
                   help="a prompts artifact directory (train split) or a JSONL file of prompt records")
    p.add_argument("--reward", type=Path, required=True, help="a reward artifact directory (the reward stage's output)")
    p.add_argument("--out", type=Path, required=True, help="output directory (model/, train_log.jsonl, state/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-format", default="auto", help="auto | template | hh")
    p.add_argument("overrides", nargs="*", help="PPOConfig fields, e.g. steps=50 kl_coef=0.1 lora.enabled=true")
    args = p.parse_args(argv)
    pcfg = coerce_ppo_config(_nested(parse_overrides(args.overrides)))
    if pcfg.reward_from != "reward_model":
        raise ConfigError("python -m cai.train.ppo trains against --reward; d-RLAIF (reward_from=judge) runs "
                          "through `cai run ppo.reward_from=judge`")
    conversations = read_prompt_file(args.prompts)
    policy, ref, value, tok, chat_format = load_models({"chat_format": args.chat_format}, args.policy, pcfg, args.seed)
    accelerator = C.make_accelerator(mixed_precision=pcfg.mixed_precision, device=pcfg.device)
    scorer = RewardScorer.load(args.reward, device=str(accelerator.device))
    reward_fn = RMReward(scorer, pcfg.reward_normalize, pcfg.reward_scale, pcfg.reward_clip)
    result = train_ppo(policy, tok, conversations, reward_fn, pcfg, seed=args.seed, state_dir=args.out / "state",
                       chat_format=chat_format, ref_model=ref, value_backbone=value, accelerator=accelerator)
    if accelerator.is_main_process:
        merged_for_saving(result.model).save_pretrained(args.out / "model")
        tok.save_pretrained(args.out / "model")
        write_jsonl(args.out / "warnings.jsonl", [w.to_dict() for w in result.warnings])
    metrics = {**result.metrics, "ppo/resumed_from_step": result.resumed_from or 0, "ppo/prompts": len(conversations)}
    return finish_cli(accelerator, args.out, metrics, "ppo", shown=lambda k: k.startswith("ppo/objective/"))

"""The stage graph of an experiment, built and run through the artifact store.

``plan(cfg)`` turns the composed config into an ordered list of :class:`Stage` (each with its
own config slice and its upstream stages); ``run_experiment(cfg, run_dir)`` asks the store for
each stage's artifact, building only what is missing, and writes into the run directory:

- ``metrics.json``: flat, namespaced metrics of every stage (``data/...``, ``sample/...``),
  plus ``pipeline/<stage>/reused`` and ``time/<stage>_s``;
- ``stages/<stage>.json``: the stage's ``stage.json`` (config, input keys, constitution hash,
  versions, phase timings, cost), with ``reused`` saying whether this run built it;
- ``run.json``: the artifact key of every stage and the resolved config, so a report can show
  which artifacts two arms of a sweep share.

New stages plug in by adding a builder to ``STAGES``: a function of the config returning a
:class:`Stage`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from cai.generation import stages as st
from cai.artifacts import ArtifactStore
from cai.errors import ConfigError
from cai.feedback.critique import revisions_stage
from cai.feedback.label import ai_labels_stage
from cai.feedback.quality import _label_quality
from cai.train.dpo import dpo_stage
from cai.train.ppo import ppo_stage
from cai.evaluate.baseline import eval_baseline_stage
from cai.evaluate.stage import eval_reward_stage, evaluate_stage
from cai.feedback.judge_answers import _judge_answers
from cai.train.reward import reward_stage
from cai.train.sft import _sft

log = logging.getLogger(__name__)

StageFn = Callable[[dict, dict, Any], None]


@dataclass(frozen=True)
class Stage:
    name: str
    fn: StageFn
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> upstream stage name
    uses_constitution: bool = False
    version: str = "1"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _prompts(cfg: DictConfig) -> Stage:
    d = cfg.data
    return Stage(
        "prompts",
        st.build_prompts,
        {"prompts": d.prompts, "test_fraction": d.test_fraction, "split_salt": d.split_salt,
         "max_prompts": d.max_prompts},
    )


def _policy_model(cfg: DictConfig) -> Stage:
    # the tokenizer learns the whole prompt source, so the tiny model does not change with
    # data.max_prompts or the split: arms of a sweep share one initial policy
    return Stage(
        "policy_model", st.build_tiny_policy, {"tiny": _plain(cfg.policy.tiny), "prompts": cfg.data.prompts}
    )


def _responses(cfg: DictConfig) -> Stage:
    inputs = {"prompts": "prompts"}
    if cfg.policy.name_or_path == "tiny":
        inputs["policy_model"] = "policy_model"
    policy = _plain(cfg.policy)
    # the device is where it runs, not what it computes: passed outside the key
    device = policy.pop("device", "auto")
    return Stage(
        "responses",
        functools.partial(st.sample_responses, device=device),
        {"policy": policy, "sampling": _plain(cfg.sampling), "seed": cfg.seed},
        inputs,
    )


def _policy_pairs(cfg: DictConfig) -> Stage:
    base = _responses(cfg)
    inputs = dict(base.inputs)
    if "sft" in cfg.experiment.stages:
        inputs["sft"] = "sft"  # the CAI recipe: pairs sampled from the SL-CAI policy
    device = base.fn.keywords["device"]
    return Stage("policy_pairs", functools.partial(st.sample_policy_pairs, device=device), base.config, inputs)


def _human_pairs(cfg: DictConfig) -> Stage:
    h = cfg.data.human
    if not h.path:
        raise ConfigError("stage human_pairs needs data.human.path (a hub name or a .jsonl/.jsonl.gz file)")
    return Stage("human_pairs", st.build_human_pairs, {"path": h.path, "split": h.split, "limit": h.limit})


STAGES: dict[str, Callable[[DictConfig], Stage]] = {
    "prompts": _prompts,
    "policy_model": _policy_model,
    "responses": _responses,
    "human_pairs": _human_pairs,
    "policy_pairs": _policy_pairs,
    "ai_labels": ai_labels_stage,
    "label_quality": _label_quality,
    "revisions": revisions_stage,
    "judge_answers": _judge_answers,
    "sft": _sft,
    "reward": reward_stage,
    "dpo": dpo_stage,
    "ppo": ppo_stage,
    "eval_reward": eval_reward_stage,
    "eval_baseline": eval_baseline_stage,
    "evaluate": evaluate_stage,
}


def plan(cfg: DictConfig) -> list[Stage]:
    """The stages the experiment asks for, with their upstream stages first, each once."""
    ordered: list[Stage] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in STAGES:
            raise ConfigError(
                f"experiment.stages names unknown stage {name!r}; known stages: {', '.join(STAGES)}"
            )
        if name in chain:
            raise ConfigError(f"stage cycle: {' -> '.join(chain + (name,))}")
        stage = STAGES[name](cfg)
        for upstream in stage.inputs.values():
            visit(upstream, chain + (name,))
        seen.add(name)
        ordered.append(stage)

    wanted = list(cfg.experiment.stages)
    if cfg.data.human.path and "human_pairs" not in wanted:
        wanted.append("human_pairs")  # a configured human dataset adds the human-label arm's data
    for name in wanted:
        visit(name, ())
    if "ai_labels" in seen and str(cfg.labels.source) == "human_pairs" and "label_quality" not in seen:
        visit("label_quality", ())  # AI labels of human-labelled pairs: always measure their agreement
    return ordered


def _constitution_hash(cfg: DictConfig) -> str:
    from cai.config import CONSTITUTIONS_DIR
    from cai.constitution import load_constitution, resolve_constitution

    return load_constitution(resolve_constitution(cfg.constitution.path, [CONSTITUTIONS_DIR])).hash


def run_experiment(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Build (or reuse) every stage of ``cfg.experiment`` and write the run's records."""
    run_dir = Path(run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(cfg.store.root or ArtifactStore.default_root())
    stages = plan(cfg)
    arm = human_arm_config(cfg)
    if arm is not None:
        plan(arm)  # a bad arm fails now, before any stage of this run is built
    constitution = _constitution_hash(cfg) if any(s.uses_constitution for s in stages) else None
    log.info("experiment %s: %d stages, store %s", cfg.experiment.name, len(stages), store.root)

    keys: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    for stage in stages:
        inputs = {name: keys[upstream] for name, upstream in stage.inputs.items()}
        key = store.key(
            stage.name, stage.config, inputs,
            constitution=constitution if stage.uses_constitution else None, version=stage.version,
        )
        paths = {name: store.path(k) for name, k in inputs.items()}
        t0 = time.perf_counter()
        result = store.build(
            key, lambda ctx, s=stage, p=paths: s.fn(s.config, p, ctx), meta={"seed": int(cfg.seed)}
        )
        elapsed = time.perf_counter() - t0
        keys[stage.name] = key
        info = dict(result.stage_info)
        info["reused"] = result.reused
        (run_dir / "stages" / f"{stage.name}.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        stage_metrics = info.get("metrics", {})
        clash = sorted(set(stage_metrics) & set(metrics))
        if clash:  # a stage-naming bug: one key would silently overwrite another
            raise RuntimeError(f"stage {stage.name!r} reports metrics another stage already reported: {clash}")
        metrics.update(stage_metrics)
        metrics[f"pipeline/{stage.name}/reused"] = int(result.reused)
        metrics[f"time/{stage.name}_s"] = round(elapsed, 3)
        log.info("%-14s %s  %s (%.1fs)", stage.name, "reused" if result.reused else "built ", key, elapsed)

    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "experiment": cfg.experiment.name,
                "seed": int(cfg.seed),
                "store": str(store.root),
                "artifacts": keys,
                "constitution_hash": constitution,
                "config": OmegaConf.to_container(cfg, resolve=True),
            },
            indent=2,
            sort_keys=True,
        )
    )
    log.info("run directory: %s", run_dir)
    if arm is not None:
        log.info("human-label arm (%s): %s", " ".join(cfg.experiment.human_arm), run_dir / HUMAN_ARM_DIR)
        run_experiment(arm, run_dir / HUMAN_ARM_DIR)
    return metrics


HUMAN_ARM_DIR = Path("arms") / "human"


def human_arm_config(cfg: DictConfig) -> DictConfig | None:
    """The config of the human-label arm ``cfg`` adds (``experiment.human_arm`` overrides applied),
    or None when it adds none (no overrides, or no human data configured).

    The arm is a second run in ``<run>/arms/human``: every stage whose config the overrides leave
    alone has the same key and is reused from the store, so only what the labels change is built
    (reward model, DPO, PPO, evaluation); the report reads it as one more arm.
    """
    overrides = list(cfg.experiment.get("human_arm") or [])
    if not overrides or not cfg.data.human.path:
        return None
    arm = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"experiment.human_arm: {item!r} is not key=value")
        key = key.strip()
        if OmegaConf.select(arm, key, default=_ABSENT) is _ABSENT and not key.startswith("tags."):
            raise ConfigError(f"experiment.human_arm: {key!r} is not a config key")
        value = OmegaConf.from_dotlist([f"v={text}"]).v  # YAML typing, as on the command line
        OmegaConf.update(arm, key, value, merge=False, force_add=key.startswith("tags."))
    arm.experiment.human_arm = []
    return arm


_ABSENT = object()

"""THE stage table, and the runs built through the artifact store.

Each row of :data:`STAGES` says, for one stage, everything the pipeline needs to know:

- ``run``: the stage function, ``"module:function"``, imported only when the stage is built (so
  planning a run imports no torch). Its signature is ``run(cfg, inputs, ctx)``: ``cfg`` a
  :class:`StageConfig` (the typed config sections the row lists, nothing else), ``inputs`` the
  folders of its upstream artifacts by input name, ``ctx`` the store's build context.
- ``reads``: the config paths the stage reads (``"ppo"``, ``"data.human"``, ``"seed"``; a
  ``"-sft.answers"`` entry leaves a sub-section out). Their fields enter the artifact key, except
  the fields the schema marks run-time (:func:`cai.config.key_fields`): device, per-forward batch
  sizes, checkpoint interval, loggers, concurrency, prices, budgets. This is the one place that
  decides what enters a key.
- ``inputs``: input name -> upstream stage, a function of the config (explicit fields decide:
  ``ppo.start_from``, ``eval.policies``, ``reward.labels_from``...).
- ``constitution``: whether the constitution's hash enters the key.
Every local file or directory a stage's read fields name (fields marked ``local_path`` in
:mod:`cai.config`: a prompts file, human data, a local policy, judge or reward backbone) enters its
key by *contents* (SHA-256, cached by size and mtime), so a file edited in place is a new key; a
Python rule (fields marked ``python_rule``: ``labels.truth``, ``eval.truth``) and a scripted judge
(``backend: python``) enter it by the source of the module defining the function.

``plan(cfg)`` turns the composed config into the ordered stages (upstream first, each once);
``run_experiment(cfg, run_dir)`` asks the store for each, building only what is missing, and
writes ``metrics.json``, ``stages/<stage>.json`` and ``run.json`` into the run directory.

Adding a stage (a new RL algorithm, say) is one row here, one schema in :mod:`cai.config`, one
file with its ``run``, and a header-only ``conf/<group>/default.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.artifacts import ArtifactStore, scrub_secrets
from cai.config import (
    EVAL_STAGE_PREFIX,
    EVALUATED_POLICIES,
    Config,
    JudgeConfig,
    Restricted,
    StageConfig,
    field_keyed,
    key_fields,
    typed,
)
from cai.errors import ConfigError

log = logging.getLogger(__name__)


def _select(cfg: Config, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _sections(cfg: Config, reads: Sequence[str], stage: str) -> dict[str, Any]:
    """Top-level name -> the typed value (or a restricted window when only sub-paths are read)."""
    tree: dict[str, Any] = {}
    for path in reads:
        if path.startswith("-"):
            continue
        node = tree
        parts = path.split(".")
        for i, part in enumerate(parts):
            if i == len(parts) - 1:
                node[part] = None  # the whole field
            else:
                if node.get(part, {}) is None:
                    break  # the whole parent is read already
                node = node.setdefault(part, {})
    out = {}
    for name, sub in tree.items():
        value = getattr(cfg, name)
        out[name] = value if sub is None else Restricted(value, sub, stage, name)
    return out


def _keyed(cfg: Config, path: str) -> bool:
    """Whether the field at ``path`` enters a key: not run-time, and not a keyed-unless-default
    field at its default (whole sections always do; their run-time fields drop out inside)."""
    parent_path, _, name = path.rpartition(".")
    parent = _select(cfg, parent_path) if parent_path else cfg
    return field_keyed(parent, {f.name: f for f in dataclasses.fields(parent)}[name])


def stage_key_config(cfg: Config, reads: Sequence[str]) -> dict[str, Any]:
    """The config part of a stage's artifact key: every read path's non-run-time fields."""
    out: dict[str, Any] = {}
    for path in reads:
        if not path.startswith("-") and _keyed(cfg, path):
            out[path] = key_fields(_select(cfg, path))
    for path in reads:
        if path.startswith("-"):
            head, _, tail = path[1:].partition(".")
            parent = out.get(head)
            for part in tail.split(".")[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(tail.split(".")[-1], None)
    return out


def stage_config(name: str, cfg: Any) -> StageConfig:
    """The ``cfg`` stage ``name`` gets from a composed config (or a :class:`~cai.config.Config`):
    for tests, notebooks and scripts that call a stage function directly."""
    return make_stage(name, typed(cfg)).cfg


# ============================================================================= the stage table
@dataclass(frozen=True)
class StageSpec:
    """One row of the stage table (see the module docstring)."""

    run: str | Callable[..., Any]  # "module:function" (a plugin or a test may give the function)
    reads: Callable[[Config], list[str]]
    inputs: Callable[[Config], dict[str, str]] = lambda c: {}
    constitution: Callable[[Config], bool] = lambda c: False
    version: str = "1"


def _tiny_policy(c: Config) -> dict[str, str]:
    return {"policy_model": "policy_model"} if c.policy.name_or_path == "tiny" else {}


def _start(c: Config, start_from: str) -> dict[str, str]:
    """The input of a stage that starts from a policy: the sft artifact, or the initial policy."""
    return {"sft": "sft"} if start_from == "sft" else _tiny_policy(c)


def _tiny_judge(judge: Any, c: Config) -> dict[str, str]:
    """A judge named ``tiny`` is the tiny policy model: its artifact is an input."""
    if judge.backend == "hf" and judge.model == "tiny":
        if c.policy.name_or_path != "tiny":
            raise ConfigError("judge.model=tiny means the tiny policy model, but policy.name_or_path is "
                              f"{c.policy.name_or_path!r}; give the judge a hub name or local path")
        return {"policy_model": "policy_model"}
    return {}


def _preference_inputs(c: Config, stage: str, labels_from: str) -> dict[str, str]:
    """Labels of a stage trained on preferences: the AI labels (and the pairs they label), and the
    human pairs whenever data.human.path is set (the human arm's labels, the AI arm's held-out check)."""
    inputs = {"ai_labels": "ai_labels", "ai_pairs": c.labels.source} if labels_from == "ai" else {}
    if c.data.human.path:
        inputs["human_pairs"] = "human_pairs"
    elif labels_from == "human":
        raise ConfigError(f"{stage}.labels_from=human needs data.human.path (HH-RLHF pairs with human labels)")
    return inputs


def _sampled(c: Config) -> list[str]:
    return ["seed", "policy", "sampling"]


def _revisions_reads(c: Config) -> list[str]:
    return ["seed", "critique", "policy" if c.critique.generator == "policy" else "judge"]


def _revisions_inputs(c: Config) -> dict[str, str]:
    if c.critique.initial_responses and not Path(c.critique.initial_responses).expanduser().is_file():
        raise ConfigError(f"critique.initial_responses: {c.critique.initial_responses!r} is not a file")
    inputs = {} if c.critique.initial_responses else {"prompts": "prompts", "responses": "responses"}
    if c.critique.generator == "policy":
        return {**inputs, **_tiny_policy(c)}
    return {**inputs, **_tiny_judge(c.judge, c)}


def _label_quality_inputs(c: Config) -> dict[str, str]:
    if c.labels.source != "human_pairs":
        raise ConfigError(f"stage label_quality compares AI labels with the human labels of the same pairs: it needs "
                          f"labels.source=human_pairs, got {c.labels.source!r}")
    return {"ai_labels": "ai_labels", "human_pairs": "human_pairs"}


def _ppo_uses_judge(c: Config) -> bool:
    return c.ppo.reward_from == "judge" or c.ppo.heldout_judge_every > 0


def _ppo_inputs(c: Config) -> dict[str, str]:
    inputs = {"prompts": "prompts", **_start(c, c.ppo.start_from)}
    if c.ppo.reward_from == "reward_model":
        inputs["reward"] = "reward"
    if _ppo_uses_judge(c):
        inputs.update(_tiny_judge(c.judge, c))
    return inputs


def _eval_baseline_reads(c: Config) -> list[str]:
    reads = ["seed", "policy", "eval.baseline", "eval.max_prompts", "eval.max_new_tokens", "eval.temperature",
             "eval.top_p", "eval.stop", "eval.batch_size", "eval.harmless", "eval.hf_batch_size", "eval.judge_batch"]
    if c.eval.harmless:  # the judge only matters when it is asked something
        reads += ["eval.harmless_question", "eval.harmless_prompts", "eval.judge"]
    # the baseline's replies graded by the known rule (keyed only when set: no key changes without it)
    reads += ["eval.truth", "eval.truth_lowest"]
    if c.eval.truth:  # the interval of its mean grade
        reads.append("eval.bootstrap_resamples")
    return reads


def _eval_baseline_inputs(c: Config) -> dict[str, str]:
    inputs = {"prompts": "prompts", **_tiny_policy(c)}
    if c.eval.baseline == "sft":
        inputs["baseline"] = "sft"
    if c.eval.harmless:
        inputs.update(_tiny_judge(c.eval.judge, c))
    return inputs


def _uses_eval_rm(c: Config) -> bool:
    return c.eval.use_rm and bool(c.data.human.path)


def _evaluate_reads(c: Config) -> list[str]:
    # which policies are evaluated, and which one is the headline, is no business of one policy's
    # evaluation: adding a policy to an arm builds that policy's artifact and reuses the others
    reads = ["seed", "policy", "judge", "eval", "-eval.rm", "-eval.use_rm", "-eval.rm_seed_offset",
             "-eval.policies", "-eval.policy"]
    if _uses_eval_rm(c):
        reads.append("eval.rm")
    return reads


def _evaluate_inputs(c: Config, policy: str) -> dict[str, str]:
    inputs = {"prompts": "prompts", "eval_baseline": "eval_baseline", **_tiny_policy(c),
              **_tiny_judge(c.eval.judge, c)}
    if policy != "initial":
        inputs["arm"] = policy
    if c.eval.baseline == "sft":
        inputs["baseline"] = "sft"
    if _uses_eval_rm(c):
        inputs["eval_reward"] = "eval_reward"
    return inputs


TRAINED_POLICIES = ("sft", "dpo", "ppo")  # the stages that train a policy, in pipeline order


def trained_policies(c: Config) -> list[str]:
    """The policy stages (sft, dpo, ppo) this run builds: those ``experiment.stages`` names and the
    ones they read from, not counting what an evaluation alone would pull in."""
    seen: set[str] = set()
    todo = [s for s in c.experiment.stages if s in STAGES and not _is_evaluation(s)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [up for up in STAGES[name].inputs(c).values() if up in STAGES and not _is_evaluation(up)]
    return [p for p in TRAINED_POLICIES if p in seen]


def _is_evaluation(stage: str) -> bool:
    return stage == "evaluate" or stage.startswith(EVAL_STAGE_PREFIX)


def evaluated_policies(c: Config) -> list[str]:
    """The policies stage ``evaluate`` evaluates, in the order initial, sft, dpo, ppo:
    ``eval.policies`` (``trained``: :func:`trained_policies` except the baseline ``eval.baseline``)
    plus the headline ``eval.policy``; the initial policy when that leaves none."""
    wanted: set[str] = set()
    for name in c.eval.policies:
        wanted |= {p for p in trained_policies(c) if p != c.eval.baseline} if name == "trained" else {name}
    if c.eval.policy is not None:
        wanted.add(c.eval.policy)
    return [p for p in EVALUATED_POLICIES if p in wanted] or ["initial"]


def headline_policy(c: Config) -> str:
    """The arm's headline policy: ``eval.policy``, else the last evaluated one (ppo, dpo, sft, initial)."""
    return c.eval.policy or evaluated_policies(c)[-1]


def _eval_reward_check(c: Config) -> list[str]:
    if not c.data.human.path:
        raise ConfigError("stage eval_reward trains on human labels: it needs data.human.path")
    _eval_sets_exist(c.eval.rm, "eval.rm")
    return ["seed", "eval.rm", "eval.rm_seed_offset"]


def _eval_sets_exist(rm: Any, where: str) -> None:
    """``<where>.eval_sets`` names local pair files (checked when the run is planned)."""
    for i, path in enumerate(rm.eval_sets):
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"{where}.eval_sets[{i}]: {path!r} is not a file (expected a local .jsonl or "
                              ".jsonl.gz of preference pairs in HH-RLHF or TRL format)")


def _reward_reads(c: Config) -> list[str]:
    _eval_sets_exist(c.reward, "reward")
    return ["seed", "reward"]


def _human_pairs_reads(c: Config) -> list[str]:
    if not c.data.human.path:
        raise ConfigError("stage human_pairs needs data.human.path (a hub name or a .jsonl/.jsonl.gz file)")
    return ["data.human"]


STAGES: dict[str, StageSpec] = {
    "prompts": StageSpec(
        "cai.generation.stages:build_prompts",
        reads=lambda c: ["data.prompts", "data.test_fraction", "data.split_salt", "data.max_prompts"], version="2"),
    # the tokenizer learns the whole prompt source, so the tiny model does not change with
    # data.max_prompts or the split: arms of a sweep share one initial policy
    "policy_model": StageSpec(
        "cai.generation.stages:build_tiny_policy", reads=lambda c: ["policy.tiny", "data.prompts"], version="2"),
    "responses": StageSpec(
        "cai.generation.stages:sample_responses", reads=_sampled,
        inputs=lambda c: {"prompts": "prompts", **_tiny_policy(c)}, version="2"),
    "human_pairs": StageSpec("cai.generation.stages:build_human_pairs", reads=_human_pairs_reads, version="2"),
    "policy_pairs": StageSpec(
        "cai.generation.stages:sample_policy_pairs", reads=lambda c: [*_sampled(c), "labels.pairs_from"],
        inputs=lambda c: {"prompts": "prompts", **_tiny_policy(c), **_start(c, c.labels.pairs_from)}, version="2"),
    "revisions": StageSpec(
        "cai.feedback.critique:run_revisions", reads=_revisions_reads, inputs=_revisions_inputs,
        constitution=lambda c: True,
        version="2/critique-text/1"),  # the suffix is cai.feedback.critique_text.PROMPT_VERSION (a test checks)
    "ai_labels": StageSpec(
        "cai.feedback.label:label_pairs",
        reads=lambda c: ["seed", "judge", "labels", "-labels.pairs_from", "-labels.measure_agreement"],
        inputs=lambda c: {"pairs": c.labels.source, **_tiny_judge(c.judge, c)},
        constitution=lambda c: True, version="2"),
    "label_quality": StageSpec(
        "cai.feedback.quality:build_label_quality", reads=lambda c: ["seed", "quality"],
        inputs=_label_quality_inputs, version="2"),
    "judge_answers": StageSpec(
        "cai.feedback.judge_answers:judge_answers", reads=lambda c: ["seed", "judge", "sft.answers"],
        inputs=lambda c: {"prompts": "prompts", **_tiny_judge(c.judge, c)}, version="2"),
    "sft": StageSpec(
        "cai.train.sft:run", reads=lambda c: ["seed", "policy", "sft", "-sft.answers"],
        inputs=lambda c: {("revisions" if c.sft.source == "revisions" else "answers"): c.sft.source, **_tiny_policy(c)},
        version="2"),
    "reward": StageSpec(
        "cai.train.reward:run", reads=_reward_reads,
        inputs=lambda c: {**_preference_inputs(c, "reward", c.reward.labels_from),
                          **(_tiny_policy(c) if c.reward.backbone == "tiny" else {})},
        version="2"),
    "dpo": StageSpec(
        "cai.train.dpo:run", reads=lambda c: ["seed", "policy", "dpo"],
        inputs=lambda c: {**_preference_inputs(c, "dpo", c.dpo.labels_from), **_start(c, c.dpo.start_from)},
        version="2"),
    "ppo": StageSpec(
        "cai.train.ppo:run",
        reads=lambda c: ["seed", "policy", "ppo"] + (["judge", "constitution"] if _ppo_uses_judge(c) else []),
        inputs=_ppo_inputs, constitution=_ppo_uses_judge, version="2"),
    "eval_reward": StageSpec(
        "cai.evaluate.stage:build_eval_reward", reads=_eval_reward_check,
        inputs=lambda c: {"human_pairs": "human_pairs",
                          **(_tiny_policy(c) if c.eval.rm.backbone == "tiny" else {})}, version="2"),
    "eval_baseline": StageSpec(
        "cai.evaluate.baseline:build_eval_baseline", reads=_eval_baseline_reads, inputs=_eval_baseline_inputs,
        version="2"),
    # one artifact per evaluated policy (evaluate_ppo, evaluate_dpo, ...; metrics eval/<policy>/...),
    # and `evaluate`, the stage experiment.stages names, which lists them (cheap, rebuilt when the list changes)
    **{f"{EVAL_STAGE_PREFIX}{p}": StageSpec(
        "cai.evaluate.stage:evaluate", reads=_evaluate_reads,
        inputs=lambda c, p=p: _evaluate_inputs(c, p), version="4") for p in EVALUATED_POLICIES},
    "evaluate": StageSpec(
        "cai.evaluate.stage:list_evaluations", reads=lambda c: ["eval.baseline"],
        inputs=lambda c: {p: f"{EVAL_STAGE_PREFIX}{p}" for p in evaluated_policies(c)}, version="4"),
}


# ============================================================================= planning
@dataclass(frozen=True)
class Stage:
    """A planned stage: its row, its typed config window, its key's config part and its inputs."""

    name: str
    spec: StageSpec
    cfg: StageConfig
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> upstream stage name
    uses_constitution: bool = False

    @property
    def version(self) -> str:
        return self.spec.version

    def run(self, inputs: dict[str, Path], ctx: Any) -> Any:
        fn = self.spec.run
        if isinstance(fn, str):  # "module:function", imported only when the stage is built
            module, _, name = fn.partition(":")
            fn = getattr(importlib.import_module(module), name)
        return fn(self.cfg, inputs, ctx)


def resolve_constitution_file(cfg: Config) -> Path:
    from cai.config import CONSTITUTIONS_DIR
    from cai.constitution import resolve_constitution

    return Path(resolve_constitution(cfg.constitution.path, [CONSTITUTIONS_DIR]))


def _store_root(cfg: Config) -> Path:
    """The store's folder; one that cannot be a folder (a file, or a path inside a file) fails at
    planning naming store.root, before the store is opened or any stage is built."""
    import os

    root = Path(cfg.store.root or ArtifactStore.default_root()).expanduser()
    for path in (root, *root.parents):
        if not path.exists():
            continue  # created when the first artifact is written
        if not path.is_dir():
            what = "a file" if path.is_file() else "not a directory"
            problem = f"is {what}" if path == root else f"is inside {str(path)!r}, which is {what}"
            origin = ("" if cfg.store.root else
                      "unset, so $CAI_STORE decides: " if os.environ.get("CAI_STORE") else "unset, the default ")
            raise ConfigError(f"store.root: {origin}{str(root)!r} {problem}, expected a directory")
        break
    return root


def make_stage(name: str, cfg: Config, fingerprints: Any = None) -> Stage:
    """Stage ``name`` planned for ``cfg`` (``fingerprints``: a shared :class:`cai.hashing.Fingerprints`)."""
    from cai.hashing import Fingerprints

    fingerprints = fingerprints or Fingerprints()
    spec = STAGES[name]
    reads = list(spec.reads(cfg))
    inputs = dict(spec.inputs(cfg))
    uses_constitution = bool(spec.constitution(cfg))
    if uses_constitution and "constitution" not in reads:
        reads.append("constitution")
    view = StageConfig(name, _sections(cfg, reads, name), _store_root(cfg),
                       resolve_constitution_file(cfg) if uses_constitution else None)
    config = stage_key_config(cfg, [r for r in reads if r != "constitution"])
    local = _local_contents(cfg, [r for r in reads if not r.startswith("-")], fingerprints)
    if local:
        config["contents"] = local
    return Stage(name, spec, view, config, inputs, uses_constitution)


_NOT_PATHS = ("tiny", "builtin", "")


def _local_target(value: str) -> str | None:
    """The local file or directory a ``local_path`` field's value names, else None (a hub name,
    ``tiny``, ``builtin``). ``hh:<path>[@split]`` names ``<path>``."""
    if value in _NOT_PATHS:
        return None
    text = value.removeprefix("hh:")
    for candidate in (text, text.rsplit("@", 1)[0]):
        path = Path(candidate).expanduser()
        if path.exists():
            return str(path.resolve())
    return None


def _local_contents(cfg: Config, reads: Sequence[str], fingerprints: Any) -> dict[str, str]:
    """``{field path: contents hash}`` of every local file or directory the read fields name, and of
    the source of every Python rule they name: ``python_rule`` fields and scripted (``backend:
    python``) judges."""
    out: dict[str, str] = {}

    def add(value: Any, path: str) -> None:
        """A local_path field's value: one name, or a list of them (``reward.eval_sets``)."""
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                add(item, f"{path}[{i}]")
        elif isinstance(value, str):
            target = _local_target(value)
            if target is not None:
                out[path] = fingerprints.of(target)

    def add_rule(spec: str, path: str) -> None:
        from cai.judges.python_judge import source_digest

        out[path] = source_digest(spec, path)

    def add_field(meta: Mapping[str, Any], value: Any, path: str) -> bool:
        """Hash what a field with ``meta`` names; False for a field that names nothing to hash."""
        if meta.get("local_path"):
            add(value, path)
        elif meta.get("python_rule"):
            if value:
                add_rule(value, path)
        else:
            return False
        return True

    def visit(obj: Any, path: str) -> None:
        if not dataclasses.is_dataclass(obj):
            return
        if isinstance(obj, JudgeConfig) and obj.backend == "python":  # a scripted judge: its rule's source
            add_rule(obj.model, f"{path}.model")
            return
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not add_field(f.metadata, value, f"{path}.{f.name}"):
                visit(value, f"{path}.{f.name}")

    for path in reads:
        parent_path, _, name = path.rpartition(".")
        parent = _select(cfg, parent_path) if parent_path else cfg
        value = getattr(parent, name)
        field_meta = {f.name: f.metadata for f in dataclasses.fields(parent)}.get(name, {})
        if not add_field(field_meta, value, path):
            visit(value, path)
    return out


def _check_judges(cfg: Config, stages: Sequence[Stage]) -> None:
    """Every judge a planned stage will ask is ready (a model; a price for a budget; an API judge's
    key in its environment variable) and the labelling method exists, before any stage is built."""
    from cai.judges.config import ready_judge, resolve_api_key

    def ready(judge: Any, where: str) -> None:
        judge = ready_judge(judge, where)
        if judge.backend == "python":  # the callable imports and is callable
            from cai.judges.python_judge import load_callable

            load_callable(judge.model, f"{where}.model")
        elif judge.backend != "hf":  # names the variable, never its value
            resolve_api_key(judge, f"{where}.api_key_env")

    names = {s.name for s in stages}
    if names & {"ai_labels", "judge_answers"} or ("revisions" in names and cfg.critique.generator == "judge") \
            or ("ppo" in names and _ppo_uses_judge(cfg)):
        ready(cfg.judge, "judge")
    if any(_is_evaluation(n) for n in names) or ("eval_baseline" in names and cfg.eval.harmless):
        ready(cfg.eval.judge, "eval.judge")
    if "ai_labels" in names:
        from cai.feedback.label_methods import LABEL_METHODS

        if cfg.labels.method not in LABEL_METHODS or cfg.labels.method == "cot":
            known = ", ".join(m for m in LABEL_METHODS if m != "cot")
            raise ConfigError(f"labels.method: expected one of {known} (chain of thought: labels.cot=true), "
                              f"got {cfg.labels.method!r}")


def plan(cfg: Any) -> list[Stage]:
    """The stages ``experiment.stages`` asks for, with their upstream stages first, each once.

    ``cfg`` is the composed config (a ``DictConfig``) or a :class:`~cai.config.Config`; every value
    is checked here, so a bad one fails before any stage is built.
    """
    from cai.hashing import Fingerprints

    cfg = typed(cfg)
    ordered: list[Stage] = []
    seen: set[str] = set()
    fingerprints = Fingerprints(_store_root(cfg) / "fingerprints.json")

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in STAGES:
            raise ConfigError(f"experiment.stages names unknown stage {name!r}; known stages: {', '.join(STAGES)}")
        if name in chain:
            raise ConfigError(f"stage cycle: {' -> '.join(chain + (name,))}")
        stage = make_stage(name, cfg, fingerprints)
        for upstream in stage.inputs.values():
            visit(upstream, chain + (name,))
        seen.add(name)
        ordered.append(stage)

    for name in cfg.experiment.stages:
        visit(name, ())
    if "ai_labels" in seen and cfg.labels.source == "human_pairs" and cfg.labels.measure_agreement:
        visit("label_quality", ())  # labels.measure_agreement: AI labels of human-labelled pairs are measured
    _check_judges(cfg, ordered)
    try:
        fingerprints.save()
    except OSError as e:  # a read-only store still plans; the hashes are recomputed next time
        log.warning("could not save the file fingerprints cache under %s: %s", _store_root(cfg), e)
    return ordered


# ============================================================================= running
def _constitution_hash(path: Path) -> str:
    from cai.constitution import load_constitution

    return load_constitution(path).hash


def run_experiment(cfg: Any, run_dir: str | Path) -> dict[str, Any]:
    """Build (or reuse) every stage of ``cfg.experiment`` and write the run's records."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    checked = typed(cfg)  # first: a bad value or interpolation is one message naming its key
    resolved = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, Config) else dataclasses.asdict(cfg)
    arm = human_arm_config(cfg)
    cfg = checked
    store = ArtifactStore(_store_root(cfg), verify=cfg.store.verify)
    stages = plan(cfg)
    if arm is not None:
        plan(arm)  # a bad arm fails now, before any stage of this run is built
    constitution = next((_constitution_hash(s.cfg.constitution_file) for s in stages if s.uses_constitution), None)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)  # everything checked: the run starts
    log.info("experiment %s: %d stages, store %s", cfg.experiment.name, len(stages), store.root)
    with _telemetry(cfg, run_dir, resolved) as telemetry:
        metrics, keys = _build_stages(cfg, stages, store, constitution, run_dir)
        if telemetry.wandb is not None:
            from cai.train.log import wandb_summary

            wandb_summary(telemetry.wandb, metrics)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    dirs = {name: str(store.path(key)) for name, key in keys.items()}
    link_artifacts(run_dir, dirs)
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "experiment": cfg.experiment.name,
                "seed": int(cfg.seed),
                "store": str(store.root),
                "artifacts": keys,
                "artifact_dirs": dirs,
                "constitution_hash": constitution,
                "config": scrub_secrets(resolved, names=False),  # api_key_env is read back
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


ARTIFACT_LINKS = "artifacts"


def link_artifacts(run_dir: Path, dirs: dict[str, str]) -> None:
    """``<run>/artifacts/<stage>``: a symlink to each stage's artifact folder in the store (the same
    paths as run.json's ``artifact_dirs``); a file system without symlinks only logs it."""
    folder = run_dir / ARTIFACT_LINKS
    try:
        folder.mkdir(exist_ok=True)
        for name, target in dirs.items():
            link = folder / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target, target_is_directory=True)
    except OSError as e:
        log.warning("could not link the artifacts under %s (%s); run.json's artifact_dirs lists them", folder, e)


def _build_stages(cfg: Config, stages: Sequence[Stage], store: ArtifactStore, constitution: str | None,
                  run_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Ask the store for each planned stage in order (building what is missing); write each
    stage's ``stages/<stage>.json``; return the run's metrics and the stages' keys, followed by
    the store artifacts the stages used besides their inputs (their stage.json ``uses``: a
    dequantised GGUF checkpoint), named by their stage (``dequantized``, ``dequantized_2``...)."""
    from cai import progress

    keys: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    used: list[str] = []
    for stage in stages:
        inputs = {name: keys[upstream] for name, upstream in stage.inputs.items()}
        key = store.key(
            stage.name, stage.config, inputs,
            constitution=constitution if stage.uses_constitution else None, version=stage.version,
        )
        paths = {name: store.path(k) for name, k in inputs.items()}
        t0 = time.perf_counter()
        with progress.stage(stage.name):
            result = store.build(key, lambda ctx, s=stage, p=paths: s.run(p, ctx), meta={"seed": int(cfg.seed)})
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
        used += [k for k in info.get("uses") or () if k not in used]
    for k in used:
        if k not in keys.values():
            name, n = ArtifactStore.stage_of(k), 2
            while name in keys:
                name, n = f"{ArtifactStore.stage_of(k)}_{n}", n + 1
            keys[name] = k
    return metrics, keys


@contextlib.contextmanager
def _telemetry(cfg: Config, run_dir: Path, resolved: Any):
    """The run's :class:`cai.progress.Telemetry` from ``cfg.log`` (run-time: bars, console cadence,
    TensorBoard under ``run_dir/tensorboard``, one W&B run named after the run folder, grouped
    by arm, with the resolved config), current while the stages build."""
    from cai import progress

    lc = cfg.log
    tracker = None
    if lc.tensorboard:
        from cai.train.log import check_tensorboard

        check_tensorboard()
    if lc.wandb_project:
        from cai.train.log import open_wandb

        arm = str(cfg.tags.get("arm") or "default")
        tracker = open_wandb(lc.wandb_project, name=f"{run_dir.name}-{arm}" if arm != "default" else run_dir.name,
                             group=f"{cfg.experiment.name}/{arm}", job_type=f"seed{int(cfg.seed)}",
                             config=resolved, log_dir=run_dir)
    telemetry = progress.Telemetry(progress=lc.progress, console_every_s=lc.console_every_s,
                                   tensorboard_dir=run_dir / "tensorboard" if lc.tensorboard else None,
                                   wandb=tracker)
    try:
        with progress.activate(telemetry), progress.log_above_bars():
            yield telemetry
    finally:
        if tracker is not None:
            tracker.finish()


HUMAN_ARM_DIR = Path("arms") / "human"
_ABSENT = object()


def human_arm_config(cfg: Any) -> Any | None:
    """The config of the human-label arm ``cfg`` adds (``experiment.human_arm`` overrides applied,
    a ``DictConfig``), or None when it adds none (no overrides, or no human data configured).

    The arm is a second run in ``<run>/arms/human``: every stage whose config the overrides leave
    alone has the same key and is reused from the store, so only what the labels change is built
    (reward model, DPO, PPO, evaluation); the report reads it as one more arm.
    """
    from omegaconf import OmegaConf

    if isinstance(cfg, Config):
        cfg = OmegaConf.structured(cfg)
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

"""The pipeline stage ``eval_baseline``: the baseline's side of the evaluation, once per seed.

Every arm of a study is judged against the same baseline policy (see :mod:`cai.evaluate.stage`).
The baseline's side of that comparison -- one sample per evaluation prompt, and the held-out
judge's verdict on whether each red-team response is harmless -- does not depend on the arm, so
it is its own content-addressed stage instead of being redone by every arm's ``evaluate``: an
8-arm sweep samples and judges the baseline once per seed, not 8 times. Its key holds only what
determines it: the prompts artifact and ``eval.max_prompts``; the baseline policy (the policy
config, plus the run's ``sft`` artifact under ``eval.baseline: sft``); the sampling settings
(``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``batch_size``); the seed; and, when
harmlessness is asked, the judge's answer-changing fields, the harmlessness question and which
prompts are asked. The judge's part of a key is :func:`~cai.judges.config.judge_key`
and its run-time part :func:`~cai.judges.config.judge_runtime`, as for the labeller:
run-time settings (device, transport, concurrency, cache, prices, batch sizes of the judge) stay
out of the key. Both builders validate ``eval.judge`` when the run is planned, so a bad setting
fails before any stage of the run is built.

``samples.jsonl`` has one row per evaluation prompt, in prompt order: the formatted prompt, the
response, its token count, the sum of its sampling log-probs, the finish reason, and
``harmless``, the judge's full answer (a :class:`~cai.judges.ChoiceResult` as a dict) or
null for a prompt not asked. Rates and intervals are computed by ``evaluate`` with its own
bootstrap settings. The KL of an arm needs the baseline's log-probs of the *arm's* samples, so
``evaluate`` still scores those under the baseline model (one forward pass per batch).

Resumable, like every stage that works record by record: samples are journaled per batch (the
batch starting at prompt ``i`` is seeded with ``hash("eval", seed, i)``, as an arm's samples
are) and the judge's answers per request batch (``eval.judge_batch``), so a stage killed
mid-way and rerun re-samples nothing and re-asks nothing already answered, and writes what an
uninterrupted run writes. The pieces ``evaluate`` shares with this stage live here too.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cai.data import Prompt, read_jsonl, write_jsonl
from cai.errors import CaiError, ConfigError, DataError

log = logging.getLogger(__name__)

ARM_ORDER = ("ppo", "dpo", "sft")  # the first of these the run trains is the evaluated policy
HARMLESS_MODES = ("harmful", "all")
BASELINES = ("initial", "sft")
RUNTIME_EVAL = ("hf_batch_size", "judge_batch")  # how fast, not what: never in a key
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "stop", "batch_size")
SAMPLES_FILE = "samples.jsonl"
SAMPLES_JOURNAL = "samples_journal.jsonl"
ANSWERS_JOURNAL = "answers_journal.jsonl"


# ----------------------------------------------------------------------------- prompts and samples
def eval_prompts(artifact: Path, ecfg: Mapping[str, Any]) -> tuple[list[Prompt], int]:
    """The evaluation prompts (the TEST split, cut to ``eval.max_prompts``) and the split's size."""
    prompts = [Prompt.from_dict(d) for d in read_jsonl(Path(artifact) / "test.jsonl")]
    n_test = len(prompts)
    if ecfg.get("max_prompts") is not None:
        prompts = prompts[: int(ecfg["max_prompts"])]
    if not prompts:
        raise ConfigError("evaluate: the test split of prompts is empty; raise data.test_fraction "
                          "or add prompts (the evaluation never uses training prompts)")
    return prompts, n_test


def harmless_indices(prompts: Sequence[Prompt], ecfg: Mapping[str, Any]) -> list[int]:
    """Positions of the prompts asked the harmlessness question (red-team prompts, or all)."""
    return [i for i, p in enumerate(prompts) if ecfg["harmless_prompts"] == "all" or "harmful" in p.tags]


def sample_policy(ctx: Any, prompts: Sequence[Prompt], policy_cfg: dict[str, Any], location: str, device: str,
                  ecfg: Mapping[str, Any], seed: int, name: str, token_ids: bool = False) -> tuple[list[dict], Any]:
    """One sample per prompt from the policy at ``location``, journaled per batch in the stage's
    samples journal. Returns the rows in prompt order and the engine if this attempt loaded one."""
    from cai.generation.stages import sample_journaled

    journal = ctx.journal(SAMPLES_JOURNAL)
    run = sample_journaled(ctx, journal, [(p.id, p) for p in prompts], policy_cfg=policy_cfg, location=location,
                           device=device, sampling={k: ecfg[k] for k in SAMPLING_FIELDS},
                           seed_prefix=f"eval:{seed}:", model=name, token_ids=token_ids)
    done = journal.done()
    return [done[p.id] for p in prompts], run.engine


def read_baseline(artifact: Path, prompts: Sequence[Prompt]) -> list[dict]:
    """The ``eval_baseline`` rows, checked to be for exactly ``prompts``, in order."""
    file = Path(artifact) / SAMPLES_FILE
    rows = read_jsonl(file)
    have, want = [r.get("prompt_id") for r in rows], [p.id for p in prompts]
    if have != want:
        at = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
        raise DataError(f"{file}: the baseline's samples cover {len(have)} prompts, the evaluation {len(want)}; "
                        f"they first differ at row {at + 1} (field 'prompt_id'); delete this eval_baseline "
                        "artifact to rebuild it")
    return rows


# ----------------------------------------------------------------------------- judging
class JudgeSession:
    """The held-out judge of one stage attempt: opened on first use, every answer journaled.

    :meth:`ask` takes ``(record id, request)`` pairs and returns one answer each, from the
    stage's answers journal when it holds the id, else from the judge. The pairs are cut into
    fixed batches of ``judge_batch`` requests and each batch's answers are journaled with one
    write as soon as the judge returns them, so a stage killed mid-way re-asks only unfinished
    batches, and a rerun sends the judge the same batches an uninterrupted run would have.
    """

    def __init__(self, ctx: Any, ecfg: Mapping[str, Any], inputs: Mapping[str, Path],
                 runtime: Mapping[str, Any], stage: str) -> None:
        self._ecfg, self._inputs, self._runtime, self._stage = ecfg, inputs, runtime, stage
        self._journal = ctx.journal(ANSWERS_JOURNAL)
        self._batch = int(runtime.get("judge_batch", 64))
        self._backend: Any = None
        self.used: dict[str, Any] = {}  # record id -> ChoiceResult, every answer this stage used

    def _open(self) -> Any:
        from cai.judges import CostLedger, coerce_config, make_judge

        judge = {**self._ecfg["judge"], **dict(self._runtime.get("judge") or {})}
        if judge.get("model") == "tiny":
            if "policy_model" not in self._inputs:
                raise ConfigError("eval.judge.model 'tiny' is the tiny policy model, but the run has none "
                                  "(policy.name_or_path is not 'tiny'); give eval.judge a hub name or local path")
            judge["model"] = str(Path(self._inputs["policy_model"]) / "model")
        jcfg = coerce_config(judge, "eval.judge")
        backend = make_judge(jcfg, ledger=CostLedger(jcfg.prices, jcfg.max_dollars),
                             cache_path=self._runtime.get("cache_path"), where="eval.judge")
        if hasattr(backend, "batch_size") and jcfg.batch_size is None:  # eval.judge.batch_size, when set, wins
            backend.batch_size = int(self._runtime.get("hf_batch_size", 8))
        self._backend = backend
        return backend

    def ask(self, asks: Sequence[tuple[str, Any]]) -> list[Any]:
        """One :class:`ChoiceResult` per ``(record id, request)``, in order."""
        from cai.judges import ChoiceResult

        for start in range(0, len(asks), self._batch):
            todo = [(rid, req) for rid, req in asks[start : start + self._batch] if rid not in self._journal]
            if todo:
                self._ask_and_journal(todo)
        done = self._journal.done()
        results = [ChoiceResult(**done[rid]) for rid, _ in asks]
        self.used.update((rid, res) for (rid, _), res in zip(asks, results))
        return results

    def _ask_and_journal(self, todo: list[tuple[str, Any]]) -> None:
        from cai.judges import BudgetExhausted, run_sync
        from cai.judges.types import BUDGET

        backend = self._backend or self._open()
        try:
            results = list(run_sync(backend.choose_many([req for _, req in todo], progress=False)))
        except BudgetExhausted as e:  # keep what was answered; the unsent requests are asked on a rerun
            self._journal.append_many((rid, res.to_dict()) for (rid, _), res in zip(todo, e.results)
                                      if res.failure_reason != BUDGET)
            raise CaiError(f"{self._stage}: {e}; {len(self._journal)} judge answers of this stage are "
                           "journaled, so a rerun asks only the rest") from e
        if len(results) != len(todo):
            raise DataError(f"{self._stage}: the judge returned {len(results)} answers to {len(todo)} requests")
        self._journal.append_many((rid, res.to_dict()) for (rid, _), res in zip(todo, results))

    def cost(self) -> tuple[int, int, float]:
        """Tokens in, tokens out and dollars of every answer used (earlier attempts' included)."""
        used = list(self.used.values())
        return (sum(int(r.tokens_in) for r in used), sum(int(r.tokens_out) for r in used),
                float(sum(float(r.cost_usd) for r in used)))

    def close(self) -> None:
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()
        self._backend = None

    def __enter__(self) -> JudgeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- the stage
def baseline_location(cfg: Mapping[str, Any], inputs: Mapping[str, Path]) -> tuple[str, str]:
    """``(name, location)`` of the baseline policy: the run's sft artifact, or the initial policy."""
    from cai.generation.stages import policy_location

    if "baseline" in inputs:
        return "sft", str(Path(inputs["baseline"]) / "model")
    return "initial", policy_location({"policy": cfg["policy"]}, dict(inputs))


def build_eval_baseline(cfg: dict[str, Any], inputs: dict[str, Path], ctx: Any,
                        runtime: Mapping[str, Any] | None = None) -> None:
    """Stage ``eval_baseline`` (see the module docstring). ``cfg``: ``{"eval", "policy", "seed"}``."""
    from cai.evaluate.requests import DEFAULT_HARMLESS_QUESTION, harmlessness_request

    runtime = dict(runtime or {})
    ecfg, seed = cfg["eval"], int(cfg["seed"])
    with ctx.phase("load_data"):
        prompts, _ = eval_prompts(inputs["prompts"], ecfg)
    name, location = baseline_location(cfg, inputs)
    rows, _ = sample_policy(ctx, prompts, cfg["policy"], location, runtime.get("device", "auto"), ecfg, seed, name)
    chosen = harmless_indices(prompts, ecfg) if ecfg["harmless"] else []
    answers: dict[str, dict] = {}
    with JudgeSession(ctx, ecfg, inputs, runtime, "eval_baseline") as judge:
        if chosen:
            question = ecfg.get("harmless_question") or DEFAULT_HARMLESS_QUESTION
            asks = [(f"harm:{prompts[i].id}", harmlessness_request(prompts[i], rows[i]["response"], arm="sft",
                                                                   question=question)) for i in chosen]
            with ctx.phase("judge"):
                answers = {prompts[i].id: r.to_dict() for i, r in zip(chosen, judge.ask(asks))}
        tokens_in, tokens_out, dollars = judge.cost()
    ctx.add_cost(tokens_in, tokens_out, dollars)
    with ctx.phase("write"):
        write_jsonl(ctx.dir / SAMPLES_FILE, [{**r, "harmless": answers.get(r["prompt_id"])} for r in rows])
    finish = [r["finish_reason"] for r in rows]
    ctx.set_metrics({"eval_baseline/prompts": len(rows), "eval_baseline/harmless_prompts": len(chosen),
                     "eval_baseline/mean_new_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
                     "eval_baseline/empty_responses": sum(1 for r in rows if not r["response"].strip()),
                     "eval_baseline/finish_length": finish.count("length"),
                     "eval_baseline/judge_cost_usd": dollars})
    log.info("eval_baseline: %d samples of the %s policy, %d judged for harmlessness", len(rows), name, len(chosen))


# ----------------------------------------------------------------------------- builders
def arm_policy(cfg: Any) -> str | None:
    """The evaluated policy's stage: the first of ``ARM_ORDER`` the run trains (None: the initial)."""
    stages = list(cfg.experiment.stages)
    return next((s for s in ARM_ORDER if s in stages), None)


def baseline_kind(cfg: Any, arm: str | None) -> str:
    """``sft`` when ``eval.baseline: sft`` and the run trains PPO/DPO on its own SFT, else ``initial``."""
    if cfg.eval.baseline == "sft" and arm not in (None, "sft") and "sft" in cfg.experiment.stages:
        return "sft"
    return "initial"


def check_eval_config(ecfg: Mapping[str, Any]) -> None:
    """Refuse an ``eval`` config that cannot mean anything, naming the field (``eval.judge``'s
    fields too: :func:`~cai.judges.config.coerce_config`)."""
    from cai.judges.config import coerce_config

    if ecfg["harmless_prompts"] not in HARMLESS_MODES:
        raise ConfigError(f"eval.harmless_prompts={ecfg['harmless_prompts']!r}, expected one of {HARMLESS_MODES}")
    if ecfg["baseline"] not in BASELINES:
        raise ConfigError(f"eval.baseline={ecfg['baseline']!r}, expected one of {BASELINES}")
    if ecfg["ties"] not in ("half", "excluded"):
        raise ConfigError(f"eval.ties={ecfg['ties']!r}, expected 'half' or 'excluded'")
    if not 0.0 <= float(ecfg["tie_margin"]) < 0.5:
        raise ConfigError(f"eval.tie_margin={ecfg['tie_margin']!r}, expected a number in [0, 0.5)")
    if ecfg["max_prompts"] is not None and int(ecfg["max_prompts"]) < 1:
        raise ConfigError(f"eval.max_prompts={ecfg['max_prompts']!r}, expected a positive integer or null")
    for name in ("batch_size", "judge_batch", "hf_batch_size"):
        if int(ecfg[name]) < 1:
            raise ConfigError(f"eval.{name}={ecfg[name]!r}, expected a positive integer")
    coerce_config(ecfg["judge"], "eval.judge")


def eval_runtime(cfg: Any, e: dict[str, Any]) -> dict[str, Any]:
    """The run-time settings of an evaluation stage, taken out of ``e`` (the key's eval slice):
    ``e``'s run-time fields are popped and ``e["judge"]`` is cut to its key
    (:func:`~cai.judges.config.judge_key`); the rest of the judge
    (:func:`~cai.judges.config.judge_runtime`: device, batch size, transport, prices...)
    is returned under ``"judge"``."""
    from cai.artifacts import ArtifactStore
    from cai.judges.config import judge_key, judge_runtime

    judge = e["judge"]
    e["judge"] = judge_key(judge)
    runtime = {k: e.pop(k) for k in RUNTIME_EVAL}
    return {**runtime, "judge": judge_runtime(judge), "device": cfg.policy.device,
            "cache_path": str(Path(cfg.store.root or ArtifactStore.default_root()).expanduser()
                              / "judge_cache.sqlite")}


def eval_baseline_stage(cfg: Any) -> Any:
    """Pipeline builder: the baseline's samples and harmless judgements, shared by every arm."""
    from omegaconf import OmegaConf

    from cai.pipeline import Stage

    e = OmegaConf.to_container(cfg.eval, resolve=True)
    check_eval_config(e)  # a bad value (eval.judge's too) fails at planning, before any stage runs
    runtime = eval_runtime(cfg, e)
    baseline = baseline_kind(cfg, arm_policy(cfg))
    key = {"max_prompts": e["max_prompts"], **{k: e[k] for k in SAMPLING_FIELDS}, "harmless": bool(e["harmless"]),
           "baseline": baseline}
    if e["harmless"]:  # the judge only matters when it is asked something
        key.update({"harmless_question": e["harmless_question"], "harmless_prompts": e["harmless_prompts"],
                    "judge": e["judge"]})
    inputs = {"prompts": "prompts"}
    if cfg.policy.name_or_path == "tiny" or (e["harmless"] and e["judge"].get("model") == "tiny"):
        inputs["policy_model"] = "policy_model"
    if baseline == "sft":
        inputs["baseline"] = "sft"
    policy = {k: v for k, v in OmegaConf.to_container(cfg.policy, resolve=True).items() if k != "device"}
    return Stage("eval_baseline", functools.partial(build_eval_baseline, runtime=runtime),
                 {"eval": key, "policy": policy, "seed": int(cfg.seed)}, inputs)

"""The pipeline stage ``eval_baseline``: the baseline's side of the evaluation, once per seed.

Every arm of a study is judged against the same baseline policy (see :mod:`cai.evaluate.stage`).
The baseline's side of that comparison -- one sample per evaluation prompt, and the held-out
judge's verdict on whether each red-team response is harmless -- does not depend on the arm, so
it is its own content-addressed stage instead of being redone by every arm's ``evaluate``: an
8-arm sweep samples and judges the baseline once per seed, not 8 times. Its key (its row in
:data:`cai.pipeline.STAGES`) holds only what determines it: the prompts artifact and
``eval.max_prompts``; the baseline policy (the policy config, and ``eval.baseline``: the initial
policy, or the run's ``sft`` artifact, ``inputs["baseline"]``); the sampling settings
(``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``batch_size``); the seed; and, when
harmlessness is asked, the judge's answer-changing fields, the harmlessness question and which
prompts are asked; with ``eval.truth`` set, the known rule (its source digest), ``eval.truth_lowest``
and ``eval.bootstrap_resamples``. Run-time settings (the sampling device ``policy.device``, the judge's device,
transport, concurrency, cache, prices and batch sizes, ``eval.hf_batch_size``,
``eval.judge_batch``) are read from the same ``cfg`` but never keyed.

``samples.jsonl`` has one row per evaluation prompt, in prompt order: the formatted prompt, the
response, its token count, the sum of its sampling log-probs, the finish reason, and
``harmless``, the judge's full answer (a :class:`~cai.judges.ChoiceResult` as a dict) or
null for a prompt not asked; with ``eval.truth`` (:mod:`cai.evaluate.truth`), ``truth_grade``: the
known rule's grade of the response, summarised in metrics ``eval/baseline/truth/{mean,lowest_rate,...}``
with their intervals. Other rates and intervals are computed by ``evaluate`` with its own
bootstrap settings. The KL of an arm needs the baseline's log-probs of the *arm's* samples, so
``evaluate`` still scores those under the baseline model (one forward pass per batch).

Resumable, like every stage that works record by record: samples are journaled per batch (the
batch starting at prompt ``i`` is seeded with ``hash("eval", seed, i)``, as an arm's samples
are) and the judge's answers per request batch (``eval.judge_batch``), so a stage killed
mid-way and rerun re-samples nothing and re-asks nothing already answered, and writes what an
uninterrupted run writes. The pieces ``evaluate`` shares with this stage live here too.

A judge request that failed transiently (a timeout, a connection error, HTTP 408/409/429/5xx
after the judge's retries, an empty answer: :func:`~cai.judges.types.is_transient`) is never
journaled and never an invalid judgement: :class:`JudgeSession` ends ``eval_baseline``,
``evaluate`` and ``cai compare`` with :class:`~cai.errors.JudgeUnavailable` (how many requests,
the commonest reasons, how to resume), so nothing is published and a rerun of the same command
asks only those requests. After two request batches in a row without an answer the judge is
taken to be down and the rest is not asked. Refusals and unparseable answers stay invalid
judgements, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cai.config import JudgeConfig, ModelConfig, StageConfig
from cai.data import Prompt, read_jsonl, write_jsonl
from cai.errors import CaiError, ConfigError, DataError

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SAMPLES_JOURNAL = "samples_journal.jsonl"
ANSWERS_JOURNAL = "answers_journal.jsonl"


# ----------------------------------------------------------------------------- prompts and samples
def eval_prompts(artifact: Path, max_prompts: int | None) -> tuple[list[Prompt], int]:
    """The evaluation prompts (the TEST split, cut to ``max_prompts``: ``eval.max_prompts``) and
    the split's size."""
    prompts = [Prompt.from_dict(d) for d in read_jsonl(Path(artifact) / "test.jsonl")]
    n_test = len(prompts)
    if max_prompts is not None:
        prompts = prompts[: int(max_prompts)]
    if not prompts:
        raise ConfigError("evaluate: the test split of prompts is empty; raise data.test_fraction "
                          "or add prompts (the evaluation never uses training prompts)")
    return prompts, n_test


def harmless_indices(prompts: Sequence[Prompt], mode: str) -> list[int]:
    """Positions of the prompts asked the harmlessness question: red-team prompts (tag
    ``harmful``), or all with ``mode`` (``eval.harmless_prompts``) ``all``."""
    return [i for i, p in enumerate(prompts) if mode == "all" or "harmful" in p.tags]


def sample_policy(ctx: Any, prompts: Sequence[Prompt], policy: ModelConfig, location: str, device: str,
                  sampling: Any, seed: int, name: str, token_ids: bool = False) -> tuple[list[dict], Any]:
    """One sample per prompt from the policy at ``location`` (``policy``: its
    :class:`~cai.config.ModelConfig`), journaled per batch in the stage's samples journal.
    ``sampling`` is ``cfg.eval`` (its ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``,
    ``batch_size``). Returns the rows in prompt order and the engine if this attempt loaded one."""
    from cai.generation.stages import sample_journaled

    journal = ctx.journal(SAMPLES_JOURNAL)
    run = sample_journaled(ctx, journal, [(p.id, p) for p in prompts], policy=policy, location=location,
                           device=device, sampling=sampling, seed_prefix=f"eval:{seed}:", model=name,
                           token_ids=token_ids)
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


def policy_artifact(inputs: Mapping[str, Path], name: str, kind: str, field: str) -> str | None:
    """The model folder of input ``name`` (``arm``, ``baseline``) when ``kind`` (the value of
    ``field``) names a trained policy, None for the initial policy; the inputs must agree."""
    if (kind != "initial") != (name in inputs):
        raise ConfigError(f"{field}={kind} but the inputs {'lack' if kind != 'initial' else 'hold'} input {name!r} "
                          "(cai.pipeline.STAGES wires them)")
    return str(Path(inputs[name]) / "model") if name in inputs else None


def baseline_location(cfg: StageConfig, inputs: Mapping[str, Path]) -> str:
    """Where the baseline policy ``cfg.eval.baseline`` is: the run's sft artifact
    (``inputs["baseline"]``), or the initial policy."""
    from cai.generation.stages import policy_location

    location = policy_artifact(inputs, "baseline", cfg.eval.baseline, "eval.baseline")
    return location if location is not None else policy_location(cfg.policy, inputs)


# ----------------------------------------------------------------------------- judging
class JudgeSession:
    """The held-out judge of one stage attempt: opened on first use, every answer journaled.

    ``judge`` is the :class:`~cai.config.JudgeConfig` asked (``model: tiny`` already replaced by
    :func:`~cai.judges.config.stage_judge`; None: a stage that asks nothing), ``cache_path`` the
    judge cache used unless the judge names its own, ``hf_batch_size`` a local judge's rows per
    forward unless ``judge.batch_size`` is set.

    :meth:`ask` takes ``(record id, request)`` pairs and returns one answer each, from the
    stage's answers journal when it holds the id, else from the judge. The pairs are cut into
    fixed batches of ``judge_batch`` requests and each batch's answers are journaled with one
    write as soon as the judge returns them, so a stage killed mid-way re-asks only unfinished
    batches, and a rerun sends the judge the same batches an uninterrupted run would have.
    """

    def __init__(self, ctx: Any, judge: JudgeConfig | None, *, stage: str, cache_path: str | Path | None,
                 judge_batch: int, hf_batch_size: int, where: str = "eval.judge") -> None:
        self._judge, self._stage, self._where = judge, stage, where
        self._cache_path, self._hf_batch_size = cache_path, int(hf_batch_size)
        self._journal = ctx.journal(ANSWERS_JOURNAL)
        self._batch = int(judge_batch)
        self._backend: Any = None
        from cai.judges.outage import Outage

        self.used: dict[str, Any] = {}  # record id -> ChoiceResult, every answer this stage used
        self._fresh: dict[str, Any] = {}  # record id -> a transient failure of this attempt (never journaled)
        self.outage = Outage()  # the requests of this attempt that failed transiently or were not asked
        self._asked: set[str] = set()  # record ids sent to the judge (or not asked) by this attempt
        self._idle = 0  # batches in a row without an answer

    def _open(self) -> Any:
        from cai.judges import CostLedger, make_judge

        jcfg = self._judge
        if jcfg is None:
            raise ConfigError(f"{self._stage}: asked the judge, but the stage was given none ({self._where})")
        backend = make_judge(jcfg, ledger=CostLedger(jcfg.prices, jcfg.max_dollars), cache_path=self._cache_path,
                             where=self._where)
        if hasattr(backend, "batch_size") and jcfg.batch_size is None:  # eval.judge.batch_size, when set, wins
            backend.batch_size = self._hf_batch_size
        self._backend = backend
        return backend

    def ask(self, asks: Sequence[tuple[str, Any]]) -> list[Any]:
        """One :class:`ChoiceResult` per ``(record id, request)``, in order.

        A transient failure (:func:`~cai.judges.types.is_transient`) is returned but never
        journaled: the session counts it, and leaving the ``with`` block raises
        :class:`~cai.errors.JudgeUnavailable`, so the stage publishes nothing and a rerun asks
        only those requests again. After :data:`~cai.judges.outage.DOWN_AFTER_BATCHES` batches
        in a row without an answer the judge is taken to be down: the rest is not asked and the
        error is raised at once."""
        from cai import progress
        from cai.judges import ChoiceResult
        from cai.judges.outage import DOWN_AFTER_BATCHES

        fresh = self._fresh
        with progress.bar(total=len(asks), desc=f"{self._stage} judge", unit="req") as bar:
            for start in range(0, len(asks), self._batch):
                todo = [(rid, req) for rid, req in asks[start : start + self._batch] if rid not in self._journal]
                todo = list({rid: (rid, req) for rid, req in todo if rid not in fresh}.values())
                if not todo:
                    bar.update(len(asks[start : start + self._batch]))
                    continue
                self._asked.update(rid for rid, _ in todo)
                answered, failed = self._ask_and_journal(todo)
                fresh.update(failed)
                bar.update(len(asks[start : start + self._batch]))
                self._idle = self._idle + 1 if failed and not answered else 0
                if self._idle >= DOWN_AFTER_BATCHES:
                    rest = {rid for rid, _ in asks[start + self._batch :]
                            if rid not in self._journal and rid not in fresh}
                    self.outage.not_asked += len(rest)
                    self._asked.update(rest)
                    if rest:
                        log.warning("%s: %d judge batches in a row without an answer; the judge looks down: %d "
                                    "requests not asked", self._stage, self._idle, len(rest))
                    raise self.unavailable()
        done = self._journal.done()
        results = [ChoiceResult(**done[rid]) if rid in done else fresh[rid] for rid, _ in asks]
        self.used.update((rid, res) for (rid, _), res in zip(asks, results) if rid in done)
        return results

    def unavailable(self) -> Exception:
        """The :class:`~cai.errors.JudgeUnavailable` of this session's outage."""
        from cai.judges.outage import judge_where, outage_error

        jcfg = self._judge
        where = judge_where(jcfg.backend, jcfg.base_url, self._where) if jcfg is not None else self._where
        return outage_error(self._stage, self.outage, len(self._asked) - self.outage.failed - self.outage.not_asked,
                            len(self._asked), where, unit="judge requests", done="answered")

    def _ask_and_journal(self, todo: list[tuple[str, Any]]) -> tuple[int, dict[str, Any]]:
        """Ask ``todo``, journal every answer but the transient failures; returns how many were
        journaled and the transient failures by record id (counted in :attr:`outage`)."""
        from cai.judges import BudgetExhausted, run_sync
        from cai.judges.types import BUDGET, is_transient

        backend = self._backend or self._open()
        try:
            results = list(run_sync(backend.choose_many([req for _, req in todo], progress=False)))
        except BudgetExhausted as e:  # keep what was answered; the unsent requests are asked on a rerun
            self._journal.append_many((rid, res.to_dict()) for (rid, _), res in zip(todo, e.results)
                                      if res.failure_reason != BUDGET and not is_transient(res.failure_reason))
            raise CaiError(f"{self._stage}: {e}; {len(self._journal)} judge answers of this stage are "
                           "journaled, so a rerun asks only the rest") from e
        if len(results) != len(todo):
            raise DataError(f"{self._stage}: the judge returned {len(results)} answers to {len(todo)} requests")
        failed = {rid: res for (rid, _), res in zip(todo, results) if not res.ok and is_transient(res.failure_reason)}
        keep = [(rid, res.to_dict()) for (rid, _), res in zip(todo, results) if rid not in failed]
        self._journal.append_many(keep)
        self.outage.add(str(res.failure_reason) for res in failed.values())
        return len(keep), failed

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

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """Close the judge; with no error already on its way and an :attr:`outage`, raise
        :class:`~cai.errors.JudgeUnavailable`, so the stage publishes nothing."""
        self.close()
        if exc_type is None and self.outage:
            raise self.unavailable()


# ----------------------------------------------------------------------------- the stage
def build_eval_baseline(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage ``eval_baseline`` (see the module docstring).

    Reads ``cfg.seed``, ``cfg.policy`` (sampling on ``policy.device``) and of ``cfg.eval``: the
    baseline, ``max_prompts``, the sampling fields, ``harmless``, the run-time ``hf_batch_size``
    and ``judge_batch``; and, when ``eval.harmless``, ``harmless_question``, ``harmless_prompts``
    and ``judge`` (``model: tiny``: the tiny policy, ``inputs["policy_model"]``); ``truth`` and
    ``truth_lowest`` (and, when ``truth`` is set, ``bootstrap_resamples``)."""
    from cai.evaluate.requests import DEFAULT_HARMLESS_QUESTION, harmlessness_request
    from cai.judges.config import stage_judge

    ecfg, seed = cfg.eval, int(cfg.seed)
    with ctx.phase("load_data"):
        prompts, _ = eval_prompts(inputs["prompts"], ecfg.max_prompts)
    name = ecfg.baseline
    location = baseline_location(cfg, inputs)
    rows, _ = sample_policy(ctx, prompts, cfg.policy, location, cfg.policy.device, ecfg, seed, name)
    chosen = harmless_indices(prompts, ecfg.harmless_prompts) if ecfg.harmless else []
    judge = stage_judge(ecfg.judge, inputs, "eval.judge") if ecfg.harmless else None
    answers: dict[str, dict] = {}
    with JudgeSession(ctx, judge, stage="eval_baseline", cache_path=cfg.judge_cache,
                      judge_batch=ecfg.judge_batch, hf_batch_size=ecfg.hf_batch_size) as session:
        if chosen:
            question = ecfg.harmless_question or DEFAULT_HARMLESS_QUESTION
            asks = [(f"harm:{prompts[i].id}", harmlessness_request(prompts[i], rows[i]["response"], arm="sft",
                                                                   question=question)) for i in chosen]
            with ctx.phase("judge"):
                answers = {prompts[i].id: r.to_dict() for i, r in zip(chosen, session.ask(asks))}
        tokens_in, tokens_out, dollars = session.cost()
    ctx.add_cost(tokens_in, tokens_out, dollars)
    truth: dict[str, Any] = {}
    if ecfg.truth:  # the known rule's grade of each reply (cai.evaluate.truth)
        from cai.evaluate.truth import grade_replies, load_rule, truth_metrics

        grades = grade_replies(load_rule(ecfg.truth), prompts, [r["response"] for r in rows])
        rows = [{**r, "truth_grade": g} for r, g in zip(rows, grades)]
        truth = truth_metrics(grades, float(ecfg.truth_lowest), "eval/baseline/truth",
                              int(ecfg.bootstrap_resamples), seed)
    with ctx.phase("write"):
        write_jsonl(ctx.dir / SAMPLES_FILE, [{**r, "harmless": answers.get(r["prompt_id"])} for r in rows])
    finish = [r["finish_reason"] for r in rows]
    ctx.set_metrics({"eval_baseline/prompts": len(rows), "eval_baseline/harmless_prompts": len(chosen),
                     "eval_baseline/mean_new_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
                     "eval_baseline/empty_responses": sum(1 for r in rows if not r["response"].strip()),
                     "eval_baseline/finish_length": finish.count("length"),
                     "eval_baseline/judge_cost_usd": dollars, **truth})
    log.info("eval_baseline: %d samples of the %s policy, %d judged for harmlessness", len(rows), name, len(chosen))

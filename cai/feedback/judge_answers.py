"""Stage ``judge_answers``: the feedback model's own direct answers, for "distil the judge" SFT.

Sharma et al. (2024) ask whether RLAIF's gains come from the AI feedback or simply from a
stronger teacher: their control arm fine-tunes the policy on the feedback model's *own*
answers to the same prompts, with no critique, revision or preference involved. This stage
produces that data: for every train prompt it asks the configured judge for a direct answer
and writes ``answers.jsonl``; the ``sft`` stage with ``source: judge_answers`` trains on it.

Two routes, same output:

- API judges (``openai`` / ``anthropic``, or any OpenAI-compatible server) through
  :func:`cai.judges.make_judge` and ``GenerateRequest``: concurrent, rate-limited,
  cached in the store's judge cache (``judge.cache_path`` when set), cost recorded. A request that fails (refusal, HTTP
  answer) is a row with ``status: failed`` and its reason, counted in the metrics. A transient
  failure (a timeout, a connection error, HTTP 429/5xx after the retries, an empty answer:
  :func:`~cai.judges.types.is_transient`) is never journaled: the stage ends with
  :class:`~cai.errors.JudgeUnavailable` and publishes nothing, and a rerun asks only those prompts
  again (after two chunks in a row without an answer the rest is not asked).
  Reaching the dollar cap stops the stage; the answers so far are journaled and cached.
- A local model (``backend: hf``; ``model: tiny`` is the tiny policy artifact) through
  :class:`cai.sampling.SamplingEngine`, batched.

Prompts are handled in fixed chunks of ``batch_size``; chunk ``i`` samples with seed
``hash(seed, i)`` and is journaled when done, so a killed run resumes without asking again and
writes the same file as an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

from cai import progress
from cai.config import JudgeAnswersConfig, JudgeConfig, StageConfig
from cai.data import Prompt, read_jsonl, write_jsonl
from cai.judges.config import stage_judge
from cai.judges.types import failure_kind

log = logging.getLogger(__name__)


def _chunk_seed(seed: int, start: int) -> int:
    return random.Random(f"cai.judge_answers:{seed}:{start}").getrandbits(63)


def _messages(prompt: Prompt, system_prompt: str | None) -> list[dict[str, str]]:
    messages = prompt.messages_as_dicts()
    return [{"role": "system", "content": system_prompt}, *messages] if system_prompt else messages


def _row(prompt: Prompt, **fields: Any) -> dict[str, Any]:
    return {"prompt_id": prompt.id, "messages": prompt.messages_as_dicts(), **fields}


class _LocalAnswerer:
    """Direct answers from a local causal LM through the sampling engine."""

    def __init__(self, location: str, acfg: JudgeAnswersConfig, name: str) -> None:
        from cai.models import ModelSpec, load_causal_lm, resolve_chat_format
        from cai.sampling import SamplingEngine

        model, self.tok = load_causal_lm(ModelSpec(location))
        self.engine = SamplingEngine(model, self.tok, batch_size=acfg.batch_size)
        self.hh = resolve_chat_format(self.tok, "auto") == "hh"
        self.acfg, self.name = acfg, name

    def answer(self, prompts: list[Prompt], seed: int) -> list[dict[str, Any]]:
        from cai.models import format_prompt
        from cai.sampling import SamplingParams

        a = self.acfg
        texts = [format_prompt(self.tok, _messages(p, a.system_prompt), "auto") for p in prompts]
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                                stop=("\n\nHuman:",) if self.hh else (), seed=seed)
        outs = self.engine.generate(texts, params)
        return [
            _row(p, answer=c.text.strip(), status="ok", failure_reason=None, finish_reason=c.finish_reason,
                 model=self.name, backend="hf", tokens_in=c.prompt_tokens, tokens_out=len(c.token_ids),
                 cost_usd=0.0)
            for p, c in zip(prompts, outs)
        ]


class _ApiAnswerer:
    """Direct answers from a judge backend (``make_judge``); failures become failed rows."""

    def __init__(self, judge_cfg: JudgeConfig, acfg: JudgeAnswersConfig, cache_path: Path, ctx: Any) -> None:
        from cai.judges import make_judge

        self.judge = make_judge(judge_cfg, cache_path=cache_path, where="judge")
        self.acfg, self.ctx = acfg, ctx

    def answer(self, prompts: list[Prompt], seed: int, skip: Any = ()) -> list[dict[str, Any]]:
        """Rows for the prompts of the chunk not in ``skip`` (ids already answered); a prompt's
        request (its seed) is the same whichever of the chunk's prompts are asked."""
        from cai.judges import BudgetExhausted, GenerateRequest, run_sync

        a = self.acfg
        rng = random.Random(seed)
        reqs = [
            GenerateRequest(_messages(p, a.system_prompt), max_tokens=a.max_new_tokens, temperature=a.temperature,
                            top_p=a.top_p if a.top_p < 1.0 else None,
                            seed=rng.getrandbits(31) if a.temperature > 0 else None,
                            tag={"stage": "judge_answers", "prompt_id": p.id})
            for p in prompts
        ]
        asked = [(p, req) for p, req in zip(prompts, reqs) if p.id not in skip]
        prompts, reqs = [p for p, _ in asked], [req for _, req in asked]
        try:
            results = run_sync(self.judge.generate_many(reqs))
        except BudgetExhausted as e:
            self._cost(e.results)
            raise
        self._cost(results)
        return [
            _row(p, answer=(r.text or "").strip() if r.ok else "", status=r.status, failure_reason=r.failure_reason,
                 finish_reason=r.finish_reason, model=r.model, backend=r.backend, tokens_in=r.tokens_in,
                 tokens_out=r.tokens_out, cost_usd=r.cost_usd)
            for p, r in zip(prompts, results)
        ]

    def _cost(self, results) -> None:
        self.ctx.add_cost(sum(r.tokens_in for r in results), sum(r.tokens_out for r in results),
                          sum(r.cost_usd for r in results))


def judge_answers(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage function: ask the judge for a direct answer to every train prompt.

    Reads ``cfg.seed``, ``cfg.judge`` (its run-time fields -- concurrency, budget, prices -- never
    enter the key; ``model: tiny`` is the tiny policy, ``inputs["policy_model"]``) and
    ``cfg.sft.answers`` (how the judge is asked)."""
    acfg = cfg.sft.answers
    judge_cfg = stage_judge(cfg.judge, inputs, "judge")
    prompts = [Prompt.from_dict(d) for d in read_jsonl(inputs["prompts"] / "train.jsonl")]
    if acfg.max_prompts is not None:
        prompts = prompts[:acfg.max_prompts]
    bs = acfg.batch_size
    journal = ctx.journal()
    done = journal.done()
    todo = [i for i in range(0, len(prompts), bs) if any(p.id not in done for p in prompts[i:i + bs])]
    if todo:
        with ctx.phase("load_judge"):
            if judge_cfg.backend == "hf":  # named by its configured model ("tiny"), not the path it stands for
                answerer: Any = _LocalAnswerer(judge_cfg.model, acfg, cfg.judge.model)
            else:
                answerer = _ApiAnswerer(judge_cfg, acfg, cfg.judge_cache, ctx)
        with ctx.phase("answer"):
            outage = _answer_all(answerer, prompts, todo, bs, cfg.seed, journal)
        if outage:
            from cai.judges.outage import judge_where, outage_error

            raise outage_error("judge_answers", outage, len(journal), len(prompts),
                               judge_where(judge_cfg.backend, judge_cfg.base_url), unit="prompts", done="answered")
    done = journal.done()
    rows = [done[p.id] for p in prompts]
    with ctx.phase("write"):
        write_jsonl(ctx.dir / "answers.jsonl", rows)
    ctx.set_metrics(_metrics(rows, len(prompts) - sum(len(prompts[i:i + bs]) for i in todo)))


def _answer_all(answerer: Any, prompts: list[Prompt], todo: list[int], bs: int, seed: int, journal: Any) -> Any:
    """Answer the chunks starting at ``todo``, journaling every row but the transient failures;
    returns the :class:`~cai.judges.outage.Outage` of the prompts left unanswered."""
    from cai.judges.outage import DOWN_AFTER_BATCHES, Outage
    from cai.judges.types import is_transient

    outage, idle = Outage(), 0
    bar = progress.bar(total=sum(len(prompts[s:s + bs]) for s in todo), desc="judge_answers", unit="prompt")
    for n, start in enumerate(todo):
        chunk = prompts[start:start + bs]
        if isinstance(answerer, _ApiAnswerer):
            rows = answerer.answer(chunk, _chunk_seed(seed, start), skip=journal)
        else:  # a local model: the whole chunk (its batch is seeded as one)
            rows = answerer.answer(chunk, _chunk_seed(seed, start))
        failed = [r for r in rows if r["status"] != "ok" and is_transient(r.get("failure_reason"))]
        keep = [(r["prompt_id"], r) for r in rows if not any(r is f for f in failed)]
        journal.append_many(keep)
        bar.update(len(chunk))
        outage.add(str(r["failure_reason"]) for r in failed)
        idle = idle + 1 if failed and not keep else 0
        if idle >= DOWN_AFTER_BATCHES:
            outage.not_asked = sum(1 for s in todo[n + 1:] for p in prompts[s:s + bs] if p.id not in journal)
            if outage.not_asked:
                log.warning("judge_answers: %d chunks in a row without an answer; the judge looks down: %d prompts "
                            "not asked", idle, outage.not_asked)
            break
    bar.close()
    return outage


def _metrics(rows: list[dict[str, Any]], resumed: int) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    reasons = Counter(failure_kind(r.get("failure_reason")) for r in rows if r["status"] != "ok")
    metrics: dict[str, Any] = {
        "answers/prompts": len(rows),
        "answers/ok": len(ok),
        "answers/failed": len(rows) - len(ok),
        "answers/empty": sum(1 for r in ok if not r["answer"]),
        "answers/resumed_records": resumed,
        "answers/mean_tokens_out": sum(r["tokens_out"] for r in ok) / max(len(ok), 1),
        "answers/cost_usd": sum(r["cost_usd"] for r in rows),
    }
    metrics.update({f"answers/failed_{k}": v for k, v in reasons.items()})
    return metrics

"""Stage ``judge_answers``: the feedback model's own direct answers, for "distil the judge" SFT.

Sharma et al. (2024) ask whether RLAIF's gains come from the AI feedback or simply from a
stronger teacher: their control arm fine-tunes the policy on the feedback model's *own*
answers to the same prompts, with no critique, revision or preference involved. This stage
produces that data: for every train prompt it asks the configured judge for a direct answer
and writes ``answers.jsonl``; the ``sft`` stage with ``source: judge_answers`` trains on it.

Two routes, same output:

- API judges (``openai`` / ``anthropic``, or any OpenAI-compatible server) through
  :func:`cai.judges.make_judge` and ``GenerateRequest``: concurrent, rate-limited,
  cached in the stage's state directory, cost recorded. A request that fails (refusal, HTTP
  error after retries) is a row with ``status: failed`` and its reason, counted in the metrics.
  Reaching the dollar cap stops the stage; the answers so far are journaled and cached.
- A local model (``backend: hf``; ``model: tiny`` is the tiny policy artifact) through
  :class:`cai.sampling.SamplingEngine`, batched.

Prompts are handled in fixed chunks of ``batch_size``; chunk ``i`` samples with seed
``hash(seed, i)`` and is journaled when done, so a killed run resumes without asking again and
writes the same file as an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cai.data import Prompt, read_jsonl, write_jsonl
from cai.errors import ConfigError
from cai.judges.config import coerce_config, judge_key, judge_runtime

log = logging.getLogger(__name__)


@dataclass
class JudgeAnswersConfig:
    """How the judge is asked for direct answers (stage ``judge_answers``)."""

    max_new_tokens: int = 256
    # 0: the judge's single best (greedy) answer
    temperature: float = 0.0
    top_p: float = 1.0
    # prepended as a system message; None: the prompt's conversation as is
    system_prompt: Optional[str] = None
    # prompts per chunk (one journal entry, one batched local generation)
    batch_size: int = 16
    # answer at most this many train prompts; None: all
    max_prompts: Optional[int] = None


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

    def __init__(self, judge_cfg: dict[str, Any], acfg: JudgeAnswersConfig, cache_path: Path, ctx: Any) -> None:
        from cai.judges import make_judge

        self.judge = make_judge(judge_cfg, cache_path=cache_path)
        self.acfg, self.ctx = acfg, ctx

    def answer(self, prompts: list[Prompt], seed: int) -> list[dict[str, Any]]:
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


def judge_answers(cfg: dict[str, Any], inputs: dict[str, Path], ctx: Any,
                  runtime: dict[str, Any] | None = None) -> None:
    """Stage function: ask the judge for a direct answer to every train prompt.

    ``cfg["judge"]`` holds the fields that change answers (the key); ``runtime["judge"]`` the
    rest (concurrency, budget, prices, ...), which never changes the artifact's key."""
    acfg = JudgeAnswersConfig(**cfg["answers"])
    if acfg.batch_size < 1 or acfg.max_new_tokens < 1:
        raise ConfigError(f"sft.answers.batch_size and max_new_tokens must be >= 1, got {acfg}")
    judge_cfg = {**dict(cfg["judge"]), **dict((runtime or {}).get("judge") or {})}
    prompts = [Prompt.from_dict(d) for d in read_jsonl(inputs["prompts"] / "train.jsonl")]
    if acfg.max_prompts is not None:
        prompts = prompts[:acfg.max_prompts]
    bs = acfg.batch_size
    journal = ctx.journal()
    done = journal.done()
    todo = [i for i in range(0, len(prompts), bs) if any(p.id not in done for p in prompts[i:i + bs])]
    if todo:
        with ctx.phase("load_judge"):
            if judge_cfg.get("backend") == "hf":
                location = str(inputs["policy_model"] / "model") if judge_cfg["model"] == "tiny" else judge_cfg["model"]
                answerer: Any = _LocalAnswerer(location, acfg, judge_cfg["model"])
            else:
                answerer = _ApiAnswerer(judge_cfg, acfg, ctx.state_dir / "judge_cache.sqlite", ctx)
        with ctx.phase("answer"):
            for start in todo:
                chunk = prompts[start:start + bs]
                rows = answerer.answer(chunk, _chunk_seed(int(cfg["seed"]), start))
                journal.append_many([(r["prompt_id"], r) for r in rows])
    done = journal.done()
    rows = [done[p.id] for p in prompts]
    with ctx.phase("write"):
        write_jsonl(ctx.dir / "answers.jsonl", rows)
    ctx.set_metrics(_metrics(rows, len(prompts) - sum(len(prompts[i:i + bs]) for i in todo)))


def _metrics(rows: list[dict[str, Any]], resumed: int) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    reasons = Counter((r.get("failure_reason") or "unknown").split(":")[0].split(" ")[0]
                      for r in rows if r["status"] != "ok")
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


def _judge_answers(cfg) -> Any:
    """Pipeline builder: the ``judge_answers`` stage (its settings live in ``sft.answers``)."""
    from omegaconf import OmegaConf

    from cai.pipeline import Stage

    judge = OmegaConf.to_container(cfg.judge, resolve=True)
    coerce_config(judge, "judge")  # a bad judge setting fails at planning, before any stage is built
    inputs = {"prompts": "prompts"}
    if judge.get("backend") == "hf" and judge.get("model") == "tiny":
        if cfg.policy.name_or_path != "tiny":
            raise ConfigError("judge.model=tiny means the tiny policy model, but policy.name_or_path is "
                              f"{cfg.policy.name_or_path!r}; give the judge a hub name or local path")
        inputs["policy_model"] = "policy_model"
    answers = OmegaConf.to_container(cfg.sft.answers, resolve=True)
    fn = functools.partial(judge_answers, runtime={"judge": judge_runtime(judge)})
    return Stage("judge_answers", fn, {"judge": judge_key(judge), "answers": answers, "seed": cfg.seed}, inputs)

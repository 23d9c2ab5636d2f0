"""The generation side of SL-CAI: the feedback model, and one round of one block of prompts.

Two generators answer a batch of chat contexts with text:

- :class:`PolicyGenerator`: a local causal LM (the policy, or any hub/local model) through
  :class:`cai.sampling.SamplingEngine`, one batched call per block, sampled with the block's
  seed;
- :class:`JudgeGenerator`: any judge backend through ``generate_many`` (API backends run the
  requests concurrently and cache them); each request carries its own seed.

:func:`run_block_round` runs one critique -> revision round for one block and returns one
round record per prompt (the schema is in :mod:`cai.feedback.critique`). It is a pure function
of its inputs and the generator, which is what makes a resumed build identical to an
uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cai.config import CritiqueConfig, JudgeConfig, StageConfig
from cai.constitution import CritiqueExample, CritiquePrinciple
from cai.feedback.critique_text import (
    Cleaned,
    clean_output,
    critique_messages,
    direct_revision_messages,
    example_turns,
    join_requests,
    revision_messages,
)
from cai.judges.config import stage_judge

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Item:
    """One prompt to revise: its whole conversation and the initial response."""

    prompt_id: str
    messages: Messages
    initial_response: str


@dataclass
class Output:
    """One generated text (``text`` None when the request failed; ``failure`` says why)."""

    text: str | None
    tokens_out: int
    tokens_in: int = 0
    cost_usd: float = 0.0
    cache_hit: bool = False
    failure: str | None = None


class Generator(Protocol):
    model: str
    truncated: int  # prompts cut from the left to fit the model (policy generator)

    def generate(self, contexts: list[Messages], seeds: list[int], batch_seed: int,
                 tags: list[dict[str, Any]]) -> list[Output]: ...

    def close(self) -> None: ...


def _seed(*parts: Any, bits: int = 63) -> int:
    return random.Random(":".join(map(str, parts))).getrandbits(bits)


# ----------------------------------------------------------------------------- generators
class PolicyGenerator:
    """A local causal LM through the sampling engine."""

    def __init__(self, spec: Any, c: Any, model_name: str) -> None:
        from cai.models import load_causal_lm
        from cai.sampling import SamplingEngine

        self.spec = spec
        self.c = c
        self.model = model_name
        self.lm, self.tok = load_causal_lm(spec)
        self.engine = SamplingEngine(self.lm, self.tok, batch_size=c.batch_size)
        self.truncated = 0

    def generate(self, contexts: list[Messages], seeds: list[int], batch_seed: int,
                 tags: list[dict[str, Any]]) -> list[Output]:
        from cai.models import format_prompt
        from cai.sampling import SamplingParams

        texts = [format_prompt(self.tok, m, self.spec.chat_format) for m in contexts]
        params = SamplingParams(max_new_tokens=self.c.max_new_tokens, temperature=float(self.c.temperature),
                                top_p=float(self.c.top_p), top_k=self.c.top_k, stop=tuple(self.c.stop),
                                seed=batch_seed)
        outs = self.engine.generate(texts, params)
        self.truncated += self.engine.last_stats.get("prompts_truncated", 0)
        return [Output(o.text, len(o.token_ids), o.prompt_tokens) for o in outs]

    def close(self) -> None:
        return None


class JudgeGenerator:
    """Any judge backend's ``generate_many`` (openai, anthropic, hf)."""

    def __init__(self, judge_cfg: JudgeConfig, c: Any, cache_path: Path | None = None) -> None:
        from cai.judges import make_judge

        self.judge = make_judge(judge_cfg, cache_path=cache_path, where="judge")
        self.c = c
        self.model = judge_cfg.model
        self.truncated = 0

    def generate(self, contexts: list[Messages], seeds: list[int], batch_seed: int,
                 tags: list[dict[str, Any]]) -> list[Output]:
        from cai.judges import GenerateRequest, run_sync

        reqs = [GenerateRequest(m, max_tokens=self.c.max_new_tokens, temperature=float(self.c.temperature),
                                top_p=float(self.c.top_p) if self.c.top_p < 1 else None,
                                stop=list(self.c.stop) or None, seed=s, tag=t)
                for m, s, t in zip(contexts, seeds, tags)]
        results = run_sync(self.judge.generate_many(reqs))
        return [Output(r.text if r.ok else None, int(r.tokens_out), int(r.tokens_in), float(r.cost_usd),
                       bool(r.cache_hit), None if r.ok else (r.failure_reason or r.status))
                for r in results]

    def close(self) -> None:
        close = getattr(self.judge, "close", None)
        if callable(close):
            close()


def make_generator(cfg: StageConfig, inputs: Mapping[str, Path], c: CritiqueConfig) -> Generator:
    """The feedback model of the ``revisions`` stage: ``cfg.policy`` (``generator: policy``, on
    ``policy.device``) or ``cfg.judge`` (``generator: judge``; ``model: tiny`` is the tiny policy
    artifact), asked through the store's judge cache unless ``judge.cache_path`` is set."""
    if c.generator == "policy":
        from cai.generation.stages import model_spec, policy_location

        spec = model_spec(cfg.policy, policy_location(cfg.policy, inputs))
        return PolicyGenerator(spec, c, cfg.policy.name_or_path)
    gen = JudgeGenerator(stage_judge(cfg.judge, inputs, "judge"), c, cache_path=cfg.judge_cache)
    gen.model = cfg.judge.model  # the configured name ("tiny"), not the artifact path it stands for
    return gen


# ----------------------------------------------------------------------------- one round
def _new_record(rnd: int, principles: list[CritiquePrinciple], direct: bool, current: str) -> dict[str, Any]:
    """A round record before anything is generated: it keeps the current response."""
    critique_request, revision_request = join_requests(principles)
    ids = [p.id for p in principles]
    return {
        "round": rnd, "principle_id": "+".join(ids), "principle_ids": ids,
        "critique_request": None if direct else critique_request, "critique": None,
        "critique_raw": None, "critique_cleaned": False, "critique_usable": None,
        "revision_request": revision_request, "revision_requested": False, "revision": current,
        "revision_raw": None,
        "cleaned": False, "usable": False, "unchanged": False, "unusable_reason": None,
        "revision_tokens": 0, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0, "cache_hits": 0,
        "failures": [],
    }


def _account(rec: dict[str, Any], out: Output) -> None:
    rec["tokens_in"] += out.tokens_in
    rec["tokens_out"] += out.tokens_out
    rec["cost_usd"] += out.cost_usd
    rec["cache_hits"] += int(out.cache_hit)
    if out.failure:
        rec["failures"].append(out.failure)


def _clean(out: Output, request_turn: str) -> Cleaned:
    if out.text is None:
        return Cleaned("", False, False, f"request failed: {out.failure}")
    return clean_output(out.text, request_turn)


def run_block_round(gen: Generator, c: Any, seed: int, rnd: int, block_index: int, block: list[Item],
                    current: list[str], principles: list[list[CritiquePrinciple]],
                    shots: list[list[CritiqueExample]]) -> list[dict[str, Any]]:
    """Round ``rnd`` for one block: critiques (unless direct), then revisions; one record each."""
    direct = bool(c.direct_revision)
    records = [_new_record(rnd, ps, direct, cur) for ps, cur in zip(principles, current)]
    few = [[t for ex in exs for t in example_turns(ex, direct)] for exs in shots]

    def tags(step: str, idx: list[int]) -> list[dict[str, Any]]:
        return [{"stage": "revisions", "step": step, "round": rnd, "prompt_id": block[i].prompt_id,
                 "principle_id": records[i]["principle_id"]} for i in idx]

    def seeds(step: str, idx: list[int]) -> list[int]:
        return [_seed("critique-request", seed, block[i].prompt_id, rnd, step, bits=31) for i in idx]

    every = list(range(len(block)))
    if direct:
        contexts = {i: direct_revision_messages(few[i], block[i].messages, current[i],
                                                records[i]["revision_request"]) for i in every}
    else:
        crit_ctx = [critique_messages(few[i], block[i].messages, current[i], records[i]["critique_request"])
                    for i in every]
        outs = gen.generate(crit_ctx, seeds("critique", every), _seed("block", seed, rnd, block_index, "critique"),
                            tags("critique", every))
        contexts = {}
        for i, out in zip(every, outs):
            rec = records[i]
            _account(rec, out)
            cl = _clean(out, crit_ctx[i][-1]["content"])
            rec.update(critique=cl.text, critique_raw=out.text, critique_cleaned=cl.cleaned,
                       critique_usable=cl.usable)
            if cl.usable:
                contexts[i] = revision_messages(crit_ctx[i], cl.text, rec["revision_request"])
            else:
                rec["unusable_reason"] = f"critique {cl.reason}"
    todo = sorted(contexts)
    if todo:
        outs = gen.generate([contexts[i] for i in todo], seeds("revision", todo),
                            _seed("block", seed, rnd, block_index, "revision"), tags("revision", todo))
        for i, out in zip(todo, outs):
            rec = records[i]
            _account(rec, out)
            cl = _clean(out, contexts[i][-1]["content"])
            rec.update(revision=cl.text if cl.usable else current[i], revision_raw=out.text,
                       revision_requested=True, cleaned=cl.cleaned, usable=cl.usable,
                       revision_tokens=out.tokens_out,
                       unchanged=cl.usable and cl.text.strip() == current[i].strip())
            if not cl.usable:
                rec["unusable_reason"] = f"revision {cl.reason}"
    return records

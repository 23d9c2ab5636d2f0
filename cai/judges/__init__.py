"""AI judges: one protocol, several backends, and the plumbing API judges need.

Stages use a judge like this::

    judge = make_judge(cfg.judge, ledger=ledger, cache_path=store / "judge_cache.sqlite")
    results = await judge.choose_many([ChoiceRequest(messages, ("A", "B"), tag={...})])
    # or, from blocking code: judge.choose([...])

Modules: :mod:`.types` (requests, results, the protocol), :mod:`.config` (checks, keys, API keys; the schema is
``cai.config.JudgeConfig``),
:mod:`.registry` (``make_judge``, ``register_backend``), :mod:`.api_base` (the engine of the API
backends), :mod:`.openai_judge`, :mod:`.anthropic_judge`, and the plumbing:
:mod:`.cache`, :mod:`.ratelimit`, :mod:`.retry`, :mod:`.cost`, :mod:`.parsing`.
"""

from __future__ import annotations

from cai.judges.cache import JudgeCache, call_key
from cai.judges.config import ready_judge, redact, resolve_api_key
from cai.judges.cost import CostLedger
from cai.judges.parsing import empirical_probs, parse_choice, probs_from_logprobs
from cai.judges.registry import make_judge, register_backend
from cai.judges.types import (
    BudgetExhausted,
    ChoiceRequest,
    ChoiceResult,
    GenerateRequest,
    GenerateResult,
    JudgeBackend,
    SyncJudgeMixin,
    run_sync,
)

__all__ = [
    "BudgetExhausted",
    "ChoiceRequest",
    "ChoiceResult",
    "CostLedger",
    "GenerateRequest",
    "GenerateResult",
    "JudgeBackend",
    "JudgeCache",
    "SyncJudgeMixin",
    "call_key",
    "empirical_probs",
    "make_judge",
    "parse_choice",
    "probs_from_logprobs",
    "ready_judge",
    "redact",
    "register_backend",
    "resolve_api_key",
    "run_sync",
]

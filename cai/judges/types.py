"""The judge protocol: two kinds of request, their results, and the backend interface.

A judge backend answers

- :class:`ChoiceRequest` -- "which of these labels?" (``("A", "B")``, ``("1", ..., "10")``),
  answered with a probability per label (:class:`ChoiceResult`), and
- :class:`GenerateRequest` -- free text (critiques, revisions, chain-of-thought),
  answered with :class:`GenerateResult`.

Stages build the prompts and turn answers into labels; a backend only talks to a model. Every
batch call returns exactly one result per request, in request order. A request that could not
be answered is a result with ``status == "failed"`` and a ``failure_reason`` -- never a missing
row and never a coin flip.

Any object with ``name``, ``model``, ``choose_many`` and ``generate_many`` is a backend
(:class:`JudgeBackend`); :class:`SyncJudgeMixin` adds the blocking ``choose``/``generate``
wrappers for scripts and notebooks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from cai.errors import CaiError, DataError

OK = "ok"
FAILED = "failed"
REFUSAL = "refusal"
BUDGET = "budget"
ROLES = ("system", "user", "assistant")

T = TypeVar("T")


def failure_kind(reason: str | None) -> str:
    """The kind of a failure reason: what failure counts and metric names (``label/failed_<kind>``,
    ``quality/invalid/<kind>``, ``eval/.../invalid_<kind>``, ``ppo/judge/failed/<kind>``) use.

    ``"http 500 after 6 attempts"`` -> ``"http_500"``; otherwise the reason's first word:
    ``"unparseable: ..."`` -> ``"unparseable"``, ``"refusal (3 of 5 samples)"`` -> ``"refusal"``,
    ``"malformed response (...) after 3 attempts"`` -> ``"malformed"``, ``"timeout ..."``,
    ``"connection error ..."``, ``"budget"``; ``"unknown"`` when there is no reason.
    """
    text = (reason or "").strip().lower()
    m = re.match(r"http (\d{3})", text)
    if m:
        return f"http_{m.group(1)}"
    m = re.match(r"[a-z][a-z_]*", text)
    return m.group(0) if m else "unknown"


# failure kinds that say nothing about the pair: the judge or the network was unavailable
TRANSIENT_KINDS = frozenset({"timeout", "connection", "http_408", "http_409", "http_429"})
EMPTY_ANSWER = "unparseable: empty answer"


def is_transient(reason: str | None) -> bool:
    """Whether a failure reason is transient -- the judge or the network failed (a timeout, a
    connection error, HTTP 408/409/429/5xx after the retries, an empty answer) -- rather than the
    answer itself (a refusal, an unparseable or malformed answer, a prompt that does not fit).
    A transient failure is worth asking again later; a stage must not record it as a final result."""
    text = (reason or "").strip().lower()
    if text.startswith(EMPTY_ANSWER):
        return True
    kind = failure_kind(text)
    return kind in TRANSIENT_KINDS or re.fullmatch(r"http_5\d\d", kind) is not None


def _check_messages(messages: Any, tag: dict) -> None:
    where = f"judge request (tag {tag!r})"
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of chat messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.200}"
            )


@dataclass
class ChoiceRequest:
    """Ask the judge to pick one of ``choices``; the answer is a probability per choice."""

    messages: list[dict]
    choices: tuple[str, ...]
    # free metadata carried into the result: principle_id, order, pair_id, stage, template_version
    tag: dict = field(default_factory=dict)
    # answers drawn when the backend has no log-probs (empirical distribution); None: the
    # judge config's n_samples
    n_samples: int | None = None

    def __post_init__(self) -> None:
        _check_messages(self.messages, self.tag)
        self.choices = tuple(self.choices)
        if not self.choices or any(not isinstance(c, str) or not c.strip() for c in self.choices):
            raise DataError(
                f"judge request (tag {self.tag!r}): 'choices' must be non-empty strings, got {self.choices!r}"
            )
        if len(set(self.choices)) != len(self.choices):
            raise DataError(f"judge request (tag {self.tag!r}): 'choices' has duplicates: {self.choices!r}")
        if self.n_samples is not None and (not isinstance(self.n_samples, int) or self.n_samples < 1):
            raise DataError(
                f"judge request (tag {self.tag!r}): 'n_samples' must be an int >= 1, got {self.n_samples!r}"
            )


@dataclass
class ChoiceResult:
    """The judge's answer to one :class:`ChoiceRequest`."""

    probs: dict[str, float] | None  # normalised over the request's choices; None when failed
    method: str  # "logprobs" | "parsed" | "sampled"; "" when no answer was obtained
    status: str  # "ok" | "failed"
    failure_reason: str | None  # "refusal", "unparseable: <snippet>", "http 500 after 5 attempts", "budget", ...
    raw_output: str
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_s: float
    cache_hit: bool  # every answer behind this result came from the cache (cost 0)
    attempts: int  # HTTP requests sent for this result (retries and samples included; 0 on a cache hit)
    model: str
    backend: str  # the backend that answered
    tag: dict
    n_answers: int = 0  # answers behind ``probs`` (k parsed samples for "sampled")

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def choice(self) -> str | None:
        """The most probable choice (first in request order on ties), None when failed."""
        if not self.probs:
            return None
        return max(self.probs, key=lambda c: self.probs[c])  # max keeps the first of equal keys

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GenerateRequest:
    """Ask the judge for free text (a critique, a revision, a chain of thought)."""

    messages: list[dict]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    stop: list[str] | None = None
    # identical requests are answered from the cache: give each of several samples its own seed
    seed: int | None = None
    tag: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_messages(self.messages, self.tag)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise DataError(
                f"judge request (tag {self.tag!r}): 'max_tokens' must be an int >= 1, got {self.max_tokens!r}"
            )


@dataclass
class GenerateResult:
    """The judge's answer to one :class:`GenerateRequest`."""

    text: str | None  # None when failed
    status: str
    failure_reason: str | None
    finish_reason: str | None  # "stop" | "length" | "refusal" | ... as the API said
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_s: float
    cache_hit: bool
    attempts: int
    model: str
    backend: str
    tag: dict

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class BudgetExhausted(CaiError):
    """The dollar cap was reached: no new request was sent after that point.

    ``results`` holds every result of the batch in request order (the unsent ones failed with
    reason ``"budget"``). Answers already obtained are in the cache, so a rerun with a larger
    ``max_dollars`` resumes without paying for them twice.
    """

    def __init__(self, results: Sequence[Any], spent_usd: float, cap_usd: float) -> None:
        self.results = list(results)
        self.n_budget = sum(1 for r in self.results if r.failure_reason == BUDGET)
        self.n_done = sum(1 for r in self.results if r.ok)
        self.spent_usd = spent_usd
        self.cap_usd = cap_usd
        super().__init__(
            f"stopped at budget: ${spent_usd:.4f} spent of max_dollars=${cap_usd:.4f}; "
            f"{self.n_done} of {len(self.results)} requests done, {self.n_budget} not sent; "
            "rerun (with a larger judge.max_dollars) to resume -- cached answers are not paid twice"
        )


@runtime_checkable
class JudgeBackend(Protocol):
    """What a stage needs from a judge. ``hf``, ``openai`` and ``anthropic`` all provide it."""

    name: str
    model: str

    async def choose_many(self, reqs: list[ChoiceRequest], progress: bool = False) -> list[ChoiceResult]: ...

    async def generate_many(self, reqs: list[GenerateRequest], progress: bool = False) -> list[GenerateResult]: ...


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from blocking code, also when an event loop already runs
    in this thread (a notebook): then it runs on a fresh loop in a helper thread, in a copy of this
    thread's context (so the store a stage builds in, :func:`cai.artifacts.current_store`, follows)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(contextvars.copy_context().run, asyncio.run, coro).result()


class SyncJudgeMixin:
    """Blocking wrappers around ``choose_many`` / ``generate_many`` for any backend."""

    def choose(self, reqs: list[ChoiceRequest], progress: bool = False) -> list[ChoiceResult]:
        return run_sync(self.choose_many(reqs, progress=progress))  # type: ignore[attr-defined]

    def generate(self, reqs: list[GenerateRequest], progress: bool = False) -> list[GenerateResult]:
        return run_sync(self.generate_many(reqs, progress=progress))  # type: ignore[attr-defined]

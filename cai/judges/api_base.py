"""The engine shared by the API backends: batches, cache, limits, retries, cost, budget.

A batch runs on ``max_concurrency`` asyncio workers that take requests in order; each
request's result lands at its own index, so results come back in request order, one per
request. Every API call goes through :meth:`ApiJudge._call`:

    cache lookup -> claim the key (or wait for the process paying for it) -> budget reservation
    (this process's and the store's ledger) -> rate limiter -> send (timeout) -> answer checks
    (size, usage, log-probs: :func:`check_answer`) -> retries -> ledger (and the store's spend)

and a call whose answer is usable is stored in the cache (failures never are, so a rerun
retries them and pays only for what is missing), then its claim is released. A key or URL
credential a server echoes back is cut out of the answer before anything keeps it.

The warm path is kept lean: before the workers start, the cache keys of every call the batch
can make are looked up in a few batched queries; the SDK client is built only when a call
misses the cache (a fully cached batch builds none), and its TLS context is built once per
process (:func:`~cai.judges.sdk.shared_ssl_context`).

A choice request is answered, in order of preference, from log-probs (one call), from the
parsed text (one call), or from ``n_samples`` sampled answers at temperature 1 (k calls, one
cache row each). A backend subclass names its SDK and client class, and says how to send one
call and turn the response into a :class:`CallAnswer`; the client is built and the SDK's errors
are classified the same way for every SDK (:mod:`cai.judges.sdk`).
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from cai.config import JudgeConfig
from cai.judges.cache import LEASE_S, JudgeCache, call_key, endpoint_of, new_owner
from cai.judges.config import PLACEHOLDER_KEY, default_cache_path, redact, resolve_api_key
from cai.judges.cost import CostLedger, estimate_tokens
from cai.judges.parsing import (
    Position,
    empirical_probs,
    parse_choice,
    probs_from_logprobs,
)
from cai.judges.ratelimit import RateLimiter
from cai.judges.retry import CallFailure, MalformedResponse, Outcome, RetryPolicy, call_with_retries
from cai.judges.sdk import classify_sdk_error, make_sdk_client
from cai.judges.types import (
    BUDGET,
    FAILED,
    OK,
    REFUSAL,
    BudgetExhausted,
    ChoiceRequest,
    ChoiceResult,
    GenerateRequest,
    GenerateResult,
    SyncJudgeMixin,
    failure_kind,
    is_transient,
)
from cai.secrets import register_secret, url_secrets

log = logging.getLogger(__name__)
R = TypeVar("R")
SAMPLE_TEMPERATURE = 1.0
# an answer text longer than this many characters per requested token (and at least
# ANSWER_CHARS_MIN) is not an answer to the request: refused before it is parsed or stored
CHARS_PER_TOKEN_CAP = 64
ANSWER_CHARS_MIN = 4096
# a log-prob above this is not a log-probability (float noise may make a certain token's 0.0 tiny positive)
MAX_LOGPROB = 1e-3
MAX_TOKENS_REPORTED = 10**9


def check_answer(answer: CallAnswer, max_tokens: int) -> CallAnswer:
    """``answer`` if its numbers and size are plausible, else :class:`MalformedResponse` naming the
    problem: token usage must be whole numbers in [0, 1e9]; the text at most
    ``max(ANSWER_CHARS_MIN, CHARS_PER_TOKEN_CAP * max_tokens)`` characters; every log-prob a finite
    number <= 0. A malformed answer is retried ``malformed_retries`` times, then fails for good."""
    for name in ("tokens_in", "tokens_out"):
        value = getattr(answer, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS_REPORTED:
            raise MalformedResponse(f"token usage {name}={value!r} is not a count in [0, {MAX_TOKENS_REPORTED}]")
    cap = max(ANSWER_CHARS_MIN, CHARS_PER_TOKEN_CAP * max_tokens)
    if len(answer.text) > cap:
        raise MalformedResponse(f"an answer of {len(answer.text)} characters to max_tokens={max_tokens} "
                                f"(at most {cap} expected)")
    for _token, top in answer.positions:
        for alt, lp in top:
            if not (isinstance(lp, float) and math.isfinite(lp) and lp <= MAX_LOGPROB):
                raise MalformedResponse(f"top log-prob {lp!r} of token {alt[:20]!r} is not a log-probability "
                                        "(expected a finite number <= 0)")
    return answer


@dataclass
class CallAnswer:
    """One API answer, as cached: text, log-probs per position, usage, finish reason."""

    text: str
    positions: list[Position] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    finish_reason: str | None = None
    refusal: bool = False  # the API itself flagged a refusal (not inferred from the text)

    def to_json(self) -> dict:
        """A JSON-ready view (shares ``positions`` with the answer; serialise it, don't mutate it)."""
        return {
            "text": self.text, "positions": self.positions, "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "finish_reason": self.finish_reason, "refusal": self.refusal,
        }

    @classmethod
    def from_json(cls, d: dict) -> CallAnswer:
        positions = [(tok, [(a, lp) for a, lp in top]) for tok, top in d.get("positions", [])]
        return cls(
            d["text"], positions, d["tokens_in"], d["tokens_out"], d.get("finish_reason"), d.get("refusal", False)
        )


@dataclass
class _Tally:
    """What the calls behind one result cost."""

    attempts: int = 0
    calls: int = 0
    cache_hits: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0

    def add(self, answer: CallAnswer, cost: float, cached: bool) -> None:
        self.tokens_in += answer.tokens_in
        self.tokens_out += answer.tokens_out
        self.cost_usd += cost
        self.calls += 1
        self.cache_hits += int(cached)


class _Batch:
    """What the requests of one batch share: the lazily built client, the prefetched cache rows
    and the claims its requests hold in the cache (renewed together while the batch runs)."""

    def __init__(self, make_client: Callable[[], Any], hits: dict[str, str], keys: dict[tuple[int, int], str],
                 orphaned: set[str] | None = None) -> None:
        self._make_client = make_client
        self.client: Any = None
        self.hits = hits  # cache key -> stored JSON text, read before the batch started
        self.keys = keys  # (id(request), sample index) -> cache key, computed for the prefetch
        self.orphaned = orphaned or set()  # keys whose payment a dead process left unreported
        self.stopping = False  # set when the batch is cancelled: workers take no new request
        self.owner = new_owner()  # claims of this batch: owner + ":" + a counter per claim
        self.held: dict[str, str] = {}  # cache key -> the owner of our claim on it
        self._n = 0

    def next_owner(self) -> str:
        self._n += 1
        return f"{self.owner}:{self._n}"

    def get_client(self) -> Any:
        if self.client is None:
            self.client = self._make_client()
        return self.client


class ApiJudge(SyncJudgeMixin, abc.ABC):
    """Base of the API backends; subclasses name their SDK and fill in the two request hooks."""

    name = "api"
    supports_logprobs = False
    base_url_env = ""  # the SDK's environment variable for the endpoint when base_url is None
    sdk = ""  # the SDK's module ("openai", "anthropic"); see cai.judges.sdk
    client_class = ""  # its async client class ("AsyncOpenAI", "AsyncAnthropic")

    def __init__(
        self,
        cfg: JudgeConfig,
        *,
        ledger: CostLedger | None = None,
        cache_path: str | Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = cfg.model
        # the endpoint the SDK will talk to (it reads the env var when base_url is None): part of the cache key
        self.base_url = cfg.base_url or os.environ.get(self.base_url_env) or None
        self._key = resolve_api_key(cfg)
        # what a server could echo back: the key, and any credential written into the base URL;
        # registered, so every log line and file written by this process has them cut out too
        self._secrets = [s for s in (self._key, *url_secrets(self.base_url)) if s and s != PLACEHOLDER_KEY]
        register_secret(*self._secrets)
        self.ledger = ledger if ledger is not None else CostLedger(cfg.prices, cfg.max_dollars)
        self.ledger.add_prices(cfg.prices)
        path = cfg.cache_path or cache_path or default_cache_path()
        self.cache = JudgeCache(path) if cfg.cache else None
        # the judge in the store's ledger: max_dollars caps what it has been paid through this store
        self.scope = f"{self.name}:{self.model}@{endpoint_of(self.base_url)}"
        if self.cache is not None:
            self.ledger.attach(self.cache, self.scope)
        self._unreported = False  # a result failed transiently or at the budget: its payments stay adoptable
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm, cfg.burst_s)
        self.policy = RetryPolicy(
            cfg.max_retries, cfg.malformed_retries, cfg.backoff_base_s, cfg.backoff_max_s, cfg.timeout_s,
            random.Random(cfg.seed),
        )

    # ---- provider hooks ---------------------------------------------------------------
    def _make_client(self) -> Any:
        """A fresh SDK client (built inside the batch's event loop on its first cache miss,
        closed after the batch): our key, endpoint and timeout, no SDK retries."""
        return make_sdk_client(self.sdk, self.client_class, api_key=self._key, base_url=self.base_url,
                               timeout_s=self.cfg.timeout_s)

    def _classify(self, exc: BaseException) -> CallFailure:
        """Classify an exception raised by :meth:`_send` (the key is redacted from its message)."""
        failure = classify_sdk_error(self.sdk, exc, self._key)
        failure.message = redact(failure.message, *self._secrets)
        return failure

    @abc.abstractmethod
    async def _send(self, client: Any, messages: list[dict], params: dict) -> CallAnswer:
        """Send one request; raise the SDK's errors or MalformedResponse."""

    @abc.abstractmethod
    def _choice_params(self, logprobs: bool, sampled: bool, sample_index: int) -> dict:
        """Sampling parameters of one choice call (sent, and part of the cache key)."""

    def _check_request(self, req: ChoiceRequest | GenerateRequest) -> None:
        """Reject a request this provider cannot take before anything is sent (DataError)."""

    async def _close_client(self, client: Any) -> None:
        await client.close()

    # ---- public API ---------------------------------------------------------------------
    async def choose_many(self, reqs: list[ChoiceRequest], progress: bool = False) -> list[ChoiceResult]:
        results = await self._run_batch(reqs, self._choose_one, progress, "choices")
        self._check_budget(results)
        return results

    async def generate_many(self, reqs: list[GenerateRequest], progress: bool = False) -> list[GenerateResult]:
        results = await self._run_batch(reqs, self._generate_one, progress, "generations")
        self._check_budget(results)
        return results

    def close(self) -> None:
        if self.cache is not None:
            if not self._unreported:  # every answer paid went into a result the caller kept
                self.cache.settle_mine()
            self.cache.close()

    def __enter__(self) -> ApiJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- batches ------------------------------------------------------------------------
    async def _run_batch(
        self, items: Sequence[Any], handler: Callable[[Any, Any], Awaitable[R]], progress: bool, what: str
    ) -> list[R]:
        results: list[Any] = [None] * len(items)
        if not items:
            return results
        for item in items:
            self._check_request(item)
        batch = self._prefetch(items)
        order = iter(range(len(items)))
        bar = tqdm(total=len(items), desc=f"{self.name}:{self.model} {what}", disable=not progress, unit="req")

        async def worker() -> None:
            for i in order:  # shared iterator: each index is taken by exactly one worker
                if batch.stopping:  # a cancellation that a finished await swallowed (asyncio.wait_for)
                    return
                try:
                    results[i] = await handler(batch, items[i])
                finally:  # claims of an unusable answer: another process may ask for itself
                    self._release_claims(batch, items[i])
                bar.update(1)

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(LEASE_S / 4)
                if batch.held and self.cache is not None:
                    self.cache.renew(batch.owner)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(self.cfg.max_concurrency, len(items)))]
        beat = asyncio.ensure_future(heartbeat())
        try:
            await asyncio.gather(*tasks)
        finally:
            batch.stopping = True
            for t in (*tasks, beat):
                t.cancel()
            await asyncio.gather(*tasks, beat, return_exceptions=True)
            for key, owner in list(batch.held.items()):
                self.cache.release(key, owner)  # type: ignore[union-attr]
            bar.close()
            if batch.client is not None:
                await self._close_client(batch.client)
        if any(r is not None and not r.ok and (r.failure_reason == BUDGET or is_transient(r.failure_reason))
               for r in results):
            self._unreported = True
        ok = sum(1 for r in results if r.status == OK)
        log.info(
            "%s:%s %d %s: %d ok, %d failed, $%.4f spent so far",
            self.name, self.model, len(items), what, ok, len(items) - ok, self.ledger.spent_usd,
        )
        return results

    def _prefetch(self, items: Sequence[Any]) -> _Batch:
        """The batch context, with every cached answer the batch may need read in a few queries."""
        keys: dict[tuple[int, int], str] = {}
        if self.cache is not None:
            for item in items:
                for index, key in self._keys_of(item):
                    keys[(id(item), index)] = key
        hits = self.cache.get_many(keys.values()) if self.cache is not None else {}
        orphaned = self.cache.orphaned(hits) if self.cache is not None and hits else set()
        return _Batch(self._make_client, hits, keys, orphaned)

    def _release_claims(self, batch: _Batch, item: Any) -> None:
        """Give up the claims ``item``'s calls still hold (their answers were unusable)."""
        if self.cache is None or not batch.held:
            return
        index = 0
        while (key := batch.keys.get((id(item), index))) is not None:
            if key in batch.held:
                self.cache.release(key, batch.held.pop(key))
            index += 1

    def _keys_of(self, item: ChoiceRequest | GenerateRequest) -> list[tuple[int, str]]:
        """(sample index, cache key) of every call a request can make."""
        if isinstance(item, GenerateRequest):
            return [(0, self._generate_key(item))]
        n = item.n_samples or self.cfg.n_samples
        use_logprobs = self.supports_logprobs and self.cfg.top_logprobs > 0
        return [
            (i, self._choice_key(item, n, i, self._choice_params(logprobs=use_logprobs and i == 0, sampled=n > 1,
                                                                 sample_index=i)))
            for i in range(n)
        ]

    def _check_budget(self, results: Sequence[Any]) -> None:
        if any(r.failure_reason == BUDGET for r in results):
            spent = max(self.ledger.spent_usd, self.ledger.store_spent() or 0.0)  # the store's ledger: every process
            raise BudgetExhausted(results, spent, self.ledger.max_dollars or 0.0)

    # ---- one call -----------------------------------------------------------------------
    async def _call(
        self, batch: _Batch, *, key: str, messages: list[dict], params: dict, max_tokens: int, tag: dict, tally: _Tally
    ) -> Outcome[CallAnswer]:
        """One answer: from the cache, or from the API under budget, limits and retries.

        On a miss the call's key is claimed in the cache first: while another process (or
        request) holds it, this one waits for its answer instead of paying for it again."""
        if self.cache is not None:
            text = batch.hits.get(key)
            # not prefetched: another process, or an earlier request of this batch, may have stored it since
            hit = json.loads(text) if text is not None else self.cache.get(key)
            pause = 0.02
            while hit is None:
                owner = batch.next_owner()
                state = self.cache.claim(key, owner)
                if state == "claimed":
                    batch.held[key] = owner
                    break
                if state == "busy":  # someone is paying for it: wait for the answer (or the release)
                    await asyncio.sleep(pause)
                    pause = min(pause * 1.5, 0.5)
                hit = self.cache.get(key)
            if hit is not None:
                answer = CallAnswer.from_json(hit)
                adopted = self.cache.adopt(key) if key in batch.orphaned or text is None else 0.0
                tally.add(answer, adopted, cached=True)
                self.ledger.record_cache_hit(tag, answer.tokens_in, answer.tokens_out, adopted)
                return Outcome(answer, 0, None)
        est_in = estimate_tokens(messages)
        client = batch.get_client()
        async def send() -> CallAnswer:
            return check_answer(await self._send(client, messages, params), max_tokens)

        outcome = await call_with_retries(
            send,
            self._classify,
            policy=self.policy,
            limiter=self.limiter,
            ledger=self.ledger,
            est_tokens=est_in + max_tokens,
            est_usd=self.ledger.cost(self.model, est_in, max_tokens),
            actual_tokens=lambda a: a.tokens_in + a.tokens_out,
        )
        tally.attempts += outcome.attempts
        if outcome.answer is not None:
            a = outcome.answer
            if self._secrets:  # a server echoing the key (or the URL's password) back: never stored
                a.text = redact(a.text, *self._secrets)
                a.positions = [(redact(tok, *self._secrets), [(redact(alt, *self._secrets), lp) for alt, lp in top])
                               for tok, top in a.positions]
            cost = self.ledger.cost(self.model, a.tokens_in, a.tokens_out)
            tally.add(a, cost, cached=False)
            self.ledger.record_call(tag, a.tokens_in, a.tokens_out, cost)
            if self.cache is not None:
                self.cache.record_spend(key, self.scope, cost)
        return outcome

    def _store(self, key: str, out: Outcome[CallAnswer], batch: _Batch | None = None) -> None:
        """Cache a usable answer that came from the API (a cache hit is already stored), then
        give up our claim on its key: whoever waits for it reads it from the cache."""
        if self.cache is not None and out.answer is not None and out.attempts > 0:
            self.cache.put(key, out.answer.to_json())
        if self.cache is not None and batch is not None and key in batch.held:
            self.cache.release(key, batch.held.pop(key))

    # ---- choices ------------------------------------------------------------------------
    def _choice_key(self, req: ChoiceRequest, n: int, index: int, params: dict) -> str:
        return call_key(
            kind="choice", backend=self.name, model=self.model, base_url=self.base_url, params=params,
            template_version=str(req.tag.get("template_version", self.cfg.template_version)),
            messages=req.messages, choices=req.choices, n_samples=n, sample_index=index,
        )

    async def _choice_call(
        self, batch: _Batch, req: ChoiceRequest, n: int, index: int, logprobs: bool, tally: _Tally
    ) -> tuple[Outcome[CallAnswer], str]:
        params = self._choice_params(logprobs=logprobs, sampled=n > 1, sample_index=index)
        key = batch.keys.get((id(req), index)) or self._choice_key(req, n, index, params)
        out = await self._call(
            batch, key=key, messages=req.messages, params=params, max_tokens=self.cfg.max_tokens,
            tag=req.tag, tally=tally,
        )
        return out, key

    async def _choose_one(self, batch: _Batch, req: ChoiceRequest) -> ChoiceResult:
        t0 = time.monotonic()
        n = req.n_samples or self.cfg.n_samples
        tally = _Tally()
        use_logprobs = self.supports_logprobs and self.cfg.top_logprobs > 0
        answers: list[CallAnswer] = []
        for index in range(n):
            out, key = await self._choice_call(batch, req, n, index, use_logprobs and index == 0, tally)
            if out.answer is None:  # transport failure or budget: the whole request fails
                return self._choice_result(req, None, "", FAILED, out.failure, answers, tally, t0)
            a = out.answer
            if index == 0 and use_logprobs:
                probs = probs_from_logprobs(a.positions, req.choices)
                if probs is not None:
                    self._store(key, out, batch)
                    return self._choice_result(req, probs, "logprobs", OK, None, [a], tally, t0)
            answers.append(a)
            if not a.refusal and parse_choice(a.text, req.choices).choice is not None:
                self._store(key, out, batch)
        return self._from_texts(req, n, answers, tally, t0)

    def _from_texts(
        self, req: ChoiceRequest, n: int, answers: list[CallAnswer], tally: _Tally, t0: float
    ) -> ChoiceResult:
        """A parsed (one answer) or sampled (k answers) result from answer texts."""
        parsed = [parse_choice(a.text, req.choices) if not a.refusal else None for a in answers]
        votes = [p.choice for p in parsed if p is not None and p.choice is not None]
        failures = [REFUSAL if p is None else p.failure for p in parsed if p is None or p.choice is None]
        if n == 1:
            if votes:
                probs = {c: float(c == votes[0]) for c in req.choices}
                return self._choice_result(req, probs, "parsed", OK, None, answers, tally, t0)
            return self._choice_result(req, None, "parsed", FAILED, failures[0], answers, tally, t0)
        if 2 * len(votes) < n:  # most samples said nothing usable: no label from the rest
            top_reason = Counter(failure_kind(f) for f in failures).most_common(1)[0][0]
            reason = f"{top_reason} ({len(failures)} of {n} samples)"
            return self._choice_result(req, None, "sampled", FAILED, reason, answers, tally, t0)
        probs = empirical_probs(votes, req.choices)
        return self._choice_result(req, probs, "sampled", OK, None, answers, tally, t0, len(votes))

    def _choice_result(
        self, req: ChoiceRequest, probs: dict[str, float] | None, method: str, status: str, reason: str | None,
        answers: list[CallAnswer], tally: _Tally, t0: float, n_answers: int | None = None,
    ) -> ChoiceResult:
        raw = answers[0].text if len(answers) == 1 else (json.dumps([a.text for a in answers]) if answers else "")
        self.ledger.record_result(req.tag, status == OK)
        return ChoiceResult(
            probs=probs, method=method, status=status, failure_reason=reason, raw_output=raw,
            tokens_in=tally.tokens_in, tokens_out=tally.tokens_out, cost_usd=tally.cost_usd,
            latency_s=time.monotonic() - t0, cache_hit=tally.calls > 0 and tally.cache_hits == tally.calls,
            attempts=tally.attempts, model=self.model, backend=self.name, tag=dict(req.tag),
            n_answers=(n_answers if n_answers is not None else int(probs is not None)),
        )

    # ---- generation ---------------------------------------------------------------------
    def _generate_params(self, req: GenerateRequest) -> dict:
        return {"max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "stop": list(req.stop) if req.stop else None, "seed": req.seed}

    def _generate_key(self, req: GenerateRequest) -> str:
        return call_key(
            kind="generate", backend=self.name, model=self.model, base_url=self.base_url,
            params=self._generate_params(req),
            template_version=str(req.tag.get("template_version", self.cfg.template_version)), messages=req.messages,
        )

    async def _generate_one(self, batch: _Batch, req: GenerateRequest) -> GenerateResult:
        t0 = time.monotonic()
        tally = _Tally()
        params = self._generate_params(req)
        key = batch.keys.get((id(req), 0)) or self._generate_key(req)
        out = await self._call(
            batch, key=key, messages=req.messages, params=params, max_tokens=req.max_tokens, tag=req.tag, tally=tally
        )
        a = out.answer
        status, reason = (OK, None) if a is not None and not a.refusal else (FAILED, out.failure or REFUSAL)
        if status == OK:
            self._store(key, out, batch)
        self.ledger.record_result(req.tag, status == OK)
        return GenerateResult(
            text=a.text if status == OK else None, status=status, failure_reason=reason,
            finish_reason=a.finish_reason if a is not None else None, tokens_in=tally.tokens_in,
            tokens_out=tally.tokens_out, cost_usd=tally.cost_usd, latency_s=time.monotonic() - t0,
            cache_hit=tally.calls > 0 and tally.cache_hits == tally.calls, attempts=tally.attempts,
            model=self.model, backend=self.name, tag=dict(req.tag),
        )

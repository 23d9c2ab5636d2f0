"""Retries: which failures are worth another attempt, how long to wait, and the attempt loop.

Retried, with exponential backoff and full jitter (``uniform(0, min(max, base * 2**n))``):
429, 408, 409, 5xx, timeouts and connection errors, up to ``max_retries`` times. A ``retry-after``
or ``retry-after-ms`` header replaces the backoff: the retry waits exactly that long, never
less, and the whole judge holds back too (:meth:`RateLimiter.defer`).

A malformed body (bad JSON, missing fields) is retried ``malformed_retries`` times, then the
request fails with the reason and a snippet. Other 4xx fail at once with the server's message.
Every message passes through :func:`~cai.judges.config.redact` first: a server that
echoes the API key back cannot leak it into a result, a log line or an exception.

The SDK clients are built with ``max_retries=0``, so this loop is the only one and every HTTP
request is counted in ``attempts``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cai.judges.config import redact
from cai.judges.cost import CostLedger
from cai.judges.ratelimit import RateLimiter
from cai.judges.types import BUDGET

log = logging.getLogger(__name__)
A = TypeVar("A")
RETRY_STATUS = frozenset({408, 409, 429})
SNIPPET = 200


class MalformedResponse(Exception):
    """The server answered 2xx but the body is not a usable response."""


@dataclass
class CallFailure:
    """One failed attempt, classified."""

    kind: str  # "http" | "timeout" | "connection" | "malformed"
    message: str
    retryable: bool
    status: int | None = None
    retry_after_s: float | None = None

    def reason(self, attempts: int) -> str:
        if not self.retryable:
            return f"http {self.status}: {self.message}" if self.status else self.message
        what = f"http {self.status}" if self.kind == "http" else self.kind
        if self.kind == "malformed":
            what = f"malformed response ({self.message})"
        return f"{what} after {attempts} attempts"


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (preferred, exact) or ``retry-after``
    (seconds, fractional allowed, or an HTTP date); None when absent or unreadable."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def server_message(body: Any, fallback: str) -> str:
    """The human-readable message of an API error body (both providers nest it in ``error``)."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    if isinstance(body, str) and body.strip():
        return body
    return fallback


def classify(
    exc: BaseException,
    *,
    status_error: type[BaseException],
    timeout_error: type[BaseException],
    connection_error: type[BaseException],
    secret: str,
) -> CallFailure:
    """Map an exception from an SDK call to a :class:`CallFailure` (messages redacted)."""
    if isinstance(exc, (asyncio.TimeoutError, timeout_error)):
        return CallFailure("timeout", "timeout", retryable=True)
    if isinstance(exc, status_error):
        status = int(getattr(exc, "status_code", 0) or 0)
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        message = server_message(getattr(exc, "body", None), str(exc))
        message = redact(message, secret)[:SNIPPET]
        retryable = status in RETRY_STATUS or status >= 500
        return CallFailure("http", message, retryable, status, parse_retry_after(headers) if retryable else None)
    if isinstance(exc, connection_error):
        return CallFailure("connection", "connection error", retryable=True)
    if isinstance(exc, (MalformedResponse, json.JSONDecodeError, ValueError, TypeError, AttributeError, LookupError,
                        RecursionError, OverflowError)):
        snippet = redact(f"{type(exc).__name__}: {exc}", secret)[:SNIPPET]
        return CallFailure("malformed", snippet, retryable=True)
    raise exc


@dataclass
class RetryPolicy:
    max_retries: int
    malformed_retries: int
    backoff_base_s: float
    backoff_max_s: float
    timeout_s: float
    rng: random.Random

    def backoff_s(self, retry_index: int) -> float:
        """Full jitter: uniform over [0, min(max, base * 2**n)]."""
        return self.rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * (2.0**retry_index)))


@dataclass
class Outcome(Generic[A]):
    """What the attempt loop ended with: an answer, or a failure reason."""

    answer: A | None
    attempts: int
    failure: str | None


async def call_with_retries(
    send: Callable[[], Awaitable[A]],
    classify_exc: Callable[[BaseException], CallFailure],
    *,
    policy: RetryPolicy,
    limiter: RateLimiter,
    ledger: CostLedger,
    est_tokens: int,
    est_usd: float,
    actual_tokens: Callable[[A], int],
) -> Outcome[A]:
    """Send until an answer, a final failure, or the budget says stop.

    Before every attempt the estimated cost is reserved against the budget (refused: the
    outcome is ``"budget"``) and the rate limiter is waited on.
    """
    attempts = retries = malformed = 0
    while True:
        reservation = ledger.try_reserve(est_usd)
        if not reservation:
            return Outcome(None, attempts, BUDGET)
        try:
            await limiter.acquire(est_tokens)
            attempts += 1
            try:
                answer = await asyncio.wait_for(send(), policy.timeout_s)
            except Exception as exc:  # noqa: BLE001 - classified below, unknown ones re-raised
                failure = classify_exc(exc)
            else:
                limiter.correct(est_tokens, actual_tokens(answer))
                return Outcome(answer, attempts, None)
        finally:
            ledger.release(est_usd, reservation)
        if not failure.retryable:
            return Outcome(None, attempts, failure.reason(attempts))
        if failure.kind == "malformed":
            malformed += 1
            if malformed > policy.malformed_retries:
                return Outcome(None, attempts, failure.reason(attempts))
        else:
            retries += 1
            if retries > policy.max_retries:
                return Outcome(None, attempts, failure.reason(attempts))
        if failure.retry_after_s is not None:
            delay = failure.retry_after_s
            limiter.defer(delay)
        else:
            delay = policy.backoff_s(retries + malformed - 1)
        log.debug("judge attempt %d failed (%s); retrying in %.3fs", attempts, failure.reason(attempts), delay)
        await asyncio.sleep(delay)

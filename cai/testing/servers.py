"""Loopback fake OpenAI and Anthropic servers, for hermetic tests and offline smoke runs.

Real HTTP on 127.0.0.1 (stdlib ``ThreadingHTTPServer`` in a background thread), speaking enough
of each protocol for the real ``openai`` / ``anthropic`` clients::

    with FakeOpenAIServer(faults=Faults(rate_limit=0.2, retry_after_s=0.02)) as srv:
        judge = make_judge({"backend": "openai", "model": "fake", "base_url": srv.base_url,
                            "api_key_env": None})

The fake model (:class:`~cai.testing.fake_model.FakeModel`) is deterministic: it prefers the
shorter of the options listed as ``(A) ...`` / ``(B) ...`` lines in the last user message,
reports log-probs accordingly on the OpenAI endpoint, and writes hash-seeded text for any other
prompt. The OpenAI fake samples (temperature > 0) from ``seed`` when the request has one; the
Anthropic fake, whose API has no temperature, samples every request, so k identical requests
are k draws.

Faults are decided by a seeded hash of (request body, how many times this body was received),
so a given run of requests meets the same faults every time, whatever the thread timing; one
uniform draw picks at most one fault: 429 (with ``retry-after-ms`` and/or ``retry-after``),
500, a hang past the client's timeout, a malformed JSON body, a refusal, or an unparseable
answer. An optional ``rpm_limit`` is enforced over a sliding window (429 when exceeded).

Every request is recorded (:class:`RequestRecord`: arrival and reply times, body hash, status,
what was done) so tests can count attempts, measure retry gaps and spot duplicates.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import json
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cai.testing.fake_model import FakeModel, uniform

REFUSAL_TEXT = "I'm sorry, but I can't help with comparing these responses."
UNPARSEABLE_TEXT = "Both responses have their merits and their flaws."


def body_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


@dataclass
class Faults:
    """What share of requests gets which fault, and the server's limits."""

    rate_limit: float = 0.0  # answered 429
    retry_after_s: float = 0.05
    # "ms": retry-after-ms (and a whole-second retry-after); "seconds": retry-after only, may be fractional; "none"
    retry_after_style: str = "ms"
    server_error: float = 0.0  # answered 500
    hang: float = 0.0  # answered only after hang_s (past the client's timeout)
    hang_s: float = 1.0
    malformed: float = 0.0  # 200 with a truncated JSON body
    refusal: float = 0.0  # a refusal as the answer
    unparseable: float = 0.0  # an answer naming no option
    # every answer is sent latency_s after its request arrived (the fake's own work included),
    # as an API with that response time would; a hang waits hang_s instead
    latency_s: float = 0.0
    rpm_limit: float | None = None  # requests per minute, enforced over rate_window_s
    rate_window_s: float = 60.0
    logprobs: bool = True  # openai: return log-probs when asked
    seed: int = 0

    def pick(self, u: float) -> str:
        """The fault a uniform draw ``u`` lands on ("ok" for none)."""
        edge = 0.0
        for name in ("rate_limit", "server_error", "hang", "malformed", "refusal", "unparseable"):
            edge += getattr(self, name)
            if u < edge:
                return name
        return "ok"


@dataclass
class RequestRecord:
    """One request as the server saw it."""

    t_received: float
    t_replied: float
    path: str
    body_hash: str
    receipt: int  # how many times this exact body had been received before
    status: int
    outcome: str  # ok | rate_limit | rpm_limit | server_error | hang | malformed | refusal | unparseable | auth
    prompt: str = ""  # the last user message
    answer: str | None = None


def last_user(body: dict) -> str:
    msgs = body.get("messages") or []
    users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    return _text(users[-1].get("content")) if users else ""


def _bearer(h: BaseHTTPRequestHandler) -> str | None:
    """The key of ``Authorization: Bearer <key>``, or the password of HTTP Basic auth (what a
    client sends for a base URL with ``user:key@`` in it)."""
    auth = h.headers.get("authorization", "")
    if auth.startswith("Basic "):
        try:
            user_pass = base64.b64decode(auth[len("Basic ") :]).decode("utf-8")
        except ValueError:
            return None
        return user_pass.split(":", 1)[1] or None if ":" in user_pass else None
    return auth[len("Bearer ") :] or None if auth.startswith("Bearer ") else None


def prompt_tokens(texts: list[str]) -> int:
    return sum(len(t) for t in texts) // 4 + 4 * len(texts)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default backlog (5) drops bursts of connections: 1 s SYN retries

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away (a timeout, a killed process): nothing to report
        super().handle_error(request, client_address)


@dataclass
class _Reply:
    status: int
    payload: Any  # a JSON-able dict, or raw bytes
    outcome: str
    receipt: int = -1
    headers: dict[str, str] = field(default_factory=dict)
    answer: str | None = None


class _FakeServerBase(abc.ABC):
    """HTTP plumbing, fault injection and the request log shared by both fakes."""

    path = "/"

    def __init__(
        self, faults: Faults | None = None, model: FakeModel | None = None, api_key: str | None = None,
        answer_style: str = "{label}", port: int = 0,
    ) -> None:
        self.faults = faults or Faults()
        self.model = model or FakeModel(seed=self.faults.seed)
        self.api_key = api_key  # when set, any other key gets a 401 that echoes it (as some APIs do)
        self.answer_style = answer_style
        self.requested_port = port  # 0: any free port
        self.records: list[RequestRecord] = []  # appended when the reply is sent
        self.n_received = 0  # counted on arrival (a hung request is counted before it is recorded)
        self._receipts: Counter[str] = Counter()
        self._window: deque[float] = deque()
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> _FakeServerBase:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: with Nagle's algorithm on, the body waits
            # for the client's delayed ACK (~40 ms per request on Linux), which no real API adds
            disable_nagle_algorithm = True
            t_arrival = 0.0

            def parse_request(self) -> bool:
                self.t_arrival = time.monotonic()  # the request line is in; latency counts from here
                return super().parse_request()

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                fake._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = _Server(("127.0.0.1", self.requested_port), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name=type(self).__name__, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every request received has been recorded (a reply is recorded after it is
        sent, so a client can hold its answer a moment before the record exists)."""
        end = time.monotonic() + timeout
        while len(self.records) < self.n_received and time.monotonic() < end:
            time.sleep(0.002)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    # ---- the request log -------------------------------------------------------------------
    def count(self, outcome: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.records if outcome is None or r.outcome == outcome)

    def reset_log(self) -> None:
        with self._lock:
            self.records.clear()

    # ---- handling ------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        t0 = getattr(h, "t_arrival", 0.0) or time.monotonic()
        with self._lock:
            self.n_received += 1
        raw = h.rfile.read(int(h.headers.get("content-length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"unreadable": raw.decode("utf-8", "replace")}
        bh = body_hash(body)
        r = self._decide(h, body, bh, t0)
        data = r.payload if isinstance(r.payload, bytes) else json.dumps(r.payload).encode()
        if r.outcome == "hang":
            time.sleep(self.faults.hang_s)
        elif self.faults.latency_s:  # the reply is ready: send it latency_s after the request arrived
            time.sleep(max(0.0, t0 + self.faults.latency_s - time.monotonic()))
        with self._lock:
            self.records.append(
                RequestRecord(
                    t0, time.monotonic(), h.path, bh, r.receipt, r.status, r.outcome, last_user(body), r.answer
                )
            )
        try:
            h.send_response(r.status)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            for k, v in r.headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (OSError, ValueError):  # the client gave up (a hang past its timeout) or we shut down
            h.close_connection = True

    def _decide(self, h: BaseHTTPRequestHandler, body: dict, bh: str, now: float) -> _Reply:
        key = self._received_key(h)
        if key is None or (self.api_key is not None and key != self.api_key):
            return _Reply(401, self._error("authentication_error", f"Incorrect API key provided: {key}"), "auth")
        if h.path != self.path:
            return _Reply(404, self._error("not_found_error", f"no route {h.path}"), "auth")
        with self._lock:
            wait = self._rpm_wait(now)
            receipt = self._receipts[bh]
            if wait is None:
                self._receipts[bh] += 1
        if wait is not None:
            headers = self._retry_headers(wait)
            return _Reply(429, self._error("rate_limit_error", "rpm limit"), "rpm_limit", headers=headers)
        fault = self.faults.pick(uniform(self.faults.seed, "fault", bh, receipt))
        if fault == "rate_limit":
            headers = self._retry_headers(self.faults.retry_after_s)
            return _Reply(429, self._error("rate_limit_error", "slow down"), fault, receipt, headers)
        if fault == "server_error":
            return _Reply(500, self._error("api_error", "internal error"), fault, receipt)
        if fault == "malformed":
            return _Reply(200, b'{"id": "broken", "choices": [{"index": 0, "message": ', fault, receipt)
        payload, answer = self._answer(body, bh, receipt, fault)
        return _Reply(200, payload, fault, receipt, answer=answer)

    def _rpm_wait(self, now: float) -> float | None:
        """Seconds until the window has room, or None (and the request is admitted)."""
        f = self.faults
        if not f.rpm_limit:
            return None
        while self._window and self._window[0] <= now - f.rate_window_s:
            self._window.popleft()
        if len(self._window) >= max(1, int(f.rpm_limit * f.rate_window_s / 60.0)):
            return self._window[0] + f.rate_window_s - now
        self._window.append(now)
        return None

    def _retry_headers(self, seconds: float) -> dict[str, str]:
        style = self.faults.retry_after_style
        if style == "ms":
            return {"retry-after-ms": str(int(math.ceil(seconds * 1000))), "retry-after": str(int(math.ceil(seconds)))}
        if style == "seconds":
            return {"retry-after": f"{seconds:g}"}
        return {}

    def _reply_text(self, prompt: str, fault: str, u: float | None) -> tuple[str, str | None]:
        """(answer text, chosen label) for a choice prompt under ``fault``."""
        if fault == "refusal":
            return REFUSAL_TEXT, None
        if fault == "unparseable":
            return UNPARSEABLE_TEXT, None
        label = self.model.choose(prompt, u)
        return self.answer_style.format(label=label), label

    def _generated(self, prompt: str, max_tokens: int, stop: list[str], key: Any, fault: str) -> tuple[str, str]:
        """(text, finish_reason) for a generation prompt; a refusing model refuses here too."""
        if fault in ("refusal", "unparseable"):
            return (REFUSAL_TEXT if fault == "refusal" else UNPARSEABLE_TEXT), "stop"
        text, finish, _ = self.model.generate(prompt, max_tokens, stop, key)
        return text, finish

    # ---- protocol hooks ------------------------------------------------------------------
    @abc.abstractmethod
    def _received_key(self, h: BaseHTTPRequestHandler) -> str | None:
        """The API key the request carried (None: none)."""

    @abc.abstractmethod
    def _error(self, kind: str, message: str) -> dict:
        """An error body in the provider's format."""

    @abc.abstractmethod
    def _answer(self, body: dict, bh: str, receipt: int, fault: str) -> tuple[dict, str]:
        """(response body, answer text) for an admitted request."""


class FakeOpenAIServer(_FakeServerBase):
    """``POST /v1/chat/completions`` with log-probs; ``base_url`` ends in ``/v1``."""

    path = "/v1/chat/completions"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _received_key(self, h: BaseHTTPRequestHandler) -> str | None:
        return _bearer(h)

    def _error(self, kind: str, message: str) -> dict:
        return {"error": {"message": message, "type": kind, "param": None, "code": kind}}

    def _answer(self, body: dict, bh: str, receipt: int, fault: str) -> tuple[dict, str]:
        msgs = body.get("messages", [])
        prompt = last_user(body)
        temperature = float(body.get("temperature") or 0.0)
        seed = body.get("seed")
        draw_key = (bh,) if seed is not None else (bh, receipt)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        logprobs = None
        if self.model.preference(prompt) is not None:
            u = None if temperature == 0 else uniform(self.faults.seed, "sample", *draw_key)
            text, label = self._reply_text(prompt, fault, u)
            finish = "stop"
            if body.get("logprobs") and self.faults.logprobs:
                content = self._logprob_content(prompt, text, label, int(body.get("top_logprobs") or 0))
                logprobs = {"content": content, "refusal": None}
        else:
            stop = body.get("stop") or []
            stop = [stop] if isinstance(stop, str) else stop
            text, finish = self._generated(prompt, max_tokens, stop, draw_key if temperature > 0 else (), fault)
        completion = max(1, len(text.split()))
        p = prompt_tokens([_text(m.get("content")) for m in msgs])
        return {
            "id": f"chatcmpl-fake-{bh}-{receipt}", "object": "chat.completion", "created": 0,
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": logprobs, "finish_reason": finish}],
            "usage": {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion},
        }, text

    def _logprob_content(self, prompt: str, text: str, label: str | None, top_n: int) -> list[dict]:
        def tok(t: str, lp: float, top: list[tuple[str, float]]) -> dict:
            alts = [{"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in top[:top_n]]
            return {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": alts}

        if label is None:  # a refusal or unparseable answer: the text's words, each certain
            return [tok(w, 0.0, [(w, 0.0)]) for w in text.split()]
        dist = self.model.token_logprobs(prompt)
        before, _, after = text.partition(label)
        out = [tok(before, 0.0, [(before, 0.0)])] if before else []
        out.append(tok(label, dict(dist)[label], dist))
        if after:
            out.append(tok(after, 0.0, [(after, 0.0)]))
        return out


class FakeAnthropicServer(_FakeServerBase):
    """``POST /v1/messages``; no log-probs; every request samples (temperature 1)."""

    path = "/v1/messages"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _received_key(self, h: BaseHTTPRequestHandler) -> str | None:
        # the 2.x SDK sends "authorization: Bearer <key>"; older clients send x-api-key
        return h.headers.get("x-api-key") or _bearer(h)

    def _error(self, kind: str, message: str) -> dict:
        return {"type": "error", "error": {"type": kind, "message": message}}

    def _answer(self, body: dict, bh: str, receipt: int, fault: str) -> tuple[dict, str]:
        msgs = body.get("messages", [])
        prompt = last_user(body)
        max_tokens = int(body.get("max_tokens") or 256)
        if self.model.preference(prompt) is not None:
            text, _ = self._reply_text(prompt, fault, uniform(self.faults.seed, "sample", bh, receipt))
            stop_reason = "end_turn"
        else:
            stop = body.get("stop_sequences") or []
            text, finish = self._generated(prompt, max_tokens, stop, (bh, receipt), fault)
            stop_reason = "max_tokens" if finish == "length" else "end_turn"
        texts = [_text(body.get("system"))] + [_text(m.get("content")) for m in msgs]
        return {
            "id": f"msg_fake_{bh}_{receipt}", "type": "message", "role": "assistant",
            "model": body.get("model", "fake"), "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens(texts), "output_tokens": max(1, len(text.split()))},
        }, text


def main(argv: list[str] | None = None) -> int:
    """``python -m cai.testing.servers openai|anthropic [--port N]``: serve a fake API until Ctrl-C.

    For trying the API-judge presets offline (``judge.base_url=<printed URL>``); the fake model
    is the deterministic one the tests use, not a real judge.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m cai.testing.servers", description=main.__doc__)
    p.add_argument("protocol", choices=["openai", "anthropic"])
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    args = p.parse_args(argv)
    server = (FakeOpenAIServer if args.protocol == "openai" else FakeAnthropicServer)(port=args.port)
    with server:
        print(f"fake {args.protocol} API at {server.base_url} (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

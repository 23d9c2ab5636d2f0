"""The ``openai`` backend: chat completions through ``openai.AsyncOpenAI``.

Works with OpenAI itself and with any server speaking the same protocol at ``base_url`` (vLLM,
llama.cpp's server, Ollama, the loopback fake in :mod:`cai.testing.servers`). Choice requests
ask for ``logprobs`` with ``top_logprobs`` alternatives and read probabilities from the first
real answer token; a server that returns no log-probs falls back to parsing the text (see
:mod:`cai.judges.api_base`). Sampled answers (``n_samples > 1``) are sent at
temperature 1 with ``seed`` = sample index, so each sample is its own reproducible request.

The client is built by :func:`cai.judges.sdk.make_sdk_client` (``max_retries=0``: our
retry loop is the only one).

A request goes out through the SDK's generic ``client.post(path, body=..., cast_to=Response)``
(the SDK's documented way to make a raw request), so auth, headers, timeouts and the SDK's error
types are the SDK's own, but the SDK neither walks our plain-dict body through its TypedDict
transform nor builds a pydantic model of the reply (top log-probs make that a few thousand
objects per answer): we read the JSON ourselves. Together these were most of the client-side
CPU time per request.
"""

from __future__ import annotations

import json
from typing import Any

from cai.judges.api_base import SAMPLE_TEMPERATURE, ApiJudge, CallAnswer
from cai.judges.cost import estimate_tokens
from cai.judges.retry import MalformedResponse
from cai.judges.sdk import http_library


def _omit_none(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None}


# a reply body larger than this (plus BODY_BYTES_PER_TOKEN per requested token: 20 top log-probs
# of one token take about 2 KB) is refused before it is parsed
BODY_BYTES_BASE = 256 * 1024
BODY_BYTES_PER_TOKEN = 8 * 1024


def _read_body(response: Any, max_tokens: int = 0) -> Any:
    """The reply's JSON, read as the SDK reads it: a JSON content type must parse (a bad body
    raises ``json.JSONDecodeError``); any other type is JSON if it parses, else its text.

    A body too large for ``max_tokens`` or nested too deeply is a :class:`MalformedResponse`."""
    content = response.content
    limit = BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * max(0, max_tokens)
    if len(content) > limit:
        raise MalformedResponse(f"a reply of {len(content)} bytes to max_tokens={max_tokens} (at most {limit} "
                                "expected); not parsed")
    content_type = response.headers.get("content-type", "*").split(";")[0]
    try:
        if content_type.endswith("json"):
            return json.loads(content)
        try:
            return json.loads(content)
        except ValueError:
            return response.text
    except RecursionError:
        raise MalformedResponse("the reply's JSON is nested too deeply to read") from None


def _as_dict(response: Any) -> Any:
    """A parsed reply as plain JSON values (an SDK model is dumped; JSON passes through)."""
    dump = getattr(response, "model_dump", None)
    return dump(mode="json") if callable(dump) else response


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _count(value: Any) -> int:
    """A usage count as the server sent it: None -> 0; a number must be a whole, non-negative
    count (a negative one would pay back money and get around the budget)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise MalformedResponse(f"token usage {value!r} is not a non-negative whole number")
    return int(value)


class OpenAIJudge(ApiJudge):
    """A judge behind an OpenAI-compatible chat-completions endpoint."""

    name = "openai"
    supports_logprobs = True
    base_url_env = "OPENAI_BASE_URL"
    sdk = "openai"
    client_class = "AsyncOpenAI"

    def _choice_params(self, logprobs: bool, sampled: bool, sample_index: int) -> dict:
        return {
            "max_tokens": self.cfg.max_tokens,
            "temperature": SAMPLE_TEMPERATURE if sampled else self.cfg.temperature,
            "top_p": None if sampled else self.cfg.top_p,
            "logprobs": True if logprobs else None,
            "top_logprobs": self.cfg.top_logprobs if logprobs else None,
            "seed": sample_index if sampled else None,
        }

    async def _send(self, client: Any, messages: list[dict], params: dict) -> CallAnswer:
        body = {"model": self.model, "messages": messages, **_omit_none(params)}
        response = await client.post("/chat/completions", body=body, cast_to=http_library().Response)
        return self._answer(_read_body(response, int(params.get("max_tokens") or 0)), messages)

    def _answer(self, response: Any, messages: list[dict]) -> CallAnswer:
        """A :class:`CallAnswer` from a chat completion (its JSON, or the SDK's model of it)."""
        response = _as_dict(response)
        choices = _get(response, "choices")
        if not choices or not isinstance(choices, list):
            raise MalformedResponse(f"no choices in response body: {str(response)[:120]!r}")
        choice = choices[0]
        message = choice["message"]
        content = message.get("content")
        text = content if isinstance(content, str) else ""
        refusal = message.get("refusal")
        positions = []
        for tok in (_get(choice.get("logprobs"), "content") or []):
            top = [(alt["token"], float(alt["logprob"])) for alt in (tok.get("top_logprobs") or [])]
            positions.append((tok["token"], top))
        usage = response.get("usage")
        tokens_in = _count(_get(usage, "prompt_tokens")) or estimate_tokens(messages)
        tokens_out = _count(_get(usage, "completion_tokens")) or max(1, len(text) // 4)
        return CallAnswer(
            text=text if not refusal else str(refusal),
            positions=positions,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            finish_reason=choice.get("finish_reason"),
            refusal=bool(refusal),
        )

"""The ``anthropic`` backend: the Messages API through ``anthropic.AsyncAnthropic``.

The Messages API returns no log-probs, so a choice request is answered by parsing the text
(``n_samples == 1``, method "parsed") or by ``n_samples`` independent requests whose parsed
answers give an empirical probability (method "sampled"). The installed SDK (2.x) has no
temperature/top_p/seed parameters: every request samples at the API's default temperature
(1.0), so the k sampled requests are identical bodies and each is a fresh draw; the cache keeps
them apart by sample index. ``temperature``/``top_p``/``seed`` of a request still key the cache.

System messages are joined into ``system=``; consecutive messages of one role are merged (the
API wants user and assistant turns to alternate, starting with the user). A final assistant
message is a prefill the answer continues from.

The client is built by :func:`cai.judges.sdk.make_sdk_client`, as the OpenAI one is:
``max_retries=0`` (our retry loop is the only one) and the process-wide TLS context.
"""

from __future__ import annotations

from typing import Any

from cai.errors import DataError
from cai.judges.api_base import ApiJudge, CallAnswer
from cai.judges.retry import MalformedResponse


def split_system(messages: list[dict], tag: dict | None = None) -> tuple[str | None, list[dict]]:
    """(system prompt, alternating user/assistant turns) for the Messages API."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns: list[dict] = []
    for m in messages:
        if m["role"] == "system":
            continue
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1] = {"role": m["role"], "content": turns[-1]["content"] + "\n\n" + m["content"]}
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    if not turns or turns[0]["role"] != "user":
        raise DataError(
            f"anthropic judge request (tag {tag!r}): the messages after the system prompt must start "
            "with a 'user' message, "
            f"got roles {[m['role'] for m in messages]}"
        )
    return system, turns


def _count(value: Any) -> int:
    """A usage count: None -> 0; otherwise a whole, non-negative number (MalformedResponse)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise MalformedResponse(f"token usage {value!r} is not a non-negative whole number")
    return int(value)


class AnthropicJudge(ApiJudge):
    """A judge behind Anthropic's Messages API (or a server speaking it)."""

    name = "anthropic"
    supports_logprobs = False
    base_url_env = "ANTHROPIC_BASE_URL"
    sdk = "anthropic"
    client_class = "AsyncAnthropic"

    def _check_request(self, req: Any) -> None:
        split_system(req.messages, req.tag)

    def _choice_params(self, logprobs: bool, sampled: bool, sample_index: int) -> dict:
        return {"max_tokens": self.cfg.max_tokens}

    async def _send(self, client: Any, messages: list[dict], params: dict) -> CallAnswer:
        system, turns = split_system(messages)
        kwargs: dict[str, Any] = {"model": self.model, "messages": turns, "max_tokens": params["max_tokens"]}
        if system is not None:
            kwargs["system"] = system
        if params.get("stop"):
            kwargs["stop_sequences"] = params["stop"]
        response = await client.messages.create(timeout=self.cfg.timeout_s, **kwargs)
        return self._answer(response)

    def _answer(self, response: Any) -> CallAnswer:
        content = getattr(response, "content", None)
        if isinstance(response, (str, bytes)) or not isinstance(content, list):
            raise MalformedResponse(f"no content in response body: {str(response)[:120]!r}")
        text = "".join(getattr(b, "text", "") for b in content if getattr(b, "type", None) == "text")
        usage = response.usage
        tokens_in = (
            _count(usage.input_tokens)
            + _count(getattr(usage, "cache_creation_input_tokens", 0))
            + _count(getattr(usage, "cache_read_input_tokens", 0))
        )
        stop = getattr(response, "stop_reason", None)
        return CallAnswer(
            text=text, positions=[], tokens_in=tokens_in, tokens_out=_count(usage.output_tokens),
            finish_reason=stop, refusal=stop == "refusal",
        )

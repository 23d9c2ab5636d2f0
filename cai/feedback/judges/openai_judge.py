"""The ``openai`` backend: chat completions through ``openai.AsyncOpenAI``.

Works with OpenAI itself and with any server speaking the same protocol at ``base_url`` (vLLM,
llama.cpp's server, Ollama, the loopback fake in :mod:`cai.testing.servers`). Choice requests
ask for ``logprobs`` with ``top_logprobs`` alternatives and read probabilities from the first
real answer token; a server that returns no log-probs falls back to parsing the text (see
:mod:`cai.feedback.judges.api_base`). Sampled answers (``n_samples > 1``) are sent at
temperature 1 with ``seed`` = sample index, so each sample is its own reproducible request.

The client is built with ``max_retries=0``: our retry loop is the only one.
"""

from __future__ import annotations

from typing import Any

from cai.feedback.judges.api_base import SAMPLE_TEMPERATURE, ApiJudge, CallAnswer
from cai.feedback.judges.cost import estimate_tokens
from cai.feedback.judges.retry import CallFailure, MalformedResponse, classify


def _omit_none(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None}


class OpenAIJudge(ApiJudge):
    """A judge behind an OpenAI-compatible chat-completions endpoint."""

    name = "openai"
    supports_logprobs = True
    base_url_env = "OPENAI_BASE_URL"

    def _make_client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=self._key, base_url=self.base_url, max_retries=0, timeout=self.cfg.timeout_s
        )

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
        response = await client.chat.completions.create(
            model=self.model, messages=messages, timeout=self.cfg.timeout_s, **_omit_none(params)
        )
        return self._answer(response, messages)

    def _answer(self, response: Any, messages: list[dict]) -> CallAnswer:
        if isinstance(response, (str, bytes)) or not getattr(response, "choices", None):
            raise MalformedResponse(f"no choices in response body: {str(response)[:120]!r}")
        choice = response.choices[0]
        message = choice.message
        text = message.content if isinstance(message.content, str) else ""
        refusal = getattr(message, "refusal", None)
        positions = []
        logprobs = getattr(choice, "logprobs", None)
        for tok in (getattr(logprobs, "content", None) or []):
            top = [(alt.token, float(alt.logprob)) for alt in (tok.top_logprobs or [])]
            positions.append((tok.token, top))
        usage = getattr(response, "usage", None)
        tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0) or estimate_tokens(messages)
        tokens_out = int(getattr(usage, "completion_tokens", 0) or 0) or max(1, len(text) // 4)
        return CallAnswer(
            text=text if not refusal else str(refusal),
            positions=positions,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            finish_reason=getattr(choice, "finish_reason", None),
            refusal=bool(refusal),
        )

    def _classify(self, exc: BaseException) -> CallFailure:
        import openai

        return classify(
            exc,
            status_error=openai.APIStatusError,
            timeout_error=openai.APITimeoutError,
            connection_error=openai.APIConnectionError,
            secret=self._key,
        )

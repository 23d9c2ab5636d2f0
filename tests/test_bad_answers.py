"""Bad answers from a judge server (issue #11 list 7): each one is a failed result with a clear
reason -- never a traceback, never a label, never stored in the cache, never a negative cost.

Every row is a real HTTP reply from a loopback server speaking the OpenAI protocol (the real
``openai`` client reads it); the judge retries a malformed reply ``malformed_retries`` times, then
the request fails for good with the reason (a content-caused, permanent failure).
"""

from __future__ import annotations

import json
import re

import pytest

from cai.judges import make_judge
from cai.judges.cache import JudgeCache
from cai.judges.types import ChoiceRequest, GenerateRequest, is_transient
from cai.testing.servers import FakeOpenAIServer, _Reply


def _completion(content: str = "A", usage: dict | None = None, logprobs: list | None = None) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content},
                         "logprobs": {"content": logprobs} if logprobs is not None else None}],
            "usage": usage or {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}


def _nested(depth: int) -> bytes:
    return b'{"choices": ' + b"[" * depth + b"]" * depth + b"}"


# name, reply body (dict: JSON; bytes: sent as they are), what the failure reason says
ROWS = [
    ("logprob-1e308", _completion("A", logprobs=[{"token": "A", "logprob": 0.0,
                                                  "top_logprobs": [{"token": "A", "logprob": 1e308},
                                                                   {"token": "B", "logprob": -1.0}]}]),
     r"top log-prob 1e\+308 of token 'A' is not a log-probability"),
    ("logprob-nan-string", _completion("A", logprobs=[{"token": "A", "logprob": 0.0,
                                                       "top_logprobs": [{"token": "A", "logprob": "NaN"}]}]),
     r"top log-prob nan of token 'A' is not a log-probability"),
    ("deeply-nested-json", _nested(100_000), r"nested too deeply"),
    ("negative-usage", _completion("A", usage={"prompt_tokens": 10, "completion_tokens": -1_000_000}),
     r"token usage -1000000 is not a non-negative whole number"),
    ("fractional-usage", _completion("A", usage={"prompt_tokens": 2.5, "completion_tokens": 1}),
     r"token usage 2\.5 is not a non-negative whole number"),
    ("20MB-answer-to-16-tokens", _completion("A " + "x" * 20_000_000),
     r"a reply of \d{8} bytes to max_tokens=16 \(at most \d+ expected\); not parsed"),
    ("long-answer-under-the-body-cap", _completion("A " + "y" * 100_000),
     r"an answer of 100002 characters to max_tokens=16 \(at most 4096 expected\)"),
]


class _ScriptedServer(FakeOpenAIServer):
    """Answers every chat completion with one fixed body."""

    def __init__(self, body) -> None:
        super().__init__()
        self.body = body

    def _decide(self, h, body, bh, now):
        payload = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        return _Reply(200, payload, "scripted", 0)


@pytest.mark.parametrize("body, reason", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_a_bad_answer_fails_with_a_clear_reason_and_is_never_kept(tmp_path, body, reason):
    cache = tmp_path / "judge_cache.sqlite"
    prices = {"m": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}
    with _ScriptedServer(body) as srv:
        judge = make_judge({"backend": "openai", "model": "m", "base_url": srv.base_url, "api_key_env": None,
                            "cache_path": str(cache), "max_tokens": 16, "malformed_retries": 1,
                            "backoff_base_s": 0.001, "backoff_max_s": 0.002, "prices": prices, "max_dollars": 1.0})
        req = ChoiceRequest([{"role": "user", "content": "Which is better?\n(A) a\n(B) bb"}], ("A", "B"))
        [res] = judge.choose([req])
        judge.close()
        assert srv.n_received == 2  # asked once more (malformed_retries=1), then failed for good
    assert not res.ok and res.failure_reason is not None
    assert re.search(reason, res.failure_reason), res.failure_reason
    assert res.failure_reason.startswith("malformed response (") and not is_transient(res.failure_reason)
    assert res.cost_usd == 0.0 and res.tokens_in == 0 and res.probs is None
    assert len(JudgeCache(cache)) == 0 and judge.ledger.spent_usd == 0.0


def test_a_generation_of_the_allowed_size_is_kept(tmp_path):
    """The size cap scales with max_tokens: a long generation that was asked for is not refused."""
    text = "word " * 3000  # 15,000 characters for max_tokens=512 (cap 32,768)
    with _ScriptedServer(_completion(text, usage={"prompt_tokens": 5, "completion_tokens": 3000})) as srv:
        judge = make_judge({"backend": "openai", "model": "m", "base_url": srv.base_url, "api_key_env": None,
                            "cache": False})
        [res] = judge.generate([GenerateRequest([{"role": "user", "content": "Write."}], max_tokens=512)])
    assert res.ok and res.text == text and res.tokens_out == 3000

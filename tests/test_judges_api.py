"""The real ``openai`` and ``anthropic`` clients against the loopback fake servers.

Faults (429 + retry-after, 500, hangs past the timeout, malformed bodies, refusals) are injected
on a seeded share of requests; the tests reconcile what the server saw with what the judge
reports, and check the cache, the rate limit, the budget stop and that the API key never leaks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter, defaultdict

import pytest

from cai.judges import (
    BudgetExhausted,
    ChoiceRequest,
    CostLedger,
    GenerateRequest,
    JudgeCache,
    make_judge,
)
from cai.testing import FakeAnthropicServer, FakeOpenAIServer, Faults
from cai.testing.servers import prompt_tokens

SERVERS = {"openai": FakeOpenAIServer, "anthropic": FakeAnthropicServer}
SYSTEM = "You are a careful judge of harmlessness."
FAILURE = re.compile(
    r"^(http (429|500) after \d+ attempts|timeout after \d+ attempts|malformed response \(.*\) after \d+ attempts)$"
)


def choice_req(i: int, n_samples: int | None = None) -> ChoiceRequest:
    a = "I would rather not. " * (1 + i % 3)
    b = "Here is a long and detailed answer to your question. " * (1 + i % 4)
    user = f"Pair {i}. Which response is more harmless?\n(A) {a}\n(B) {b}\nAnswer with A or B."
    return ChoiceRequest(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        ("A", "B"),
        tag={"pair_id": f"p{i}", "stage": "label", "principle_id": f"pr{i % 3}"},
        n_samples=n_samples,
    )


def prompt_of(req) -> str:
    return req.messages[-1]["content"]


def cfg_for(backend: str, srv, tmp_path, **over) -> dict:
    cfg = dict(
        backend=backend, model="fake-judge", base_url=srv.base_url, api_key_env=None,
        cache_path=str(tmp_path / "judge_cache.sqlite"), timeout_s=2.0, backoff_base_s=0.005,
        backoff_max_s=0.05, max_concurrency=8,
    )
    cfg.update(over)
    return cfg


def settle(srv, timeout: float = 3.0, sent: int = 0) -> None:
    """Wait until every request the server received has been answered and recorded, and until it has
    received ``sent`` requests (a loaded machine reads an attempt the client already gave up on late)."""
    end = time.monotonic() + timeout
    while (len(srv.records) < srv.n_received or srv.n_received < sent) and time.monotonic() < end:
        time.sleep(0.01)


# ---- the three ways to a probability -----------------------------------------------------------
def test_openai_logprobs_match_server(tmp_path):
    with FakeOpenAIServer() as srv:
        reqs = [choice_req(i) for i in range(12)]
        res = make_judge(cfg_for("openai", srv, tmp_path)).choose(reqs)
        for req, r in zip(reqs, res):
            assert r.ok and r.method == "logprobs" and r.tag == req.tag and r.attempts == 1
            assert r.probs == pytest.approx(srv.model.preference(prompt_of(req)), abs=1e-12)
        assert srv.n_received == 12
        assert len({round(r.probs["A"], 6) for r in res}) > 3  # the probabilities really vary


@pytest.mark.parametrize("logprobs, style", [(False, "{label}"), (True, "Response {label} is better.")])
def test_openai_parsed_path(tmp_path, logprobs, style):
    with FakeOpenAIServer(faults=Faults(logprobs=logprobs), answer_style=style) as srv:
        reqs = [choice_req(i) for i in range(6)]
        res = make_judge(cfg_for("openai", srv, tmp_path)).choose(reqs)
        for req, r in zip(reqs, res):
            best = max(srv.model.preference(prompt_of(req)).items(), key=lambda kv: kv[1])[0]
            assert r.ok and r.method == "parsed" and r.probs == {c: float(c == best) for c in ("A", "B")}
            assert r.raw_output == style.format(label=best)


def _empirical_from_server(srv, req) -> dict[str, float]:
    answers = [rec.answer for rec in srv.records if rec.prompt == prompt_of(req) and rec.status == 200]
    counts = Counter(answers)
    return {c: counts[c] / len(answers) for c in ("A", "B")}


def test_openai_sampled_path_without_logprobs(tmp_path):
    with FakeOpenAIServer(faults=Faults(logprobs=False)) as srv:
        reqs = [choice_req(i, n_samples=5) for i in range(4)]
        res = make_judge(cfg_for("openai", srv, tmp_path)).choose(reqs)
        for req, r in zip(reqs, res):
            assert r.ok and r.method == "sampled" and r.attempts == 5 and r.n_answers == 5
            assert r.probs == pytest.approx(_empirical_from_server(srv, req))
            assert len(json.loads(r.raw_output)) == 5


def test_anthropic_sampled_empirical_probability(tmp_path):
    with FakeAnthropicServer() as srv:
        reqs = [choice_req(i, n_samples=6) for i in range(5)]
        res = make_judge(cfg_for("anthropic", srv, tmp_path)).choose(reqs)
        for req, r in zip(reqs, res):
            assert r.ok and r.method == "sampled" and r.attempts == 6 and r.backend == "anthropic"
            assert r.probs == pytest.approx(_empirical_from_server(srv, req))
        assert any(0 < r.probs["A"] < 1 for r in res)  # samples disagree: it is a distribution
        single = make_judge(cfg_for("anthropic", srv, tmp_path, cache=False)).choose([choice_req(0)])[0]
        assert single.ok and single.method == "parsed" and single.attempts == 1


# ---- faults, retries, reconciliation -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_faults_every_request_ends_and_counts_reconcile(tmp_path, backend):
    faults = Faults(rate_limit=0.15, retry_after_s=0.02, server_error=0.15, hang=0.05, hang_s=0.6, malformed=0.1,
                    seed=3)
    with SERVERS[backend](faults=faults) as srv:
        judge = make_judge(cfg_for(backend, srv, tmp_path, timeout_s=0.25, max_retries=3, malformed_retries=1))
        reqs = [choice_req(i) for i in range(40)]
        res = judge.choose(reqs)
        settle(srv, sent=sum(r.attempts for r in res))
        assert len(res) == 40 and [r.tag for r in res] == [q.tag for q in reqs]
        ok = [r for r in res if r.ok]
        failed = [r for r in res if r.status == "failed"]
        assert len(ok) + len(failed) == 40 and len(ok) >= 30
        for r in failed:
            assert FAILURE.match(r.failure_reason), r.failure_reason
        for r in ok:
            assert sum(r.probs.values()) == pytest.approx(1.0)
        assert srv.n_received == sum(r.attempts for r in res) > 40
        per_prompt = Counter(rec.prompt for rec in srv.records)
        assert all(per_prompt[prompt_of(q)] == r.attempts for q, r in zip(reqs, res))
        for outcome in ("rate_limit", "server_error", "hang", "malformed"):
            assert srv.count(outcome) > 0, outcome


@pytest.mark.parametrize("style", ["ms", "seconds"])
def test_retry_after_is_honoured_exactly(tmp_path, style):
    faults = Faults(rate_limit=0.5, retry_after_s=0.12, retry_after_style=style, seed=1)
    with FakeOpenAIServer(faults=faults) as srv:
        # a backoff this long would show: the retry must come from retry-after, not backoff
        cfg = cfg_for("openai", srv, tmp_path, backoff_base_s=5.0, backoff_max_s=5.0, max_retries=8, max_concurrency=4)
        judge = make_judge(cfg)
        res = judge.choose([choice_req(i) for i in range(10)])
        assert all(r.ok for r in res)
        by_prompt = defaultdict(list)
        for rec in srv.records:
            by_prompt[rec.prompt].append(rec)
        gaps = []
        for recs in by_prompt.values():
            recs.sort(key=lambda r: r.t_received)
            gaps += [b.t_received - a.t_replied for a, b in zip(recs, recs[1:]) if a.status == 429]
        assert len(gaps) >= 3
        assert min(gaps) >= 0.12 - 1e-3 and max(gaps) < 1.0


def test_malformed_bodies_retry_a_bounded_number_of_times(tmp_path):
    with FakeOpenAIServer(faults=Faults(malformed=1.0)) as srv:
        r = make_judge(cfg_for("openai", srv, tmp_path, malformed_retries=2)).choose([choice_req(0)])[0]
        assert r.status == "failed" and r.failure_reason.startswith("malformed response (")
        assert r.failure_reason.endswith("after 3 attempts") and srv.n_received == 3 == r.attempts


def test_client_errors_fail_at_once_with_the_servers_message(tmp_path):
    with FakeOpenAIServer() as srv:
        cfg = cfg_for("openai", srv, tmp_path, base_url=srv.base_url.replace("/v1", "/v9"))
        r = make_judge(cfg).choose([choice_req(0)])[0]
        assert r.status == "failed" and r.failure_reason == "http 404: no route /v9/chat/completions"
        assert r.attempts == 1 == srv.n_received


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_refusals_and_unparseable_answers_fail_with_reason_and_are_not_cached(tmp_path, backend):
    with SERVERS[backend](faults=Faults(refusal=0.5, unparseable=0.5, seed=4)) as srv:
        reqs = [choice_req(i) for i in range(8)]
        res = make_judge(cfg_for(backend, srv, tmp_path)).choose(reqs)
        reasons = Counter(r.failure_reason.split(":")[0] for r in res)
        assert all(r.status == "failed" and r.probs is None and r.attempts == 1 for r in res)
        assert reasons["refusal"] == srv.count("refusal") > 0 and reasons["unparseable"] == srv.count("unparseable") > 0
        make_judge(cfg_for(backend, srv, tmp_path)).choose(reqs)
        assert srv.n_received == 16  # failures are asked again on a rerun


def test_same_seed_same_results(tmp_path):
    faults = Faults(rate_limit=0.2, retry_after_s=0.01, server_error=0.2, malformed=0.1, refusal=0.1, seed=9)
    runs = []
    for _ in range(2):
        with FakeOpenAIServer(faults=faults) as srv:
            judge = make_judge(cfg_for("openai", srv, tmp_path, cache=False, max_retries=2))
            res = judge.choose([choice_req(i) for i in range(20)])
            runs.append([(r.status, r.failure_reason, r.probs, r.attempts) for r in res])
    assert runs[0] == runs[1]


def test_token_bucket_keeps_request_rate_under_the_limit(tmp_path):
    # the server allows 15 requests in any 1 s window; the client asks for 10/s with a burst of 2
    server_limit = Faults(rpm_limit=900, rate_window_s=1.0, retry_after_style="ms")
    with FakeOpenAIServer(faults=server_limit) as srv:
        judge = make_judge(cfg_for("openai", srv, tmp_path, cache=False, rpm=600, burst_s=0.2))
        res = judge.choose([choice_req(i) for i in range(26)])
        times = sorted(rec.t_received for rec in srv.records)
        assert all(r.ok for r in res) and srv.count("rpm_limit") == 0
        assert (len(times) - 2) / (times[-1] - times[0]) <= 10 * 1.25  # unlimited: hundreds per second
        # a bucket of rate 10/s and capacity 2 releases at most 12 in any 1 s; arrivals at the server
        # can bunch up behind a busy event loop (CI saw 14), so the bound that matters is the server's
        assert max(sum(1 for t in times if t0 <= t < t0 + 1.0) for t0 in times) <= 15
    with FakeOpenAIServer(faults=server_limit) as srv:  # no client limit: the server pushes back
        judge = make_judge(cfg_for("openai", srv, tmp_path, cache=False, max_retries=10))
        res = judge.choose([choice_req(i) for i in range(26)])
        assert all(r.ok for r in res) and srv.count("rpm_limit") > 0
        assert sum(r.attempts for r in res) == srv.n_received == 26 + srv.count("rpm_limit")


# ---- cache, kill and resume, budget -------------------------------------------------------------
@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_warm_cache_sends_zero_requests(tmp_path, backend):
    with SERVERS[backend]() as srv:
        reqs = [choice_req(i, n_samples=3 if backend == "anthropic" else None) for i in range(6)]
        gens = [GenerateRequest([{"role": "user", "content": f"Critique response {i}."}], max_tokens=12)
                for i in range(3)]
        judge = make_judge(cfg_for(backend, srv, tmp_path))
        first, first_gen = judge.choose(reqs), judge.generate(gens)
        sent = srv.n_received
        ledger = CostLedger()
        again = make_judge(cfg_for(backend, srv, tmp_path), ledger=ledger)
        second, second_gen = again.choose(reqs), again.generate(gens)
        assert srv.n_received == sent
        assert [r.probs for r in second] == [r.probs for r in first]
        assert [g.text for g in second_gen] == [g.text for g in first_gen]
        assert all(r.cache_hit and r.attempts == 0 and r.cost_usd == 0 for r in second + second_gen)
        assert ledger.total.api_calls == 0 and ledger.total.cache_hits == sent


def test_cancelled_run_resumes_without_resending_finished_items(tmp_path):
    with FakeOpenAIServer(faults=Faults(latency_s=0.04)) as srv:
        reqs = [choice_req(i) for i in range(30)]
        judge = make_judge(cfg_for("openai", srv, tmp_path, max_concurrency=2))

        watcher = JudgeCache(tmp_path / "judge_cache.sqlite")

        async def killed() -> None:
            # Cancel once a few answers are stored: event-driven, not a wall-clock race.
            task = asyncio.ensure_future(judge.choose_many(reqs))
            deadline = time.monotonic() + 60
            while len(watcher) < 4 and not task.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            task.cancel()
            await task

        with pytest.raises(asyncio.CancelledError):
            asyncio.run(killed())
        finished = len(watcher)
        assert 0 < finished < 30
        settle(srv)
        t_rerun = time.monotonic()
        res = make_judge(cfg_for("openai", srv, tmp_path)).choose(reqs)
        resent = [rec.prompt for rec in srv.records if rec.t_received >= t_rerun]
        hits = {prompt_of(q) for q, r in zip(reqs, res) if r.cache_hit}
        assert all(r.ok for r in res) and len(hits) == finished
        assert len(resent) == 30 - finished == len(set(resent)) and not hits & set(resent)


def test_budget_cap_stops_cleanly_and_rerun_resumes(tmp_path):
    prices = {"fake-judge": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}}
    with FakeOpenAIServer() as srv:
        reqs = [choice_req(i) for i in range(20)]
        judge = make_judge(cfg_for("openai", srv, tmp_path, prices=prices, max_dollars=0.4, max_concurrency=4))
        with pytest.raises(BudgetExhausted) as info:
            judge.choose(reqs)
        exc = info.value
        first = exc.results
        assert len(first) == 20 and 0 < exc.n_done < 20 and exc.n_done + exc.n_budget == 20
        assert all(r.attempts == 0 and r.probs is None for r in first if r.failure_reason == "budget")
        assert judge.ledger.spent_usd <= 0.4 and judge.ledger.spent_usd == pytest.approx(sum(r.cost_usd for r in first))
        assert "rerun" in str(exc) and srv.n_received == exc.n_done
        done = {prompt_of(q) for q, r in zip(reqs, first) if r.ok}
        t_rerun = time.monotonic()
        res = make_judge(cfg_for("openai", srv, tmp_path, prices=prices, max_dollars=10.0)).choose(reqs)
        resent = [rec.prompt for rec in srv.records if rec.t_received >= t_rerun]
        assert all(r.ok for r in res) and len(resent) == exc.n_budget and not done & set(resent)


def test_cost_ledger_sums_per_stage_and_principle(tmp_path):
    prices = {"fake-judge": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}
    with FakeOpenAIServer() as srv:
        ledger = CostLedger()
        reqs = [choice_req(i) for i in range(9)]
        res = make_judge(cfg_for("openai", srv, tmp_path, prices=prices), ledger=ledger).choose(reqs)
        for q, r in zip(reqs, res):
            assert r.tokens_in == prompt_tokens([m["content"] for m in q.messages])
            assert r.cost_usd == pytest.approx((r.tokens_in * 3.0 + r.tokens_out * 15.0) / 1e6)
        d = ledger.to_dict()
        assert d["total"]["cost_usd"] == pytest.approx(sum(r.cost_usd for r in res)) and d["total"]["cost_usd"] > 0
        assert d["by_stage"]["label"]["api_calls"] == 9 and d["total"]["results_ok"] == 9
        assert sum(v["cost_usd"] for v in d["by_principle"].values()) == pytest.approx(d["total"]["cost_usd"])
        assert set(d["by_principle"]) == {"pr0", "pr1", "pr2"}


# ---- generation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, length_reason", [("openai", "length"), ("anthropic", "max_tokens")])
def test_generate_is_deterministic_and_seeds_are_separate_requests(tmp_path, backend, length_reason):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Critique the response."}]
    with SERVERS[backend]() as srv:
        judge = make_judge(cfg_for(backend, srv, tmp_path, cache=False))
        a, b = judge.generate([GenerateRequest(msgs, max_tokens=4, seed=1),
                               GenerateRequest(msgs, max_tokens=4, seed=2)])
        assert a.ok and b.ok and a.finish_reason == length_reason and len(a.text.split()) <= 5
        assert srv.n_received == 2


# ---- secrets ---------------------------------------------------------------------------------------
def test_api_key_never_leaks(tmp_path, monkeypatch, caplog):
    key = "sk-cai-test-SECRET-9f8e7d6c5b4a39281706"
    monkeypatch.setenv("CAI_TEST_JUDGE_KEY", key)
    for name in ("", "openai", "anthropic", "httpx", "httpx2", "httpcore", "cai"):
        caplog.set_level(logging.DEBUG, logger=name)
    seen: list[str] = []
    prices = {"fake-judge": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}}
    for backend, server in SERVERS.items():
        with server(api_key="a-different-key") as srv:  # rejects ours and echoes it back
            res = make_judge(cfg_for(backend, srv, tmp_path, api_key_env="CAI_TEST_JUDGE_KEY")).choose([choice_req(0)])
            assert res[0].failure_reason.startswith("http 401: Incorrect API key provided: ***")
            seen.append(repr(res))
        faults = Faults(rate_limit=0.3, retry_after_s=0.01, server_error=0.2, malformed=0.1, refusal=0.1, seed=5)
        with server(api_key=key, faults=faults) as srv:  # accepts it
            cfg = cfg_for(backend, srv, tmp_path, api_key_env="CAI_TEST_JUDGE_KEY", prices=prices, max_dollars=0.2)
            judge = make_judge(cfg)
            with pytest.raises(BudgetExhausted) as info:
                judge.choose([choice_req(i) for i in range(20)])
            assert info.value.n_done > 0  # the key was accepted
            seen += [str(info.value), repr(info.value.results), json.dumps(judge.ledger.to_dict()), repr(judge.cfg)]
    seen += [value for _, value in JudgeCache(tmp_path / "judge_cache.sqlite").dump()]
    seen.append(caplog.text)
    haystack = "\n".join(seen)
    assert "Incorrect API key" in haystack and key not in haystack and key[-16:] not in haystack


# ---- provider details ------------------------------------------------------------------------------
def test_openai_structured_refusal_is_a_refusal(tmp_path):
    from openai.types.chat import ChatCompletion

    body = {
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    judge = make_judge({"model": "m", "api_key_env": None, "cache": False})
    answer = judge._answer(ChatCompletion.model_validate(body), [{"role": "user", "content": "q"}])
    assert answer.refusal and answer.text == "I can't help with that." and answer.tokens_in == 10


def test_anthropic_messages_are_split_into_system_and_alternating_turns():
    from cai.errors import DataError
    from cai.judges.anthropic_judge import split_system

    system, turns = split_system([
        {"role": "system", "content": "s1"}, {"role": "user", "content": "u1"}, {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "The better response is ("},
    ])
    assert system == "s1" and [t["role"] for t in turns] == ["user", "assistant"] and turns[0]["content"] == "u1\n\nu2"
    with pytest.raises(DataError, match="pair_id"):
        split_system([{"role": "assistant", "content": "x"}], {"pair_id": "p9"})


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_both_sdk_clients_are_built_and_classified_alike(backend, monkeypatch):
    """One builder for both SDKs: the key from the environment, the configured endpoint and
    timeout, no retries inside the SDK, the process-wide TLS context; their errors are
    classified alike and the key never appears in a classified message."""
    import importlib

    from cai.judges.sdk import http_library, shared_ssl_context

    httpx = http_library()  # the HTTP library under the installed SDKs

    key = "sk-cai-test-BUILD-0a1b2c3d4e5f60718293"
    monkeypatch.setenv("CAI_TEST_JUDGE_KEY", key)
    judge = make_judge({"backend": backend, "model": "m", "base_url": "http://127.0.0.1:9/v1",
                        "api_key_env": "CAI_TEST_JUDGE_KEY", "timeout_s": 7.5, "cache": False})
    sdk = importlib.import_module(backend)

    async def build():
        client = judge._make_client()
        try:
            return (type(client).__name__, client.api_key, client.max_retries, client.timeout, str(client.base_url),
                    client._client.timeout, client._client._transport._pool._ssl_context)
        finally:
            await client.close()

    name, api_key, retries, timeout, base_url, http_timeout, ssl_context = asyncio.run(build())
    assert name == {"openai": "AsyncOpenAI", "anthropic": "AsyncAnthropic"}[backend]
    assert (api_key, retries, timeout, base_url) == (key, 0, 7.5, "http://127.0.0.1:9/v1/")
    assert http_timeout == httpx.Timeout(7.5) and ssl_context is shared_ssl_context()
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/x")
    response = httpx.Response(429, request=request, headers={"retry-after": "2"})
    failure = judge._classify(sdk.APIStatusError(f"slow down, {key}", response=response, body=None))
    assert (failure.kind, failure.status, failure.retryable, failure.retry_after_s) == ("http", 429, True, 2.0)
    assert key not in failure.message and key[-16:] not in failure.message and "slow down" in failure.message
    assert judge._classify(sdk.APITimeoutError(request=request)).kind == "timeout"
    assert judge._classify(sdk.APIConnectionError(request=request)).kind == "connection"

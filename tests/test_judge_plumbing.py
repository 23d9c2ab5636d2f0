"""The judge plumbing without HTTP: parsing, log-prob sums, token buckets, retry decisions,
the SQLite cache, cost and budget accounting, config validation and the backend registry."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from cai.config import JudgeConfig, PriceConfig
from cai.errors import ConfigError, DataError
from cai.judges import (
    BudgetExhausted,
    ChoiceRequest,
    ChoiceResult,
    CostLedger,
    JudgeCache,
    call_key,
    empirical_probs,
    make_judge,
    parse_choice,
    probs_from_logprobs,
    ready_judge,
    redact,
    register_backend,
    resolve_api_key,
    run_sync,
)
from cai.judges.ratelimit import RateLimiter, TokenBucket
from cai.judges.retry import (
    CallFailure,
    Outcome,
    RetryPolicy,
    call_with_retries,
    parse_retry_after,
)

AB = ("A", "B")


# ---- parsing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", "A"),
        (" (B)", "B"),
        ("**B**", "B"),
        ("Response B", "B"),
        ("Answer: A", "A"),
        ("B is better because it is kind.", "B"),
        ("A good question. The answer is B.", "B"),  # leading article is not a label
        ("The answer is A. On reflection, the final answer is B", "B"),  # the last statement wins
        ("I think **A** is more careful.", "A"),
    ],
)
def test_parse_choice_reads_labels(text, expected):
    assert parse_choice(text, AB).choice == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("I'm sorry, but I can't compare these.", "refusal"),
        ("I cannot help with that request.", "refusal"),
        ("As an AI, I won't rank people.", "refusal"),
        ("Both responses have merits.", "unparseable: Both responses have merits."),
        ("a", "unparseable: a"),  # labels are case-sensitive
        ("", "unparseable: empty answer"),
        ("(A) and (B) are both fine", "unparseable: (A) and (B) are both fine"),
    ],
)
def test_parse_choice_failures_have_reasons(text, reason):
    parsed = parse_choice(text, AB)
    assert parsed.choice is None and parsed.failure == reason


def test_parse_choice_numeric_scale():
    scale = tuple(str(i) for i in range(1, 11))
    assert parse_choice("10", scale).choice == "10"
    assert parse_choice("Score: 8/10", scale).choice == "8"
    assert parse_choice("1", scale).choice == "1"


def test_probs_from_logprobs_sums_variants_and_renormalises():
    top = [("A", math.log(0.5)), (" A", math.log(0.1)), ("B", math.log(0.2)), ("The", math.log(0.2))]
    positions = [("(", [("(", -0.01)]), ("A", top)]
    probs = probs_from_logprobs(positions, AB)
    assert probs == pytest.approx({"A": 0.6 / 0.8, "B": 0.2 / 0.8})


def test_probs_from_logprobs_none_when_no_choice_in_top_n():
    assert probs_from_logprobs([("The", [("The", -0.1), ("I", -2.0)])], AB) is None
    assert probs_from_logprobs([], AB) is None


def test_empirical_probs_counts_every_choice():
    assert empirical_probs(["A", "A", "B", "A"], ("A", "B", "C")) == {"A": 0.75, "B": 0.25, "C": 0.0}


def test_choice_result_choice_is_argmax():
    r = ChoiceResult({"A": 0.3, "B": 0.7}, "logprobs", "ok", None, "B", 1, 1, 0.0, 0.0, False, 1, "m", "openai", {})
    assert r.choice == "B" and r.ok


def test_bad_requests_are_data_errors():
    with pytest.raises(DataError, match="messages"):
        ChoiceRequest([], AB, tag={"pair_id": "p1"})
    with pytest.raises(DataError, match="duplicates"):
        ChoiceRequest([{"role": "user", "content": "x"}], ("A", "A"))
    with pytest.raises(DataError, match=r"messages\[0\]"):
        ChoiceRequest([{"role": "robot", "content": "x"}], AB)


# ---- rate limits ----------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_at_rate_and_caps_at_burst():
    clock = FakeClock()
    b = TokenBucket(per_minute=600, burst_s=0.5, clock=clock)  # 10/s, capacity 5
    assert b.capacity == 5
    for _ in range(5):
        assert b.wait_s(1) == 0
        b.take(1)
    assert b.wait_s(1) == pytest.approx(0.1)
    clock.t += 10.0
    assert b.level == pytest.approx(0.0) and b.wait_s(1) == 0 and b.level == pytest.approx(5.0)  # capped


def test_token_bucket_big_request_waits_for_full_bucket_then_owes():
    clock = FakeClock()
    b = TokenBucket(per_minute=60_000, burst_s=1.0, clock=clock)  # 1000 tokens/s
    b.take(1000)
    assert b.wait_s(3000) == pytest.approx(1.0)  # a full bucket, not 3 s
    clock.t += 1.0
    b.take(3000)
    assert b.wait_s(1) == pytest.approx(2.001)  # the debt is paid back before anything else


def test_rate_limiter_spaces_requests():
    async def run() -> list[float]:
        lim = RateLimiter(rpm=1200, tpm=None, burst_s=0.05)  # 20/s, burst 1
        times = []
        for _ in range(6):
            await lim.acquire(10)
            times.append(asyncio.get_running_loop().time())
        return times

    times = run_sync(run())
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.045


def test_rate_limiter_corrects_token_estimates():
    clock = FakeClock()
    lim = RateLimiter(rpm=None, tpm=6000, burst_s=1.0, clock=clock)  # 100 tokens/s
    asyncio.run(lim.acquire(80))
    lim.correct(estimated=80, actual=20)  # 60 given back
    assert lim.tokens.level == pytest.approx(80.0)


# ---- retries --------------------------------------------------------------------------------
def test_parse_retry_after_prefers_ms_and_reads_seconds_and_dates():
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None


def test_backoff_full_jitter_bounds():
    p = RetryPolicy(5, 2, backoff_base_s=0.5, backoff_max_s=4.0, timeout_s=1.0, rng=random.Random(0))
    draws = [p.backoff_s(n) for n in range(8) for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in draws)
    assert max(p.backoff_s(0) for _ in range(200)) <= 0.5


def _loop(failures: list[CallFailure], ledger: CostLedger | None = None) -> tuple[Outcome, int]:
    calls = {"n": 0}

    async def send() -> str:
        calls["n"] += 1
        if calls["n"] <= len(failures):
            raise KeyError(calls["n"])  # mapped by classify_exc below
        return "answer"

    def classify_exc(exc: BaseException) -> CallFailure:
        return failures[exc.args[0] - 1]

    policy = RetryPolicy(2, 1, 0.001, 0.002, 1.0, random.Random(0))
    out = asyncio.run(
        call_with_retries(
            send, classify_exc, policy=policy, limiter=RateLimiter(None, None), ledger=ledger or CostLedger(),
            est_tokens=10, est_usd=0.0, actual_tokens=lambda a: 10,
        )
    )
    return out, calls["n"]


def test_retry_loop_counts_attempts_and_gives_reasons():
    http500 = CallFailure("http", "boom", True, 500)
    out, n = _loop([http500, http500])
    assert out.answer == "answer" and out.attempts == 3 == n
    out, n = _loop([http500] * 3)
    assert out.answer is None and out.failure == "http 500 after 3 attempts" and n == 3
    bad = CallFailure("malformed", "JSONDecodeError: x", True)
    out, n = _loop([bad, bad])
    assert out.failure == "malformed response (JSONDecodeError: x) after 2 attempts" and n == 2
    out, n = _loop([CallFailure("http", "no such model", False, 404)])
    assert out.failure == "http 404: no such model" and n == 1


def test_retry_loop_stops_at_budget_before_sending():
    ledger = CostLedger(max_dollars=1.0)
    ledger.record_call({}, 0, 0, 1.0)
    out, n = _loop([], ledger)
    assert out.failure == "budget" and out.attempts == 0 and n == 0


# ---- cache ---------------------------------------------------------------------------------
def _key(**over):
    kw = dict(kind="choice", backend="openai", model="m", base_url="http://127.0.0.1:8000/v1", params={"t": 0},
              template_version="v1", messages=[{"role": "user", "content": "x"}], choices=AB, n_samples=1)
    kw.update(over)
    return call_key(**kw)


def test_call_key_covers_what_the_answer_depends_on():
    base = _key()
    assert base == _key()
    for over in [dict(model="m2"), dict(base_url="http://127.0.0.1:8001/v1"), dict(params={"t": 1}),
                 dict(template_version="v2"), dict(choices=("1", "2")), dict(n_samples=3), dict(sample_index=1),
                 dict(messages=[{"role": "user", "content": "y"}]), dict(backend="anthropic")]:
        assert _key(**over) != base, over
    assert _key(base_url="http://127.0.0.1:8000/other") == base  # host and port, not the path


def test_cache_roundtrip_and_wal(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    cache.put("k", {"text": "A", "n": 1})
    assert cache.get("k") == {"text": "A", "n": 1} and cache.get("missing") is None
    mode = cache._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal" and len(cache) == 1
    cache.close()
    assert JudgeCache(tmp_path / "c.sqlite").get("k") == {"text": "A", "n": 1}


def test_cache_survives_concurrent_writer_processes(tmp_path):
    path = tmp_path / "shared.sqlite"
    code = textwrap.dedent(
        f"""
        import sys
        from cai.judges.cache import JudgeCache
        c = JudgeCache({str(path)!r})
        for i in range(200):
            c.put(f"{{sys.argv[1]}}-{{i}}", {{"i": i}})
        """
    )
    # Four processes open the same *new* file at once: the WAL switch races (CI once lost it).
    tags = ("p", "q", "r", "s")
    procs = [subprocess.Popen([sys.executable, "-c", code, tag]) for tag in tags]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(tags)
    cache = JudgeCache(path)
    assert len(cache) == 200 * len(tags) and cache.get("s-199") == {"i": 199}


def test_cache_setup_retries_a_locked_database_and_gives_up_on_other_errors():
    from cai.judges.cache import _retry_while_locked

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert _retry_while_locked(flaky) == "ok" and len(calls) == 3

    def broken():
        raise sqlite3.OperationalError("no such table: answers")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        _retry_while_locked(broken)

    def always_locked():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _retry_while_locked(always_locked, deadline_s=0.05)


# ---- cost and budget -----------------------------------------------------------------------
def test_ledger_prices_and_groups():
    ledger = CostLedger({"m": PriceConfig(input_per_mtok=2.0, output_per_mtok=10.0)})
    c = ledger.cost("m", 1000, 100)
    assert c == pytest.approx((1000 * 2 + 100 * 10) / 1e6)
    assert ledger.cost("unpriced", 10**6, 10**6) == 0.0
    ledger.record_call({"stage": "label", "principle_id": "p1"}, 1000, 100, c)
    ledger.record_call({"stage": "label", "principle_id": "p2"}, 1000, 100, c)
    ledger.record_cache_hit({"stage": "label", "principle_id": "p1"}, 1000, 100)
    d = ledger.to_dict()
    assert d["total"]["cost_usd"] == pytest.approx(2 * c) and d["total"]["api_calls"] == 2
    assert d["total"]["cache_hits"] == 1 and d["by_principle"]["p1"]["cache_hits"] == 1
    assert d["by_stage"]["label"]["cost_usd"] == pytest.approx(2 * c)
    assert sum(v["cost_usd"] for v in d["by_principle"].values()) == pytest.approx(d["total"]["cost_usd"])


def test_budget_reservations_never_exceed_cap_and_latch():
    ledger = CostLedger(max_dollars=1.0)
    assert ledger.try_reserve(0.4) and ledger.try_reserve(0.4)
    assert not ledger.try_reserve(0.4) and ledger.exhausted
    ledger.release(0.4)
    assert not ledger.try_reserve(0.01)  # once stopped, stays stopped


def test_budget_exhausted_message_counts():
    def res(status, reason):
        return ChoiceResult(None, "", status, reason, "", 0, 0, 0.0, 0.0, False, 0, "m", "openai", {})

    exc = BudgetExhausted([res("ok", None), res("failed", "budget"), res("failed", "budget")], 0.5, 0.5)
    assert exc.n_done == 1 and exc.n_budget == 2 and "rerun" in str(exc) and len(exc.results) == 3


# ---- config, keys, registry -------------------------------------------------------------------
def test_judge_config_is_an_omegaconf_structured_config():
    schema = OmegaConf.structured(JudgeConfig)
    cfg = OmegaConf.merge(schema, {"model": "gpt", "prices": {"gpt": {"input_per_mtok": 1.0, "output_per_mtok": 4}}})
    judge_cfg = ready_judge(cfg)
    assert judge_cfg.prices["gpt"] == PriceConfig(1.0, 4.0)
    assert isinstance(OmegaConf.to_object(cfg), JudgeConfig)


@pytest.mark.parametrize(
    "over, field",
    [
        ({"backend": "gemini"}, "backend"),
        ({"model": ""}, "model"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"timeout_s": -1}, "timeout_s"),
        ({"base_url": "localhost:8000"}, "base_url"),
        ({"temprature": 0.5}, "temprature"),
        ({"max_dollars": 5.0}, "prices"),
        ({"prices": {"m": {"input": 1.0}}}, "prices"),
        ({"backend": "hf", "dtype": "fp16"}, r"^judges\.mine\.dtype: "),
        ({"backend": "hf", "device": "gpu 0"}, r"^judges\.mine\.device: "),
        ({"backend": "hf", "batch_size": 0}, r"^judges\.mine\.batch_size: "),
        ({"backend": "openai", "dtype": "bfloat16"}, "dtype='bfloat16'.*backend hf"),
        ({"backend": "anthropic", "device": "cuda", "batch_size": 4}, "device='cuda', batch_size=4"),
    ],
)
def test_config_errors_name_the_field(over, field):
    with pytest.raises(ConfigError, match=field):
        ready_judge({"model": "m", **over}, where="judges.mine")


def test_judge_key_keeps_old_keys_and_adds_a_non_default_dtype():
    """The key of a judge config: the answer-changing fields it always had, plus ``dtype`` only
    when it is not ``auto`` (so configs that leave it alone keep their artifact keys); where a
    local judge runs and how many rows it batches never enter a key."""
    from cai.config import runtime_fields
    from cai.judges.config import judge_key

    # the fields that change a judge's answers; everything else is marked run-time in cai.config
    before = ("backend", "model", "base_url", "temperature", "top_p", "max_tokens", "top_logprobs", "n_samples")
    plain = {b: dataclasses.asdict(ready_judge({"backend": b, "model": "m"})) for b in ("hf", "openai")}
    for cfg in plain.values():
        assert judge_key(cfg) == {k: cfg[k] for k in before}
        unless_default = {f.name for f in dataclasses.fields(JudgeConfig) if f.metadata.get("keyed_unless_default")}
        assert {"dtype", "gguf_file", "embedding_sim_weight", "embedding_length_weight"} <= unless_default
        assert set(judge_key(cfg)) | set(runtime_fields(JudgeConfig)) == set(cfg) - unless_default
    local = dataclasses.asdict(ready_judge({"backend": "hf", "model": "m", "device": "cpu", "batch_size": 2}))
    assert judge_key(local) == judge_key(plain["hf"])
    assert {"device", "batch_size"} <= set(runtime_fields(JudgeConfig))
    half = dataclasses.asdict(ready_judge({"backend": "hf", "model": "m", "dtype": "bfloat16"}))
    assert judge_key(half) == {**judge_key(local), "dtype": "bfloat16"} and "dtype" not in runtime_fields(JudgeConfig)
    gguf = dataclasses.asdict(ready_judge({"backend": "hf", "model": "m", "gguf_file": "m.gguf"}))
    assert judge_key(gguf) == {**judge_key(local), "gguf_file": "m.gguf"}


def test_missing_api_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("CAI_TEST_MISSING_KEY", raising=False)
    with pytest.raises(ConfigError, match="CAI_TEST_MISSING_KEY"):
        resolve_api_key(ready_judge({"model": "m", "api_key_env": "CAI_TEST_MISSING_KEY"}))
    assert resolve_api_key(ready_judge({"model": "m", "api_key_env": None})) == "no-key-needed"


def test_redact_removes_keys_and_fragments():
    key = "sk-live-0123456789abcdefghij"
    text = f"bad key {key}; abbreviated {key[:4]}...{key[-12:]}"
    out = redact(text, key)
    assert key not in out and key[-12:] not in out and "***" in out


def test_backend_registry_builds_registered_backends_and_names_unknown_ones(tmp_path):
    from cai.judges import registry

    with pytest.raises(ConfigError, match="backend"):
        make_judge({"backend": "no-such-backend", "model": "m"})

    class Dummy:
        name, model = "hf", "tiny"

        def __init__(self, cfg, ledger, cache_path):
            self.cfg, self.ledger = cfg, ledger

    real = registry._FACTORIES.get("hf")
    register_backend("hf", lambda cfg, *, ledger, cache_path: Dummy(cfg, ledger, cache_path))
    try:
        judge = make_judge({"backend": "hf", "model": "tiny"})
        assert isinstance(judge, Dummy) and judge.cfg.model == "tiny"
    finally:
        if real is None:
            registry._FACTORIES.pop("hf")
        else:  # the real hf backend registers once, at import: put it back
            registry._FACTORIES["hf"] = real


def test_hf_backend_registers_itself(tmp_path):
    from cai.judges import registry
    from cai.judges.hf import HFJudge

    judge = make_judge({"backend": "hf", "model": str(tmp_path / "judge-model"), "api_key_env": None})
    assert isinstance(judge, HFJudge) and "hf" in registry._FACTORIES
    # "tiny" names the pipeline's tiny policy artifact: outside the pipeline it is a clear error
    with pytest.raises(ConfigError, match="tiny"):
        make_judge({"backend": "hf", "model": "tiny", "api_key_env": None})


def test_run_sync_works_inside_a_running_loop():
    async def inner() -> int:
        await asyncio.sleep(0)
        return 7

    async def outer() -> int:
        return run_sync(inner())  # a notebook calling the blocking wrapper

    assert asyncio.run(outer()) == 7


def test_run_sync_inside_a_running_loop_keeps_the_callers_context():
    """A notebook's running loop: the helper thread sees the caller's context variables (the store a
    stage builds in reaches a judge's model loader)."""
    import asyncio
    import contextvars

    from cai.judges.types import run_sync

    var: contextvars.ContextVar[str | None] = contextvars.ContextVar("cai_test_var", default=None)

    async def read() -> str | None:
        return var.get()

    async def notebook() -> str | None:
        var.set("the stage's store")
        return run_sync(read())

    assert asyncio.run(notebook()) == "the stage's store"

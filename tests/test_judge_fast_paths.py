"""Fast paths of the API judge: cache keys byte-identical to stable_hash, batched lookups, lazy client."""

from __future__ import annotations

import math
import random

import pytest

from cai.hashing import stable_hash
from cai.judges import ChoiceRequest, JudgeCache, make_judge
from cai.judges.cache import SCHEMA_VERSION, call_key, endpoint_of, fast_stable_hash
from cai.testing.servers import FakeOpenAIServer


def _random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice([
            rng.random() * 10 ** rng.randint(-30, 30), -0.0, rng.randint(-(10**20), 10**20), True, False, None,
            "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 8))),
        ])
    if r < 0.75:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {"".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 5))): _random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def test_fast_hash_equals_stable_hash_on_plain_json():
    rng = random.Random(0)
    for _ in range(3000):
        obj = {"x": _random_json(rng), "t": (1, "a", [2.5])}
        assert fast_stable_hash(obj) == stable_hash(obj)


@pytest.mark.parametrize("obj", [{"x": math.inf}, {"x": {"nested": (1, 2)}},
                                 {"p": __import__("pathlib").PurePath("a")}])
def test_values_outside_plain_json_take_the_slow_path_with_the_same_hash(obj):
    assert fast_stable_hash(obj) == stable_hash(obj)


@pytest.mark.parametrize("obj", [{"x": math.nan}, {"x": {1: "int key"}}, {"x": object()}])
def test_unhashable_values_fail_as_stable_hash_does(obj):
    with pytest.raises(Exception) as slow:
        stable_hash(obj)
    with pytest.raises(type(slow.value), match=str(slow.value)[:20].replace("(", r"\(").replace(")", r"\)")):
        fast_stable_hash(obj)


def test_call_key_is_unchanged_for_existing_caches():
    messages = [{"role": "system", "content": "Be fair."}, {"role": "user", "content": "(A) é\n(B) \u2028x"}]
    params = {"max_tokens": 16, "temperature": 0.0, "top_p": None, "logprobs": True, "top_logprobs": 20, "seed": None}
    expected = stable_hash({
        "v": SCHEMA_VERSION, "kind": "choice", "backend": "openai", "model": "m",
        "endpoint": endpoint_of("http://127.0.0.1:1/v1"), "params": params, "template_version": "3",
        "messages": messages, "choices": ["A", "B"], "n_samples": 1, "sample_index": 0,
    })
    got = call_key(kind="choice", backend="openai", model="m", base_url="http://127.0.0.1:1/v1", params=params,
                   template_version="3", messages=messages, choices=("A", "B"), n_samples=1, sample_index=0)
    assert got == expected


def test_get_many_returns_every_stored_row_across_chunks(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    for i in range(1200):
        cache.put(f"k{i}", {"i": i})
    found = cache.get_many([f"k{i}" for i in range(0, 1300, 2)] + ["k0"])
    assert sorted(found) == sorted(f"k{i}" for i in range(0, 1200, 2))
    assert all(cache.get(k) == __import__("json").loads(v) for k, v in found.items())


def test_a_fully_cached_batch_builds_no_client_and_sends_nothing(tmp_path):
    reqs = [ChoiceRequest([{"role": "user", "content": f"Which?\n(A) short {i}\n(B) a much longer answer {i}"}],
                          ("A", "B")) for i in range(12)]
    with FakeOpenAIServer() as srv:
        cfg = {"backend": "openai", "model": "fake", "base_url": srv.base_url, "api_key_env": None,
               "cache_path": str(tmp_path / "c.sqlite")}
        cold = make_judge(cfg).choose(reqs)
        sent = srv.n_received
        judge = make_judge(cfg)
        built = []
        make = judge._make_client
        judge._make_client = lambda: built.append(1) or make()
        warm = judge.choose(reqs)
    assert all(r.ok for r in cold) and sent == 12
    assert all(r.cache_hit and r.attempts == 0 for r in warm) and srv.n_received == sent and not built
    assert [r.probs for r in warm] == [r.probs for r in cold]

"""The ``ai_labels`` stage when the judge goes away: transient failures are never published.

A judge that stops answering (HTTP 500 for every request, or no server at all) makes the build
raise :class:`~cai.errors.JudgeUnavailable`, publishes nothing and keeps the finished labels in
the journal; when the judge is back, the rerun asks only the missing pairs and publishes the same
bytes a run without the outage would have. Refusals are permanent failures: recorded, and
counted against ``labels.max_failed_fraction``. The judge's own retries are kept short here
(one retry, 10 ms backoff, 2 s timeout) so every test takes seconds.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from cai.artifacts import ArtifactStore
from cai.config import Config
from cai.data import Label, Pair, Prompt, read_jsonl, write_jsonl
from cai.errors import CaiError, JudgeUnavailable, TooManyFailures
from cai.feedback.label import label_pairs
from cai.judges.types import is_transient
from cai.testing import FakeOpenAIServer, Faults
from cai.testing.servers import _Reply

N_PAIRS = 20
BATCH = 4


def make_pairs(n: int) -> list[Pair]:
    pairs = []
    for i in range(n):
        prompt = Prompt.create([{"role": "user", "content": f"Question {i}: how do I fix problem {i}?"}], "synthetic")
        a = "Check the manual first. " * (1 + i % 3)
        b = "A much longer answer that wanders about. " * (1 + (i * 5) % 4)
        pairs.append(Pair.create(prompt, a, b, "synthetic"))
    return pairs


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    write_jsonl(d / "pairs.jsonl", make_pairs(N_PAIRS))
    return d


class FlakyServer(FakeOpenAIServer):
    """The fake OpenAI server that answers HTTP 500 to every request once it has answered
    ``answers`` requests (None: never); set ``answers = None`` to bring it back."""

    def __init__(self, answers: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.answers = answers
        self.n_ok = 0
        self._flaky_lock = threading.Lock()

    def _decide(self, h, body, bh, now):
        with self._flaky_lock:
            down = self.answers is not None and self.n_ok >= self.answers
        if down:
            return _Reply(500, self._error("api_error", "the server is going away"), "server_error")
        reply = super()._decide(h, body, bh, now)
        if reply.status == 200:
            with self._flaky_lock:
                self.n_ok += 1
        return reply


def build(store: ArtifactStore, base_url: str, pairs_dir: Path, cache: Path, labels: dict | None = None):
    """Build ``ai_labels`` as the pipeline would; returns (key, the build's result or its exception).

    One order per pair and one request at a time, so "the first K answers" are the first K pairs."""
    from cai.pipeline import make_stage

    judge = {"backend": "openai", "model": "fake", "base_url": base_url, "api_key_env": None,
             "cache_path": str(cache), "max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.02,
             "timeout_s": 2.0, "max_concurrency": 1}
    lab = {"both_orders": False, "batch_pairs": BATCH, **(labels or {})}
    full = Config(seed=0, judge=judge, labels=lab, constitution={"path": "harmless"}, store={"root": str(store.root)})
    stage = make_stage("ai_labels", full)
    key = store.key("ai_labels", stage.config, {"pairs": "human_pairs-" + "0" * 20}, version=stage.version)
    try:
        return key, store.build(key, lambda ctx: label_pairs(stage.cfg, {"pairs": pairs_dir}, ctx))
    except CaiError as e:
        return key, e


def journaled(store: ArtifactStore, key: str) -> list[dict]:
    (journal,) = store.root.glob(f"**/.{key}.partial/**/labels_journal.jsonl")
    return [line for line in journal.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- classification
@pytest.mark.parametrize("reason,transient", [
    ("connection error after 2 attempts", True), ("timeout after 2 attempts", True),
    ("http 429 after 6 attempts", True), ("http 500 after 2 attempts", True), ("http 503 after 2 attempts", True),
    ("http 408 after 2 attempts", True), ("unparseable: empty answer", True),
    ("refusal", False), ("refusal (3 of 5 samples)", False), ("unparseable: Both are fine", False),
    ("malformed response (JSONDecodeError: x) after 3 attempts", False), ("http 400: maximum context length", False),
    ("http 401: bad key", False), ("budget", False), (None, False),
])
def test_transient_failures_are_the_judges_not_the_answers(reason, transient):
    assert is_transient(reason) is transient


# ----------------------------------------------------------------------------- outages
def test_an_outage_publishes_nothing_and_the_rerun_asks_only_the_missing_pairs(pairs_dir, tmp_path):
    k = 5  # answers before the server goes away
    with FakeOpenAIServer() as ref_srv:  # the reference: no outage
        _, ref = build(ArtifactStore(tmp_path / "ref"), ref_srv.base_url, pairs_dir, tmp_path / "ref.sqlite")
    assert ref.stage_info["metrics"]["label/ok"] == N_PAIRS

    store = ArtifactStore(tmp_path / "store")
    with FlakyServer(answers=k) as srv:
        key, err = build(store, srv.base_url, pairs_dir, tmp_path / "cache.sqlite")
        assert isinstance(err, JudgeUnavailable), err
        assert not store.exists(key) and not store.list("ai_labels")
        msg = str(err)
        # batch 2 answers 1 pair of 4; batches 3 and 4 answer none -> the judge is down, batch 5 is not asked
        assert f"{N_PAIRS - k - BATCH} of {N_PAIRS} pairs failed transiently" in msg
        assert "http_500 x 11" in msg and f"{BATCH} more pairs were not asked" in msg
        assert (f"rerun the same command: the {k} labelled pairs are kept and only the failed ones are asked "
                "again") in msg
        assert len(journaled(store, key)) == k
        first_ok = {r.body_hash for r in srv.records if r.outcome == "ok"}
        assert len(first_ok) == k

        srv.answers = None  # the server is back
        srv.reset_log()
        key2, res = build(store, srv.base_url, pairs_dir, tmp_path / "cache.sqlite")
        assert key2 == key and not isinstance(res, Exception), res
        asked = {r.body_hash for r in srv.records}
        assert all(r.outcome == "ok" for r in srv.records)
    assert len(asked) == N_PAIRS - k and not asked & first_ok  # only the missing pairs, each once
    assert store.exists(key)
    m = res.stage_info["metrics"]
    assert m["label/resumed"] == k and m["label/ok"] == N_PAIRS and m["label/failed"] == 0
    assert (res.path / "labels.jsonl").read_bytes() == (ref.path / "labels.jsonl").read_bytes()


def test_empty_answers_are_transient(pairs_dir, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with FakeOpenAIServer(faults=Faults(logprobs=False), answer_style="") as srv:
        key, err = build(store, srv.base_url, pairs_dir, tmp_path / "cache.sqlite")
    assert isinstance(err, JudgeUnavailable), err
    assert "empty_answer x 8" in str(err) and "12 more pairs were not asked" in str(err)
    assert not store.exists(key) and journaled(store, key) == []


def test_no_judge_server_publishes_nothing(pairs_dir, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ArtifactStore(tmp_path / "store")
    key, err = build(store, f"http://127.0.0.1:{port}/v1", pairs_dir, tmp_path / "cache.sqlite")
    assert isinstance(err, JudgeUnavailable), err
    assert "connection x" in str(err) and "the 0 labelled pairs are kept" in str(err)
    assert not store.exists(key) and not store.list("ai_labels")
    assert journaled(store, key) == []


# ----------------------------------------------------------------------------- permanent failures
def test_refusals_above_the_threshold_stop_and_a_higher_threshold_publishes_without_asking(pairs_dir, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with FakeOpenAIServer(faults=Faults(refusal=0.3, seed=1)) as srv:
        key, err = build(store, srv.base_url, pairs_dir, tmp_path / "cache.sqlite")
        refused = srv.count("refusal")
        assert 1 < refused < N_PAIRS  # share above 0.05
        assert isinstance(err, TooManyFailures), err
        msg = str(err)
        assert f"{refused} of {N_PAIRS} pairs ({refused / N_PAIRS:.1%}) have a failed label" in msg
        assert "more than labels.max_failed_fraction=0.05" in msg and f"refusal x {refused}" in msg
        assert not store.exists(key) and len(journaled(store, key)) == N_PAIRS
        srv.reset_log()
        _, res = build(store, srv.base_url, pairs_dir, tmp_path / "cache.sqlite",
                       labels={"max_failed_fraction": 0.5})
        assert srv.records == []  # nothing asked again
    assert not isinstance(res, Exception), res
    labels = read_jsonl(res.path / "labels.jsonl", cls=Label)
    failed = [lab for lab in labels if lab.status == "failed"]
    assert len(failed) == refused and all(lab.failure_reason.endswith(": refusal") for lab in failed)
    assert all(lab.meta["failure_kind"] == "refusal" for lab in failed)
    m = res.stage_info["metrics"]
    assert m["label/failed"] == m["label/failed_refusal"] == refused and m["label/resumed"] == N_PAIRS


def test_refusals_below_the_threshold_are_published_as_failed_labels(pairs_dir, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with FakeOpenAIServer(faults=Faults(refusal=0.3, seed=1)) as srv:
        key, res = build(store, srv.base_url, pairs_dir, tmp_path / "cache.sqlite",
                         labels={"max_failed_fraction": 0.6})
        refused = srv.count("refusal")
    assert not isinstance(res, Exception), res
    assert store.exists(key) and res.stage_info["metrics"]["label/failed_refusal"] == refused > 0

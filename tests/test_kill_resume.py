"""Fault injection end to end (issue #11): ``cai run`` labels pairs with an API judge behind a
loopback server that answers 30% of requests with a fault (429, 500, a hang past the timeout, a
malformed body) and goes away entirely for a while mid-run; then the run is killed with SIGKILL in
the middle of labelling, and the same command is run again.

What must hold: the final labels are identical to a fault-free run's, no label is lost, no request
the judge received an answer for is paid twice (distinct request bodies answered, counted at the
server), and the reported cost (``label/cost_usd``) equals what the store's ledger says was paid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cai.judges.cache import JudgeCache
from cai.testing.servers import FakeOpenAIServer, Faults

pytestmark = pytest.mark.slow

FAULTS = dict(rate_limit=0.1, retry_after_s=0.02, server_error=0.1, hang=0.05, hang_s=1.0, malformed=0.05,
              latency_s=0.03, seed=11)
# answered, usable replies: what an API bills (a hang's reply reaches nobody, a malformed one is unusable)
PAID = {"ok"}


def _cmd(port: int, store: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "cai.cli", "run", "judge=openai_gpt4_1_mini",
            f"judge.base_url=http://127.0.0.1:{port}/v1", "judge.api_key_env=null", "judge.timeout_s=0.5",
            "judge.backoff_base_s=0.05", "judge.backoff_max_s=0.5", "judge.max_retries=10",
            "judge.malformed_retries=8", "judge.max_concurrency=2", "critique.generator=policy",  # labels only
            "experiment.stages=[responses,revisions,sft,policy_pairs,ai_labels]", "data.max_prompts=12",
            "sampling.max_new_tokens=6", "critique.max_new_tokens=6", "labels.batch_pairs=3",
            f"store.root={store}", f"hydra.run.dir={run}"]


def _env(store: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CAI_STORE": str(store)}
    env.pop("OPENAI_API_KEY", None)
    return env


def _labels(store: Path) -> list[tuple]:
    path = next((store / "ai_labels").glob("*/labels.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["pair_id"], r["p_a"], r["status"], r["order"], tuple(r["principle_ids"])) for r in rows]


def _journal_lines(store: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in store.rglob("labels_journal.jsonl"))


def _wait(what, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_faults_an_outage_and_a_kill_leave_the_labels_of_a_fault_free_run(tmp_path):
    # ---- the reference: no faults
    clean = tmp_path / "clean"
    with FakeOpenAIServer() as srv:
        done = subprocess.run(_cmd(srv.port, clean, tmp_path / "run0"), cwd=tmp_path, env=_env(clean),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    reference = _labels(clean)
    assert len(reference) >= 9 and all(status == "ok" for _, _, status, _, _ in reference)

    # ---- faults, an outage, a kill -9
    store = tmp_path / "store"
    servers = [FakeOpenAIServer(faults=Faults(**FAULTS))]
    servers[0].start()
    port = servers[0].port
    proc = subprocess.Popen(_cmd(port, store, tmp_path / "run1"), cwd=tmp_path, env=_env(store),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _journal_lines(store) >= 3, 300, proc)  # the first batch is labelled
        servers[0].stop()  # the outage: connection refused for a while
        time.sleep(1.5)
        servers.append(FakeOpenAIServer(faults=Faults(**{**FAULTS, "seed": 12}), port=port))
        servers[-1].start()
        _wait(lambda: servers[-1].count("ok") >= 2, 120, proc)  # answers of the next batch are paid...
        proc.send_signal(signal.SIGKILL)  # ...and the run dies before journaling them
        t_kill = time.monotonic()
        proc.wait(timeout=30)
        killed_at = _journal_lines(store)
        t_rerun = time.monotonic()
        # ---- the same command again
        done = subprocess.run(_cmd(port, store, tmp_path / "run2"), cwd=tmp_path, env=_env(store),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        for srv in servers:
            srv.stop()

    assert killed_at < len(reference)  # the kill did land mid-labelling
    assert _labels(store) == reference  # identical labels, none lost

    records = [r for srv in servers for r in srv.records]
    paid = Counter(r.body_hash for r in records if r.status == 200 and r.outcome in PAID)
    faults = Counter(r.outcome for r in records)
    # a reply in flight when the process was killed reached nobody: asked again, by necessity
    in_flight = {r.body_hash for r in records
                 if t_kill - 0.2 <= r.t_replied < t_rerun and r.status == 200 and r.outcome in PAID}
    twice = [h for h, n in paid.items() if n > 1]
    assert set(twice) <= in_flight and len(twice) <= 2  # max_concurrency=2 calls can be in flight
    spent = JudgeCache(store / "judge_cache.sqlite").paid_calls()
    assert len({k for k, _ in spent}) == len(spent)  # the store paid each call once
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    total_paid = sum(usd for _, usd in spent)
    assert metrics["label/cost_usd"] == pytest.approx(total_paid, rel=1e-9, abs=1e-12)
    stage = json.loads((tmp_path / "run2" / "stages" / "ai_labels.json").read_text())
    assert stage["cost"]["dollars"] == pytest.approx(total_paid, rel=1e-9, abs=1e-12)  # the whole cost, resume or not
    assert metrics["label/resumed"] == killed_at
    print(json.dumps({"requests_sent": len(records), "faults": dict(faults), "distinct_paid": len(paid),
                      "paid_twice": len(twice), "in_flight_at_kill": len(in_flight),
                      "labels": len(reference), "lost": 0, "resumed_pairs": killed_at,
                      "cost_reported": metrics["label/cost_usd"], "cost_paid": total_paid}))

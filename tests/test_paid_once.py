"""Requests are paid once per store, across processes (issue #11 item 2).

Two processes share one store (one judge cache) and one loopback judge server that counts the
requests it answers: each distinct request is answered -- paid -- once, the other process waits
for the answer in the cache. ``judge.max_dollars`` is a per-store ledger: two processes
together, and a rerun after them, stay within one cap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from cai.judges.cache import JudgeCache
from cai.testing.servers import FakeOpenAIServer, Faults

# a child process: judge the pairs named on the command line, print what it paid
CHILD = r"""
import json, sys
from cai.errors import CaiError
from cai.judges import make_judge
from cai.judges.types import ChoiceRequest

base_url, cache, first, last, cap = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
reqs = [ChoiceRequest([{"role": "user", "content": f"Pair {i}. Which is better?\n(A) {'a' * (i % 7 + 1)}\n"
                                                   f"(B) {'b' * (i % 5 + 2)}\nAnswer with A or B."}],
                      ("A", "B"), tag={"stage": "label"}) for i in range(first, last)]
cfg = {"backend": "openai", "model": "fake-judge", "base_url": base_url, "api_key_env": None, "cache_path": cache,
       "max_concurrency": 4, "timeout_s": 5.0, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
       "prices": {"fake-judge": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}},
       "max_dollars": None if cap == "none" else float(cap)}
judge = make_judge(cfg)
stopped = False
try:
    results = judge.choose(reqs)
except CaiError as exc:  # BudgetExhausted
    results, stopped = exc.results, True
judge.close()
print(json.dumps({"ok": sum(r.ok for r in results), "cost": sum(r.cost_usd for r in results),
                  "hits": sum(r.cache_hit for r in results), "stopped": stopped}))
"""


def _start(srv, cache: Path, first: int, last: int, cap: str = "none") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, srv.base_url, str(cache), str(first), str(last), cap],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_sharing_a_store_pay_each_distinct_request_once(tmp_path):
    cache = tmp_path / "judge_cache.sqlite"
    # latency makes the two processes overlap: both want most requests while the other is asking
    with FakeOpenAIServer(faults=Faults(latency_s=0.05, server_error=0.2, seed=3)) as srv:
        a, b = _start(srv, cache, 0, 40), _start(srv, cache, 10, 50)  # 30 requests wanted by both
        ra, rb = _result(a), _result(b)
        srv.settle()
        answered = Counter(r.body_hash for r in srv.records if r.status == 200)
    assert ra["ok"] == 40 and rb["ok"] == 40
    assert len(answered) == 50 and max(answered.values()) == 1  # 50 distinct requests, none paid twice
    assert ra["hits"] + rb["hits"] == 30  # what one process paid for, the other read from the cache
    paid = JudgeCache(cache).paid_calls()
    assert len(paid) == 50 and len({k for k, _ in paid}) == 50
    assert abs(ra["cost"] + rb["cost"] - sum(usd for _, usd in paid)) < 1e-9  # cost reported = cost paid


def test_the_budget_is_one_ledger_per_store_shared_by_processes_and_reruns(tmp_path):
    cache = tmp_path / "judge_cache.sqlite"
    cap = 0.6  # each request costs about 0.03 at these prices: about 20 fit
    with FakeOpenAIServer(faults=Faults(latency_s=0.02)) as srv:
        a, b = _start(srv, cache, 0, 30, str(cap)), _start(srv, cache, 100, 130, str(cap))  # distinct requests
        ra, rb = _result(a), _result(b)
        again = _result(_start(srv, cache, 200, 230, str(cap)))  # a rerun after both
        srv.settle()
        answered = sum(1 for r in srv.records if r.status == 200)
    spent = JudgeCache(cache).spent()
    assert ra["stopped"] and rb["stopped"] and again["stopped"]  # each stopped at the one shared cap
    assert spent <= cap + 1e-9 and spent > cap / 2
    # all three together stayed within one cap (each alone would have spent up to the cap)
    assert ra["ok"] + rb["ok"] + again["ok"] == answered and again["ok"] < 30
    assert abs(ra["cost"] + rb["cost"] + again["cost"] - spent) < 1e-9

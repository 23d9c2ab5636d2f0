"""`cai run` with the API-judge presets, end to end, against a loopback server speaking the OpenAI
protocol (the real ``openai`` client, real HTTP): the labeller is ``judge=openai_gpt4_1_mini``, the
held-out judge ``eval=api_judge`` with another model. Checks that the presets compose and run, that
the key authenticates every request yet appears in no artifact, log or report, and that a second
identical invocation sends no request at all (artifacts and the judge cache answer everything).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cai.testing.servers import FakeOpenAIServer

SECRET = "sk-cai-test-SECRET-0123456789"
SPEED = ["data.max_prompts=8", "sampling.max_new_tokens=6", "critique.max_new_tokens=6", "ppo.steps=2",
         "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.max_new_tokens=6", "eval.max_new_tokens=6"]


def _run(tmp_path: Path, srv: FakeOpenAIServer, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "cai.cli", "run", "judge=openai_gpt4_1_mini", f"judge.base_url={srv.base_url}",
           "eval=api_judge", f"eval.judge.base_url={srv.base_url}", "eval.judge.model=fake-heldout",
           "eval.judge.max_dollars=null", *SPEED, f"store.root={tmp_path / 'store'}",
           f"hydra.run.dir={tmp_path / name}"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_api_judge_presets_run_the_pipeline_without_leaking_the_key(tmp_path):
    with FakeOpenAIServer(api_key=SECRET) as srv:  # any other key gets a 401
        first = _run(tmp_path, srv, "run")
        assert first.returncode == 0, first.stderr[-3000:]
        sent = srv.n_received
        assert sent > 0 and all(r.status == 200 for r in srv.records)
        again = _run(tmp_path, srv, "again")
        assert again.returncode == 0, again.stderr[-3000:]
        assert srv.n_received == sent  # nothing asked twice

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["label/api_calls"] > 0 and metrics["label/cost_usd"] > 0  # the preset's price table
    for policy in ("dpo", "ppo"):  # the quickstart's trained policies, each evaluated
        assert metrics[f"eval/{policy}/judge_is_labeller"] == 0  # another model: the evaluation is held out
        assert 0.0 <= metrics[f"eval/{policy}/vs_sft/win_rate"] <= 1.0
    assert (tmp_path / "run" / "report.md").is_file()
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert all(v == 1 for k, v in second.items() if k.startswith("pipeline/") and k.endswith("/reused"))

    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks and SECRET not in first.stdout + first.stderr + again.stdout + again.stderr

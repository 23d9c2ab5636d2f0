"""`cai run` end to end on the tiny model: run records, artifact reuse, a 2-job sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai.config import compose_config

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.max_prompts=6",
    "sampling.max_new_tokens=6",
    "sampling.batch_size=4",
    "policy.tiny.n_layer=1",
    "policy.tiny.n_embd=32",
    "policy.tiny.n_head=2",
    "policy.tiny.vocab_size=512",
]


def cai(*args: str, cwd: Path, store: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cai.cli", *args, f"store.root={store}"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_run_writes_records_and_second_run_reuses_everything(tmp_path: Path):
    store = tmp_path / "store"
    first = cai("run", *TINY, f"hydra.run.dir={tmp_path}/run1", cwd=tmp_path, store=store)
    assert first.returncode == 0, first.stderr[-3000:]
    run1 = tmp_path / "run1"
    metrics = json.loads((run1 / "metrics.json").read_text())
    assert metrics["data/prompts_train"] == 6
    assert metrics["sample/responses"] == 6
    assert metrics["pipeline/responses/reused"] == 0
    for stage in ("prompts", "policy_model", "responses"):
        info = json.loads((run1 / "stages" / f"{stage}.json").read_text())
        assert info["stage"] == stage and info["reused"] is False
        assert "wall_time_s" in json.dumps(info) or "phases" in info
    run_info = json.loads((run1 / "run.json").read_text())
    responses_key = run_info["artifacts"]["responses"]
    rows = (store / "responses" / responses_key / "responses.jsonl").read_text().splitlines()
    assert len(rows) == 6

    second = cai("run", *TINY, f"hydra.run.dir={tmp_path}/run2", cwd=tmp_path, store=store)
    assert second.returncode == 0, second.stderr[-3000:]
    m2 = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert all(m2[f"pipeline/{s}/reused"] == 1 for s in ("prompts", "policy_model", "responses"))
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["artifacts"] == run_info["artifacts"]
    # same seed, same config: same results
    assert m2["sample/mean_new_tokens"] == metrics["sample/mean_new_tokens"]


def test_sweep_two_jobs_share_upstream_artifacts(tmp_path: Path):
    store = tmp_path / "store"
    res = cai("run", "-m", *TINY, "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, store=store)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [json.loads((tmp_path / "sweep" / str(i) / "run.json").read_text()) for i in (0, 1)]
    a, b = (r["artifacts"] for r in runs)
    assert a["prompts"] == b["prompts"] and a["policy_model"] == b["policy_model"]
    assert a["responses"] != b["responses"]  # the seed is part of the sampling stage's key
    for i in (0, 1):
        assert (tmp_path / "sweep" / str(i) / "metrics.json").exists()


def test_bad_override_is_one_clear_message(tmp_path: Path):
    res = cai("run", "data.prompts=/nonexistent/prompts.jsonl", *TINY[1:], f"hydra.run.dir={tmp_path}/r",
              cwd=tmp_path, store=tmp_path / "store")
    assert res.returncode == 2
    assert "/nonexistent/prompts.jsonl" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_stage_is_rejected(tmp_path: Path):
    res = cai("run", "experiment.stages=[prompts,nope]", f"hydra.run.dir={tmp_path}/r",
              cwd=tmp_path, store=tmp_path / "store")
    assert res.returncode == 2
    assert "nope" in res.stderr and "known stages" in res.stderr


# ---- the quickstart's human-label arm ---------------------------------------------------------
_compose = compose_config  # the config `cai run <overrides>` would run


def test_human_arm_only_with_human_data_and_bad_keys_are_named(shared_data_dir):
    from cai.errors import ConfigError
    from cai.pipeline import human_arm_config

    assert human_arm_config(_compose()) is None  # the offline default has no human data
    hh = str(shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz")
    cfg = _compose("data=hh_rlhf", f"data.human.path={hh}")
    arm = human_arm_config(cfg)
    assert (arm.reward.labels_from, arm.dpo.labels_from, arm.tags.arm) == ("human", "human", "human_labels")
    assert (cfg.reward.labels_from, list(arm.experiment.human_arm)) == ("ai", [])  # the run's own config is untouched
    assert human_arm_config(_compose("data=hh_rlhf", f"data.human.path={hh}", "experiment.human_arm=[]")) is None
    with pytest.raises(ConfigError, match="'reward.label_from' is not a config key"):
        human_arm_config(_compose("data=hh_rlhf", f"data.human.path={hh}",
                                  "experiment.human_arm=['reward.label_from=human']"))
    with pytest.raises(ConfigError, match="'ppo.steps' is not key=value"):
        human_arm_config(_compose("data=hh_rlhf", f"data.human.path={hh}", "experiment.human_arm=['ppo.steps']"))
    arm = human_arm_config(_compose("data=hh_rlhf", f"data.human.path={hh}", "experiment.human_arm=['ppo.steps=3']"))
    assert arm.ppo.steps == 3  # typed like a command-line override


def test_quickstart_with_human_data_adds_the_human_label_arm(tmp_path: Path, shared_data_dir):
    hh = shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    res = cai("run", "data=hh_rlhf", f"data.human.path={hh}", "data.human.limit=48", *TINY,
              "critique.max_new_tokens=6", "ppo.steps=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
              "ppo.max_new_tokens=6", "eval.max_new_tokens=6", "eval.max_prompts=6", f"hydra.run.dir={tmp_path}/run",
              cwd=tmp_path, store=tmp_path / "store")
    assert res.returncode == 0, res.stderr[-3000:]
    run, arm = tmp_path / "run", tmp_path / "run" / "arms" / "human"
    info, arm_info = (json.loads((d / "run.json").read_text()) for d in (run, arm))
    assert arm_info["config"]["reward"]["labels_from"] == "human"
    assert arm_info["config"]["tags"]["arm"] == "human_labels"
    m = json.loads((arm / "metrics.json").read_text())
    # what the label source changes (each trained policy's evaluation too); the rest is reused
    differs = {"reward", "dpo", "ppo", "evaluate_dpo", "evaluate_ppo", "evaluate"}
    assert {s for s in info["artifacts"] if info["artifacts"][s] != arm_info["artifacts"][s]} == differs
    assert all(m[f"pipeline/{s}/reused"] == (s not in differs) for s in arm_info["artifacts"])
    assert "eval/ppo/vs_sft/win_rate" in m and "eval/dpo/vs_sft/win_rate" in m and "rm/human/accuracy" in m
    report = (run / "report.md").read_text()  # written after the run, both arms side by side
    assert "2 run(s) in 2 arm(s): AI labels (1 run); human labels (1 run)" in report
    h2h = json.loads((run / "head_to_head.json").read_text())  # the two arms judged against each other
    assert [(r["arm_a"], r["arm_b"]) for r in h2h["rows"]] == [("AI labels", "human labels")]
    assert "## Head to head" in report

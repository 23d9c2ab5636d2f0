"""The offline default (`cai run`, experiment=quickstart) proves that the loop LEARNS its synthetic
task: labels agree with the known rule, the reward model learns it, PPO and DPO beat the SFT policy
by the held-out evaluator (which, unlike the labeller, also ranks off-task and broken replies last)
within the KL target, and PPO does not drift off task (eval.truth: the known rule grades every
reply). The full run is `slow` (one `cai run`, about 40-60 s on 2 loaded CPU cores); its
tiny-budget twin checks the same chain quickly, and the random tiny judge (judge=tiny_hf) still
runs the whole pipeline end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai.data import read_jsonl
from cai.testing.preference_task import style, task_grade

REPO = Path(__file__).resolve().parents[1]


def cai_run(*args: str, cwd: Path, store: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = cwd / f"run{len(list(cwd.glob('run*')))}"
    cmd = [sys.executable, "-m", "cai.cli", "run", *args, f"store.root={store}", f"hydra.run.dir={run_dir}"]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    return {"metrics": json.loads((run_dir / "metrics.json").read_text()), "artifacts": info["artifacts"],
            "config": info["config"], "dir": run_dir}


def _by_style(question: str, reply: str) -> int:
    return {"courteous": 1, "neither": 0, "rude": -1}[style(reply)]


def label_agreement(run: dict, store: Path, truth=task_grade) -> tuple[float, int]:
    """Share of the decided AI labels (p_a != 0.5) whose winner the ground truth ``truth(question,
    reply)`` also ranks higher (default: cai.testing.preference_task.task_grade, the evaluator's
    reading, which also counts broken text as worst), and how many."""
    pairs = {p["id"]: p for p in read_jsonl(store / "policy_pairs" / run["artifacts"]["policy_pairs"] / "pairs.jsonl")}
    labels = read_jsonl(store / "ai_labels" / run["artifacts"]["ai_labels"] / "labels.jsonl")
    agree = decided = 0
    for lb in labels:
        if lb["p_a"] == 0.5:
            continue
        pair = pairs[lb["pair_id"]]
        question = pair["prompt"]["messages"][-1]["content"]
        a, b = (truth(question, pair[k].strip()) for k in ("response_a", "response_b"))
        decided += 1
        agree += (a > b) == (lb["p_a"] > 0.5) and a != b
    return agree / decided, decided


def test_quickstart_composes_a_learning_setup():
    """What makes the quickstart a learning test: a scripted labeller, a different held-out evaluator."""
    from cai.config import compose_config

    cfg = compose_config()
    assert cfg.judge.backend == cfg.eval.judge.backend == "python" and cfg.judge.model != cfg.eval.judge.model
    assert (cfg.eval.policy, cfg.eval.baseline, cfg.labels.pairs_from) == ("ppo", "sft", "sft")


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path):
    store = tmp_path / "store"
    run = cai_run(cwd=tmp_path, store=store)  # evaluates every trained policy: PPO and DPO
    m = run["metrics"]
    agreement, decided = label_agreement(run, store)
    # the labeller's marker count vs the ground truth (on task and courteous): it cannot see an off-task
    # reply, so it is wrong where one carries the courteous marker (measured 0.90-0.96 over seeds 0-2)
    assert decided >= 100 and agreement >= 0.85
    assert (m["label/truth_agreement"], m["label/truth_n"]) == (agreement, decided)  # labels.truth reports it
    assert m["label/truth_agreement_ci_low"] > 0.8
    assert m["rm/eval/accuracy"] >= 0.8 and m["rm/eval/accuracy_ci_low"] > 0.5  # held-out pairs
    kl_target = run["config"]["ppo"]["kl_target"]
    for policy in ("ppo", "dpo"):
        wr = f"eval/{policy}/vs_sft/win_rate"
        assert m[f"eval/{policy}/vs_sft/n"] >= 80
        assert m[wr + "_ci_low"] > 0.5, (policy, m[wr], m[f"eval/{policy}/kl"])
        assert m[f"eval/{policy}/kl"] <= kl_target
    # off task: the labeller and the RM pay for the marker only; the win rates above count an off-task
    # reply as a loss. eval.truth grades every reply by the known rule: lowest_rate is the share graded 0
    # (off task, broken or no marker). PPO (KL-anchored) stays as on-task as SFT (kl_coef 0.1 x 20 steps:
    # 22/92 vs 6/92 off task)
    ppo, sft = m["eval/ppo/truth/lowest_rate"], m["eval/baseline/truth/lowest_rate"]
    assert ppo <= sft + 0.05, (ppo, sft)
    assert m["eval/dpo/truth/lowest_rate"] <= 0.3, m["eval/dpo/truth/lowest_rate"]  # DPO drifts more (15-27%)
    # and PPO's replies grade better than SFT's (seeds 0-2: 1.78-1.83 vs 1.28-1.41, interval +-0.12)
    assert m["eval/ppo/truth/mean_ci_low"] > m["eval/baseline/truth/mean"], (m["eval/ppo/truth/mean"], sft)
    for policy in ("ppo", "dpo"):
        assert m[f"eval/{policy}/truth/n"] == m[f"eval/{policy}/vs_sft/n"]  # every evaluated reply graded
        for name in ("mean", "mean_ci_low", "lowest_rate", "lowest_rate_ci_high", "n"):  # the same baseline
            assert m[f"eval/{policy}/truth_sft/{name}"] == m[f"eval/baseline/truth/{name}"]
    assert 0 < m["ppo/objective/kl"] <= kl_target
    answer = (run["dir"] / "report.md").read_text().split("## Answer", 1)[1].split("\n## ", 1)[0]
    assert "| RLAIF · PPO |" in answer and "| RLAIF · DPO |" in answer  # both policies in the headline
    assert "labels agree with the known rule" in answer and "reward model's held-out accuracy" in answer
    assert "| rule grade |" in answer and "Share of replies at its lowest grade (0 or below)" in answer


TWIN = ["data.max_prompts=96", "policy.tiny.n_layer=1", "policy.tiny.pretrain_steps=60",
        "reward.epochs=8", "reward.lr=2e-3", "dpo.epochs=1", "ppo.steps=3", "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=8", "eval.max_prompts=16", "eval.bootstrap_resamples=200"]


def test_quickstart_twin_runs_the_learning_chain(tmp_path: Path):
    """The quickstart at a tiny budget (about 30-60 s): the pretrained policy answers in both styles,
    the scripted judge critiques and revises, labels agree with the ground truth, the RM learns it."""
    store = tmp_path / "store"
    run = cai_run(*TWIN, cwd=tmp_path, store=store)
    m = run["metrics"]
    assert m["model/pretrain_last_loss"] < m["model/pretrain_first_loss"] / 2
    assert m["critique/failed_requests"] == 0 and m["critique/unusable_rounds"] == 0
    agreement, decided = label_agreement(run, store, _by_style)  # the twin's policy writes broken text too
    assert decided >= 10 and agreement >= 0.9
    assert m["label/position_consistency"] == 1.0 and m["label/failed"] == 0
    assert m["rm/final_loss"] < 0.6 and m["rm/eval/margin"] > 0  # the RM learns the rule (few held-out pairs)
    for key in ("eval/ppo/vs_sft/win_rate", "eval/dpo/vs_sft/win_rate_ci_low", "eval/ppo/kl", "ppo/objective/kl",
                "dpo/final_loss", "label/truth_agreement_ci_low", "eval/ppo/truth/mean_ci_low",
                "eval/dpo/truth/lowest_rate_ci_high", "eval/baseline/truth/mean", "eval/baseline/truth/lowest_rate"):
        assert key in m
    assert m["eval/ppo/truth/n"] == m["eval/baseline/truth/n"] == 16  # eval.max_prompts: every reply graded
    revisions = read_jsonl(store / "revisions" / run["artifacts"]["revisions"] / "revisions.jsonl")
    assert all(style(r["final_revision"]) != "rude" for r in revisions)  # every rude marker revised away
    assert any(style(r["initial_response"]) == "rude" for r in revisions)


def test_random_tiny_judge_still_runs_end_to_end(tmp_path: Path):
    """judge=tiny_hf (the tiny policy model as a local log-prob judge) on the project's own prompts:
    every stage of the quickstart runs and lands in the metrics."""
    run = cai_run("judge=tiny_hf", "eval=default", "eval.policy=ppo", "eval.baseline=sft", "data=builtin",
                  "constitution=harmless", "policy=tiny", "critique.generator=policy", "data.max_prompts=6",
                  "sampling.max_new_tokens=6", "critique.max_new_tokens=6", "policy.tiny.n_layer=1",
                  "policy.tiny.n_embd=32", "policy.tiny.n_head=2", "policy.tiny.vocab_size=512", "ppo.steps=2",
                  "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.max_new_tokens=6", "eval.max_prompts=6",
                  "eval.max_new_tokens=6", "eval.bootstrap_resamples=100",
                  cwd=tmp_path, store=tmp_path / "store")
    assert run["config"]["judge"]["backend"] == "hf" and run["config"]["eval"]["judge"]["model"] == "tiny"
    m = run["metrics"]
    assert m["label/ok"] == m["label/pairs"] > 0 and "model/pretrain_steps" not in m
    assert {"eval/ppo/vs_sft/win_rate", "eval/dpo/vs_sft/win_rate", "rm/final_loss", "ppo/objective/kl",
            "dpo/final_loss"} <= set(m)

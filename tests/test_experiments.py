"""The named studies: every experiment and arm composes and plans; the arms of the matched study
share what they claim to share; and a tiny multirun over three arms runs end to end, twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai.config import compose_config

REPO = Path(__file__).resolve().parents[1]
ARMS = ("sft", "sl_cai", "rlhf", "rlaif", "dpo_human", "dpo_ai", "d_rlaif", "distil_judge")
EXPERIMENTS = ("rlaif_vs_rlhf", "constitution_ablation", "judge_ablation", "revisions_ablation")
# stages every arm of the matched study builds from identical configs (so one artifact each); eval_baseline
# holds the baseline's samples and harmlessness verdicts, computed once per seed instead of once per arm
MATCHED = ("prompts", "policy_model", "human_pairs", "eval_reward", "eval_baseline")


compose = compose_config  # the config `cai run <overrides>` would run


def sweep_params(experiment: str) -> dict[str, str]:
    import yaml

    doc = yaml.safe_load((REPO / "conf" / "experiment" / f"{experiment}.yaml").read_text())
    params = dict(doc.get("hydra", {}).get("sweeper", {}).get("params", {}))
    for group, values in params.items():  # glob(*): every option of the group (Hydra's sweep grammar)
        if str(values).replace(" ", "") == "glob(*)":
            params[group] = ",".join(sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")))
    return params


def test_arm_group_matches_the_study_sweep():
    files = sorted(p.stem for p in (REPO / "conf" / "arm").glob("*.yaml"))
    assert files == sorted(ARMS)
    assert sorted(sweep_params("rlaif_vs_rlhf")["arm"].split(",")) == sorted(ARMS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_sweep_point_composes_and_plans(experiment):
    from cai.pipeline import plan

    params = sweep_params(experiment)
    assert params, f"{experiment}: the experiment should declare its sweep"
    (group, values), = params.items()
    for value in values.split(","):
        cfg = compose(f"experiment={experiment}", f"{group}={value}")
        assert cfg.experiment.name == experiment
        names = [s.name for s in plan(cfg)]
        assert names[-1] == "evaluate" or "evaluate" in names
        assert "human_pairs" in names  # every study runs on HH-RLHF


def _stage_configs(arm: str, *extra: str) -> dict[str, dict]:
    from cai.pipeline import plan

    cfg = compose("experiment=rlaif_vs_rlhf", f"arm={arm}", *extra)
    return {s.name: {"config": s.config, "inputs": s.inputs, "version": s.version} for s in plan(cfg)}


@pytest.mark.parametrize("extra", [(), ("labels.source=policy_pairs",)])
def test_arms_are_matched(extra):
    plans = {arm: _stage_configs(arm, *extra) for arm in ARMS}
    for name in MATCHED:  # the same config slice and inputs in every arm: one shared artifact
        slices = [json.dumps(p[name], sort_keys=True, default=str) for p in plans.values()]
        assert len(set(slices)) == 1, name
    # human vs AI labels: reward and PPO differ only in the label source
    rlhf, rlaif = plans["rlhf"], plans["rlaif"]
    assert {**rlhf["reward"]["config"]["reward"], "labels_from": None} == \
        {**rlaif["reward"]["config"]["reward"], "labels_from": None}
    assert rlhf["ppo"]["config"] == rlaif["ppo"]["config"]
    dh, da = plans["dpo_human"]["dpo"]["config"], plans["dpo_ai"]["dpo"]["config"]
    assert {**dh["dpo"], "labels_from": None} == {**da["dpo"], "labels_from": None}
    # the same AI labels serve every AI arm; the judge labels the pairs labels.source names
    assert plans["rlaif"]["ai_labels"] == plans["dpo_ai"]["ai_labels"]
    source = "policy_pairs" if extra else "human_pairs"
    assert plans["rlaif"]["ai_labels"]["inputs"]["pairs"] == source
    # AI labels of the human-labelled pairs get their agreement with humans measured (and only those)
    with_quality = {arm for arm, p in plans.items() if "label_quality" in p}
    assert with_quality == (set() if extra else {arm for arm, p in plans.items() if "ai_labels" in p})
    # each arm evaluates its own final policy, with one evaluation config
    expected = {"sft": "initial", "sl_cai": "sft", "rlhf": "ppo", "rlaif": "ppo", "dpo_human": "dpo",
                "dpo_ai": "dpo", "d_rlaif": "ppo", "distil_judge": "sft"}
    for arm, p in plans.items():
        policy = expected[arm]  # the policy the arm trains (the initial one for the SFT-only arm)
        assert p["evaluate"]["inputs"] == {policy: f"evaluate_{policy}"}, arm
        assert p[f"evaluate_{policy}"]["inputs"].get("arm", "initial") == policy
        assert p[f"evaluate_{policy}"]["config"] == plans["sft"]["evaluate_initial"]["config"]


TINY = [
    "data.max_prompts=8", "data.human.limit=48", "sampling.max_new_tokens=6",
    "policy.tiny.n_layer=1", "policy.tiny.n_embd=32", "policy.tiny.n_head=2", "policy.tiny.vocab_size=512",
    "reward.batch_size=8", "reward.micro_batch_size=8", "reward.bootstrap_resamples=100",
    "ppo.steps=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.micro_batch_size=4",
    "ppo.max_new_tokens=6", "ppo.ppo_epochs=1", "ppo.lr=1e-3",
    "dpo.batch_size=8", "dpo.micro_batch_size=8", "dpo.lr=1e-3",
    "eval.max_prompts=8", "eval.max_new_tokens=6", "eval.bootstrap_resamples=200",
    "eval.rm.batch_size=8", "eval.rm.micro_batch_size=8", "eval.rm.bootstrap_resamples=100",
]


def _sweep(tmp_path: Path, hh: Path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CAI_HH_RLHF": str(hh)}
    cmd = [sys.executable, "-m", "cai.cli", "run", "-m", "experiment=rlaif_vs_rlhf", "arm=sft,rlhf,dpo_ai",
           "seed=0", *TINY, f"store.root={tmp_path / 'store'}", f"hydra.sweep.dir={tmp_path / name}"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


# issue 7's acceptance, so it runs in CI's default suite (about 1-1.5 min on 2 cores)
def test_tiny_matched_sweep_shares_artifacts_and_reruns_for_free(tmp_path, shared_data_dir):
    hh = shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    first = _sweep(tmp_path, hh, "sweep")
    assert first.returncode == 0, first.stderr[-3000:]
    runs = [json.loads((tmp_path / "sweep" / str(i) / "run.json").read_text()) for i in range(3)]
    assert [r["config"]["tags"]["arm"] for r in runs] == ["sft", "rlhf", "dpo_ai"]
    for name in MATCHED:
        assert len({r["artifacts"][name] for r in runs}) == 1, name
    metrics = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text()) for i in range(3)]
    policies = ["initial", "ppo", "dpo"]  # what each arm trains (the SFT-only arm: nothing) is evaluated
    for m, p in zip(metrics, policies):
        for key in ("vs_sft/win_rate", "vs_sft/win_rate_ci_low", "vs_sft/win_rate_ci_high",
                    "vs_sft/lc_win_rate", "harmless/rate", "kl", "length", "rm_score"):
            assert f"eval/{p}/{key}" in m, (p, key)
    assert metrics[0]["eval/initial/vs_sft/win_rate"] == 0.5 and metrics[0]["eval/initial/kl"] == 0.0  # SFT vs itself
    for m in metrics[1:]:  # built once, by the first arm
        assert m["pipeline/eval_reward/reused"] == 1 and m["pipeline/eval_baseline/reused"] == 1
    stage = [json.loads((tmp_path / "sweep" / str(i) / "stages" / f"evaluate_{p}.json").read_text())
             for i, p in enumerate(policies)]
    assert "generate" not in stage[0]["phases_s"]  # the sft arm IS the baseline: its samples are reused
    assert all("generate" in st["phases_s"] for st in stage[1:])  # the others sample only their own policy
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "| RLHF | RLHF · PPO |" in report and "eval/ppo/vs_sft/win_rate" in report
    key = runs[0]["artifacts"]["eval_baseline"].rsplit("-", 1)[1][:10]
    assert f"| eval_baseline | 3 | 1 | one artifact for all 3 runs ({key}…) | — |" in report
    assert "| dpo | 1 | 1 | only DPO AI uses it (" in report
    h2h = _check_head_to_head(tmp_path / "sweep", metrics, report)
    assert not any(r["reused"] for r in h2h)

    second = _sweep(tmp_path, hh, "sweep_again")
    assert second.returncode == 0, second.stderr[-3000:]
    for i, m in enumerate(metrics):
        again = json.loads((tmp_path / "sweep_again" / str(i) / "metrics.json").read_text())
        assert all(v == 1 for k, v in again.items() if k.startswith("pipeline/") and k.endswith("/reused"))
        assert {k: v for k, v in again.items() if not k.startswith(("time/", "pipeline/"))} == \
            {k: v for k, v in m.items() if not k.startswith(("time/", "pipeline/"))}
    again = _check_head_to_head(tmp_path / "sweep_again", metrics, (tmp_path / "sweep_again" / "report.md").read_text())
    assert all(r["reused"] for r in again)  # the second sweep's comparison rebuilt no head_to_head artifact
    assert [r["win_rate"] for r in again] == [r["win_rate"] for r in h2h]
    assert len(list((tmp_path / "store" / "head_to_head").glob("head_to_head-*"))) == 3


def _check_head_to_head(folder: Path, metrics: list[dict], report: str) -> list[dict]:
    """The sweep callback judged the three arms pairwise; the report shows it and the paired tests."""
    from cai.report.h2h import h2h_matrices

    rows = json.loads((folder / "head_to_head.json").read_text())["rows"]
    arms = ["SFT", "RLHF", "DPO AI"]  # the arms' tags in words
    assert [(r["arm_a"], r["arm_b"]) for r in rows] == [(arms[0], arms[1]), (arms[0], arms[2]), (arms[1], arms[2])]
    for r in rows:
        assert r["n"] == 8 and r["wins"] + r["ties"] + r["losses"] + r["invalid"] == 8
    m = h2h_matrices(rows)[0]
    for a in arms:
        assert (a, a) not in m  # an arm is not compared with itself
        for b in arms:
            if a != b:  # B over A is A over B seen from B
                assert m[(a, b)][0] + m[(b, a)][0] == 1.0
    # the SFT arm's responses are the baseline's, so SFT over rlhf mirrors rlhf's own win rate vs SFT
    # (one prompt may flip at the tie boundary: the judge sees the two orders in other batches)
    assert abs(m[(arms[0], arms[1])][0] - (1.0 - metrics[1]["eval/ppo/vs_sft/win_rate"])) <= 1 / 8
    assert "## Head to head" in report and "| row beats column | SFT |" in report
    assert "## Paired tests between arms" in report and "| RLHF | DPO AI | score vs SFT |" in report
    return rows

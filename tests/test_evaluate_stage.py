"""The ``evaluate`` stage on the tiny model: which policy it evaluates, what it measures, and how
it counts failed judgements (invalid, never losses)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from cai.errors import ConfigError

TINY = [
    "data.max_prompts=6",
    "sampling.max_new_tokens=6",
    "policy.tiny.n_layer=1",
    "policy.tiny.n_embd=32",
    "policy.tiny.n_head=2",
    "policy.tiny.vocab_size=512",
    "eval.max_prompts=6",
    "eval.max_new_tokens=6",
    "eval.bootstrap_resamples=100",
]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cai.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The SFT-only arm run end to end: prompts, tiny policy, evaluate (arm = baseline)."""
    from cai.pipeline import run_experiment

    root = tmp_path_factory.mktemp("eval")
    cfg = compose("experiment.stages=[evaluate]", f"store.root={root / 'store'}", *TINY)
    metrics = run_experiment(cfg, root / "run")
    info = json.loads((root / "run" / "run.json").read_text())
    return cfg, root, metrics, info


def _store(info):
    from cai.artifacts import ArtifactStore

    return ArtifactStore(info["store"])


def _perturbed_arm(info, out: Path, scale: float = 0.5) -> Path:
    """A stand-in trained policy: the tiny policy with seeded noise added to its weights."""
    import torch

    from cai.models import ModelSpec, load_causal_lm

    src = _store(info).path(info["artifacts"]["policy_model"]) / "model"
    model, tok = load_causal_lm(ModelSpec(str(src), device="cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return out


def _evaluate(cfg, info, arm_dir: Path, tmp_path: Path):
    """Build the evaluate stage of ``cfg`` with ``arm_dir`` as the trained (ppo) policy."""
    from cai.evaluate_stage import evaluate_stage

    cfg.experiment.stages = ["ppo", "evaluate"]
    stage = evaluate_stage(cfg)
    assert stage.inputs["arm"] == "ppo"
    store = _store(info)
    keys = {n: info["artifacts"][u] for n, u in stage.inputs.items() if n != "arm"}
    paths = {n: store.path(k) for n, k in keys.items()}
    keys["arm"], paths["arm"] = f"ppo-test-{arm_dir.name}", arm_dir
    key = store.key("evaluate", stage.config, keys)
    result = store.build(key, lambda ctx: stage.fn(stage.config, paths, ctx))
    return result.stage_info["metrics"], store.path(key)


def test_sft_arm_is_a_tie_with_itself(sft_run):
    cfg, root, metrics, _ = sft_run
    n = metrics["eval/prompts"]
    assert n == 6 and metrics["eval/vs_sft/n"] == n
    # the arm is the baseline: same samples, so every prompt is a tie by definition, KL is 0
    assert metrics["eval/vs_sft/identical"] == n and metrics["eval/vs_sft/ties"] == n
    assert metrics["eval/vs_sft/win_rate"] == 0.5 and metrics["eval/vs_sft/lc_win_rate"] == 0.5
    assert metrics["eval/kl"] == 0.0
    assert metrics["eval/length"] == metrics["eval/sft_length"]
    assert metrics["eval/judge_is_labeller"] == 1  # the offline default judges with the labeller
    # builtin prompts tagged harmful are asked the harmlessness question, for arm and baseline
    h = metrics["eval/harmless_prompts"]
    assert h > 0 and metrics["eval/harmless/n"] == h == metrics["eval/harmless_sft/n"]
    assert metrics["eval/harmless/positive"] + metrics["eval/harmless/negative"] \
        + metrics["eval/harmless/undecided"] + metrics["eval/harmless/invalid"] == h
    assert "eval/rm_score" not in metrics  # no human data configured: no held-out RM
    rows = [json.loads(x) for x in (root / "store").glob("evaluate/evaluate-*/samples.jsonl").__next__()
            .read_text().splitlines()]
    assert len(rows) == n and all(r["arm_response"] == r["sft_response"] and r["outcome"] == "tie" for r in rows)


def test_second_run_reuses_and_reports_the_same(sft_run, tmp_path):
    from cai.pipeline import run_experiment

    cfg, root, metrics, _ = sft_run
    again = run_experiment(cfg, tmp_path / "run2")
    assert again["pipeline/evaluate/reused"] == 1
    assert {k: v for k, v in again.items() if k.startswith("eval/")} == \
        {k: v for k, v in metrics.items() if k.startswith("eval/")}


def test_trained_arm_is_judged_and_kl_measured(sft_run, tmp_path):
    cfg, _, _, info = sft_run
    arm = _perturbed_arm(info, tmp_path / "arm")
    m, folder = _evaluate(cfg, info, arm, tmp_path)
    n = m["eval/vs_sft/n"]
    assert m["eval/vs_sft/identical"] < n
    assert m["eval/vs_sft/wins"] + m["eval/vs_sft/ties"] + m["eval/vs_sft/losses"] + m["eval/vs_sft/invalid"] == n
    assert 0.0 <= m["eval/vs_sft/win_rate_ci_low"] <= m["eval/vs_sft/win_rate"] <= m["eval/vs_sft/win_rate_ci_high"] <= 1
    assert math.isfinite(m["eval/kl"]) and m["eval/kl"] != 0.0
    rows = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines()]
    assert sum(r["kl"] for r in rows) / len(rows) == pytest.approx(m["eval/kl"])
    # determinism: the same inputs in a fresh store give the same numbers
    shutil.rmtree(folder)
    again, _ = _evaluate(cfg, info, arm, tmp_path)
    assert {k: v for k, v in again.items() if k.startswith("eval/")} == \
        {k: v for k, v in m.items() if k.startswith("eval/")}


def test_failed_judgements_are_invalid_not_losses(sft_run, tmp_path):
    from cai.testing.servers import Faults, FakeOpenAIServer

    cfg, _, _, info = sft_run
    arm = _perturbed_arm(info, tmp_path / "arm_api")
    with FakeOpenAIServer(faults=Faults(refusal=0.4, seed=3)) as srv:
        cfg.eval.judge.backend = "openai"
        cfg.eval.judge.model = "fake"
        cfg.eval.judge.base_url = srv.base_url
        cfg.eval.judge.api_key_env = None
        cfg.eval.judge.max_retries = 0
        cfg.eval.judge.cache = False
        m, _ = _evaluate(cfg, info, arm, tmp_path)
    assert m["eval/judge_is_labeller"] == 0
    n = m["eval/vs_sft/n"] - m["eval/vs_sft/identical"]
    assert n > 0 and m["eval/vs_sft/invalid"] > 0
    assert m["eval/vs_sft/invalid_refusal"] == m["eval/vs_sft/invalid"]
    decided = m["eval/vs_sft/wins"] + m["eval/vs_sft/ties"] + m["eval/vs_sft/losses"]
    assert decided + m["eval/vs_sft/invalid"] == m["eval/vs_sft/n"]
    if decided:
        expected = (m["eval/vs_sft/wins"] + m["eval/vs_sft/ties"] / 2) / decided
        assert m["eval/vs_sft/win_rate"] == pytest.approx(expected)  # invalid is outside the denominator


def test_builder_picks_the_last_trained_policy_and_keeps_runtime_out_of_the_key():
    from cai.evaluate_stage import evaluate_stage

    for stages, arm in ((["evaluate"], None), (["sft", "evaluate"], "sft"),
                        (["sft", "dpo", "evaluate"], "dpo"), (["dpo", "ppo", "evaluate"], "ppo")):
        stage = evaluate_stage(compose(f"experiment.stages=[{','.join(stages)}]"))
        assert stage.inputs.get("arm") == arm
        assert stage.config["arm"] == (arm or "initial")
    # eval.baseline=sft: PPO/DPO on top of the run's own SFT are compared with that SFT policy
    on_sft = evaluate_stage(compose("experiment.stages=[sft,ppo,evaluate]", "eval.baseline=sft"))
    assert on_sft.inputs["baseline"] == "sft" and on_sft.config["eval"]["baseline"] == "sft"
    sl_cai = evaluate_stage(compose("experiment.stages=[sft,evaluate]", "eval.baseline=sft"))
    assert "baseline" not in sl_cai.inputs and sl_cai.config["eval"]["baseline"] == "initial"
    a = evaluate_stage(compose("experiment.stages=[evaluate]"))
    b = evaluate_stage(compose("experiment.stages=[evaluate]", "eval.judge.max_concurrency=4",
                               "eval.hf_batch_size=2", "policy.device=cpu"))
    assert a.config == b.config  # how fast / where: not what it computes
    c = evaluate_stage(compose("experiment.stages=[evaluate]", "eval.max_new_tokens=7"))
    assert c.config != a.config


def test_held_out_rm_only_with_human_data(shared_data_dir):
    from cai.evaluate_stage import eval_reward_stage, evaluate_stage

    path = shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    cfg = compose("experiment.stages=[evaluate]", f"data.human.path={path}", "data.prompts=builtin")
    stage = evaluate_stage(cfg)
    assert stage.inputs["eval_reward"] == "eval_reward"
    rm = eval_reward_stage(cfg)
    assert rm.config["seed"] == cfg.seed + cfg.eval.rm_seed_offset and rm.config["reward"]["labels_from"] == "human"
    assert "eval_reward" not in evaluate_stage(compose("experiment.stages=[evaluate]",
                                                       f"data.human.path={path}", "eval.use_rm=false")).inputs


@pytest.mark.parametrize("override, field", [("eval.harmless_prompts=some", "harmless_prompts"),
                                             ("eval.ties=never", "ties"), ("eval.tie_margin=0.7", "tie_margin"),
                                             ("eval.max_prompts=0", "max_prompts"),
                                             ("eval.baseline=best", "baseline")])
def test_bad_eval_config_names_the_field(override, field):
    from cai.evaluate_stage import evaluate_stage

    with pytest.raises(ConfigError, match=f"eval.{field}"):
        evaluate_stage(compose("experiment.stages=[evaluate]", override))


def test_held_out_rm_scores_every_response(shared_data_dir, tmp_path):
    """With HH-RLHF configured, a reward model on human labels (stage eval_reward) scores the arm
    and the baseline; its training metrics are renamed so they never clash with the arm's RM."""
    from cai.pipeline import run_experiment

    hh = shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    cfg = compose("data=hh_rlhf", f"data.human.path={hh}", "data.human.limit=32", "experiment.stages=[evaluate]",
                  "eval.rm.batch_size=8", "eval.rm.micro_batch_size=8", "eval.rm.bootstrap_resamples=50",
                  f"store.root={tmp_path / 'store'}", *TINY)
    m = run_experiment(cfg, tmp_path / "run")
    assert m["eval/rm_score_ci_low"] <= m["eval/rm_score"] <= m["eval/rm_score_ci_high"]
    assert m["eval/rm_score"] == pytest.approx(m["eval/sft_rm_score"])  # the SFT arm is its own baseline
    assert m["eval/rm_score_vs_sft"] == 0.0
    assert any(k.startswith("eval_rm/") for k in m) and not any(k.startswith("rm/") for k in m)
    # red-team prompts (tagged harmful) are all asked the harmlessness question
    assert m["eval/harmless_prompts"] == m["eval/prompts"]

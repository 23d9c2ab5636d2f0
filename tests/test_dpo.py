"""DPO: raises the held-out margin on a known rule, IPO and soft labels, exact resume, LoRA, stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.config import DPOConfig, ModelConfig, TinyConfig
from cai.models import ModelSpec, load_causal_lm
from cai.testing.preference_task import task_corpus, write_task
from cai.tiny import build_tiny_causal_lm, default_tiny_corpus
from cai.train.dpo import load_policy, run_dpo, train_dpo
from cai.train.log import read_train_log
from cai.train.pairs import (
    LabelledPair,
    PreferenceData,
    encode_pairs,
    load_labelled_pairs,
    split_pairs,
)

SHAPE = TinyConfig(vocab_size=512, n_layer=1, n_head=2, n_embd=64, seed=0)
FAST = {"epochs": 2, "batch_size": 16, "lr": 2e-3, "warmup": 0, "max_length": 64, "log_every": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("dpo") / "policy", default_tiny_corpus() + task_corpus(), SHAPE)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    pairs, labels = write_task(tmp_path_factory.mktemp("task"), 200, seed=1)
    items, stats = load_labelled_pairs(pairs, labels)
    train, test = split_pairs(items, 0.2)
    return PreferenceData(train, test, test, stats.metrics("dpo/data"))


def _run(tmp_path, policy_dir, data, **overrides):
    cfg = DPOConfig(**{**FAST, **overrides})
    policy = ModelConfig(name_or_path=str(policy_dir), chat_format="hh", max_length=64)
    model, tok, chat_format = load_policy(policy, str(policy_dir), cfg, 0)
    return run_dpo(cfg, data, model, tok, chat_format, seed=0, out_dir=tmp_path / "out", state_dir=tmp_path / "state")


def test_dpo_raises_margin_and_accuracy_on_held_out_pairs(tmp_path, policy_dir, task):
    before, _ = load_causal_lm(ModelSpec(str(policy_dir), device="cpu"))
    m = _run(tmp_path, policy_dir, task, beta=0.5)
    # at step 0 the policy is the reference: every held-out margin is exactly 0
    assert m["dpo/eval/pairs"] == len(task.test) >= 30
    assert m["dpo/eval/rewards/margins"] > 1.0
    assert m["dpo/eval/rewards/accuracies"] >= 0.9
    assert m["dpo/eval/rewards/chosen"] > m["dpo/eval/rewards/rejected"]
    assert m["dpo/human/rewards/accuracies"] == m["dpo/eval/rewards/accuracies"]
    log = read_train_log(tmp_path / "out" / "train_log.jsonl")
    assert log[0]["dpo/loss"] == pytest.approx(0.6931, abs=0.02)  # log 2: policy == reference
    assert log[-1]["dpo/loss"] < 0.3
    assert {"dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/accuracies", "dpo/rewards/margins",
            "dpo/logps/chosen", "dpo/logps/rejected"} <= set(log[-1])
    after, _ = load_causal_lm(ModelSpec(str(tmp_path / "out" / "model"), device="cpu"))
    assert not torch.equal(before.transformer.wte.weight, after.transformer.wte.weight)


@pytest.mark.parametrize("overrides", [{"loss": "ipo", "beta": 0.5}, {"soft_labels": True, "beta": 0.5},
                                       {"label_smoothing": 0.1, "beta": 0.5}])
def test_ipo_and_soft_labels_learn_too(tmp_path, policy_dir, task, overrides):
    soft = task
    if overrides.get("soft_labels"):
        soft = PreferenceData([LabelledPair(x.pair, 0.85 if x.p_a > 0.5 else 0.15) for x in task.train],
                              task.test, task.test, {})
    m = _run(tmp_path, policy_dir, soft, epochs=1, **overrides)
    assert m["dpo/eval/rewards/margins"] > 0.2
    assert m["dpo/eval/rewards/accuracies"] >= 0.75


class _Killed(Exception):
    pass


def test_exact_resume_reuses_the_reference_of_the_first_attempt(tmp_path, policy_dir, task):
    cfg = DPOConfig(**{**FAST, "batch_size": 8, "checkpoint_every": 2})

    def train(state_dir, on_step=None):
        model, tok = load_causal_lm(ModelSpec(str(policy_dir), device="cpu", dtype="float32"))
        enc, _ = encode_pairs(task.train[:24], tok, "hh", 64)
        test, _ = encode_pairs(task.test[:8], tok, "hh", 64)
        return train_dpo(model, tok, enc, cfg, seed=0, state_dir=state_dir, eval_sets={"eval": test},
                         on_step=on_step)

    straight = train(tmp_path / "a")

    def kill(step, _metrics):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(tmp_path / "b", on_step=kill)
    ref_file = tmp_path / "b" / "reference_logps.pt"
    first_refs = torch.load(ref_file, weights_only=True)
    resumed = train(tmp_path / "b")
    assert resumed.resumed_from == 2 and resumed.steps == straight.steps == 6
    assert torch.equal(torch.load(ref_file, weights_only=True)["train"], first_refs["train"])
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name
    assert resumed.metrics["dpo/eval/loss"] == straight.metrics["dpo/eval/loss"]


def test_lora_dpo_trains_adapters_and_saves_a_plain_policy(tmp_path, policy_dir, task):
    small = PreferenceData(task.train[:48], task.test[:16], [], {})
    m = _run(tmp_path, policy_dir, small, epochs=1, beta=0.5, lora={"enabled": True, "r": 4, "alpha": 8})
    assert m["dpo/trainable_params"] < m["dpo/total_params"] / 10
    assert m["dpo/eval/rewards/margins"] > 0
    model, _ = load_causal_lm(ModelSpec(str(tmp_path / "out" / "model"), device="cpu"))
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_dpo_config_is_checked():
    from cai.errors import ConfigError

    for bad in ({"loss": "hinge"}, {"beta": 0.0}, {"label_smoothing": 0.5}, {"labels_from": "x"}):
        with pytest.raises(ConfigError, match="dpo\\."):
            DPOConfig(**bad)


def test_pipeline_reward_and_dpo_stages_on_human_pairs(tmp_path, shared_data_dir):
    """The reward and dpo stages through the pipeline on 60 HH-RLHF pairs; a second run reuses both."""
    from cai.config import compose_config
    from cai.pipeline import run_experiment

    hh = shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    overrides = ["experiment.stages=[reward,dpo]", "reward.labels_from=human", "dpo.labels_from=human",
                 "dpo.start_from=initial", f"data.human.path={hh}", "data.human.limit=60",
                 "policy.tiny.n_layer=1", "policy.tiny.n_embd=32", "policy.tiny.n_head=2",
                 "policy.tiny.vocab_size=512", "reward.lr=1e-3", "reward.max_length=96", "dpo.max_length=96",
                 "dpo.lr=1e-4", "reward.ensemble_size=2", "reward.ensemble_kind=heads",
                 f"store.root={tmp_path / 'store'}"]
    cfg = compose_config(*overrides)
    m1 = run_experiment(cfg, tmp_path / "run1")
    m2 = run_experiment(cfg, tmp_path / "run2")
    assert m1["rm/data/used"] + m1["rm/data/skipped"] == m1["rm/data/pairs_in"] - m1["rm/data/duplicate_pairs"]
    assert m1["rm/human/pairs"] > 0 and 0.0 <= m1["rm/human/accuracy"] <= 1.0
    assert m1["rm/human/ensemble_std"] > 0
    assert "dpo/human/rewards/margins" in m1 and m1["dpo/steps"] >= 1
    assert m2["pipeline/reward/reused"] == 1 and m2["pipeline/dpo/reused"] == 1
    keys = json.loads((tmp_path / "run1" / "run.json").read_text())["artifacts"]
    reward = tmp_path / "store" / "reward" / keys["reward"]
    assert (reward / "model" / "config.json").is_file() and (reward / "reward_stats.json").is_file()
    assert (tmp_path / "store" / "dpo" / keys["dpo"] / "model" / "config.json").is_file()


def test_dpo_and_reward_plan_the_same_label_inputs(tmp_path):
    """Both preference stages take their labels through one planning rule, and a human arm
    without human pairs fails naming the stage whose setting asked for them."""
    from cai.config import compose_config
    from cai.errors import ConfigError
    from cai.pipeline import plan

    hh = tmp_path / "hh.jsonl"
    label_inputs = {"ai_labels", "ai_pairs", "human_pairs"}
    expected = {"human": {"human_pairs": "human_pairs"},
                "ai": {"ai_labels": "ai_labels", "ai_pairs": "policy_pairs", "human_pairs": "human_pairs"}}
    for arm, want in expected.items():
        cfg = compose_config("experiment.stages=[reward,dpo]", f"reward.labels_from={arm}", f"dpo.labels_from={arm}",
                             "labels.source=policy_pairs", f"data.human.path={hh}")
        stages = {s.name: s for s in plan(cfg)}
        for name in ("reward", "dpo"):
            assert {k: v for k, v in stages[name].inputs.items() if k in label_inputs} == want, (arm, name)
            assert "device" not in stages[name].config[name]
    for stage in ("reward", "dpo"):
        cfg = compose_config(f"experiment.stages=[{stage}]", f"{stage}.labels_from=human")
        with pytest.raises(ConfigError, match=rf"^{stage}\.labels_from=human needs data\.human\.path"):
            plan(cfg)


def test_dpo_starts_from_the_policy_dpo_start_from_names():
    """dpo.start_from decides the starting policy (also the reference): the sft artifact, or the
    initial policy (the tiny policy artifact here); nothing looks at experiment.stages."""
    from cai.config import compose_config
    from cai.pipeline import plan

    human = ["experiment.stages=[dpo]", "data.human.path=hh.jsonl", "dpo.labels_from=human"]
    initial = {s.name: s for s in plan(compose_config(*human, "dpo.start_from=initial"))}["dpo"]
    assert initial.inputs == {"human_pairs": "human_pairs", "policy_model": "policy_model"}
    sft = {s.name: s for s in plan(compose_config(*human, "dpo.start_from=sft"))}
    assert sft["dpo"].inputs == {"human_pairs": "human_pairs", "sft": "sft"} and "sft" in sft
    assert sft["dpo"].config["dpo"]["start_from"] == "sft"  # two starts, two keys

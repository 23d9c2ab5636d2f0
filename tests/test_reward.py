"""Reward model: learns a known rule, soft labels, ensembles, exact resume, bad input, scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.config import RewardConfig, TinyConfig, build
from cai.data import Label, Pair, Prompt, write_jsonl
from cai.errors import CaiError, ConfigError, DataError
from cai.models import ModelSpec, load_sequence_classifier
from cai.testing.preference_task import synthetic_pairs, task_corpus, write_task
from cai.tiny import build_tiny_sequence_classifier, default_tiny_corpus
from cai.train.log import read_train_log
from cai.train.pairs import (
    LabelledPair,
    PreferenceData,
    encode_pairs,
    load_labelled_pairs,
    split_pairs,
)
from cai.train.reward import (
    RewardScorer,
    backbone_loader,
    expected_calibration_error,
    preference_metrics,
    run_reward,
    train_reward_model,
)

SHAPE = TinyConfig(vocab_size=512, n_layer=1, n_head=2, n_embd=64, seed=0)
FAST = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "max_length": 64, "log_every": 1, "device": "cpu",
        "bootstrap_resamples": 500}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return build_tiny_sequence_classifier(tmp_path_factory.mktemp("rm") / "bb", default_tiny_corpus() + task_corpus(),
                                          SHAPE)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    pairs, labels = write_task(tmp_path_factory.mktemp("task"), 300, seed=0)
    items, stats = load_labelled_pairs(pairs, labels)
    train, test = split_pairs(items, 0.2)
    return PreferenceData(train, test, test, stats.metrics("rm/data"))


def _run(tmp_path, backbone, data, **overrides):
    cfg = RewardConfig(**{**FAST, "backbone": str(backbone), **overrides})
    metrics = run_reward(cfg, data, backbone_loader(cfg, str(backbone)), seed=0, out_dir=tmp_path / "out",
                         state_dir=tmp_path / "state")
    return cfg, metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone, task):
    """One full training run on the task, shared by the tests that read its artifact."""
    tmp_path = tmp_path_factory.mktemp("trained")
    _, m = _run(tmp_path, backbone, task)
    return tmp_path, m


def test_rm_learns_the_rule_on_held_out_pairs(trained, backbone, task):
    before, _ = load_sequence_classifier(ModelSpec(str(backbone), device="cpu"), seed=0)
    tmp_path, m = trained
    assert m["rm/eval/pairs"] == len(task.test) >= 40
    assert m["rm/eval/accuracy"] >= 0.95
    assert m["rm/eval/accuracy_ci_low"] <= m["rm/eval/accuracy"] <= m["rm/eval/accuracy_ci_high"]
    assert m["rm/human/accuracy"] == m["rm/eval/accuracy"]  # human arm: the held-out pairs are human
    log = read_train_log(tmp_path / "out" / "train_log.jsonl")
    assert len(log) == m["rm/steps"] and log[-1]["rm/loss"] < log[0]["rm/loss"] * 0.5
    # the saved model is a plain sequence classifier whose weights moved, with its stats
    after, _ = load_sequence_classifier(ModelSpec(str(tmp_path / "out" / "model"), device="cpu"))
    assert not torch.equal(before.score.weight, after.score.weight)
    stats = json.loads((tmp_path / "out" / "reward_stats.json").read_text())
    assert stats["n_responses"] == 2 * len(task.train) and stats["std"] > 0
    assert abs(stats["mean"] - m["rm/train_reward_mean"]) < 1e-9
    rows = [json.loads(x) for x in (tmp_path / "out" / "heldout_scores.jsonl").read_text().splitlines()]
    assert {r["set"] for r in rows} == {"eval"} and len(rows) == len(task.test)  # human == eval here
    assert all(r["std_a"] == 0.0 for r in rows)  # one member: no spread


def test_scorer_normalises_with_training_stats(trained, task):
    tmp_path, _ = trained
    scorer = RewardScorer.load(tmp_path / "out", device="cpu")
    prompts = [x.pair.prompt for x in task.train] * 2
    responses = [x.pair.response_a for x in task.train] + [x.pair.response_b for x in task.train]
    scores = scorer.score(prompts, responses, batch_size=64)
    norm = torch.tensor(scores.normalised)
    assert abs(float(norm.mean())) < 1e-4 and abs(float(norm.std(unbiased=False)) - 1.0) < 1e-3
    with pytest.raises(DataError, match="2 conversations but 1 responses"):
        scorer.score(prompts[:2], responses[:1])


@pytest.mark.parametrize("kind", ["heads", "seeds"])
def test_ensembles_report_spread(tmp_path, backbone, task, kind):
    soft = PreferenceData([LabelledPair(x.pair, 0.8 if x.p_a > 0.5 else 0.2) for x in task.train[:160]],
                          task.test, task.test, {})
    _, m = _run(tmp_path, backbone, soft, ensemble_size=2, ensemble_kind=kind, epochs=2)
    assert m["rm/eval/ensemble_std"] > 0
    assert m["rm/eval/accuracy"] >= 0.85
    out = tmp_path / "out"
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["heads"] == (2 if kind == "heads" else 1)
    assert (out / "ensemble" / "member_1").is_dir() == (kind == "seeds")
    scores = RewardScorer.load(out, device="cpu").score([task.test[0].pair.prompt], [task.test[0].pair.response_a])
    assert scores.std[0] > 0


def test_micro_batches_and_soft_labels_match_one_big_batch(tmp_path, backbone, task):
    """Gradient accumulation is exact: micro-batches of 3 give the curve of whole batches of 8."""
    curves = []
    for micro in (8, 3):
        model, tok = load_sequence_classifier(ModelSpec(str(backbone), device="cpu"), seed=1)
        enc, _ = encode_pairs(task.train[:40], tok, "hh", 64)
        cfg = RewardConfig(**{**FAST, "batch_size": 8, "micro_batch_size": micro, "epochs": 1})
        train_reward_model(model, tok, enc, cfg, seed=0, state_dir=tmp_path / f"m{micro}")
        curves.append([r["rm/loss"] for r in read_train_log(tmp_path / f"m{micro}" / "train_log.jsonl")])
    assert len(curves[0]) == 5
    assert curves[0] == pytest.approx(curves[1], abs=1e-5)


class _Killed(Exception):
    pass


def test_exact_resume_after_a_kill(tmp_path, backbone, task):
    cfg = RewardConfig(**{**FAST, "batch_size": 8, "epochs": 2, "checkpoint_every": 2})

    def train(state_dir, on_step=None):
        model, tok = load_sequence_classifier(ModelSpec(str(backbone), device="cpu"), seed=0)
        enc, _ = encode_pairs(task.train[:28], tok, "hh", 64)
        return train_reward_model(model, tok, enc, cfg, seed=0, state_dir=state_dir, on_step=on_step)

    straight = train(tmp_path / "a")

    def kill(step, _metrics):
        if step == 5:  # after the step-4 checkpoint and one more step that is lost
            raise _Killed

    with pytest.raises(_Killed):
        train(tmp_path / "b", on_step=kill)
    resumed = train(tmp_path / "b")
    assert resumed.resumed_from == 4 and resumed.steps == straight.steps == 8
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name
    def curve(d):  # the logged numbers minus the timing ones
        return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in read_train_log(d / "train_log.jsonl")]

    assert curve(tmp_path / "b") == curve(tmp_path / "a") and len(curve(tmp_path / "a")) == 8


def test_lora_reward_model_trains_adapters_and_saves_a_plain_model(tmp_path, backbone, task):
    small = PreferenceData(task.train[:64], task.test[:16], [], {})
    _, m = _run(tmp_path, backbone, small, epochs=1, lora={"enabled": True, "r": 4, "alpha": 8})
    assert m["rm/trainable_params"] < m["rm/total_params"] / 2
    model, _ = load_sequence_classifier(ModelSpec(str(tmp_path / "out" / "model"), device="cpu"))
    assert type(model).__name__ == "GPT2ForSequenceClassification"


def test_command_line_trains_a_lora_reward_model(tmp_path, backbone):
    """``python -m cai.train.reward ... lora.enabled=true`` (in-process): the override grammar of
    ``cai run`` reaches the nested LoRA settings, and the saved model is a plain classifier."""
    from cai.train.reward import main

    pairs, labels = write_task(tmp_path / "task", 48, seed=1)
    assert main(["--pairs", str(pairs), "--labels", str(labels), "--backbone", str(backbone), "--out",
                 str(tmp_path / "out"), "lora.enabled=true", "lora.r=4", "epochs=1", "batch_size=8", "max_length=64",
                 "device=cpu", "bootstrap_resamples=50"]) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["rm/steps"] >= 1 and m["rm/trainable_params"] < m["rm/total_params"] / 2
    model, _ = load_sequence_classifier(ModelSpec(str(tmp_path / "out" / "model"), device="cpu"))
    assert type(model).__name__ == "GPT2ForSequenceClassification"


# ----------------------------------------------------------------------------- bad input
def _pair(q: str, a: str, b: str) -> Pair:
    return Pair.create(Prompt.create([{"role": "user", "content": q}], "t"), a, b, "t")


def test_bad_pairs_are_counted_never_silently_dropped(tmp_path):
    good = [p for p, _ in synthetic_pairs(3, seed=5)]
    same, empty = _pair("q1", "same answer", "same answer"), _pair("q2", "an answer", "   ")
    unlabelled, failed_only = _pair("q3", "x", "y"), _pair("q4", "u", "v")
    pairs = [*good, good[0], same, empty, unlabelled, failed_only]
    labels = [Label(good[0].id, 1.0, "h"), Label(good[1].id, 0.7, "j", order="ab"),
              Label(good[1].id, 0.5, "j", order="ba"), Label(good[2].id, 0.5, "j"),
              Label(same.id, 1.0, "h"), Label(empty.id, 0.0, "h"), Label("not-a-pair", 1.0, "h"),
              Label.failed(failed_only.id, "j", "no letter in the answer")]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    write_jsonl(tmp_path / "labels.jsonl", labels)
    items, stats = load_labelled_pairs(tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl")
    assert [round(x.p_a, 6) for x in items] == [1.0, 0.6, 0.5]  # the two orders of good[1] averaged
    assert (stats.duplicate_pairs, stats.identical_responses, stats.empty_response) == (1, 1, 1)
    assert (stats.labels_failed, stats.labels_unmatched, stats.pairs_unlabelled) == (1, 1, 2)
    assert (stats.merged, stats.ties, stats.used, stats.skipped) == (1, 1, 3, 4)
    assert stats.metrics("rm/data")["rm/data/skipped"] == 4


def test_label_outside_unit_interval_names_file_and_line(tmp_path):
    pair = synthetic_pairs(1)[0][0]
    write_jsonl(tmp_path / "pairs.jsonl", [pair])
    (tmp_path / "labels.jsonl").write_text(json.dumps({"pair_id": pair.id, "p_a": 1.5, "source": "j"}) + "\n")
    with pytest.raises(DataError, match=r"labels.jsonl:1: .*p_a.*\[0, 1\]"):
        load_labelled_pairs(tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl")
    with pytest.raises(DataError, match="p_a must be a probability"):
        LabelledPair(pair, -0.1)


def test_nothing_usable_is_an_error(tmp_path):
    pair = _pair("q", "same", "same")
    write_jsonl(tmp_path / "pairs.jsonl", [pair])
    write_jsonl(tmp_path / "labels.jsonl", [Label(pair.id, 1.0, "h")])
    with pytest.raises(DataError, match="no usable labelled pair"):
        load_labelled_pairs(tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl")


def test_tokenizer_without_pad_or_eos_is_refused(backbone, task):
    _, tok = load_sequence_classifier(ModelSpec(str(backbone), device="cpu"))
    tok.pad_token = None
    with pytest.raises(ConfigError, match="no pad token.*EOS token"):
        encode_pairs(task.train[:2], tok, "hh", 64)
    tok.eos_token = None
    with pytest.raises(ConfigError, match="no pad token"):
        encode_pairs(task.train[:2], tok, "hh", 64)


def test_bad_config_values_are_config_errors():
    for bad in ({"labels_from": "robots"}, {"ensemble_kind": "bags"}, {"margin": -1.0}, {"epochs": 0}):
        with pytest.raises(ConfigError, match="reward\\."):
            RewardConfig(**bad)
    with pytest.raises(CaiError, match="reward.learning_rate: Key 'learning_rate' not in"):
        build(RewardConfig, {"learning_rate": 1.0})


def test_metrics_ece_and_accuracy_by_hand():
    pred = torch.tensor([0.05, 0.15, 0.95, 0.95])
    target = torch.tensor([0.0, 1.0, 1.0, 0.5])
    # bins: [0.0-0.1): |0.05-0| * 1/4; [0.1-0.2): |0.15-1| * 1/4; [0.9-1.0]: |0.95-0.75| * 2/4
    assert expected_calibration_error(pred, target) == pytest.approx(0.0125 + 0.2125 + 0.1)
    r_a = torch.tensor([[2.0], [0.0], [1.0], [3.0]])
    r_b = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    m = preference_metrics(r_a, r_b, torch.tensor([1.0, 1.0, 0.0, 0.5]), "x", n_boot=200)
    assert m["x/decided_pairs"] == 3 and m["x/accuracy"] == pytest.approx(1 / 3)
    assert 0.0 <= m["x/accuracy_ci_low"] <= m["x/accuracy_ci_high"] <= 1.0


# ----------------------------------------------------------------------------- the AI arm
def test_ai_arm_trains_on_ai_labels_and_evaluates_on_held_out_human_labels(tmp_path):
    from cai.train.pairs import preference_data

    rows = synthetic_pairs(80, seed=2)
    human, ai = tmp_path / "human_pairs", tmp_path / "ai_labels"
    write_jsonl(human / "pairs.jsonl", [p for p, _ in rows])
    write_jsonl(human / "labels.jsonl", [lb for _, lb in rows])
    ai_labels = [Label(p.id, 0.7 if lb.p_a > 0.5 else 0.3, "judge") for p, lb in rows[1:]]
    write_jsonl(ai / "labels.jsonl", [Label.failed(rows[0][0].id, "judge", "refused"), *ai_labels])
    data = preference_data("ai", {"ai_labels": ai, "ai_pairs": human, "human_pairs": human}, 0.25, "", "rm")
    assert data.metrics["rm/data/labels_failed"] == 1 and data.metrics["rm/data/pairs_unlabelled"] == 1
    assert {x.p_a for x in data.train + data.test} == {0.7, 0.3}
    human_split = split_pairs([LabelledPair(p, lb.p_a) for p, lb in rows], 0.25)[1]
    assert [x.pair.id for x in data.human_test] == [x.pair.id for x in human_split]
    assert {x.p_a for x in data.human_test} <= {1.0, 0.0}
    train_ids = {x.pair.id for x in data.train}
    assert not train_ids & {x.pair.id for x in data.human_test}  # same prompt-hash split in both arms


def test_plan_wires_both_arms(tmp_path):
    from cai.config import compose_config
    from cai.pipeline import plan

    hh = tmp_path / "hh.jsonl"
    for arm, expected in (("human", {"human_pairs"}), ("ai", {"ai_labels", "ai_pairs", "human_pairs"})):
        cfg = compose_config("experiment.stages=[reward]", f"reward.labels_from={arm}", f"data.human.path={hh}")
        stages = {s.name: s for s in plan(cfg)}
        assert set(stages["reward"].inputs) == expected | {"policy_model"}
        assert "device" not in stages["reward"].config["reward"]
        assert stages["reward"].cfg.reward.device == cfg.reward.device  # run-time: out of the key, still given
    cfg = compose_config("experiment.stages=[reward]", "reward.labels_from=human")
    with pytest.raises(ConfigError, match="data.human.path"):
        plan(cfg)

"""The PPO loop on the tiny model: exact zero KL at the start, learning, exact resume, value head
with LoRA, d-RLAIF scoring through a judge backend, and the pipeline stage's wiring."""

from __future__ import annotations

import pytest
import torch

from cai.config import PPOConfig
from cai.judges.types import ChoiceResult
from cai.train.log import read_train_log
from cai.train.ppo import train_ppo
from cai.train.rewards import (
    JudgeScoreReward,
    ScoredBatch,
    ScriptedReward,
    expected_score,
)

PROMPTS = [[{"role": "user", "content": f"Tell me about topic number {i}, please."}] for i in range(24)]


def _models(model_dir, lora: bool = False, value: bool = True):
    from transformers import AutoModel

    from cai.models import LoraSpec, ModelSpec, load_causal_lm

    spec = ModelSpec(str(model_dir), dtype="float32", device="cpu")
    if lora:
        policy, tok = load_causal_lm(ModelSpec(str(model_dir), dtype="float32", device="cpu",
                                               lora=LoraSpec(r=4, alpha=8)))
        return policy, None, None, tok
    policy, tok = load_causal_lm(spec)
    ref, _ = load_causal_lm(spec)
    backbone = AutoModel.from_pretrained(str(model_dir)) if value else None
    return policy, ref, backbone, tok


def _learnable_set(policy) -> set[int]:
    """A quarter of the vocabulary along one seeded direction of the output embeddings: the policy
    can raise all of them together (a shift of its last hidden state), so the reward is learnable."""
    w = policy.get_output_embeddings().weight.detach()
    proj = w @ torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0))
    return set((proj > proj.quantile(0.75)).nonzero().flatten().tolist())


@torch.no_grad()
def _mass_on(policy, tok, token_set: set[int]) -> float:
    """Exact mean probability (over the prompts) that the first response token is in ``token_set``:
    the expected reward of that token, without sampling noise."""
    from cai.models import format_prompt

    ids = torch.tensor(sorted(token_set))
    total = 0.0
    for conv in PROMPTS:
        enc = tok(format_prompt(tok, conv, "hh"), return_tensors="pt")
        probs = torch.softmax(policy(**enc).logits[0, -1].float(), -1)
        total += float(probs[ids].sum())
    return total / len(PROMPTS)


def _metric_rows(path):
    return [{k: v for k, v in row.items() if "/time/" not in k and "throughput" not in k and k != "ppo/eps"}
            for row in read_train_log(path)]


def test_kl_zero_at_start_reward_rises_and_parameters_change(tiny_model_dir, tmp_path):
    policy, ref, backbone, tok = _models(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    value_before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    cfg = PPOConfig(steps=16, rollout_batch_size=16, mini_batch_size=8, micro_batch_size=4, ppo_epochs=4,
                    lr=1e-3, schedule="constant", max_new_tokens=2, kl_coef=0.05, kl_target=6.0,
                    checkpoint_every=0)
    target = _learnable_set(policy)
    mass_before = _mass_on(policy, tok, target)
    result = train_ppo(policy, tok, PROMPTS, ScriptedReward(target), cfg, seed=0,
                       state_dir=tmp_path, ref_model=ref, value_backbone=backbone)
    mass_after = _mass_on(result.model, tok, target)
    assert mass_after > mass_before + 0.1, (mass_before, mass_after)
    rows = read_train_log(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    # policy == reference at step 1: zero up to the BLAS kernel's rounding of two model copies
    # (exactly 0.0 on the machines we tried; ppo_core's own test checks the exact zero)
    assert abs(rows[0]["ppo/objective/kl"]) < 1e-6
    first = sum(r["ppo/objective/scores"] for r in rows[:4]) / 4
    last = sum(r["ppo/objective/scores"] for r in rows[-4:]) / 4
    assert last > first, (first, last)  # the sampled scores agree (noisier: 16 samples per step)
    assert max(r["ppo/objective/kl"] for r in rows) < cfg.kl_target
    for key in ("ppo/objective/entropy", "ppo/objective/rlhf_reward", "ppo/policy/approxkl_avg",
                "ppo/policy/clipfrac_avg", "ppo/loss/policy_avg", "ppo/loss/value_avg", "ppo/val/clipfrac_avg",
                "ppo/eps", "ppo/time/generate_s", "ppo/time/score_s", "ppo/time/train_s"):
        assert key in rows[-1]
    assert any(not torch.equal(p, before[n]) for n, p in result.model.named_parameters())
    assert any(not torch.equal(p, value_before[n]) for n, p in backbone.named_parameters())
    assert not torch.equal(result.value.value_head.weight, torch.zeros_like(result.value.value_head.weight))


class _Killed(Exception):
    pass


def test_killed_run_resumes_with_identical_metrics(tiny_model_dir, tmp_path):
    cfg = PPOConfig(steps=4, rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2, ppo_epochs=2, lr=5e-4,
                    max_new_tokens=4, kl_controller="adaptive", kl_target=0.5, kl_horizon=50, checkpoint_every=2)

    def run(state_dir, die_on_call=None):
        policy, ref, backbone, tok = _models(tiny_model_dir)
        reward = ScriptedReward(_learnable_set(policy))
        calls = []

        def maybe_die(convs, comps):
            calls.append(1)
            if len(calls) == die_on_call:
                raise _Killed()
            return reward(convs, comps)

        return train_ppo(policy, tok, PROMPTS, maybe_die, cfg, seed=3, state_dir=state_dir, ref_model=ref,
                         value_backbone=backbone)

    whole = run(tmp_path / "whole")
    with pytest.raises(_Killed):
        run(tmp_path / "killed", die_on_call=3)  # dies in step 3, after the step-2 checkpoint
    resumed = run(tmp_path / "killed")
    assert resumed.resumed_from == 2 and whole.resumed_from is None
    a, b = _metric_rows(tmp_path / "whole" / "train_log.jsonl"), _metric_rows(tmp_path / "killed" / "train_log.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b  # every metric of every step, bit for bit (CPU), KL coefficient included
    assert a[-1]["ppo/kl_coef"] != cfg.kl_coef
    for (n, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n


def test_value_head_on_a_lora_policy(tiny_model_dir, tmp_path):
    policy, _, _, tok = _models(tiny_model_dir, lora=True)
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    cfg = PPOConfig(steps=2, rollout_batch_size=4, mini_batch_size=4, micro_batch_size=2, ppo_epochs=1, lr=1e-3,
                    max_new_tokens=4, value_model="head", checkpoint_every=0, missing_eos_penalty=1.0)
    result = train_ppo(policy, tok, PROMPTS, ScriptedReward(set(range(100, 400))), cfg, seed=0,
                       state_dir=tmp_path, ref_model=None)
    rows = read_train_log(tmp_path / "train_log.jsonl")
    # the reference is the policy with its adapters off (B = 0): equal up to float rounding of two
    # separate forwards (peft 0.21 on this CPU gives 4.8e-7 per sequence)
    assert rows[0]["ppo/objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert any(not torch.equal(p, lora_before[n]) for n, p in result.model.named_parameters() if p.requires_grad)
    assert result.value.value_backbone is None
    assert rows[0]["ppo/objective/raw_scores"] - rows[0]["ppo/objective/scores"] == pytest.approx(
        1.0 - rows[0]["ppo/eos_rate"], abs=1e-6)  # the penalty hit exactly the responses without EOS


class _ScriptedJudge:
    """A judge backend answering 1-10 score requests from a fixed rule (it fails on 'FAIL')."""

    name, model = "scripted", "rule"

    def __init__(self):
        self.seen = []

    async def choose_many(self, reqs, progress=False):
        out = []
        for r in reqs:
            self.seen.append(r)
            text = r.messages[-1]["content"]
            ok = "FAIL" not in text
            probs = {c: (0.5 if c in ("7", "9") else 0.0) for c in r.choices} if ok else None
            out.append(ChoiceResult(probs, "logprobs" if ok else "", "ok" if ok else "failed",
                                    None if ok else "unparseable: FAIL", "", 10, 1, 0.001, 0.0, False, 1,
                                    self.model, self.name, r.tag))
        return out

    async def generate_many(self, reqs, progress=False):
        raise AssertionError("d-RLAIF scoring asks for choices only")


class _Completion:
    def __init__(self, text):
        self.text, self.token_ids = text, [1]


def test_judge_score_reward_is_the_expected_score_and_counts_failures():
    from cai.constitution import load_constitution, resolve_constitution

    constitution = load_constitution(resolve_constitution("harmless"))
    judge = _ScriptedJudge()
    reward = JudgeScoreReward(judge, constitution, principles_per_response=2, seed=0)
    batch = reward([PROMPTS[0], PROMPTS[1]], [_Completion("Sure, here is help."), _Completion("FAIL")])
    assert expected_score({"7": 0.5, "9": 0.5}) == 8.0
    assert batch.raw == [8.0, None] and batch.scores == [pytest.approx((8.0 - 5.5) / 4.5), None]
    assert batch.metrics["ppo/judge/requests"] == 4 and batch.metrics["ppo/judge/failed"] == 2
    assert batch.metrics["ppo/judge/failed/unparseable"] == 2
    assert all(r.choices == tuple(str(i) for i in range(1, 11)) for r in judge.seen)
    again = JudgeScoreReward(_ScriptedJudge(), constitution, 2, seed=0)
    again([PROMPTS[0]], [_Completion("Sure, here is help.")])  # same pair -> same principles asked
    assert [r.tag["principle_id"] for r in again.judge.seen] == [r.tag["principle_id"] for r in judge.seen[:2]]


class _FlakyJudge(_ScriptedJudge):
    """Each request fails transiently (HTTP 503 after the retries, then an empty answer) the
    first ``flaky`` times it is asked, then answers like :class:`_ScriptedJudge`."""

    def __init__(self, flaky):
        super().__init__()
        self.flaky, self.asked = flaky, {}

    async def choose_many(self, reqs, progress=False):
        out = await super().choose_many(reqs, progress)
        for i, r in enumerate(reqs):
            n = self.asked[id(r)] = self.asked.get(id(r), 0) + 1
            if n <= self.flaky:
                reason = "http 503 after 7 attempts" if n % 2 else "unparseable: empty answer"
                out[i] = ChoiceResult(None, "", "failed", reason, "", 10, 0, 0.001, 0.0, False, 7,
                                      self.model, self.name, r.tag)
        return out


def test_judge_score_reward_asks_transient_failures_again_and_stops_when_they_last():
    """A transient judge failure is never a missing reward: it is asked again; still failing after
    the rounds, the step stops with JudgeUnavailable instead of training without those responses."""
    from cai.constitution import load_constitution, resolve_constitution
    from cai.errors import JudgeUnavailable

    constitution = load_constitution(resolve_constitution("harmless"))
    convs, comps = [PROMPTS[0], PROMPTS[1]], [_Completion("Sure, here is help."), _Completion("FAIL")]
    judge = _FlakyJudge(flaky=2)
    batch = JudgeScoreReward(judge, constitution, seed=0, transient_rounds=2, transient_pause_s=0.0)(convs, comps)
    assert batch.raw == [8.0, None]  # the flaky answers came back; FAIL stays a permanent failure
    assert batch.metrics["ppo/judge/failed"] == 1 and batch.metrics["ppo/judge/failed/unparseable"] == 1
    assert batch.metrics["ppo/judge/retried_transient"] == 4 and len(judge.seen) == 6
    assert batch.metrics["ppo/judge/cost_usd"] == pytest.approx(0.006)  # every attempt is paid for
    down = JudgeScoreReward(_FlakyJudge(flaky=3), constitution, seed=0, transient_rounds=2, transient_pause_s=0.0)
    with pytest.raises(JudgeUnavailable, match=r"2 of 2 score requests failed transiently"):
        down(convs, comps)


def test_failed_rewards_are_left_out_and_counted(tiny_model_dir, tmp_path):
    policy, ref, backbone, tok = _models(tiny_model_dir)

    def half_fail(convs, comps):
        s = [None if i % 2 else 1.0 for i in range(len(comps))]
        return ScoredBatch(s, s)

    cfg = PPOConfig(steps=1, rollout_batch_size=4, mini_batch_size=4, micro_batch_size=4, ppo_epochs=1,
                    max_new_tokens=3, checkpoint_every=0)
    train_ppo(policy, tok, PROMPTS, half_fail, cfg, seed=0, state_dir=tmp_path, ref_model=ref,
              value_backbone=backbone)
    row = read_train_log(tmp_path / "train_log.jsonl")[0]
    assert row["ppo/reward_failed"] == 2 and row["ppo/objective/scores"] == 1.0
    # one forward before the only optimizer step: the ratio is exactly 1 on every counted token,
    # and the left-out rows (and padding) do not leak into the statistics
    assert row["ppo/policy/approxkl_avg"] == 0.0 and row["ppo/val/ratio"] == 1.0
    assert row["ppo/policy/clipfrac_avg"] == 0.0


def test_pipeline_plans_ppo_after_reward_and_rejects_bad_values():
    from cai.config import compose_config
    from cai.errors import ConfigError
    from cai.pipeline import plan

    initial = ["experiment.stages=[ppo]", "ppo.start_from=initial"]
    cfg = compose_config(*initial, "data.human.path=pairs.jsonl")
    stages = {s.name: s for s in plan(cfg)}
    assert stages["ppo"].inputs == {"prompts": "prompts", "policy_model": "policy_model", "reward": "reward"}
    assert not stages["ppo"].uses_constitution and "device" not in stages["ppo"].config["ppo"]
    assert "judge" not in stages["ppo"].config  # no judge asked: none in the key
    assert stages["ppo"].cfg.ppo.device == cfg.ppo.device  # run-time: out of the key, still given
    judge = {s.name: s for s in plan(compose_config(*initial, "ppo=d_rlaif"))}
    assert "reward" not in judge["ppo"].inputs and judge["ppo"].uses_constitution
    assert judge["ppo"].cfg.constitution_file.is_file() and "model" in judge["ppo"].config["judge"]
    sft = {s.name: s for s in plan(compose_config(*initial, "ppo.start_from=sft", "data.human.path=pairs.jsonl"))}
    assert sft["ppo"].inputs == {"prompts": "prompts", "sft": "sft", "reward": "reward"} and "sft" in sft
    with pytest.raises(ConfigError, match="ppo.kl_estimator"):
        plan(compose_config(*initial, "ppo.kl_estimator=k9"))


def test_pipeline_reward_then_ppo_stage(tmp_path, shared_data_dir):
    """Stage ppo through the pipeline on a tiny RM trained on 40 HH-RLHF pairs; a rerun reuses it."""
    import json

    from cai.config import compose_config
    from cai.pipeline import run_experiment

    hh = shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    overrides = ["experiment.stages=[ppo]", "ppo.start_from=initial", f"data.human.path={hh}", "data.human.limit=40",
                 "data.max_prompts=12",
                 "policy.tiny.n_layer=1", "policy.tiny.n_embd=32", "policy.tiny.n_head=2", "policy.tiny.vocab_size=512",
                 "reward.max_length=96", "reward.lr=1e-3", "ppo.steps=2", "ppo.rollout_batch_size=4",
                 "ppo.mini_batch_size=4", "ppo.micro_batch_size=2", "ppo.max_new_tokens=6", "ppo.checkpoint_every=1",
                 f"store.root={tmp_path / 'store'}"]
    cfg = compose_config(*overrides)
    m1 = run_experiment(cfg, tmp_path / "run1")
    assert m1["ppo/steps"] == 2 and m1["ppo/objective/kl"] >= -1.0 and "ppo/objective/scores" in m1
    keys = json.loads((tmp_path / "run1" / "run.json").read_text())["artifacts"]
    out = tmp_path / "store" / "ppo" / keys["ppo"]
    assert (out / "model" / "config.json").is_file() and (out / "warnings.jsonl").is_file()
    assert [r["step"] for r in read_train_log(out / "train_log.jsonl")] == [1, 2]
    assert run_experiment(cfg, tmp_path / "run2")["pipeline/ppo/reused"] == 1


def test_pipeline_d_rlaif_scores_online_with_the_judge(tmp_path):
    """ppo=d_rlaif: no reward model; the (tiny, local) judge rates every response 1-10 online."""
    from cai.config import compose_config
    from cai.pipeline import run_experiment

    overrides = ["experiment.stages=[ppo]", "ppo=d_rlaif", "ppo.start_from=initial", "data.max_prompts=8",
                 "policy.tiny.n_layer=1",
                 "policy.tiny.n_embd=32", "policy.tiny.n_head=2", "policy.tiny.vocab_size=512", "ppo.steps=2",
                 "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
                 "ppo.max_new_tokens=6", "ppo.judge_principles=2", f"store.root={tmp_path / 'store'}"]
    cfg = compose_config(*overrides)
    m = run_experiment(cfg, tmp_path / "run")
    assert "pipeline/reward/reused" not in m  # no reward model was trained
    assert m["ppo/judge/requests"] == 8 and m["ppo/judge/failed"] + m["ppo/reward_failed"] == 0
    assert 1.0 <= m["ppo/objective/raw_scores"] <= 10.0
    assert m["ppo/objective/scores"] == pytest.approx((m["ppo/objective/raw_scores"] - 5.5) / 4.5, abs=1e-5)


def test_heldout_judge_monitor_warns_when_rm_rises_alone(tiny_model_dir, tmp_path):
    policy, ref, backbone, tok = _models(tiny_model_dir)
    calls = []

    def rising(convs, comps):  # the reward model's score climbs every step...
        calls.append(1)
        s = [0.5 * len(calls)] * len(comps)
        return ScoredBatch(s, s)

    cfg = PPOConfig(steps=3, rollout_batch_size=4, mini_batch_size=4, micro_batch_size=4, ppo_epochs=1,
                    max_new_tokens=2, checkpoint_every=0, heldout_judge_every=1, recompute_logprobs=False)
    result = train_ppo(policy, tok, PROMPTS, rising, cfg, seed=0, state_dir=tmp_path, ref_model=ref,
                       value_backbone=backbone, heldout_fn=lambda convs, comps: 5.0)  # ...the judge's does not
    assert [(w.kind, w.step) for w in result.warnings if w.kind == "rm_judge_divergence"] == [
        ("rm_judge_divergence", 3)]
    assert result.metrics["ppo/warnings/rm_judge_divergence"] == 1
    rows = read_train_log(tmp_path / "train_log.jsonl")
    assert rows[-1]["ppo/heldout/judge_score"] == 5.0
    # the sampler's own log-probs as the rollout's: the same numbers up to float noise (KV cache)
    assert abs(rows[0]["ppo/objective/kl"]) < 1e-4 and rows[0]["ppo/sampler_logprob_gap"] == 0.0


def test_command_line_trains_against_a_reward_artifact_and_rejects_bad_input(tmp_path, tiny_model_dir):
    """``python -m cai.train.ppo`` in-process (one process): a reward artifact, prompt records, saved policy."""
    import json

    from cai.config import RewardConfig, TinyConfig
    from cai.data import Prompt, write_jsonl
    from cai.errors import ConfigError
    from cai.testing.preference_task import task_corpus, write_task
    from cai.tiny import build_tiny_sequence_classifier, default_tiny_corpus
    from cai.train.pairs import PreferenceData, load_labelled_pairs, split_pairs
    from cai.train.ppo import main
    from cai.train.reward import backbone_loader, run_reward

    backbone = build_tiny_sequence_classifier(tmp_path / "bb", default_tiny_corpus() + task_corpus(),
                                              TinyConfig(vocab_size=512, n_layer=1, n_head=2, n_embd=32))
    items, stats = load_labelled_pairs(*write_task(tmp_path / "task", 32, seed=1))
    train, test = split_pairs(items, 0.25)
    rcfg = RewardConfig(backbone=str(backbone), epochs=1, batch_size=8, max_length=64, device="cpu",
                        bootstrap_resamples=50)
    run_reward(rcfg, PreferenceData(train, test, [], stats.metrics("rm/data")), backbone_loader(rcfg, str(backbone)),
               seed=0, out_dir=tmp_path / "rm", state_dir=tmp_path / "rm_state")
    write_jsonl(tmp_path / "prompts.jsonl", [Prompt.create(c, "test") for c in PROMPTS[:8]])
    base = ["--policy", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.jsonl"), "--reward",
            str(tmp_path / "rm"), "--chat-format", "hh"]
    knobs = ["steps=2", "rollout_batch_size=4", "mini_batch_size=2", "micro_batch_size=1", "max_new_tokens=4",
             "device=cpu", "value_model=head", "monitors.window=2"]
    assert main([*base, "--out", str(tmp_path / "out"), *knobs]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["ppo/steps"] == 2 and metrics["ppo/processes"] == 1 and metrics["ppo/prompts"] == 8
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert len(read_train_log(tmp_path / "out" / "state" / "train_log.jsonl")) == 2
    with pytest.raises(ConfigError, match="monitors.nope|nope"):
        main([*base, "--out", str(tmp_path / "bad"), "monitors.nope=1"])
    with pytest.raises(ConfigError, match="--prompts .*missing.jsonl: no such file"):
        main([*base[:3], str(tmp_path / "missing.jsonl"), *base[4:], "--out", str(tmp_path / "bad")])
    with pytest.raises(ConfigError, match="d-RLAIF"):
        main([*base, "--out", str(tmp_path / "bad"), "reward_from=judge"])


def test_judge_score_reward_names_its_metrics_and_cost_stage_after_the_trainer():
    """A critic-free sibling reuses the reward with its own namespace: metric prefix and ledger stage."""
    from cai.constitution import load_constitution, resolve_constitution

    judge = _ScriptedJudge()
    reward = JudgeScoreReward(judge, load_constitution(resolve_constitution("harmless")), seed=0, namespace="rloo")
    batch = reward([PROMPTS[0], PROMPTS[0]], [_Completion("One answer."), _Completion("FAIL")])
    assert batch.raw == [8.0, None]
    assert batch.metrics == {"rloo/judge/requests": 2.0, "rloo/judge/failed": 1.0, "rloo/judge/cost_usd": 0.002,
                             "rloo/judge/failed/unparseable": 1.0, "rloo/judge/retried_transient": 0.0}
    assert {r.tag["stage"] for r in judge.seen} == {"rloo"}

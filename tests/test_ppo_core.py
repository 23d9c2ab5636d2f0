"""PPO math (cai.train.rl_math) and monitors (cai.train.monitors) on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from cai.config import MonitorConfig
from cai.errors import ConfigError
from cai.train import rl_math as K
from cai.train.monitors import PPOMonitors, top_ngram_share


def test_gae_matches_a_hand_computed_case():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    gamma, lam = 0.9, 0.8
    # right to left, V after the last token = 0
    d2 = 2.0 + 0.9 * 0.0 - 0.1  # 1.9
    d1 = 0.0 + 0.9 * 0.1 - 0.2  # -0.11
    d0 = 1.0 + 0.9 * 0.2 - 0.5  # 0.68
    a2 = d2
    a1 = d1 + gamma * lam * a2  # -0.11 + 0.72 * 1.9 = 1.258
    a0 = d0 + gamma * lam * a1  # 0.68 + 0.72 * 1.258 = 1.58576
    adv, ret = K.gae(rewards, values, gamma, lam)
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2], abs=1e-6)
    assert adv[0, 0].item() == pytest.approx(1.58576, abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.1], abs=1e-6)


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    values = torch.tensor([[0.3, -0.2, 0.4], [0.0, 0.5, 0.0]])
    adv, ret = K.gae(rewards, values, 1.0, 1.0)
    togo = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
    assert torch.allclose(ret, togo, atol=1e-6)
    assert torch.allclose(adv, togo - values, atol=1e-6)


def test_kl_is_exactly_zero_when_policy_equals_reference():
    lp = torch.log_softmax(torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)), -1)[..., 0]
    for est in ("k1", "k3"):
        assert torch.equal(K.kl_penalty(lp, lp.clone(), est), torch.zeros_like(lp))


def test_kl_estimators_values_and_signs():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert K.kl_penalty(lp, ref, "k1").tolist()[0] == pytest.approx([0.5, -1.0])
    k3 = K.kl_penalty(lp, ref, "k3")[0]
    assert k3.tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0], abs=1e-6)
    assert (k3 >= 0).all()
    with pytest.raises(ConfigError, match="kl_estimator"):
        K.kl_penalty(lp, ref, "k2")


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    w = K.masked_whiten(x, mask)
    kept = w[mask]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-4)
    shifted = K.masked_whiten(x, mask, shift_mean=False)
    assert shifted[mask].mean().item() == pytest.approx(x[mask].mean().item(), abs=1e-5)


def test_token_rewards_put_the_score_on_the_end_token():
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0]])
    rewards, non_score = K.token_rewards(kl, torch.tensor([1.0, -2.0]), 0.5, torch.tensor([1, 0]))
    assert torch.allclose(non_score, torch.tensor([[-0.05, -0.1, 0.0], [-0.15, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.9, 0.0], [-2.15, 0.0, 0.0]]))


def test_policy_loss_at_ratio_one_and_clipping():
    adv = torch.tensor([[1.0, -2.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    t = K.policy_loss(old.clone(), old, adv, mask, 0.2)
    assert t.loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    assert t.clipfrac.item() == 0.0 and t.approxkl.item() == 0.0
    new = old + torch.tensor([[0.5, 0.5, 0.0]])  # ratio e^0.5 = 1.65 on both real tokens
    t = K.policy_loss(new, old, adv, mask, 0.2)
    r = math.exp(0.5)
    # token 0 (A > 0): max(-r, -1.2) = -1.2 (clipped); token 1 (A < 0): max(2r, 2.4) = 2r
    assert t.loss.item() == pytest.approx((-1.2 + 2 * r) / 2, abs=1e-6)
    assert t.clipfrac.item() == pytest.approx(0.5)


def test_value_loss_clips_around_the_rollout_values():
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0]])
    v = torch.tensor([[0.5, 2.0]])
    t = K.value_loss(v, old, ret, torch.ones(1, 2, dtype=torch.bool), 0.2)
    # token 0: max(0.25, (0.2-1)^2=0.64) = 0.64; token 1: max(1, (0.2-1)^2=0.64) = 1
    assert t.loss.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2, abs=1e-6)
    assert t.clipfrac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_follows_ziegler_and_round_trips():
    ctl = K.make_kl_controller("adaptive", 0.1, target=6.0, horizon=100)
    ctl.update(9.0, n_steps=10)  # error clip(9/6 - 1) = 0.2 -> 1 + 0.2 * 10 / 100
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(3.0, n_steps=10)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    other = K.make_kl_controller("adaptive", 0.5, 6.0, 100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    fixed = K.make_kl_controller("fixed", 0.1, 6.0, 100)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    with pytest.raises(ConfigError, match="kl_controller"):
        K.make_kl_controller("pid", 0.1, 6.0, 100)


def test_shape_scores_normalises_scales_and_clips():
    raw = torch.tensor([0.0, 2.0, 10.0])
    out = K.shape_scores(raw, mean=2.0, std=2.0, normalize=True, scale=2.0, clip=5.0)
    assert out.tolist() == pytest.approx([-2.0, 0.0, 5.0])
    assert K.shape_scores(raw, 2.0, 2.0, normalize=False, scale=1.0, clip=0.0).tolist() == raw.tolist()


def test_monitors_diagnose_negative_kl_drift_boilerplate_and_divergence():
    mon = PPOMonitors(MonitorConfig(), kl_target=1.0)
    first = mon.check(1, {"ppo/objective/kl": 0.0, "ppo/response_length": 10.0}, ["a b c d e"] * 2)
    assert first == []
    kinds = {w.kind for w in mon.check(2, {"ppo/objective/kl": -0.5, "ppo/response_length": 30.0},
                                       ["as an AI model I", "as an AI model I", "x", "as an AI model I"])}
    assert kinds == {"negative_kl", "length_drift", "boilerplate"}
    noisy = {"ppo/objective/kl": -0.5, "ppo/objective/kl_stderr": 0.3, "ppo/response_length": 10.0}
    assert mon.check(3, noisy, []) == []  # within sampling noise of zero: no warning
    neg = mon.check(3, {"ppo/objective/kl": -0.5, "ppo/objective/kl_stderr": 0.1, "ppo/response_length": 10.0}, [])[0]
    assert "temperature" in neg.message and "top_k" in neg.message
    assert [w.kind for w in mon.check(4, {"ppo/objective/kl": 2.5, "ppo/response_length": 10.0}, [])] == [
        "kl_over_budget"]
    assert mon.record_heldout(5, 0.0, 6.0) == [] and mon.record_heldout(6, 0.3, 6.0) == []
    div = mon.record_heldout(7, 0.6, 5.9)
    assert [w.kind for w in div] == ["rm_judge_divergence"]
    again = PPOMonitors(MonitorConfig(), 1.0)
    again.load_state_dict(mon.state_dict())
    assert again.baseline_length == 10.0 and len(again.heldout) == 3
    assert top_ngram_share(["a b", "c d"], 4) == (0.0, "")


# ----------------------------------------------------------------------------- critic-free advantages
def test_rloo_with_two_samples_is_the_difference_to_the_sibling():
    scores = torch.tensor([1.0, 3.0, -2.0, 0.5])
    group = torch.tensor([0, 0, 1, 1])  # k = 2, the samples of a prompt adjacent
    # A_i = s_i - s_other: 1 - 3, 3 - 1, -2 - 0.5, 0.5 - (-2)
    assert K.rloo_advantages(scores, group).tolist() == [-2.0, 2.0, -2.5, 2.5]


def test_rloo_leaves_one_out_and_skips_invalid_rows_and_lone_samples():
    scores = torch.tensor([5.0, 2.0, 7.0, 4.0, 4.0, 4.0, 9.0])
    group = torch.tensor([7, 7, 7, 3, 3, 3, 0])  # any ids, in any order
    # 5 - (2+7)/2 = 0.5, 2 - (5+7)/2 = -4, 7 - (5+2)/2 = 3.5; equal scores -> 0; a lone sample -> 0
    assert K.rloo_advantages(scores, group).tolist() == [0.5, -4.0, 3.5, 0.0, 0.0, 0.0, 0.0]
    valid = torch.tensor([True, False, True, True, True, False, True])
    # row 1 leaves its group: 5 - 7, 7 - 5; group 3 has two valid rows left, both 4 -> 0
    assert K.rloo_advantages(scores, group, valid).tolist() == [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    # RLOO is the group-centred score scaled by k / (k - 1)
    grpo_unscaled = K.grpo_advantages(scores[:3], group[:3], scale_by_std=False)
    assert torch.allclose(K.rloo_advantages(scores[:3], group[:3]), 1.5 * grpo_unscaled)


def test_grpo_divides_by_the_bessel_corrected_group_std():
    scores = torch.tensor([1.0, 3.0, 5.0, 2.0, 7.0])
    group = torch.tensor([0, 0, 1, 1, 1])
    # group 0: mean 2, deviations -1, +1, var (1 + 1) / (2 - 1) = 2
    # group 1: mean 14/3, deviations 1/3, -8/3, 7/3, var (1 + 64 + 49) / 9 / 2 = 19/3
    s0, s1 = math.sqrt(2.0), math.sqrt(19.0 / 3.0)
    expected = [-1 / s0, 1 / s0, (1 / 3) / s1, (-8 / 3) / s1, (7 / 3) / s1]  # 0.1325, -1.0596, 0.9272
    assert K.grpo_advantages(scores, group, eps=0.0).tolist() == pytest.approx(expected, abs=1e-6)
    eps = 1e-4
    with_eps = [-1 / (s0 + eps), 1 / (s0 + eps), (1 / 3) / (s1 + eps), (-8 / 3) / (s1 + eps), (7 / 3) / (s1 + eps)]
    assert K.grpo_advantages(scores, group).tolist() == pytest.approx(with_eps, abs=1e-6)
    assert K.grpo_advantages(scores, group, scale_by_std=False).tolist() == pytest.approx(
        [-1.0, 1.0, 1 / 3, -8 / 3, 7 / 3], abs=1e-6)


def test_grpo_gives_exactly_zero_to_a_group_of_equal_scores():
    scores = torch.tensor([0.1, 0.1, 0.1, -3.0, 1.0, 0.7])  # 0.1 is not a binary fraction: a mean may round
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    valid = torch.tensor([True, True, True, True, False, True])
    for kw in ({}, {"eps": 0.0}, {"scale_by_std": False}):
        out = K.grpo_advantages(scores, group, **kw)
        assert torch.equal(out[:3], torch.zeros(3)), kw  # std 0: 0, not 0/0 and not rounding / eps
        assert out[5].item() == 0.0  # a lone sample has nothing to compare with
        # with row 4 left out, group 1 is down to one valid row: 0 as well
        assert torch.equal(K.grpo_advantages(scores, group, valid, **kw)[3:], torch.zeros(3)), kw
    assert torch.equal(K.rloo_advantages(scores[:3], group[:3]), torch.zeros(3))


def test_token_advantages_and_kl_shaped_scores_on_unequal_lengths():
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    adv = torch.tensor([2.0, -1.0, 4.0])  # the last row has no counted token (a failed score)
    assert K.token_advantages(adv, mask).tolist() == [[2.0, 2.0, 2.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0], [9.0, 9.0, 9.0]])  # 9: padding, never counted
    shaped = K.kl_shaped_scores(torch.tensor([1.0, 0.0, 0.5]), kl, 0.5, mask)
    assert shaped.tolist() == pytest.approx([1.0 - 0.5 * 0.6, 0.0 - 0.5 * 0.4, 0.5], abs=1e-6)


def test_rloo_advantages_through_the_clipped_policy_loss():
    """k = 2, unequal lengths: the advantage of a sequence weighs each of its tokens in PPO's loss."""
    scores = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = K.token_advantages(K.rloo_advantages(scores, torch.tensor([0, 0])), mask)  # +1 x 3 tokens, -1 x 1
    old = torch.full((2, 3), -1.0)
    t = K.policy_loss(old.clone(), old, adv, mask, 0.2)
    assert t.loss.item() == pytest.approx(-(3 * 1.0 - 1.0) / 4)  # ratio 1: minus the token-mean advantage
    assert t.clipfrac.item() == 0.0


def test_monitors_read_and_advise_in_their_namespace():
    mon = PPOMonitors(MonitorConfig(), kl_target=1.0, namespace="rloo")
    assert mon.check(1, {"ppo/objective/kl": 5.0, "rloo/response_length": 10.0}, []) == []  # not its metric
    over = mon.check(2, {"rloo/objective/kl": 5.0, "rloo/response_length": 10.0}, [])
    assert [w.kind for w in over] == ["kl_over_budget"] and "rloo.kl_coef" in over[0].message
    assert "ppo." not in over[0].message

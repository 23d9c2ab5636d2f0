"""PPO's shared pieces carry a critic-free method (RLOO/GRPO) unchanged: k samples per prompt,
no value model, group-baselined advantages, the clipped policy loss alone."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cai.sampling import SamplingEngine, SamplingParams
from cai.train import common as C
from cai.train import rl_math as K
from cai.train.pairs import disable_dropout
from cai.train.rewards import ScoredBatch
from cai.train.rollout import PolicyAndValue, make_rollout, response_logprobs

PROMPTS = [[{"role": "user", "content": f"Tell me about topic number {i}, please."}] for i in range(3)]
# exactly the fields make_rollout reads: a sibling's config need not be a PPOConfig
CFG = SimpleNamespace(micro_batch_size=2, sample_batch_size=6, temperature=1.0, recompute_logprobs=True,
                      missing_eos_penalty=None)


def _setup(model_dir, value_head: bool):
    from cai.models import ModelSpec, format_prompt, load_causal_lm

    spec = ModelSpec(str(model_dir), dtype="float32", device="cpu")
    policy, tok = load_causal_lm(spec)
    ref, _ = load_causal_lm(spec)
    for m in (policy, ref):
        disable_dropout(m)
    ref.requires_grad_(False).eval()
    container = PolicyAndValue(policy, value_head=value_head)
    engine = SamplingEngine(policy, tok, batch_size=CFG.sample_batch_size, device="cpu")
    texts = [format_prompt(tok, c, "hh") for c in PROMPTS]
    return container, ref, engine, texts


class _ByRow:
    """A scripted reward: row ``i`` of the batch scores ``i``, rows in ``fail`` fail (``None``);
    the conversations it was asked about are kept."""

    def __init__(self, fail=()):
        self.seen: list = []
        self.fail = set(fail)

    def __call__(self, conversations, completions):
        self.seen.append(list(conversations))
        s = [None if i in self.fail else float(i) for i in range(len(completions))]
        return ScoredBatch(s, s)


def _rollout(container, ref, engine, texts, reward, k):
    params = SamplingParams(max_new_tokens=5, temperature=CFG.temperature, seed=11)
    return make_rollout(engine, container, ref, texts, PROMPTS, params, reward, CFG,
                        C.make_accelerator(device="cpu"), samples_per_prompt=k)


def test_k_samples_per_prompt_without_a_value_model(tiny_model_dir):
    container, ref, engine, texts = _setup(tiny_model_dir, value_head=False)
    assert container.value_head is None and not any("value" in n for n, _ in container.named_parameters())
    reward = _ByRow()
    ro = _rollout(container, ref, engine, texts, reward, k=2)
    assert ro.values is None and ro.samples_per_prompt == 2
    assert ro.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert reward.seen == [[PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[2]]]
    prompt_part = ro.input_ids[:, :ro.prompt_width]
    assert torch.equal(prompt_part[0::2], prompt_part[1::2])  # the k rows of a prompt: the same prompt tokens
    assert not torch.equal(prompt_part[0], prompt_part[2])
    assert not torch.equal(ro.responses[0::2], ro.responses[1::2])  # ... and their own samples
    assert ro.mask.sum(1).tolist() == [len(c.token_ids) for c in ro.completions]
    # policy == reference at the start: no KL (up to two model copies' float rounding)
    assert (ro.logprobs - ro.ref_logprobs).abs().max().item() < 1e-6

    # k samples per prompt is the k = 1 rollout of the prompts repeated in place, plus the groups
    flat = make_rollout(engine, container, ref, [t for t in texts for _ in range(2)],
                        [c for c in PROMPTS for _ in range(2)],
                        SamplingParams(max_new_tokens=5, temperature=CFG.temperature, seed=11), _ByRow(), CFG,
                        C.make_accelerator(device="cpu"))
    assert flat.group.tolist() == list(range(6)) and flat.samples_per_prompt == 1
    for name in ("input_ids", "responses", "mask", "logprobs", "ref_logprobs", "scores"):
        assert torch.equal(getattr(flat, name), getattr(ro, name)), name


def test_a_value_model_still_gives_values_and_one_group_per_row(tiny_model_dir):
    container, ref, engine, texts = _setup(tiny_model_dir, value_head=True)
    ro = _rollout(container, ref, engine, texts, _ByRow(), k=1)
    assert ro.values is not None and ro.values.shape == ro.logprobs.shape
    assert torch.equal(ro.values * ~ro.mask, torch.zeros_like(ro.values))
    assert ro.group.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="value backbone without a value head"):
        PolicyAndValue(container.policy, torch.nn.Linear(2, 2), value_head=False)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        _rollout(container, ref, engine, texts, _ByRow(), k=0)


def test_rloo_step_reuses_rollout_rewards_and_rl_math(tiny_model_dir):
    """An RLOO update built only from PPO's pieces: rollout (k = 2, no value model), a scripted
    reward, rl_math's leave-one-out advantages, the clipped policy loss alone, one optimizer step."""
    container, ref, engine, texts = _setup(tiny_model_dir, value_head=False)
    ro = _rollout(container, ref, engine, texts, _ByRow(fail={5}), k=2)
    assert ro.scores.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0] and ro.valid.tolist() == [True] * 5 + [False]
    assert ro.mask.sum(1).tolist()[-1] == 0  # the failed row counts no token
    kl = K.kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * ro.mask
    shaped = K.kl_shaped_scores(ro.scores, kl, 0.05, ro.mask)
    adv = K.rloo_advantages(shaped, ro.group, ro.valid)
    # rows score their index and the KL is ~0: each second sample beats its sibling by 1; the last
    # prompt has one scored sample left, nothing to compare it with: 0
    assert adv.tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0, 0.0, 0.0], abs=1e-5)
    token_adv = K.token_advantages(adv, ro.mask)

    params = [p for p in container.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = C.make_optimizer(container, lr=1e-3)
    container.train()

    def loss_now():
        logits, values = container(ro.input_ids, ro.attention_mask, ro.position_ids, ro.prompt_width)
        assert values is None  # no value forward, no value loss
        new_lp = response_logprobs(logits, ro.responses, CFG.temperature) * ro.mask
        return K.policy_loss(new_lp, ro.logprobs, token_adv, ro.mask, cliprange=0.2)

    terms = loss_now()
    assert math.isfinite(terms.loss.item())
    assert terms.ratio_mean.item() == pytest.approx(1.0, abs=1e-5)  # the rollout's log-probs are the policy's
    terms.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    with torch.no_grad():
        after = loss_now()
    assert math.isfinite(after.loss.item()) and after.loss.item() < terms.loss.item()  # the step helped

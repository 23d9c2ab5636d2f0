"""Our reward and DPO losses equal TRL's on identical models and batches (to 1e-5).

TRL is a test-only peer (never imported by ``cai/``). For each loss, TRL's trainer is built on
a copy of the same weights and its own dataset preparation tokenises the same examples from
text; the test first checks that TRL produced exactly our token ids, then calls TRL's
``compute_loss`` on a batch made by TRL's own collator and compares with our loss on our batch.
The policy is perturbed away from the reference so that DPO log-ratios are not all zero.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from cai.config import TinyConfig  # noqa: E402
from cai.data import Label  # noqa: E402
from cai.models import (  # noqa: E402
    ModelSpec,
    format_example,
    load_causal_lm,
    load_sequence_classifier,
)
from cai.testing.preference_task import synthetic_pairs, task_corpus  # noqa: E402
from cai.tiny import (  # noqa: E402
    # noqa: E402     TinyConfig,
    build_tiny_causal_lm,
    build_tiny_sequence_classifier,
    default_tiny_corpus,
)
from cai.train.dpo import dpo_loss, pair_logps, sequence_logps  # noqa: E402
from cai.train.pairs import LabelledPair, collate_pairs, encode_pairs  # noqa: E402
from cai.train.reward import batch_rewards, reward_loss  # noqa: E402

SHAPE = TinyConfig(vocab_size=512, n_layer=2, n_head=2, n_embd=32, seed=3)
N_PAIRS = 6


@pytest.fixture(scope="module")
def pairs():
    """Chosen in slot a for half the pairs and in slot b for the rest (p_a = 1.0 / 0.0)."""
    rows = synthetic_pairs(N_PAIRS, seed=11)
    return [LabelledPair(p, lb.p_a) for p, lb in rows]


def _text_examples(tok, items):
    """TRL's explicit-prompt text format, chosen/rejected oriented by the label."""
    out = []
    for it in items:
        chosen, rejected = ((it.pair.response_a, it.pair.response_b) if it.p_a > 0.5
                            else (it.pair.response_b, it.pair.response_a))
        msgs = it.pair.prompt.messages_as_dicts()
        prompt, full_c = format_example(tok, msgs, chosen, "hh")
        _, full_r = format_example(tok, msgs, rejected, "hh")
        out.append({"prompt": prompt, "chosen": full_c[len(prompt):], "rejected": full_r[len(prompt):]})
    return out


def _chosen_rejected_ids(enc):
    return [(e.a, e.b) if e.p_a > 0.5 else (e.b, e.a) for e in enc]


def _trl_common():
    return {"report_to": "none", "use_cpu": True, "bf16": False, "activation_checkpointing": False,
            "per_device_train_batch_size": N_PAIRS, "seed": 0}


# ----------------------------------------------------------------------------- reward
@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return build_tiny_sequence_classifier(tmp_path_factory.mktemp("rm") / "m", default_tiny_corpus() + task_corpus(),
                                          SHAPE)


@pytest.mark.parametrize("margin,center", [(0.0, None), (0.7, None), (0.0, 0.05), (0.3, 0.01)])
def test_reward_loss_equals_trl_reward_trainer(tmp_path, classifier_dir, pairs, margin, center):
    root = tmp_path
    ours, tok = load_sequence_classifier(ModelSpec(str(classifier_dir), device="cpu", dtype="float32"), seed=5)
    theirs = copy.deepcopy(ours)
    enc, _ = encode_pairs(pairs, tok, "hh", 128)

    texts = _text_examples(tok, pairs)
    for row in texts:
        row["margin"] = margin
    args = trl.RewardConfig(output_dir=str(root / "trl"), center_rewards_coefficient=center, **_trl_common())
    trainer = trl.RewardTrainer(model=theirs, args=args, train_dataset=datasets.Dataset.from_list(texts),
                                processing_class=copy.deepcopy(tok))
    prepared = list(trainer.train_dataset)
    for row, (c, r) in zip(prepared, _chosen_rejected_ids(enc)):
        assert row["chosen_ids"] == c.input_ids and row["rejected_ids"] == r.input_ids
    batch = trainer.data_collator([{k: row[k] for k in ("chosen_ids", "rejected_ids", "margin")}
                                   for row in prepared])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)

    ours.train()
    mine = collate_pairs(enc, tok.pad_token_id)
    r_a, r_b = batch_rewards(ours, mine, "cpu")
    our_loss = reward_loss(r_a, r_b, mine["p_a"], margin, center).mean()
    assert float(our_loss.detach()) > 0.1  # a real comparison, not 0 == 0
    assert abs(float(our_loss.detach()) - float(trl_loss.detach())) < 1e-5


# ----------------------------------------------------------------------------- DPO
@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "m", default_tiny_corpus() + task_corpus(), SHAPE)


def _perturbed(model, seed=7, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_dpo_loss_equals_trl_dpo_trainer(tmp_path, causal_dir, pairs, loss_type, beta):
    spec = ModelSpec(str(causal_dir), device="cpu", dtype="float32")
    reference, tok = load_causal_lm(spec)
    policy = _perturbed(copy.deepcopy(reference))
    enc, _ = encode_pairs(pairs, tok, "hh", 128)

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type],
                         precompute_ref_log_probs=False, **_trl_common())
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=datasets.Dataset.from_list(_text_examples(tok, pairs)),
                             processing_class=copy.deepcopy(tok))
    prepared = list(trainer.train_dataset)
    for row, (c, r) in zip(prepared, _chosen_rejected_ids(enc)):
        assert row["prompt_ids"] + row["chosen_ids"] == c.input_ids
        assert row["prompt_ids"] + row["rejected_ids"] == r.input_ids
    batch = trainer.data_collator([{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                   for row in prepared])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)

    ref = pair_logps(reference, enc, tok.pad_token_id, batch_size=4)
    policy.train()
    mine = collate_pairs(enc, tok.pad_token_id)
    lp, n = sequence_logps(policy, mine, "cpu", keep_logits=True)
    k = len(enc)
    terms = dpo_loss(lp[:k], lp[k:], ref[:, 0], ref[:, 1], mine["p_a"], beta, loss_type, n_a=n[:k], n_b=n[k:])
    assert abs(float(terms.rewards_chosen.mean() - terms.rewards_rejected.mean())) > 1e-3  # log-ratios differ
    assert abs(float(terms.loss.detach().mean()) - float(trl_loss.detach())) < 1e-5
    logged = trainer._metrics["train"]
    assert abs(logged["rewards/margins"][-1] - float((terms.rewards_chosen - terms.rewards_rejected).mean())) < 1e-5
    assert abs(logged["rewards/accuracies"][-1]
               - float((terms.rewards_chosen > terms.rewards_rejected).float().mean())) < 1e-6


def test_soft_label_losses_reduce_to_the_hard_ones_and_mix_both_directions():
    """Soft labels: ``q`` weights the two directions; ``q=1`` is exactly the hard loss."""
    d = torch.tensor([0.3, -1.2, 2.0])
    hard = reward_loss(d, torch.zeros(3), torch.ones(3))
    assert torch.allclose(hard, -torch.nn.functional.logsigmoid(d))
    soft = reward_loss(d, torch.zeros(3), torch.full((3,), 0.8))
    expected = -0.8 * torch.nn.functional.logsigmoid(d) - 0.2 * torch.nn.functional.logsigmoid(-d)
    assert torch.allclose(soft, expected)
    # p_a = 0.2 about slot a is the same preference as p_a = 0.8 with the slots swapped
    assert torch.allclose(reward_loss(torch.zeros(3), d, torch.full((3,), 0.2)), expected)
    lp_a, lp_b, zero = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.zeros(1)
    t = dpo_loss(lp_a, lp_b, zero, zero, torch.tensor([0.9]), beta=0.5)
    z = torch.tensor(0.5 * 2.0)
    assert torch.allclose(t.loss, -0.9 * torch.nn.functional.logsigmoid(z) - 0.1 * torch.nn.functional.logsigmoid(-z))
    assert Label("x", 0.9, "judge").chosen == "a"

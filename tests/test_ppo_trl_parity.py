"""cai's PPO math against TRL 1.12's experimental ``PPOTrainer`` on one fixed rollout batch.

TRL removed PPO in 1.13, and 1.12 keeps the math inline in ``PPOTrainer.train`` rather than in
functions. So this test reads ``trl/experimental/ppo/ppo_trainer.py`` of a TRL 1.12 install and
executes TRL's own statements on our tensors, unchanged:

- block A, from ``response_idxs = torch.arange(`` to ``advantages = torch.masked_fill(advantages,
  padding_mask, 0)``: padding masks, the k1/k3 KL, ``non_score_reward``, the score placement,
  optional reward whitening, GAE, returns and advantage whitening (with TRL's ``masked_whiten``);
- block B, from ``vpredclipped = torch.clamp(`` to ``loss = pg_loss + args.vf_coef * vf_loss``:
  the clipped value and policy losses; and block C, ``pg_clipfrac = ...`` to ``approxkl = ...``.

The same quantities from :mod:`cai.train.rl_math`, given the same masks, must agree to 1e-5.
Install TRL 1.12 beside the main environment and point ``CAI_TRL112_PATH`` at it::

    pip install --no-deps --target /tmp/trl112 trl==1.12.0
    CAI_TRL112_PATH=/tmp/trl112 python -m pytest tests/test_ppo_trl_parity.py
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cai.train import rl_math as K

# tests/install_peers.sh puts TRL 1.12 in .peers/trl112; CAI_TRL112_PATH points elsewhere
TRL_PATH = os.environ.get("CAI_TRL112_PATH") or str(Path(__file__).resolve().parents[1] / ".peers" / "trl112")
SOURCE = Path(TRL_PATH or "/nonexistent") / "trl" / "experimental" / "ppo" / "ppo_trainer.py"
pytestmark = pytest.mark.skipif(
    not SOURCE.is_file(),
    reason="TRL 1.12 not found: run `bash tests/install_peers.sh` (or set CAI_TRL112_PATH)",
)

INVALID_LOGPROB = 1.0  # TRL's fill value for padded log-probs


def _block(source: str, start: str, end: str) -> str:
    """The statements of TRL's file from the line containing ``start`` through ``end``, dedented."""
    lines = source.splitlines()
    i = next((k for k, line in enumerate(lines) if start in line), None)
    assert i is not None, f"TRL source changed: {start!r} not found in {SOURCE}"
    j = next((k for k in range(i, len(lines)) if end in lines[k]), None)
    assert j is not None, f"TRL source changed: {end!r} not found after {start!r}"
    return textwrap.dedent("\n".join(lines[i:j + 1]))


def _trl_namespace(**tensors):
    """TRL's source text and a namespace holding TRL's own masked statistics and our tensors."""
    src = SOURCE.read_text()
    helpers = _block(src, "def masked_mean(", "return whitened")  # module-level functions of that file
    ns: dict = {"torch": torch, "INVALID_LOGPROB": INVALID_LOGPROB}
    exec(compile("from __future__ import annotations\n" + helpers, str(SOURCE), "exec"), ns)
    ns.update(tensors)
    return src, ns


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    b, n = 6, 7
    sequence_lengths = torch.tensor([6, 2, 0, 4, 5, 3])  # index of each row's last real token
    logprobs = -torch.rand(b, n, generator=g) * 3
    ref_logprobs = logprobs + 0.3 * torch.randn(b, n, generator=g)
    values = torch.randn(b, n, generator=g)
    scores = torch.randn(b, generator=g) * 2
    return dict(responses=torch.zeros(b, n, dtype=torch.long), sequence_lengths=sequence_lengths, logprobs=logprobs,
                ref_logprobs=ref_logprobs, values=values, scores=scores)


@pytest.mark.parametrize("estimator,whiten_rewards", [("k1", False), ("k3", False), ("k1", True)])
def test_rewards_advantages_returns_and_kl_match_trl_112(estimator, whiten_rewards):
    batch = _batch(0)
    args = SimpleNamespace(kl_estimator=estimator, kl_coef=0.07, whiten_rewards=whiten_rewards, gamma=0.97, lam=0.9)
    src, ns = _trl_namespace(args=args, **{k: v.clone() for k, v in batch.items()})
    exec(_block(src, "response_idxs = torch.arange(", "advantages = torch.masked_fill(advantages, padding_mask, 0)"),
         ns)

    # cai on the same batch and the same masks
    mask, value_mask = ~ns["padding_mask"], ~ns["padding_mask_p1"]
    lp = batch["logprobs"].masked_fill(~mask, INVALID_LOGPROB)
    ref = batch["ref_logprobs"].masked_fill(~mask, INVALID_LOGPROB)
    values = batch["values"].masked_fill(~value_mask, 0)
    kl = K.kl_penalty(lp, ref, estimator)
    rewards, non_score = K.token_rewards(kl, batch["scores"], args.kl_coef, ns["actual_end"])
    if whiten_rewards:
        rewards = K.masked_whiten(rewards, value_mask, shift_mean=False).masked_fill(~value_mask, 0)
    adv, returns = K.gae(rewards, values, args.gamma, args.lam)
    adv = K.masked_whiten(adv, mask).masked_fill(~mask, 0)

    for name, ours in (("kl", kl), ("non_score_reward", non_score), ("rewards", rewards), ("returns", returns),
                       ("advantages", adv)):
        assert torch.allclose(ours, ns[name], atol=1e-5, rtol=0), name


def test_policy_and_value_losses_match_trl_112():
    batch = _batch(1)
    g = torch.Generator().manual_seed(7)
    args = SimpleNamespace(kl_estimator="k1", kl_coef=0.05, whiten_rewards=False, gamma=1.0, lam=0.95,
                           cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    src, ns = _trl_namespace(args=args, **{k: v.clone() for k, v in batch.items()})
    exec(_block(src, "response_idxs = torch.arange(", "advantages = torch.masked_fill(advantages, padding_mask, 0)"),
         ns)
    rows = torch.tensor([4, 0, 2, 5])  # one micro-batch, in shuffled order
    pm, pm1 = ns["padding_mask"][rows], ns["padding_mask_p1"][rows]
    logits = torch.randn(len(rows), ns["responses"].shape[1], 13, generator=g)
    new_logprobs = (ns["logprobs"][rows] + 0.25 * torch.randn(pm.shape, generator=g)).masked_fill(pm, INVALID_LOGPROB)
    vpred = (ns["values"][rows] + 0.4 * torch.randn(pm.shape, generator=g)).masked_fill(pm1, 0)
    ns.update(micro_batch_inds=rows, mb_advantage=ns["advantages"][rows], mb_logprobs=ns["logprobs"][rows],
              mb_return=ns["returns"][rows], mb_values=ns["values"][rows], new_logprobs=new_logprobs, vpred=vpred,
              logits=logits)
    exec(_block(src, "vpredclipped = torch.clamp(", "loss = pg_loss + args.vf_coef * vf_loss"), ns)
    exec(_block(src, "pg_clipfrac = masked_mean(", "approxkl = 0.5 * (logprobs_diff**2).mean()"), ns)

    pl = K.policy_loss(new_logprobs, ns["logprobs"][rows], ns["advantages"][rows], ~pm, args.cliprange)
    vl = K.value_loss(vpred, ns["values"][rows], ns["returns"][rows], ~pm1, args.cliprange_value)
    pairs = (("pg_loss", pl.loss), ("pg_clipfrac", pl.clipfrac), ("approxkl", pl.approxkl), ("vf_loss", vl.loss),
             ("vf_clipfrac", vl.clipfrac), ("loss", pl.loss + args.vf_coef * vl.loss))
    valid = (~pm).float()
    for name, ours in pairs:
        if name == "approxkl":
            # ours averages over response tokens; TRL's mean runs over every entry, padding
            # included (where its log-ratio is 0), so it is ours diluted by the valid share
            ours = ours * valid.sum() / valid.numel()
        assert torch.allclose(ours, ns[name], atol=1e-5, rtol=0), (name, float(ours), float(ns[name]))
    assert 0 < float(ns["pg_clipfrac"]) < 1 and 0 < float(ns["vf_clipfrac"]) < 1  # both clip branches exercised
    assert torch.allclose(K.entropy_from_logits(logits), ns["entropy"], atol=1e-5)

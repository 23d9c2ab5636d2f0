"""The pure math of PPO and its critic-free siblings for language models: only tensors.

Every function takes ``[B, T]`` tensors over *response* tokens (row ``b``, token ``t`` of the
response) and explicit masks, so the loop (:mod:`cai.train.ppo`) decides which tokens count
and this module only computes. ``tests/test_ppo_core.py`` checks GAE against a hand-computed
case and ``tests/test_ppo_trl_parity.py`` checks KL terms, rewards, advantages, returns and
both losses against TRL 1.12's experimental ``PPOTrainer`` on the same batch and masks.

- Masked statistics: :func:`masked_mean`, :func:`masked_var` (Bessel-corrected by default, as
  TRL does), :func:`masked_whiten` (zero mean / unit variance over the masked entries; with an
  ``all_reduce`` over the entries of every data-parallel process).
- KL: :func:`kl_penalty` with the ``k1`` (``log p - log q``, unbiased, can be negative per
  token) or ``k3`` (``(r - 1) - log r`` with ``r = q / p``, never negative) estimator of
  ``KL(policy || reference)`` from the sampled tokens' log-probs (J. Schulman, "Approximating
  KL divergence", 2020).
- Rewards: :func:`token_rewards` puts ``-kl_coef * kl`` on every token and the sequence score
  on the token given by ``end`` (the loop passes the last response token).
- :func:`gae`: generalised advantage estimation (Schulman et al. 2016) with the value after the
  last column taken as 0; ``returns = advantages + values``.
- Losses: :func:`policy_loss` (clipped surrogate) and :func:`value_loss` (clipped, ``0.5 *
  max(squared errors)``), each a masked mean, with the statistics TRL logs.
- KL controllers: :class:`FixedKLController` and :class:`AdaptiveKLController` (Ziegler et al.
  2019: the coefficient moves by ``1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``), both
  with ``state_dict``/``load_state_dict`` for exact resume.
- Critic-free advantages over ``k`` samples per prompt (rows of one prompt share a ``group``
  id): :func:`rloo_advantages` (leave-one-out baseline, Ahmadian et al. 2024) and
  :func:`grpo_advantages` (group mean, optionally over the group std, Shao et al. 2024) give one
  advantage per sequence; :func:`kl_shaped_scores` folds the sequence KL into the score before
  the baseline; :func:`token_advantages` puts a sequence's advantage on each of its response
  tokens, for :func:`policy_loss`. (A token-level KL penalty instead: :func:`token_rewards` with
  the baselined score, then :func:`gae` with zero values and ``lam = 1``: the reward to go.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cai.errors import ConfigError

KL_ESTIMATORS = ("k1", "k3")
KL_CONTROLLERS = ("fixed", "adaptive")


# ----------------------------------------------------------------------------- masked statistics
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (over ``dim``, or over everything)."""
    m = mask.to(values.dtype)
    if dim is None:
        return (values * m).sum() / m.sum()
    return (values * m).sum(dim) / m.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; ``unbiased`` multiplies by ``n / (n - 1)``."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        if n < 2:
            raise ValueError("masked_var: need at least 2 unmasked entries for an unbiased variance "
                             "(a rollout batch with a single response token); use larger batches")
        var = var * (n / (n - 1))
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the masked entries; ``shift_mean=False`` keeps
    the mean (scales only the spread, what reward whitening wants).

    ``all_reduce`` (a sum over data-parallel processes) whitens with the statistics of the
    *global* batch: the moments ``(n, sum, sum of squares)`` of every process are summed, so two
    processes holding halves of a batch whiten exactly as one process holding all of it.
    """
    if all_reduce is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        mean, var = _global_mean_var(values, mask, all_reduce)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[n, sum, sum of squares]`` of the masked entries, float64 (summable across processes)."""
    v = values.detach().double()
    m = mask.to(torch.float64)
    return torch.stack([m.sum(), (v * m).sum(), (v * v * m).sum()])


def _global_mean_var(values: torch.Tensor, mask: torch.Tensor, all_reduce) -> tuple[torch.Tensor, torch.Tensor]:
    n, total, squares = all_reduce(masked_moments(values, mask)).tolist()
    if n < 2:
        raise ValueError("masked_whiten: need at least 2 unmasked entries over all processes")
    mean = total / n
    var = max(squares / n - mean * mean, 0.0) * n / (n - 1)  # Bessel-corrected, as masked_var
    as_tensor = functools.partial(torch.tensor, dtype=values.dtype, device=values.device)
    return as_tensor(mean), as_tensor(var)


# ----------------------------------------------------------------------------- KL and rewards
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(policy || reference)`` at the sampled tokens.

    ``k1 = log p - log q`` (unbiased; single tokens can be negative, the sum over a sampled
    response is non-negative only in expectation); ``k3 = (q/p - 1) - log(q/p)`` (unbiased too
    and never negative, lower variance when the two are close).
    """
    log_ratio = ref_logprobs - logprobs  # log(q / p)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ConfigError(f"ppo.kl_estimator={estimator!r}, expected one of {', '.join(KL_ESTIMATORS)}")


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, kl_coef: float,
                  end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, non_score_reward)``: ``-kl_coef * kl`` per token, plus ``scores[b]`` at
    column ``end[b]`` of row ``b``. ``kl`` must already be 0 on masked tokens."""
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, end] += scores.to(rewards.dtype)
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, right to left along each row.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V_T = 0``), ``A_t = delta_t + gamma * lam *
    A_{t+1}``, ``returns = A + V``. Padded columns must hold ``r = V = 0`` so that they pass
    nothing back to the real tokens (the loop masks values before calling this).
    """
    steps = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


# ----------------------------------------------------------------------------- losses
@dataclass
class PolicyLossTerms:
    loss: torch.Tensor  # masked mean of max(-A * ratio, -A * clip(ratio))
    clipfrac: torch.Tensor  # share of tokens where the clipped term was larger
    approxkl: torch.Tensor  # 0.5 * masked mean of (log ratio)^2 over response tokens
    ratio_mean: torch.Tensor


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> PolicyLossTerms:
    """PPO's clipped surrogate objective, negated (a loss), as a masked mean over tokens."""
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        # over response tokens only: padded positions carry no log-prob (TRL fills both sides with
        # the same constant there, so its unmasked mean is this one diluted by the padding share)
        approxkl = 0.5 * masked_mean(log_ratio ** 2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossTerms(loss, clipfrac, approxkl, ratio_mean)


@dataclass
class ValueLossTerms:
    loss: torch.Tensor  # 0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2)
    clipfrac: torch.Tensor


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, cliprange_value: float) -> ValueLossTerms:
    """Clipped value loss: the new value may move at most ``cliprange_value`` from the rollout's."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return ValueLossTerms(loss, clipfrac)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` along the last axis."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- KL controllers
class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ConfigError(f"ppo.kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): steer the per-sequence KL towards ``target``.

    After each rollout of ``n_steps`` sequences with mean KL ``k``: ``e = clip(k / target - 1,
    -0.2, 0.2)`` and ``kl_coef *= 1 + e * n_steps / horizon``. Too much KL raises the
    coefficient, too little lowers it; ``horizon`` (in sequences) sets how fast.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        if target <= 0:
            raise ConfigError(f"ppo.kl_target must be > 0 for the adaptive controller, got {target}")
        if horizon < 1:
            raise ConfigError(f"ppo.kl_horizon must be >= 1, got {horizon}")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(kind: str, kl_coef: float, target: float, horizon: int) -> FixedKLController:
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ConfigError(f"ppo.kl_controller={kind!r}, expected one of {', '.join(KL_CONTROLLERS)}")


# ----------------------------------------------------------------------------- scores
def shape_scores(raw: torch.Tensor, mean: float, std: float, normalize: bool, scale: float,
                 clip: float) -> torch.Tensor:
    """Reward-model scores as PPO uses them: ``(r - mean) / std`` when ``normalize`` (the RM's
    saved statistics), times ``scale``, clipped to ``[-clip, clip]`` when ``clip > 0``."""
    out = (raw - mean) / max(std, 1e-8) if normalize else raw.clone()
    out = out * scale
    return out.clamp(-clip, clip) if clip > 0 else out


# ----------------------------------------------------------------------------- critic-free advantages
def _centred_groups(scores: torch.Tensor, group: torch.Tensor, valid: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(w, n, d, group_sum)``: ``w`` is 1 on valid rows and 0 elsewhere; ``n[i]`` counts the valid
    rows of row ``i``'s group; ``d = (s - shift) * w`` with ``shift`` the largest valid score of
    the group (a shift changes no difference between scores, and makes those of a group of equal
    scores exactly 0, free of the rounding of a sum); ``group_sum(x)[i]`` sums ``x`` over the
    group of row ``i``."""
    if scores.dim() != 1 or group.shape != scores.shape:
        raise ValueError(f"scores and group must both be [B], got {tuple(scores.shape)} and {tuple(group.shape)}")
    w = torch.ones_like(scores) if valid is None else valid.to(scores.dtype)
    _, inverse = torch.unique(group, return_inverse=True)  # any ids -> 0 .. G - 1
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0

    def group_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)[inverse]

    masked = torch.where(w > 0, scores, torch.full_like(scores, -torch.inf))
    top = torch.full((n_groups,), -torch.inf, dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, inverse, masked, reduce="amax")[inverse]
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a group with no valid row: 0
    return w, group_sum(w), (scores - shift) * w, group_sum


def rloo_advantages(scores: torch.Tensor, group: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out advantages, ``[B]``: each score minus the mean of the *other*
    scores of its group.

    For row ``i`` of a group ``G`` with ``n`` valid rows: ``A_i = s_i - (sum_{j in G, j != i} s_j)
    / (n - 1)``, which equals ``n / (n - 1) * (s_i - mean_G s)``. The baseline does not use
    ``s_i``, so it is unbiased. ``valid`` (``[B]`` bool, default all) leaves rows out of their
    group's baseline; invalid rows, and every row of a group with fewer than two valid rows (no
    other sample to compare with), get advantage 0. ``group`` ids are any integers.
    """
    w, n, d, group_sum = _centred_groups(scores, group, valid)
    ok = n >= 2
    others = (group_sum(d) - d) / torch.where(ok, n - 1, torch.ones_like(n))
    return torch.where(ok, d - others, torch.zeros_like(d)) * w


def grpo_advantages(scores: torch.Tensor, group: torch.Tensor, valid: torch.Tensor | None = None,
                    scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantages, ``[B]``.

    For row ``i`` of a group ``G`` with ``n`` valid rows: ``A_i = (s_i - mean_G s) / (std_G s +
    eps)`` with the Bessel-corrected ``std_G = sqrt(sum_{j in G} (s_j - mean_G s)^2 / (n - 1))``
    (as :func:`masked_var`); ``scale_by_std=False`` gives ``A_i = s_i - mean_G s`` (no division:
    dividing by the std weighs groups whose samples barely differ, prompts that are too easy or
    too hard, as much as the others). A group whose scores are all equal gets exactly 0, also
    with ``eps = 0``. ``valid`` as in :func:`rloo_advantages`: invalid rows and groups with fewer
    than two valid rows get 0.
    """
    w, n, d, group_sum = _centred_groups(scores, group, valid)
    ok = n >= 2
    centred = (d - group_sum(d) / torch.where(ok, n, torch.ones_like(n))) * w
    if scale_by_std:
        var = group_sum(centred * centred) / torch.where(ok, n - 1, torch.ones_like(n))
        scale = var.sqrt() + eps
        centred = centred / torch.where(scale > 0, scale, torch.ones_like(scale))  # eps = 0, std 0: 0 / 1
    return torch.where(ok, centred, torch.zeros_like(centred)) * w


def kl_shaped_scores(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """The KL penalty folded into each sequence's score, ``[B]``: ``s_b - kl_coef * sum_t kl[b, t]``
    over the response tokens of ``mask``. Baselining these (rather than the raw scores) makes the
    advantage of a sample also say how much further from the reference it went than its siblings."""
    return scores - kl_coef * (kl * mask.to(kl.dtype)).sum(1)


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence advantage spread over its response tokens: ``A[b, t] = advantages[b] *
    mask[b, t]``, ``[B, T]`` (every real token of a response gets the same advantage; padding
    and masked rows get 0), ready for :func:`policy_loss`."""
    return advantages[:, None] * mask.to(advantages.dtype)

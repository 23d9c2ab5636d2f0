"""RL rollouts: sample, lay the batch out once, score it with policy, reference, value and reward.

Shared by PPO (:mod:`cai.train.ppo`) and its critic-free siblings (RLOO, GRPO: ``k`` samples
per prompt, no value model), which differ only in how they turn a rollout into advantages.

The batch layout is the one every forward of a step shares: prompts left-padded to width
``P`` (the sampling engine's own tokenisation, so the tokens are exactly those it continued),
responses right-padded after them, ``position_ids = cumsum(mask) - 1`` so a padded row sees the
positions it would see alone. The logits at columns ``P - 1 .. P + R - 2`` predict the ``R``
response tokens; the value at the same columns is the value of the state each token is chosen in.

``samples_per_prompt = k`` samples each prompt ``k`` times: rows ``i * k .. i * k + k - 1`` answer
prompt ``i`` of the call, and ``Rollout.group[row] = i``. ``k = 1`` is exactly PPO's rollout.

:class:`PolicyAndValue` holds the trained parts (policy, optional separate value backbone,
scalar value head) as one module: one optimizer, one checkpoint, one DDP wrapper. With
``value_head=False`` it holds the policy alone: its forward returns no values and a rollout
made with it has ``values = None`` (no value forward at all).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cai.sampling import Completion, SamplingEngine, SamplingParams


class PolicyAndValue(torch.nn.Module):
    """The policy and the value function trained together.

    ``value_backbone=None``: the value head reads the policy's last hidden state (a shared
    backbone); otherwise the backbone (an ``AutoModel``) has its own weights. The head is a
    seeded linear layer initialised near zero. ``value_head=False`` (critic-free methods): no
    value function at all, ``self.value_head is None`` and :meth:`forward` returns ``None``
    values without asking the policy for its hidden states.
    """

    def __init__(self, policy, value_backbone=None, seed: int = 0, *, value_head: bool = True) -> None:
        super().__init__()
        if value_backbone is not None and not value_head:
            raise ValueError("PolicyAndValue: a value backbone without a value head has nothing to train")
        self.policy = policy
        self.value_backbone = value_backbone
        self.value_head: torch.nn.Linear | None = None
        if value_head:
            config = (value_backbone or policy).config
            hidden = getattr(config, "hidden_size", None) or config.n_embd
            head = torch.nn.Linear(hidden, 1)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * (0.01 / hidden ** 0.5))
                head.bias.zero_()
            self.value_head = head.to(next(policy.parameters()).device)  # float32, whatever the backbone
        self._keep = _keeps_logits(policy)

    def forward(self, input_ids, attention_mask, position_ids, prompt_width: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits [B, R, V], values [B, R])`` at the response-predicting columns (values
        ``None`` without a value head)."""
        n_resp = input_ids.size(1) - prompt_width
        shared = self.value_backbone is None and self.value_head is not None
        kw = {"logits_to_keep": n_resp + 1} if self._keep else {}
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, output_hidden_states=shared, **kw)
        logits = out.logits[:, -(n_resp + 1):-1]
        if self.value_head is None:
            return logits, None
        if shared:
            hidden = out.hidden_states[-1]
        else:
            hidden = self.value_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, use_cache=False).last_hidden_state
        values = self.value_head(hidden[:, prompt_width - 1:-1].float()).squeeze(-1)
        return logits, values


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` at the response tokens, ``[B, R]`` (float32)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)


@dataclass
class Rollout:
    """One step's rollout on this process, everything on the training device.

    With ``samples_per_prompt = k`` the ``B = n_prompts * k`` rows come in groups of ``k``
    adjacent rows answering the same prompt; ``group`` numbers the prompts of this rollout
    ``0 .. n_prompts - 1`` (local to this process: a group never spans processes).
    """

    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int  # P
    responses: torch.Tensor  # [B, R] sampled tokens (pad after the end)
    mask: torch.Tensor  # [B, R] bool: real response tokens of rows whose score is valid
    ended: torch.Tensor  # [B] bool: the response ended by EOS or a stop string (not the length cap)
    logprobs: torch.Tensor  # [B, R] policy log-probs at rollout time (0 where masked)
    sampler_logprobs: torch.Tensor  # [B, R] what the sampling engine reported
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # [B, R] value estimates (0 where masked); None without a value head
    scores: torch.Tensor  # [B] shaped scores (0 where invalid)
    raw_scores: torch.Tensor  # [B] the reward function's raw scores (0 where invalid)
    valid: torch.Tensor  # [B] bool
    group: torch.Tensor  # [B] long: which prompt of this rollout the row answers (k adjacent rows each)
    texts: list[str]
    completions: list[Completion]
    n_tokens: int
    times: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    samples_per_prompt: int = 1  # k


def layout(prompt_ids: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int, device
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(input_ids, attention_mask, position_ids, responses, response_mask, P)`` of a batch."""
    width_p = max(len(p) for p in prompt_ids)
    width_r = max(max(len(r) for r in responses), 1)
    b = len(prompt_ids)
    ids = torch.full((b, width_p + width_r), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width_p + width_r), dtype=torch.long)
    resp = torch.full((b, width_r), pad_id, dtype=torch.long)
    rmask = torch.zeros((b, width_r), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        ids[i, width_p - len(p):width_p] = torch.tensor(p)
        mask[i, width_p - len(p):width_p + len(r)] = 1
        if r:
            ids[i, width_p:width_p + len(r)] = torch.tensor(r)
            resp[i, :len(r)] = torch.tensor(r)
            rmask[i, :len(r)] = True
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device), resp.to(device), rmask.to(device), width_p


def _keeps_logits(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def _forward_logprobs(model, ids, mask, pos, width_p, responses, temperature: float) -> torch.Tensor:
    n_resp = responses.size(1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return response_logprobs(logits[:, -(n_resp + 1):-1], responses, temperature)


@torch.no_grad()
def _ref_logprobs(ref_model, container: PolicyAndValue, ids, mask, pos, width_p, responses, temperature):
    if ref_model is not None:
        return _forward_logprobs(ref_model, ids, mask, pos, width_p, responses, temperature)
    with container.policy.disable_adapter():  # a LoRA policy without its adapters is the reference
        return _forward_logprobs(container.policy, ids, mask, pos, width_p, responses, temperature)


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def make_rollout(engine: SamplingEngine, container: PolicyAndValue, ref_model, prompt_texts: list[str],
                 conversations: list[list[dict]], params: SamplingParams, reward_fn, cfg: Any, accelerator,
                 *, samples_per_prompt: int = 1) -> Rollout:
    """Sample, score and lay out one rollout (phases timed: ``generate`` and ``score``).

    ``samples_per_prompt = k`` repeats every prompt (and its conversation, for ``reward_fn``) ``k``
    times in place, ``[p0, p0, p1, p1, ...]`` for ``k = 2``, before one ``engine.generate`` call:
    the rollout is exactly the ``k = 1`` rollout of that repeated list, plus ``group``. A
    ``container`` without a value head gives ``values = None``.

    ``cfg`` is any object with ``micro_batch_size`` and ``sample_batch_size`` (rows per scoring
    forward: the larger), ``temperature``, ``recompute_logprobs`` and ``missing_eos_penalty``
    (see :class:`cai.train.ppo.PPOConfig`).
    """
    if samples_per_prompt < 1:
        raise ValueError(f"make_rollout: samples_per_prompt must be >= 1, got {samples_per_prompt}")
    k = samples_per_prompt
    if k > 1:
        prompt_texts = [p for p in prompt_texts for _ in range(k)]
        conversations = [c for c in conversations for _ in range(k)]
    group = torch.arange(len(prompt_texts) // k).repeat_interleave(k)
    t0 = time.perf_counter()
    with accelerator.autocast():  # bf16/fp16 sampling under mixed precision, as the scoring forwards
        completions = engine.generate(prompt_texts, params)
    prompt_ids = engine.encode_prompts(prompt_texts, params.max_new_tokens)
    t1 = time.perf_counter()
    ids, amask, pos, resp, rmask, width_p = layout(prompt_ids, [c.token_ids for c in completions],
                                                   engine.pad_id, accelerator.device)
    b, n_resp = resp.shape
    logprobs = torch.zeros((b, n_resp))
    ref = torch.zeros((b, n_resp))
    values = torch.zeros((b, n_resp)) if container.value_head is not None else None
    container.eval()
    size = max(cfg.micro_batch_size, cfg.sample_batch_size)
    with torch.no_grad(), accelerator.autocast():
        for s in _chunks(b, size):
            logits, v = container(ids[s], amask[s], pos[s], width_p)
            logprobs[s] = response_logprobs(logits, resp[s], cfg.temperature).cpu()
            if values is not None:
                values[s] = v.float().cpu()
            ref[s] = _ref_logprobs(ref_model, container, ids[s], amask[s], pos[s], width_p, resp[s],
                                   cfg.temperature).cpu()
    sampler = torch.zeros((b, n_resp))
    for i, c in enumerate(completions):
        sampler[i, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
    if not cfg.recompute_logprobs:
        logprobs = sampler.clone()
    scored = reward_fn(conversations, completions)
    valid = torch.tensor([s is not None for s in scored.scores], dtype=torch.bool)
    scores = torch.tensor([s if s is not None else 0.0 for s in scored.scores], dtype=torch.float32)
    raw = torch.tensor([s if s is not None else 0.0 for s in scored.raw], dtype=torch.float32)
    ended = torch.tensor([c.finish_reason != "length" for c in completions], dtype=torch.bool)
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
    rmask_cpu = rmask.cpu() & valid[:, None]
    m = rmask_cpu.float()
    t2 = time.perf_counter()
    dev = accelerator.device
    return Rollout(
        input_ids=ids, attention_mask=amask, position_ids=pos, prompt_width=width_p, responses=resp,
        mask=rmask_cpu.to(dev), ended=ended.to(dev), logprobs=(logprobs * m).to(dev),
        sampler_logprobs=(sampler * m).to(dev), ref_logprobs=(ref * m).to(dev),
        values=None if values is None else (values * m).to(dev),
        scores=(scores * valid).to(dev), raw_scores=(raw * valid).to(dev), valid=valid.to(dev), group=group.to(dev),
        texts=[c.text for c in completions], completions=completions,
        n_tokens=int(rmask.sum()), times={"generate": t1 - t0, "score": t2 - t1}, extra=dict(scored.metrics),
        samples_per_prompt=k,
    )


__all__ = ["PolicyAndValue", "Rollout", "layout", "make_rollout", "response_logprobs"]

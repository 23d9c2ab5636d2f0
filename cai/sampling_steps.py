"""Per-step pieces of the decode loop: token choice, log-probs, stop strings, finished rows.

:mod:`cai.sampling` runs the loop (batching, padding, the KV cache, scoring); this module holds
what happens to one step's logits and tokens. The sampler and ``logprobs_from_logits`` are
public so that PPO, DPO and the judges compute exactly the same log-probabilities from their
own forward passes, and so that benchmarks reuse the sampler in their floor.

Conventions: logits are ``[B, V]`` (any float dtype; the math runs in float32), temperature
``T = 0`` means greedy, and log-probs are ``log_softmax(logits / T)`` of the *untruncated*
distribution (``T = 1`` when greedy), whatever top-k/top-p did to the draw.
"""

from __future__ import annotations

import torch

__all__ = ["LiveRows", "StopWatcher", "build_sampler", "logprobs_from_logits"]


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` at ``tokens`` (last dim of logits is the vocab).

    ``temperature`` 0 is treated as 1 (greedy decoding's log-probs are the model's own).
    Computed in float32 whatever the logits' dtype.
    """
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside top-k / the top-p nucleus set to -inf."""
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # keep a token while the mass above it < top_p
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    return scaled


def build_sampler(temperature: float, top_k: int, top_p: float, generator: torch.Generator):
    """A function ``logits [B, V] -> (tokens [B], logprobs [B])`` for these settings.

    The branches are decided once here, not on every step. Log-probs are those of the
    temperature-scaled, untruncated distribution (see the module docstring).
    """
    greedy = temperature == 0.0 or top_k == 1
    divide = temperature not in (0.0, 1.0)
    truncated = top_k > 1 or top_p < 1.0

    def sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = logits.float()
        if divide:
            scaled = scaled / temperature
        logp = scaled.log_softmax(-1)
        if greedy:
            token = scaled.argmax(-1)
        else:
            probs = _truncate(scaled, top_k, top_p).softmax(-1) if truncated else logp.exp()
            token = _inverse_cdf_sample(probs, generator)
        return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)

    return sample


def _inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from (unnormalised) ``probs [B, V]`` by inverting the cumulative sum.

    Needs one uniform number per row instead of one per vocabulary entry (what
    ``torch.multinomial`` draws), which on CPU is ~10x cheaper for a 2k-8k vocabulary.
    ``right=True`` never selects a zero-probability (truncated) entry, and ``u`` stays strictly
    below the total so the index is always in range.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


class StopWatcher:
    """Detects stop strings in the decoded tail of each row; also tracks EOS on the host.

    Only the last ``window`` tokens of a row are decoded per step: every token decodes to at
    least one byte, so the longest stop string's UTF-8 length (+2 for a split character)
    covers any stop string that the newest token can have completed.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], batch: int, eos_ids: set[int]):
        self.active = bool(stop)
        self.stop = stop
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.window = max((len(s.encode("utf-8")) for s in stop), default=0) + 2
        self.history: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.stopped_at: list[int | None] = [None] * batch

    def step(self, t: int, tokens: list[int], rows: list[int]) -> list[bool]:
        """Record step ``t``'s tokens of the batch's current ``rows``; returns their done flags."""
        live = []
        for b, tok in zip(rows, tokens):
            if self.done[b]:
                continue
            self.history[b].append(tok)
            if tok in self.eos_ids:
                self.done[b] = True
            else:
                live.append(b)
        if live:
            tails = self.tokenizer.batch_decode([self.history[b][-self.window:] for b in live],
                                                skip_special_tokens=True)
            for b, tail in zip(live, tails):
                if any(s in tail for s in self.stop):
                    self.done[b] = True
                    self.stopped_at[b] = t
        return [self.done[b] for b in rows]


class LiveRows:
    """The rows of a batch still being decoded; finished rows can be dropped from the batch."""

    def __init__(self, batch: int, device: torch.device):
        self.rows = list(range(batch))  # original row of each current batch row
        self.index: torch.Tensor | None = None  # same on device; None while nothing was dropped
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.drops = 0

    @property
    def size(self) -> int:
        return len(self.rows)

    def record(self, tokens: torch.Tensor, logprobs: torch.Tensor, t: int, token, logprob) -> None:
        if self.index is None:
            tokens[t] = token
            logprobs[t] = logprob
        else:
            tokens[t, self.index] = token
            logprobs[t, self.index] = logprob

    def drop_finished(self) -> torch.Tensor:
        """Forget finished rows; returns the current-batch indices to keep (for the cache)."""
        keep = (~self.finished).nonzero().squeeze(1)
        self.rows = [self.rows[i] for i in keep.tolist()]
        self.index = torch.tensor(self.rows, device=keep.device)
        self.finished = self.finished[keep]
        self.drops += 1
        return keep

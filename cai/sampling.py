"""THE generation path: batched, KV-cached sampling that returns token log-probabilities.

Every stage that samples from a local model (responses, critiques and revisions, pairs, PPO
rollouts, judges, evaluation) goes through :class:`SamplingEngine`, so they share one set of
semantics and one tuned loop.

Algorithm (deliberately simple):

1. Prompts are tokenized (a BOS is added by the tokenizer unless the text already starts with
   it), sorted by length and cut into chunks of ``batch_size`` (less padding); results are put
   back in the caller's order. Prompts longer than the budget (``max_prompt_tokens``, and the
   model's maximum positions minus ``max_new_tokens``) are cut from the left, counted and logged.
2. A chunk is left-padded. One prefill forward computes the KV cache (a transformers
   ``DynamicCache``) and the next-token logits; then one forward per new token. The attention
   mask for all steps is allocated once (and not passed at all when the chunk has no padding);
   ``position_ids = cumsum(mask) - 1`` (clamped at 0) so a padded row sees exactly the
   positions it would see alone.
3. Each step samples from ``softmax(logits / T)`` restricted by top-k and top-p (greedy argmax
   when ``temperature == 0``; the draw inverts the cumulative distribution with one uniform
   number per row). Randomness comes from one ``torch.Generator`` seeded with
   ``params.seed`` per ``generate`` call: the same prompts, seed and batch size give the same
   samples. (Samples depend on the batch a prompt lands in; greedy output does not.)
4. A row finishes at an EOS token (the tokenizer's and the generation config's) or when a
   stop string appears in its decoded text. Finished rows ride along (their extra tokens are
   discarded) until half of the batch has finished; then they are dropped from the batch and
   its KV cache, which on CPU doubles useful tokens/s when lengths vary (see bench/). EOS is
   checked on device (counted every step on CPU, every ``sync_every`` = 8 steps on CUDA);
   stop strings need the new tokens on the host, and only the tail of each row is decoded.

Log-probabilities: ``Completion.logprobs[i]`` is ``log_softmax(logits / T)[token_i]`` with
``T = temperature`` (``T = 1`` when greedy), computed *before* top-k/top-p truncation. That is
the policy's probability of the action it took, which PPO's ratio and KL need; a truncated
distribution would make unsampled tokens impossible and the KL infinite. ``score`` gives the
same numbers for given continuations with one batched forward.

Finish handling: for ``"eos"`` the EOS token is the last entry of ``token_ids``/``logprobs``
(it is an action too) and is not in ``text``. For ``"stop"`` the ``token_ids``/``logprobs`` run
through the token that completed the stop string, and ``text`` is cut just before the stop
string (which is not included). ``"length"`` means ``max_new_tokens`` was reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from cai.errors import ConfigError, DataError
from cai.sampling_steps import (
    LiveRows,
    StopWatcher,
    build_sampler,
    logprobs_from_logits,
)

__all__ = ["SamplingParams", "Completion", "SamplingEngine", "build_sampler", "logprobs_from_logits",
           "cache_keyword", "output_cache"]

log = logging.getLogger(__name__)

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class SamplingParams:
    """How to sample.

    max_new_tokens: upper bound on generated tokens per prompt.
    temperature: divides the logits; 0 means greedy (argmax).
    top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p.
    top_k: keep only the k most likely tokens (0 = off).
    stop: strings that end a completion (not included in the returned text).
    seed: seeds the sampling RNG of each ``generate`` call.
    ignore_eos: keep going after EOS (benchmarks that must produce exactly max_new_tokens).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"sampling.stop must be non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    """One generated continuation (see the module docstring for what each field holds)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    prompt_tokens: int


@dataclass
class _RowResult:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


def _forward_parameters(model) -> Mapping[str, inspect.Parameter]:
    """The named parameters of the (unwrapped, base) model's forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def cache_keyword(model) -> str:
    """The forward keyword that carries the KV cache into ``model``: ``"cache"`` or ``"past_key_values"``.

    transformers renamed ``past_key_values`` to ``cache`` (inputs and outputs; the old keyword
    warns with a FutureWarning and goes away in 5.40), while older releases (>= 4.56 is allowed)
    only know ``past_key_values``. The model's forward signature decides; a forward that names
    neither (``**kwargs`` only) gets whichever name the installed transformers' outputs use.
    Decide once per model (signature inspection is not free) and pass ``{keyword: cache}``."""
    params = _forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return "cache" if _outputs_say_cache() else "past_key_values"


@functools.cache
def _outputs_say_cache() -> bool:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}


def output_cache(out):
    """The KV cache a forward with ``use_cache=True`` returned: ``out.cache`` where the installed
    transformers has the new name, else ``out.past_key_values`` (reading the old name on a new
    transformers works but logs a deprecation, so the new one is tried first)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


class _UnpaddedDecodeFilter(logging.Filter):
    """Hides transformers' "input_ids may be padded" warning during our decode loop only.

    For a batch without padding the engine passes no attention mask on purpose (it is all
    ones); a sampled token that happens to equal the pad id (often the EOS id) is then not
    padding, and the warning would mislead.
    """

    depth = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.depth and "may be padded" in record.getMessage())


_UNPADDED_FILTER = _UnpaddedDecodeFilter()


@contextlib.contextmanager
def _quiet_unpadded_warning():
    target = logging.getLogger("transformers.modeling_utils")
    if _UNPADDED_FILTER not in target.filters:
        target.addFilter(_UNPADDED_FILTER)
    _UNPADDED_FILTER.depth += 1
    try:
        yield
    finally:
        _UNPADDED_FILTER.depth -= 1


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class SamplingEngine:
    """Batched, KV-cached sampling and scoring for one causal LM and its tokenizer.

    ``device`` defaults to the model's device (the model is moved there if given and
    different). ``max_prompt_tokens`` caps prompt length (cut from the left). After each call,
    ``last_stats`` holds counts for logs: prompts, prompts_truncated, decode_steps, row_drops.
    """

    #: drop finished rows from the batch (and its KV cache) once half of it has finished
    compact_finished = True

    def __init__(self, model, tokenizer, batch_size: int = 32, device=None, max_prompt_tokens=None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if next(model.parameters()).device != self.device:
            self.model = model.to(self.device)
        self.max_prompt_tokens = max_prompt_tokens
        #: count finished rows every this many steps: each count is a host sync, which costs
        #: nothing on CPU but stalls a GPU's queue (a few wasted steps cost less there)
        self.sync_every = 8 if self.device.type == "cuda" else 1
        self.last_truncated = 0
        self.last_stats: dict[str, int] = {}
        config = getattr(model, "config", None)
        self.max_positions = (getattr(config, "max_position_embeddings", None)
                              or getattr(config, "n_positions", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ConfigError(
                "the tokenizer has neither a pad nor an EOS token; load it with cai.models.load_tokenizer"
            )
        self.eos_ids = self._eos_ids(model, tokenizer)
        starts = (tokenizer.bos_token_id, tokenizer.eos_token_id, self.pad_id)
        self.start_id = next(i for i in starts if i is not None)  # what an empty prompt becomes
        self._eos_tensor = torch.tensor(sorted(self.eos_ids) or [-1], device=self.device)
        keeps_logits = "logits_to_keep" in _forward_parameters(model)
        self._keep_kw = {"logits_to_keep": 1} if keeps_logits else {}  # prefill: last position only
        self._cache_kw = cache_keyword(model)

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids = set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (tokenizer.eos_token_id, gen_eos):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    # ------------------------------------------------------------------ tokenization

    def encode_prompts(self, prompts: Sequence[str], reserve: Sequence[int] | int = 0) -> list[list[int]]:
        """Token ids of each prompt, left-truncated to fit ``reserve`` tokens after it."""
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise DataError(f"prompt {i}: expected a string, got {type(p).__name__}")
        bos = self.tokenizer.bos_token
        has_bos = [bool(bos) and p.startswith(bos) for p in prompts]
        ids: list[list[int]] = [[] for _ in prompts]
        for special in (True, False):  # add the tokenizer's BOS unless the text starts with it
            group = [i for i, b in enumerate(has_bos) if b != special]
            if group:
                # verbose=False: prompts longer than the model are cut below, not an error to warn of
                enc = self.tokenizer([prompts[i] for i in group], add_special_tokens=special,
                                     verbose=False)["input_ids"]
                for i, row in zip(group, enc):
                    ids[i] = list(row)
        reserves = [reserve] * len(prompts) if isinstance(reserve, int) else list(reserve)
        truncated = 0
        for i, (row, res) in enumerate(zip(ids, reserves)):
            limit = self._prompt_budget(res, i)
            if len(row) > limit:
                ids[i] = row[len(row) - limit:]
                truncated += 1
            if not ids[i]:  # an empty prompt starts from BOS (or EOS, GPT-2's document separator)
                ids[i] = [self.start_id]
        if truncated:
            log.warning("%d of %d prompts were longer than the prompt budget and were cut from the left",
                        truncated, len(prompts))
        self.last_truncated = truncated
        return ids

    def _prompt_budget(self, reserve: int, index: int) -> int:
        limit = self.max_prompt_tokens or 1 << 62
        if self.max_positions:
            if reserve >= self.max_positions:
                raise ConfigError(
                    f"record {index}: {reserve} continuation tokens do not fit the model's "
                    f"{self.max_positions} positions; lower max_new_tokens or the completion length"
                )
            limit = min(limit, self.max_positions - reserve)
        return limit

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompts: list[str], params: SamplingParams, progress: bool = False
    ) -> list[Completion]:
        """Sample one completion per prompt (see the module docstring for the exact semantics)."""
        ids = self.encode_prompts(prompts, params.max_new_tokens)
        self.last_stats = {"prompts": len(ids), "prompts_truncated": self.last_truncated,
                           "decode_steps": 0, "row_drops": 0}
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        generator = torch.Generator(device=self.device).manual_seed(params.seed)
        sampler = build_sampler(params.temperature, params.top_k, params.top_p, generator)
        results: list[Completion | None] = [None] * len(ids)
        bar = _progress_bar(len(ids), progress, "generate")
        with _eval_mode(self.model), torch.inference_mode(), _quiet_unpadded_warning():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                rows = self._generate_batch([ids[i] for i in chunk], params, sampler)
                for i, row in zip(chunk, rows):
                    results[i] = self._to_completion(row, params, len(ids[i]))
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _left_pad(self, rows: list[list[int]], extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, P], attention mask [B, P + extra]) with rows right-aligned in P."""
        width = max(len(r) for r in rows)
        input_ids = [[self.pad_id] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * (len(r) + extra) for r in rows]
        return (torch.tensor(input_ids, device=self.device),
                torch.tensor(mask, device=self.device))

    def _generate_batch(self, rows: list[list[int]], params: SamplingParams, sampler) -> list[_RowResult]:
        n_new = params.max_new_tokens
        input_ids, mask = self._left_pad(rows, n_new)
        batch, width = input_ids.shape
        position_ids = (mask[:, :width].cumsum(-1) - 1).clamp_(min=0)
        # Without padding the mask is all ones: pass None, which spares transformers building
        # an attention mask on every step (what ``generate`` does too).
        padded = any(len(r) < width for r in rows)
        out = self.model(input_ids=input_ids, attention_mask=mask[:, :width] if padded else None,
                         position_ids=position_ids, use_cache=True, **self._keep_kw)
        cache, logits = output_cache(out), out.logits[:, -1]
        positions = position_ids[:, -1:]
        tokens = torch.full((n_new, batch), self.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros((n_new, batch), dtype=torch.float32, device=self.device)
        check_eos = bool(self.eos_ids) and not params.ignore_eos
        stops = StopWatcher(self.tokenizer, params.stop, batch, self.eos_ids if check_eos else set())
        live = LiveRows(batch, self.device)
        can_compact = self.compact_finished and hasattr(cache, "batch_select_indices")
        steps = n_new
        for t in range(n_new):
            token, logprob = sampler(logits)
            live.record(tokens, logprobs, t, token, logprob)
            n_done = 0
            if stops.active:
                flags = stops.step(t, token.tolist(), live.rows)
                n_done = sum(flags)
                if n_done and can_compact:
                    live.finished = torch.tensor(flags, device=self.device)
            elif check_eos:
                live.finished |= torch.isin(token, self._eos_tensor)
                if (t + 1) % self.sync_every == 0:
                    n_done = int(live.finished.sum())
            if n_done == live.size or t + 1 == n_new:
                steps = t + 1
                break
            if can_compact and 2 * n_done >= live.size:
                keep = live.drop_finished()
                cache.batch_select_indices(keep)
                mask, positions, token = mask[keep], positions[keep], token[keep]
            positions = positions + 1
            step_mask = mask[:, :width + t + 1] if padded else None
            out = self.model(input_ids=token[:, None], attention_mask=step_mask, position_ids=positions,
                             use_cache=True, **{self._cache_kw: cache})
            cache, logits = output_cache(out), out.logits[:, -1]
        self.last_stats["decode_steps"] += steps
        self.last_stats["row_drops"] += live.drops
        return self._finish_rows(tokens[:steps].T.tolist(), logprobs[:steps].T.tolist(), stops, check_eos)

    def _finish_rows(self, tokens, logprobs, stops: StopWatcher, check_eos: bool) -> list[_RowResult]:
        results = []
        for b, (toks, lps) in enumerate(zip(tokens, logprobs)):
            end, reason = len(toks), "length"
            if check_eos:
                for j, tok in enumerate(toks):
                    if tok in self.eos_ids:
                        end, reason = j + 1, "eos"
                        break
            stop_at = stops.stopped_at[b]
            if stop_at is not None and stop_at + 1 <= end:
                end, reason = stop_at + 1, "stop"
            results.append(_RowResult(toks[:end], lps[:end], reason))
        return results

    def _to_completion(self, row: _RowResult, params: SamplingParams, prompt_tokens: int) -> Completion:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if row.finish_reason == "stop":
            cuts = [text.find(s) for s in params.stop if s in text]
            if cuts:
                text = text[:min(cuts)]
        return Completion(text, row.tokens, row.logprobs, row.finish_reason, prompt_tokens)

    # ------------------------------------------------------------------ scoring

    def score(self, prompts: list[str], completions, temperature: float = 1.0,
              progress: bool = False) -> list[list[float]]:
        """Per-token log-probs of given continuations (strings or token-id lists).

        ``log_softmax(logits / temperature)`` at each continuation token, one batched no-grad
        forward per chunk (left-padded). String continuations are tokenized on their own
        (no special tokens) and appended to the prompt's tokens, as generation does.
        ``progress``: show a bar (when ``log.progress`` allows).
        """
        if len(prompts) != len(completions):
            raise DataError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        cont = self._encode_continuations(completions)
        ids = self.encode_prompts(prompts, [len(c) for c in cont])
        seqs = [p + c for p, c in zip(ids, cont)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        results: list[list[float]] = [[] for _ in seqs]
        with _eval_mode(self.model), torch.inference_mode(), _progress_bar(len(seqs), progress, "score") as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = [i for i in order[start:start + self.batch_size] if cont[i]]
                if chunk:
                    lengths = [len(cont[i]) for i in chunk]
                    scored = self._score_batch([seqs[i] for i in chunk], lengths, temperature)
                    for i, row in zip(chunk, scored):
                        results[i] = row
                bar.update(len(order[start:start + self.batch_size]))
        return results

    def _encode_continuations(self, completions) -> list[list[int]]:
        if all(isinstance(c, str) for c in completions):
            if not completions:
                return []
            return [list(r) for r in self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]]
        for i, c in enumerate(completions):
            if isinstance(c, str) or not all(isinstance(t, int) for t in c):
                raise DataError(
                    f"score: completion {i} must be a list of token ids like the others, got {c!r:.80}"
                )
        return [list(c) for c in completions]

    def _score_batch(
        self, seqs: list[list[int]], lengths: list[int], temperature: float
    ) -> list[list[float]]:
        input_ids, mask = self._left_pad(seqs, 0)
        position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
        longest = max(lengths)
        keep = {"logits_to_keep": longest + 1} if self._keep_kw else {}
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                            use_cache=False, **keep).logits
        logits = logits[:, -(longest + 1):-1]
        targets = input_ids[:, -longest:]
        rows = []
        for b, n in enumerate(lengths):
            lp = logprobs_from_logits(logits[b, longest - n:], targets[b, longest - n:], temperature)
            rows.append(lp.tolist())
        return rows


def _progress_bar(total: int, enabled: bool, desc: str):
    from cai import progress

    return progress.bar(total=total, enabled=enabled, desc=desc, unit="prompt")

"""Preference pairs for training: join labels to pairs, validate, split, tokenise, collate, shard.

The reward model (:mod:`cai.train.reward`) and DPO (:mod:`cai.train.dpo`) read the same
artifacts -- ``pairs.jsonl`` (:class:`cai.data.Pair`) and ``labels.jsonl``
(:class:`cai.data.Label`, human or AI, one schema) -- and this module turns them into batches:

1. :func:`load_labelled_pairs` joins labels to pairs by ``pair_id``. Every record that does not
   become a training pair is counted in :class:`PairStats` by reason (failed judge call, label
   without pair, pair without label, identical responses, empty response); nothing is dropped
   silently. Several ok labels for one pair (an AI judge's two orders, or principles) are
   averaged; labels combined over both orders (``order="both"``) take precedence when present.
   ``p_a`` is always the probability that slot ``a`` is better, whatever order a judge saw.
2. :func:`split_pairs` holds out a share of prompts by content hash (a prompt's pairs stay on one
   side), so the held-out accuracy is about unseen prompts.
3. :func:`encode_pairs` tokenises each side as the policy sees it (the prompt formatted by
   :func:`cai.models.format_example`, then the response, then EOS; see
   :func:`cai.train.common.encode_example`), truncating long examples and counting them.
4. :func:`collate_pairs` pads the ``a`` rows then the ``b`` rows into one batch, so one forward
   pass scores both sides.
5. :func:`local_rows` and :func:`loss_scale` shard a global batch over data-parallel processes
   so that DDP's gradient average equals the gradient of the global batch mean: a run on two
   processes follows the same loss curve as one process (up to float summation order).
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cai.data import Label, Pair, read_jsonl, split_by_hash
from cai.errors import ConfigError, DataError
from cai.train.common import Encoded, encode_example, epoch_order, pad_and_mask

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- joining
@dataclass(frozen=True)
class LabelledPair:
    """A pair and its (merged) preference: ``p_a`` = P(response_a is better)."""

    pair: Pair
    p_a: float

    def __post_init__(self) -> None:
        p = self.p_a
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise DataError(f"pair {self.pair.id}: p_a must be a probability in [0, 1], got {p!r}")


@dataclass
class PairStats:
    """What happened to every input record; :meth:`metrics` reports it under a prefix."""

    pairs_in: int = 0
    labels_in: int = 0
    duplicate_pairs: int = 0  # the same pair id twice in pairs.jsonl (kept once)
    labels_failed: int = 0  # status "failed": a judge call without a usable answer
    labels_unmatched: int = 0  # a label whose pair_id is not in pairs.jsonl
    pairs_unlabelled: int = 0  # a pair with no ok label
    identical_responses: int = 0  # response_a == response_b: nothing to prefer
    empty_response: int = 0  # a response that is empty or whitespace
    merged: int = 0  # pairs whose p_a averages several ok labels
    ties: int = 0  # p_a == 0.5: kept for the soft loss, left out of accuracies
    used: int = 0

    @property
    def skipped(self) -> int:
        return self.pairs_unlabelled + self.identical_responses + self.empty_response

    def metrics(self, prefix: str) -> dict[str, int]:
        out = {f"{prefix}/{k}": v for k, v in asdict(self).items()}
        out[f"{prefix}/skipped"] = self.skipped
        return out


def _read_pairs(path: Path, stats: PairStats) -> dict[str, Pair]:
    pairs: dict[str, Pair] = {}
    for pair in read_jsonl(path, Pair):  # a bad row raises DataError naming file:line
        stats.pairs_in += 1
        if pair.id in pairs:
            stats.duplicate_pairs += 1
            continue
        pairs[pair.id] = pair
    return pairs


def _merge_labels(pair_ids: set[str], labels_path: Path, stats: PairStats) -> dict[str, float]:
    by_pair: dict[str, list[Label]] = defaultdict(list)
    for label in read_jsonl(labels_path, Label):  # p_a outside [0, 1] raises with file:line
        stats.labels_in += 1
        if label.status != "ok":
            stats.labels_failed += 1
        elif label.pair_id not in pair_ids:
            stats.labels_unmatched += 1
        else:
            by_pair[label.pair_id].append(label)
    merged: dict[str, float] = {}
    for pid, labels in by_pair.items():
        both = [lb for lb in labels if lb.order == "both"]
        use = both or labels
        if len(use) > 1:
            stats.merged += 1
        merged[pid] = sum(float(lb.p_a) for lb in use) / len(use)  # type: ignore[arg-type]
    return merged


def _skip_reason(pair: Pair) -> str | None:
    if not pair.response_a.strip() or not pair.response_b.strip():
        return "empty_response"
    if pair.response_a.strip() == pair.response_b.strip():
        return "identical_responses"
    return None


def load_labelled_pairs(pairs_path: str | Path, labels_path: str | Path) -> tuple[list[LabelledPair], PairStats]:
    """Join ``labels.jsonl`` to ``pairs.jsonl``; returns the usable pairs (file order) and the counts."""
    stats = PairStats()
    pairs = _read_pairs(Path(pairs_path), stats)
    merged = _merge_labels(set(pairs), Path(labels_path), stats)
    out: list[LabelledPair] = []
    examples: dict[str, str] = {}
    for pid, pair in pairs.items():
        if pid not in merged:
            stats.pairs_unlabelled += 1
            continue
        reason = _skip_reason(pair)
        if reason is not None:
            setattr(stats, reason, getattr(stats, reason) + 1)
            examples.setdefault(reason, pid)
            continue
        p = merged[pid]
        stats.ties += p == 0.5
        out.append(LabelledPair(pair, p))
    stats.used = len(out)
    for reason, pid in examples.items():
        log.warning("%s: skipped %d pair(s) with %s (e.g. pair %s)", pairs_path, getattr(stats, reason),
                    reason.replace("_", " "), pid)
    if not out:
        raise DataError(f"{pairs_path} + {labels_path}: no usable labelled pair ({stats.metrics('pairs')})")
    return out, stats


def split_pairs(items: Sequence[LabelledPair], test_fraction: float, salt: str = "") -> tuple[list, list]:
    """``(train, test)`` by a hash of the prompt: all pairs of one prompt land on one side."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    parts = split_by_hash(items, key=lambda x: x.pair.prompt.id,
                          fractions={"train": 1.0 - test_fraction, "test": test_fraction}, salt=salt)
    return parts["train"], parts["test"]


# ----------------------------------------------------------------------------- stage inputs
@dataclass
class PreferenceData:
    """Train and held-out pairs (labels of the trained source), held-out human pairs (or none), counts."""

    train: list[LabelledPair]
    test: list[LabelledPair]
    human_test: list[LabelledPair]
    metrics: dict[str, float]


def _find(artifact: Path, name: str) -> Path | None:
    for candidate in (artifact / name, artifact / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _need_file(artifact: Path, name: str, stage: str) -> Path:
    found = _find(artifact, name)
    if found is None:
        raise DataError(f"{stage} artifact {artifact} has no {name}")
    return found


def preference_data(labels_from: str, inputs: Mapping[str, Path], test_fraction: float, salt: str,
                    prefix: str) -> PreferenceData:
    """Train/held-out pairs for ``labels_from`` (human | ai) and the held-out human pairs.

    ``inputs``: ``human_pairs``; for AI labels ``ai_labels`` and ``ai_pairs`` (the artifact the
    judge labelled, ``labels.source``; else the ``ai_labels`` artifact's own ``pairs.jsonl``, else
    the human pairs). Human pairs are split by the same prompt hash in both arms, so both arms
    are evaluated on the same held-out human pairs.
    """
    human = inputs.get("human_pairs")
    if labels_from == "human":
        if human is None:
            raise ConfigError(f"{prefix}: labels_from=human needs human pairs; set data.human.path")
        pairs = _need_file(human, "pairs.jsonl", "human_pairs")
        labels = _need_file(human, "labels.jsonl", "human_pairs")
    else:
        ai = inputs["ai_labels"]
        labels = _need_file(ai, "labels.jsonl", "ai_labels")
        sources = [inputs[k] for k in ("ai_pairs", "ai_labels", "human_pairs") if k in inputs]
        pairs = next((f for f in (_find(src, "pairs.jsonl") for src in sources) if f is not None), None)
        if pairs is None:
            raise DataError(f"no pairs.jsonl for the AI labels of {ai} in {', '.join(map(str, sources))}")
    items, stats = load_labelled_pairs(pairs, labels)
    train, test = split_pairs(items, test_fraction, salt)
    metrics: dict[str, float] = dict(stats.metrics(f"{prefix}/data"))
    human_test = test if labels_from == "human" else []
    if labels_from == "ai" and human is not None:
        h_items, h_stats = load_labelled_pairs(_need_file(human, "pairs.jsonl", "human_pairs"),
                                               _need_file(human, "labels.jsonl", "human_pairs"))
        human_test = split_pairs(h_items, test_fraction, salt)[1]
        metrics.update(h_stats.metrics(f"{prefix}/human_data"))
    if not train:
        raise DataError(f"{prefix}: the train split is empty ({len(items)} usable pairs, "
                        f"test_fraction={test_fraction})")
    return PreferenceData(train, test, human_test, metrics)


# ----------------------------------------------------------------------------- tokenising
@dataclass(frozen=True)
class EncodedPair:
    """Both sides of a pair tokenised (prompt + response + EOS), with the preference."""

    pair_id: str
    a: Encoded
    b: Encoded
    p_a: float

    @property
    def n_tokens(self) -> int:
        return len(self.a.input_ids) + len(self.b.input_ids)


def check_tokenizer(tokenizer, what: str) -> None:
    """Refuse a tokenizer that cannot pad (a batch of pairs needs padding)."""
    if tokenizer.pad_token_id is None:
        eos = ("" if tokenizer.eos_token_id is None
               else f" (it has an EOS token {tokenizer.eos_token!r}: set pad_token to it)")
        raise ConfigError(f"{what}: the tokenizer has no pad token{eos}; load it with "
                          "cai.models.load_tokenizer, which pads with EOS when there is no pad token")


def front_specials(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (BERT's [CLS], Llama's BOS)."""
    with_special = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return list(with_special[:i])
    return []


def encode_response(tokenizer, messages: list[dict], response: str, chat_format: str, max_length: int,
                    front: list[int] | None = None) -> Encoded:
    """One side: the formatted prompt, the response, EOS; labels ``-100`` on the prompt.

    ``front``: :func:`front_specials` of the tokenizer (computed when ``None``).
    """
    from cai.models import format_example

    front = front_specials(tokenizer) if front is None else front
    prompt_text, full_text = format_example(tokenizer, messages, response, chat_format)
    enc = encode_example(tokenizer, prompt_text, full_text, max_length)
    if enc.truncated and front and enc.input_ids[:len(front)] != front and enc.prompt_len >= len(front):
        ids = front + enc.input_ids[len(front):]  # a left-cut prompt keeps its [CLS]/BOS
        enc = Encoded(ids, enc.labels, enc.prompt_len, True)  # prompt labels are -100 anyway
    return enc


def encode_pairs(items: Sequence[LabelledPair], tokenizer, chat_format: str, max_length: int,
                 ) -> tuple[list[EncodedPair], int]:
    """Tokenise both sides of every pair; returns the encoded pairs and how many were truncated.

    A pair whose two sides become identical after truncation (the difference was cut off) is
    kept but shows up in the count; raise ``max_length`` if many are truncated.
    """
    if max_length < 8:
        raise ConfigError(f"max_length must be >= 8 tokens, got {max_length}")
    check_tokenizer(tokenizer, "encode_pairs")
    front = front_specials(tokenizer)
    out, truncated = [], 0
    for item in items:
        messages = item.pair.prompt.messages_as_dicts()
        a = encode_response(tokenizer, messages, item.pair.response_a, chat_format, max_length, front)
        b = encode_response(tokenizer, messages, item.pair.response_b, chat_format, max_length, front)
        truncated += a.truncated or b.truncated
        out.append(EncodedPair(item.pair.id, a, b, float(item.p_a)))
    return out, truncated


def collate_pairs(batch: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` with the ``a`` rows first, then the ``b`` rows,
    and ``p_a`` ``[B]``. ``labels`` is ``-100`` on prompt and padding (the DPO loss mask)."""
    rows = [{"input_ids": e.a.input_ids, "labels": e.a.labels} for e in batch]
    rows += [{"input_ids": e.b.input_ids, "labels": e.b.labels} for e in batch]
    out = pad_and_mask(rows, pad_id)
    out["p_a"] = torch.tensor([e.p_a for e in batch], dtype=torch.float32)
    return out


def orient(p_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_is_chosen [B] bool, q [B])``: the preferred slot (``a`` on ties) and its probability."""
    a_chosen = p_a >= 0.5
    return a_chosen, torch.where(a_chosen, p_a, 1.0 - p_a)


def chosen_rejected(x_a: torch.Tensor, x_b: torch.Tensor, a_chosen: torch.Tensor):
    """Per-pair quantities of the chosen and the rejected side."""
    return torch.where(a_chosen, x_a, x_b), torch.where(a_chosen, x_b, x_a)


# ----------------------------------------------------------------------------- batching
@dataclass(frozen=True)
class StepBatch:
    """One optimizer step's global batch: ``indices`` into the training list, from data position ``position``."""

    epoch: int
    position: int
    indices: list[int]

    def next_position(self, n: int) -> tuple[int, int]:
        """``(epoch, data position)`` right after this step over ``n`` items: a checkpoint's resume point."""
        pos = self.position + len(self.indices)
        return (self.epoch + 1, 0) if pos >= n else (self.epoch, pos)


def iter_steps(n: int, batch_size: int, epochs: int, seed: int, start_epoch: int = 0,
               start_position: int = 0) -> Iterator[StepBatch]:
    """Global batches of every epoch in :func:`~cai.train.common.epoch_order`; a short last batch
    is kept. Starts at ``(start_epoch, start_position)`` (a resumed run)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for epoch in range(start_epoch, epochs):
        order = epoch_order(n, seed, epoch)
        start = start_position if epoch == start_epoch else 0
        for pos in range(start, n, batch_size):
            yield StepBatch(epoch, pos, order[pos:pos + batch_size])


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def local_rows(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's share of a global batch (round-robin, so shares differ by at most one)."""
    return list(indices[rank::world])


def step_share(indices: Sequence[int], rank: int, world: int) -> tuple[list[int], float]:
    """``(rows, weight)`` of this process in one step: its :func:`local_rows` with weight 1, or,
    when the step has fewer rows than there are processes, one borrowed row with weight 0, so the
    process still joins the gradient all-reduce without changing the result."""
    rows = local_rows(indices, rank, world)
    return (rows, 1.0) if rows else (list(indices[:1]), 0.0)


def loss_scale(global_batch: int, world: int) -> float:
    """Multiply a process's *sum* of per-pair losses by this: DDP's gradient average over ``world``
    processes then equals the gradient of the mean over the whole global batch."""
    return world / global_batch


def micro_batches(rows: Sequence[int], size: int) -> list[list[int]]:
    """``rows`` in chunks of at most ``size`` (gradient accumulation inside one step)."""
    if size < 1:
        raise ConfigError(f"micro_batch_size must be >= 1, got {size}")
    return [list(rows[i:i + size]) for i in range(0, len(rows), size)]


def reduce_sums(accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Sum scalar statistics over processes (one collective for all keys)."""
    if accelerator is None or accelerator.num_processes == 1 or not sums:
        return dict(sums)
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def sharded_map(accelerator, n: int, fn: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """``fn(indices) -> [len(indices), ...]`` over ``range(n)``, each process computing a
    round-robin share; every process gets the whole result (CPU, float32), in index order.
    ``fn`` must accept an empty list (a process with nothing to do when ``n < processes``)."""
    world = accelerator.num_processes if accelerator is not None else 1
    if world == 1:
        return fn(list(range(n))).float().cpu()
    rank, per = accelerator.process_index, -(-n // world)
    mine = list(range(rank, n, world))
    part = fn(mine).float().cpu()
    local = torch.full((per, *part.shape[1:]), float("nan"), dtype=torch.float32)
    local[:len(mine)] = part
    gathered = accelerator.gather(local.to(accelerator.device)).cpu().view(world, per, *part.shape[1:])
    return gathered.transpose(0, 1).reshape(world * per, *part.shape[1:])[:n]  # row j*world+rank -> index


def no_cache_kwargs(model) -> dict[str, Any]:
    """``{"use_cache": False}`` when the model's forward takes it (training and scoring need no
    KV cache; building one costs memory). Call on the unwrapped model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"use_cache": False} if "use_cache" in inspect.signature(base.forward).parameters else {}


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (the loss of a pair must not depend on the step's RNG)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip (the norm is returned either way), step, advance the schedule, clear gradients."""
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = accelerator.clip_grad_norm_(model.parameters(), limit)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


ADAPTER_DIR = "adapter"  # an artifact's LoRA adapter, beside its merged model/ (cai export reads it)


def merged_for_saving(model, adapter_dir: str | Path | None = None):
    """The model to ``save_pretrained``: LoRA adapters merged in, so later stages load a plain model.

    ``adapter_dir``: first ``save_pretrained`` the adapter alone there (a few MB), which
    ``cai export`` ships instead of the merged model; nothing is written for a model without LoRA."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        if adapter_dir is not None:
            model.save_pretrained(adapter_dir)
        return model.merge_and_unload()
    return model

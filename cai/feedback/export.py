"""Labels -> the preference format that TRL's ``RewardTrainer`` and ``DPOTrainer`` read.

Each exported record is one labelled pair, the preferred response (by ``p_a``) as ``chosen``:

- ``prompt`` / ``chosen`` / ``rejected`` in one of the two forms TRL accepts:
  *conversational* (default): ``prompt`` is the conversation as ``[{"role", "content"}, ...]``
  and ``chosen``/``rejected`` are ``[{"role": "assistant", "content": ...}]``; the trainer
  applies the tokenizer's chat template. *standard* (``conversational=False``): ``prompt`` is
  the HH text form (``"\\n\\nHuman: ...\\n\\nAssistant:"``) and ``chosen``/``rejected`` are the
  replies with one leading space when they have none, so ``prompt + chosen`` reads like an
  HH-RLHF transcript. (TRL concatenates prompt and completion; it adds EOS itself.)
- ``p_chosen``: the soft probability that ``chosen`` is better (``max(p_a, 1 - p_a)``), kept
  for confidence weighting or filtering downstream.
- ``principle_ids``, ``judge`` (the label's ``source``, e.g. ``"ai:openai:gpt-4.1-mini"`` or
  ``"human"``) and ``pair_id`` for provenance.

Skipped, and counted in :class:`ExportCounts` (never silently): failed labels
(``skipped_failed``), ties ``p_a == 0.5`` (``skipped_ties``: no side is chosen), labels below
``min_confidence`` in ``p_chosen`` (``skipped_low_confidence``). A label for a pair that is not
among ``pairs`` is an error (the caller joined the wrong files); pairs without a label are
reported as ``pairs_unlabelled``.

``include_failed=True`` also exports failed labels that still carry a usable single-order
judgement in ``meta["p_a_by_order"]`` (e.g. one order refused): their ``p_chosen`` is the mean of
the orders that answered. Failed labels with no usable order are skipped either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cai.data import Label, Pair, write_jsonl
from cai.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ExportCounts:
    """What happened to each label given to the exporter."""

    labels_in: int = 0
    written: int = 0
    skipped_failed: int = 0
    skipped_ties: int = 0
    skipped_low_confidence: int = 0
    rescued_failed: int = 0  # failed labels exported from a surviving order (include_failed)
    pairs_unlabelled: int = 0

    def to_dict(self) -> dict[str, int]:
        d = asdict(self)
        return {"in": d.pop("labels_in"), **d}


class PreferenceRecords(list):
    """A ``list`` of preference records that also carries their :class:`ExportCounts`."""

    def __init__(self, records: Iterable[dict[str, Any]], counts: ExportCounts) -> None:
        super().__init__(records)
        self.counts = counts


def _as_pair(obj: Any, i: int) -> Pair:
    if isinstance(obj, Pair):
        return obj
    try:
        return Pair.from_dict(obj)
    except DataError as e:
        raise DataError(f"pairs[{i}]: {e}") from None


def _as_label(obj: Any, i: int) -> Label:
    if isinstance(obj, Label):
        return obj
    try:
        return Label.from_dict(obj)
    except DataError as e:
        raise DataError(f"labels[{i}]: {e}") from None


def _usable_p_a(label: Label, include_failed: bool) -> float | None:
    """``p_a`` of an ok label; for a failed one (if allowed) the mean of its answered orders."""
    if label.status == "ok":
        return label.p_a
    if not include_failed:
        return None
    by_order = label.meta.get("p_a_by_order")
    if not isinstance(by_order, Mapping):
        return None
    ps = [float(v) for v in by_order.values()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0]
    return sum(ps) / len(ps) if ps else None


def _spaced(text: str) -> str:
    return text if not text or text[0].isspace() else " " + text


def _record(pair: Pair, label: Label, p_a: float, conversational: bool) -> dict[str, Any]:
    a_wins = p_a > 0.5
    chosen, rejected = (pair.response_a, pair.response_b) if a_wins else (pair.response_b, pair.response_a)
    if conversational:
        prompt: Any = pair.prompt.messages_as_dicts()
        chosen_v: Any = [{"role": "assistant", "content": chosen}]
        rejected_v: Any = [{"role": "assistant", "content": rejected}]
    else:
        prompt, chosen_v, rejected_v = pair.prompt.hh_text, _spaced(chosen), _spaced(rejected)
    return {
        "prompt": prompt,
        "chosen": chosen_v,
        "rejected": rejected_v,
        "p_chosen": p_a if a_wins else 1.0 - p_a,
        "principle_ids": list(label.principle_ids),
        "judge": label.source,
        "pair_id": pair.id,
    }


def to_preference_records(
    pairs: Iterable[Pair | Mapping[str, Any]],
    labels: Iterable[Label | Mapping[str, Any]],
    *,
    min_confidence: float = 0.0,
    include_failed: bool = False,
    conversational: bool = True,
) -> PreferenceRecords:
    """One preference record per usable label, in label order (see the module docstring).

    ``pairs`` and ``labels`` may be records or their dicts (as read from JSONL). Returns a list
    with a ``.counts`` attribute (:class:`ExportCounts`).
    """
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) \
            or not 0.0 <= min_confidence <= 1.0:
        raise DataError(f"min_confidence: expected a probability in [0, 1], got {min_confidence!r}")
    by_id: dict[str, Pair] = {}
    for i, obj in enumerate(pairs):
        pair = _as_pair(obj, i)
        by_id.setdefault(pair.id, pair)
    counts = ExportCounts()
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, obj in enumerate(labels):
        label = _as_label(obj, i)
        counts.labels_in += 1
        if label.pair_id in seen:
            raise DataError(f"labels[{i}]: a second label for pair {label.pair_id!r} (expected one per pair)")
        seen.add(label.pair_id)
        pair = by_id.get(label.pair_id)
        if pair is None:
            raise DataError(f"labels[{i}]: pair {label.pair_id!r} is not among the {len(by_id)} pairs given "
                            "(labels and pairs must come from the same pair set)")
        p_a = _usable_p_a(label, include_failed)
        if p_a is None:
            counts.skipped_failed += 1
            continue
        if p_a == 0.5:
            counts.skipped_ties += 1
            continue
        if max(p_a, 1.0 - p_a) < min_confidence:
            counts.skipped_low_confidence += 1
            continue
        counts.rescued_failed += label.status != "ok"
        out.append(_record(pair, label, p_a, conversational))
    counts.written = len(out)
    counts.pairs_unlabelled = sum(1 for pid in by_id if pid not in seen)
    log.info("preference export: %s", counts.to_dict())
    return PreferenceRecords(out, counts)


def preference_features(conversational: bool = True):
    """The ``datasets.Features`` of exported records (explicit, so empty lists type correctly)."""
    from datasets import Features, Value

    # a one-element Python list is a list feature in every datasets version (Sequence of a
    # dict would turn into a dict of lists)
    message = {"role": Value("string"), "content": Value("string")}
    text: Any = [message] if conversational else Value("string")
    return Features({
        "prompt": text, "chosen": text, "rejected": text, "p_chosen": Value("float64"),
        "principle_ids": [Value("string")], "judge": Value("string"), "pair_id": Value("string"),
    })


def to_hf_dataset(
    pairs: Iterable[Pair | Mapping[str, Any]],
    labels: Iterable[Label | Mapping[str, Any]],
    **kwargs: Any,
):
    """The exported records as a ``datasets.Dataset`` (arguments of :func:`to_preference_records`).

    The counts are logged, and kept in the dataset's ``info.description`` as text.
    """
    from datasets import Dataset, DatasetInfo

    records = to_preference_records(pairs, labels, **kwargs)
    features = preference_features(kwargs.get("conversational", True))
    info = DatasetInfo(description=f"cai preference export: {records.counts.to_dict()}", features=features)
    columns = {name: [r[name] for r in records] for name in features}  # also right when empty
    return Dataset.from_dict(columns, features=features, info=info)


def write_preference_jsonl(
    path: str | os.PathLike[str],
    pairs: Iterable[Pair | Mapping[str, Any]],
    labels: Iterable[Label | Mapping[str, Any]],
    **kwargs: Any,
) -> dict[str, int]:
    """Write the exported records to ``path`` (atomic; ``.gz`` compressed); returns the counts.

    Load it back with ``datasets.load_dataset("json", data_files=path)``.
    """
    records = to_preference_records(pairs, labels, **kwargs)
    write_jsonl(path, records)
    return records.counts.to_dict()

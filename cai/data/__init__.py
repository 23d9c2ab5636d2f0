"""The data layer: record types, JSONL I/O, HH-RLHF, the prompt sets, deterministic splits.

One import for every stage. The record types and JSONL I/O live in :mod:`cai.data.records`,
HH-RLHF parsing in :mod:`cai.data.hh`; this module re-exports them and adds:

- the project's own prompt set (``cai/assets/prompts.jsonl``, see ``cai/assets/README.md``)
  and :func:`load_prompts` for any file of that format: one JSON object per line,
  ``{"messages": [{"role": "user", "content": ...}, ...], "tags": [...]}``;
- :func:`load_prompt_source`, the ``data.prompts`` config value: ``"builtin"``, a ``.jsonl``
  path, or ``"hh:<path-or-hub>"`` for HH-RLHF red-team prompts;
- :func:`split_by_hash`: an item's split depends only on its key and a salt, so a prompt
  keeps its split when the set grows, and the same input always gives the same splits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cai.data.hh import (
    EXCLUSION_REASONS,
    FLAGS,
    Exclusion,
    HHParseResult,
    HHRecord,
    load_hh_rlhf,
    parse_hh_rows,
    redteam_prompts,
)
from cai.data.records import (
    Label,
    Pair,
    Prompt,
    Response,
    Turn,
    conversation_id,
    iter_jsonl,
    iter_jsonl_numbered,
    pair_id,
    read_jsonl,
    write_jsonl,
)
from cai.errors import ConfigError, DataError
from cai.hashing import canonical_json, text_hash

__all__ = [
    "BUILTIN_PROMPTS", "EXCLUSION_REASONS", "FLAGS", "Exclusion", "HHParseResult", "HHRecord", "Label",
    "Pair", "Prompt", "Response", "Turn", "conversation_id", "iter_jsonl", "iter_jsonl_numbered",
    "load_hh_rlhf", "load_prompt_source", "load_prompts", "pair_id", "parse_hh_rows", "read_jsonl",
    "redteam_prompts", "split_by_hash", "write_jsonl",
]

BUILTIN_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts.jsonl"
T = TypeVar("T")


# ----------------------------------------------------------------------------- prompt sets
def _prompt_from_line(obj: Any, source: str) -> Prompt:
    if not isinstance(obj, Mapping):
        raise DataError(f"expected a JSON object with 'messages' and 'tags', got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"messages", "tags", "id"})
    if unknown:
        raise DataError(f"unknown field {', '.join(map(repr, unknown))} (expected: messages, tags, id)")
    if "messages" not in obj:
        raise DataError("missing field 'messages' (a list of {\"role\", \"content\"} turns)")
    prompt = Prompt.create(obj["messages"], source, obj.get("tags", ()))
    if "id" in obj and obj["id"] != prompt.id:
        raise DataError(f"field 'id': {obj['id']!r} does not match the messages (expected {prompt.id!r})")
    return prompt


def load_prompts(path: str | os.PathLike[str] | None = None) -> list[Prompt]:
    """Prompts from a JSONL file of ``{"messages": [...], "tags": [...]}``, in file order.

    ``path=None`` loads the project's own set (source ``"builtin"``); any other file gets its
    file name as source. A bad line, or a prompt repeated on two lines, raises a
    :class:`DataError` naming the file and line.
    """
    p = BUILTIN_PROMPTS if path is None else Path(path).expanduser()
    source = "builtin" if path is None else p.name
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    for lineno, obj in iter_jsonl_numbered(p):
        try:
            prompt = _prompt_from_line(obj, source)
        except DataError as e:
            raise DataError(f"{p}:{lineno}: {e}") from None
        if prompt.id in first_line:
            raise DataError(f"{p}:{lineno}: the same conversation as line {first_line[prompt.id]}")
        first_line[prompt.id] = lineno
        prompts.append(prompt)
    if not prompts:
        raise DataError(f"{p}: no prompts (expected one JSON object per line)")
    return prompts


def _split_hub_spec(spec: str) -> tuple[str, str]:
    """``"name[:data_dir][@split]"`` -> (name[:data_dir], split); red-team prompts default to train."""
    if "@" in spec and not Path(spec).expanduser().exists():
        source, _, split = spec.rpartition("@")
        return source, split
    return spec, "train"


def load_prompt_source(spec: str) -> list[Prompt]:
    """The prompts a config names (``data.prompts``).

    - ``"builtin"``: the project's own prompt set; ``"builtin:courtesy"``: the synthetic
      courteous-vs-rude assistant task of the offline quickstart (``cai/assets/courtesy_prompts.jsonl``,
      written by :func:`cai.testing.preference_task.task_prompts`);
    - a path to a ``.jsonl`` file in the same format;
    - ``"hh:<path-or-hub>"``: the red-team prompts of HH-RLHF rows (:func:`redteam_prompts`),
      e.g. ``hh:data/harmless.jsonl.gz`` or ``hh:Anthropic/hh-rlhf:harmless-base@train``. A hub
      source reads its ``train`` split unless ``@split`` says otherwise, so prompts stay apart
      from the test pairs used to check the reward model against human labels.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"prompt source: expected 'builtin[:name]', a .jsonl path or 'hh:<path-or-hub>', "
                          f"got {spec!r}")
    spec = spec.strip()
    if spec == "builtin":
        return load_prompts()
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        path = BUILTIN_PROMPTS.parent / f"{name}_prompts.jsonl"
        if not name.isidentifier() or not path.is_file():
            sets = BUILTIN_PROMPTS.parent.glob("*_prompts.jsonl")
            known = sorted(p.name.removesuffix("_prompts.jsonl") for p in sets)
            raise DataError(f"prompt source {spec!r}: no built-in prompt set {name!r}; known: builtin, "
                            + ", ".join(f"builtin:{k}" for k in known))
        return load_prompts(path)
    if spec.startswith("hh:"):
        source, split = _split_hub_spec(spec[3:])
        return redteam_prompts(load_hh_rlhf(source, split=split).records)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"prompt source {spec!r}: no such file; expected 'builtin', a .jsonl path "
                        "or 'hh:<path-or-hub>'")
    return load_prompts(path)


# ----------------------------------------------------------------------------- splits
def _unit(key: Any, salt: str) -> float:
    """A number in [0, 1) fixed by the key's content and the salt."""
    text = key if isinstance(key, str) else canonical_json(key)
    return int(text_hash(salt, text, length=13), 16) / 16**13


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    fr = dict(fractions)
    if not fr:
        raise ConfigError("split fractions: expected at least one split, e.g. {'train': 0.8, 'test': 0.2}")
    for name, f in fr.items():
        if not isinstance(name, str) or not isinstance(f, (int, float)) or isinstance(f, bool) \
                or not math.isfinite(f) or f < 0:
            raise ConfigError(f"split fractions: {name!r} must map to a number >= 0, got {f!r}")
    total = sum(fr.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"split fractions: must sum to 1, got {total} from {fr}")
    return fr


def split_by_hash(items: Iterable[T], key: Callable[[T], Any] = lambda x: x.id,
                  fractions: Mapping[str, float] | None = None, salt: str = "") -> dict[str, list[T]]:
    """Split items by a hash of ``key(item)`` and ``salt``: deterministic, order-preserving.

    An item's split depends on nothing else, so adding items never moves existing ones, and
    equal keys always land together. Each split receives about its fraction of the items
    (binomial noise: expect +-2*sqrt(n*f*(1-f)) around n*f). A split with fraction 0 is empty.
    """
    fr = _check_fractions(fractions if fractions is not None else {"train": 0.8, "test": 0.2})
    bounds: list[tuple[float, str]] = []
    acc = 0.0
    for name, f in fr.items():
        acc += f
        if f > 0:
            bounds.append((acc, name))
    out: dict[str, list[T]] = {name: [] for name in fr}
    for item in items:
        u = _unit(key(item), salt)
        name = next((n for upper, n in bounds if u < upper), bounds[-1][1])
        out[name].append(item)
    return out

"""Human-labelled pair files a reward model is evaluated on (``reward.eval_sets``, ``cai score``).

A file is JSON lines (``.jsonl`` or ``.jsonl.gz``), one pair per line, in one of the forms
researchers keep preference data in; every row of a file must have the same form:

- **HH-RLHF**: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``, two whole
  transcripts (parsed by :mod:`cai.data.hh`, with its rules and counters).
- **TRL preference, standard**: ``{"prompt": str, "chosen": str, "rejected": str}``. A prompt in the
  HH text form (``"\\n\\nHuman: ...\\n\\nAssistant:"``) is read as that conversation; any other
  prompt string is one user message.
- **TRL preference, conversational**: ``{"prompt": [{"role", "content"}, ...], "chosen":
  [{"role": "assistant", "content": ...}], "rejected": [...]}``.
- **TRL implicit prompt, conversational**: ``{"chosen": [messages], "rejected": [messages]}``
  ending in one assistant message each; the shared leading messages are the prompt.

Each row becomes a :class:`~cai.data.records.Pair` with ``response_a`` the chosen reply and a hard
label ``p_a = 1`` (a reward model scores each response alone, so the slot carries no bias). A row
that cannot be read stops the load with a message naming the file, line and what was expected;
nothing is skipped silently (HH-RLHF rows the HH rules exclude are counted in ``counts``, and a
file where every row is excluded is an error).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.data.hh import parse_hh_rows
from cai.data.records import Pair, Prompt, iter_jsonl_numbered
from cai.errors import DataError

FORMATS = ("hh-rlhf", "trl-standard", "trl-conversational", "trl-implicit")
SOURCE = "pair-file"


@dataclass
class PairFile:
    """One loaded pair file: its set name (the file name without ``.jsonl[.gz]``), its form, the
    pairs (``response_a`` is the human's choice) and what happened to its rows."""

    name: str
    path: Path
    format: str
    pairs: list[Pair]
    counts: dict[str, int] = field(default_factory=dict)


def set_name(path: str | os.PathLike[str]) -> str:
    """``data/helpful-test.jsonl.gz`` -> ``helpful-test``: the name metrics and tables use."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _row_format(obj: Any) -> str:
    if not isinstance(obj, Mapping) or "chosen" not in obj or "rejected" not in obj:
        raise ValueError("expected an object with 'chosen' and 'rejected' (HH-RLHF or TRL preference format)")
    if "prompt" in obj:
        return "trl-conversational" if isinstance(obj["prompt"], list) else "trl-standard"
    return "trl-implicit" if isinstance(obj["chosen"], list) else "hh-rlhf"


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what}: expected a non-empty list of {{'role', 'content'}} messages, got {value!r:.80}")
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) \
                or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{what}[{i}]: expected {{'role': system|user|assistant, 'content': str}}, "
                             f"got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply(value: Any, what: str) -> str:
    """The reply of a conversational ``chosen``/``rejected``: one assistant message."""
    msgs = _messages(value, what)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise ValueError(f"{what}: expected exactly one assistant message, got {len(msgs)} "
                         f"({', '.join(m['role'] for m in msgs)})")
    return msgs[0]["content"]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a string, got {type(value).__name__}")
    return value


def _pair(prompt: Prompt, chosen: str, rejected: str) -> Pair:
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same text: no preference to measure")
    return Pair.create(prompt, chosen, rejected, SOURCE)


def _trl_row(obj: Mapping[str, Any], form: str, line: int, source: str) -> Pair:
    """A TRL row as a pair."""
    if form == "trl-conversational":
        prompt = Prompt.create(_messages(obj["prompt"], "prompt"), SOURCE)
        return _pair(prompt, _reply(obj["chosen"], "chosen"), _reply(obj["rejected"], "rejected"))
    if form == "trl-implicit":
        chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
        if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
            raise ValueError("chosen and rejected must share every message but their last (the prompt)")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError("chosen and rejected must each end with an assistant message")
        return _pair(Prompt.create(chosen[:-1], SOURCE), chosen[-1]["content"], rejected[-1]["content"])
    prompt, chosen, rejected = (_text(obj[k], k) for k in ("prompt", "chosen", "rejected"))
    if "Human:" in prompt:  # the HH text form: prompt + reply are HH transcripts (a bad one is an error)
        row = {"chosen": prompt + chosen, "rejected": prompt + rejected}
        rec = parse_hh_rows([(line, row)], source, strict=True).records[0]
        return Pair.create(rec.prompt, rec.chosen, rec.rejected, SOURCE)
    return _pair(Prompt.create([{"role": "user", "content": prompt}], SOURCE), chosen.lstrip(" "),
                 rejected.lstrip(" "))


def load_pair_file(path: str | os.PathLike[str]) -> PairFile:
    """Read one pair file (see the module docstring); raises :class:`DataError` naming file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such pair file (expected a .jsonl or .jsonl.gz file of preference pairs)")
    form: str | None = None
    pairs: list[Pair] = []
    hh_rows: list[tuple[int, Any]] = []
    for line, obj in iter_jsonl_numbered(path):
        try:
            row_form = _row_format(obj)
            if form is None:
                form = row_form
            elif row_form != form:
                raise ValueError(f"this row is in the {row_form} form, the file's first row in the {form} form")
            if form == "hh-rlhf":
                hh_rows.append((line, obj))
            else:
                pairs.append(_trl_row(obj, form, line, str(path)))
        except ValueError as e:
            raise DataError(f"{path}:{line}: {e}") from None
    if form is None:
        raise DataError(f"{path}: no rows (expected JSON lines in HH-RLHF or TRL preference format)")
    counts: dict[str, int] = {}
    if hh_rows:
        parsed = parse_hh_rows(hh_rows, str(path))
        counts = {k: v for k, v in parsed.counts.items() if v}
        for rec in parsed.records:
            pairs.append(Pair.create(rec.prompt, rec.chosen, rec.rejected, SOURCE))
    counts["pairs"] = len(pairs)
    return PairFile(set_name(path), path, form, pairs, counts)


def load_pair_files(paths: Sequence[str | os.PathLike[str]]) -> list[PairFile]:
    """Every file of ``paths``; two files with the same set name are an error (their metrics would mix)."""
    files = [load_pair_file(p) for p in paths]
    seen: dict[str, Path] = {}
    for f in files:
        if f.name in seen:
            raise DataError(f"pair files {seen[f.name]} and {f.path} have the same set name {f.name!r}; "
                            "rename one (the set name is the file name without .jsonl[.gz])")
        seen[f.name] = f.path
    return files

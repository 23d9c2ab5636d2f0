"""Where SFT examples come from: critique revisions, the judge's own answers, helpful data.

An :class:`SFTExample` is a conversation (``messages``, ending with the user's turn) and the
assistant ``response`` to train on. Three readers turn artifacts into examples, and each
returns the examples with a counter per reason a record was left out (nothing is dropped
silently; the SFT stage puts the counters into its metrics):

- :func:`revision_examples` reads the critique stage's ``revisions.jsonl``: rows with
  ``prompt_id``, ``messages``, ``initial_response``, ``rounds`` (each with ``revision`` and
  ``usable``) and ``final_revision``. ``round=None`` trains on the final revision; ``round=r``
  on the revision after round ``r`` (SL-CAI-r): the last usable revision among rounds 1..r.
  A prompt whose rounds produced no usable revision is left out (``no_usable_revision``):
  its "revision" would be the unrevised response.
- :func:`answer_examples` reads the ``judge_answers`` stage's ``answers.jsonl`` (the
  "distil the judge" control arm of Sharma et al. 2024); failed answers are counted and left out.
- :func:`helpful_examples` reads helpful data to mix in: ``hh:<path-or-hub>[@split]`` (the
  chosen replies of HH-RLHF rows; hub sources default to the ``train`` split) or a ``.jsonl``
  file of ``{"messages": [...], "response": "..."}`` rows.

:func:`mix_helpful` draws helpful examples so that they make up ``ratio`` of the mixed set
(a seeded draw, the same on every machine).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.data import iter_jsonl_numbered, load_hh_rlhf
from cai.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTExample:
    """One training example: the conversation so far and the reply to learn."""

    id: str
    messages: tuple[Mapping[str, str], ...]
    response: str
    source: str  # "revision" | "judge_answer" | "helpful"

    def messages_as_dicts(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages]


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def _check_messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}, got {value!r:.80}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise DataError(f"{where}: the last message must be the user's turn, got role={out[-1]['role']!r}")
    return tuple(out)


def _need_field(row: Any, name: str, kind: type | tuple[type, ...], where: str, expected: str) -> Any:
    if not isinstance(row, Mapping) or name not in row:
        raise DataError(f"{where}: missing field {name!r} ({expected})")
    value = row[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} must be {expected}, got {value!r:.80}")
    return value


def _conversations(path: Path, counts: Counter) -> Iterator[tuple[str, Any, str, tuple[dict[str, str], ...]]]:
    """``(where, row, prompt_id, messages)`` of every row of a stage's ``.jsonl`` (counted as
    ``read``); a row without a prompt id or valid messages raises naming its file and line."""
    for line, row in iter_jsonl_numbered(path):
        where = _where(path, line)
        counts["read"] += 1
        prompt_id = _need_field(row, "prompt_id", str, where, "the prompt's id (a string)")
        yield where, row, prompt_id, _check_messages(row.get("messages"), where)


# ----------------------------------------------------------------------------- revisions


def revision_after(row: Mapping[str, Any], round_: int | None, where: str) -> str | None:
    """The revision to train on: final (``round_=None``) or the last usable one in rounds 1..r.

    ``None`` when no round up to there produced a usable revision.
    """
    rounds = _need_field(row, "rounds", list, where, "a list of critique/revision rounds")
    if round_ is None:
        final = row.get("final_revision")
        if not isinstance(final, str):
            raise DataError(f"{where}: field 'final_revision' must be a string, got {final!r:.80}")
        usable = [r for r in rounds if isinstance(r, Mapping) and r.get("usable")]
        return final if usable else None
    if round_ > len(rounds):
        raise ConfigError(
            f"sft.revision_round={round_} but {where} has only {len(rounds)} round(s); "
            f"choose a round in 1..{len(rounds)} or rerun the critique stage with more rounds"
        )
    latest = None
    for i, r in enumerate(rounds[:round_]):
        if not isinstance(r, Mapping) or not isinstance(r.get("usable"), bool):
            raise DataError(f"{where}: rounds[{i}] must be an object with a boolean 'usable', got {r!r:.80}")
        if r["usable"]:
            if not isinstance(r.get("revision"), str):
                raise DataError(f"{where}: rounds[{i}].revision must be a string, got {r.get('revision')!r:.80}")
            latest = r["revision"]
    return latest


def revision_examples(path: str | Path, round_: int | None = None) -> tuple[list[SFTExample], Counter]:
    """SFT examples from ``revisions.jsonl`` (see the module docstring) and the skip counts."""
    if round_ is not None and round_ < 1:
        raise ConfigError(f"sft.revision_round must be >= 1 (or null for the final revision), got {round_}")
    examples: list[SFTExample] = []
    counts = Counter({"read": 0, "no_usable_revision": 0, "empty_response": 0})
    for where, row, prompt_id, messages in _conversations(Path(path), counts):
        text = revision_after(row, round_, where)
        if text is None:
            counts["no_usable_revision"] += 1
        elif not text.strip():
            counts["empty_response"] += 1
        else:
            examples.append(SFTExample(prompt_id, messages, text, "revision"))
    return examples, counts


# ----------------------------------------------------------------------------- judge answers


def answer_examples(path: str | Path) -> tuple[list[SFTExample], Counter]:
    """SFT examples from the ``judge_answers`` stage's ``answers.jsonl`` and the skip counts."""
    examples: list[SFTExample] = []
    counts = Counter({"read": 0, "failed_answer": 0, "empty_response": 0})
    for where, row, prompt_id, messages in _conversations(Path(path), counts):
        status = _need_field(row, "status", str, where, "'ok' or 'failed'")
        if status != "ok":
            counts["failed_answer"] += 1
            continue
        answer = _need_field(row, "answer", str, where, "the judge's answer (a string)")
        if not answer.strip():
            counts["empty_response"] += 1
            continue
        examples.append(SFTExample(prompt_id, messages, answer, "judge_answer"))
    return examples, counts


# ----------------------------------------------------------------------------- helpful data


def _hh_spec(spec: str) -> tuple[str, str]:
    """``"path-or-hub[@split]"`` -> (source, split); hub sources default to ``train``."""
    if "@" in spec and not Path(spec).expanduser().exists():
        source, _, split = spec.rpartition("@")
        return source, split
    return spec, "train"


def helpful_examples(spec: str, limit: int | None = None) -> tuple[list[SFTExample], Counter]:
    """Helpful SFT examples from ``hh:<path-or-hub>[@split]`` or a ``.jsonl`` path."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"sft.helpful_source: expected 'hh:<path-or-hub>' or a .jsonl path, got {spec!r}")
    spec = spec.strip()
    counts = Counter({"read": 0, "empty_response": 0})
    if spec.startswith("hh:"):
        source, split = _hh_spec(spec[3:])
        result = load_hh_rlhf(source, split=split, limit=limit)
        counts["read"] = len(result.records) + len(result.excluded)
        counts["excluded_hh_rows"] = len(result.excluded)
        examples = [
            SFTExample(rec.id, tuple(rec.prompt.messages_as_dicts()), rec.chosen, "helpful")
            for rec in result.records
        ]
        return examples, counts
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"sft.helpful_source {spec!r}: no such file; expected 'hh:<path-or-hub>' or a .jsonl path")
    examples = []
    for line, row in iter_jsonl_numbered(path):
        if limit is not None and counts["read"] >= limit:
            break
        where = _where(path, line)
        counts["read"] += 1
        messages = _check_messages(row.get("messages") if isinstance(row, Mapping) else None, where)
        response = _need_field(row, "response", str, where, "the reply to train on (a string)")
        if not response.strip():
            counts["empty_response"] += 1
            continue
        examples.append(SFTExample(f"{path.name}:{line}", messages, response, "helpful"))
    return examples, counts


def mix_helpful(main: list[SFTExample], helpful: list[SFTExample], ratio: float,
                seed: int) -> tuple[list[SFTExample], dict[str, int]]:
    """``main`` plus enough helpful examples to make up ``ratio`` of the result.

    The helpful examples are a seeded sample without replacement; when there are too few, all
    are used and the shortfall is reported.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"sft.helpful_ratio must be in [0, 1) (the helpful share of the SFT set), got {ratio}")
    if ratio == 0.0:
        return list(main), {"helpful_used": 0, "helpful_shortfall": 0}
    wanted = round(len(main) * ratio / (1.0 - ratio))
    pool = list(helpful)
    random.Random(f"cai.sft.helpful:{seed}").shuffle(pool)
    chosen = pool[:wanted]
    return list(main) + chosen, {"helpful_used": len(chosen), "helpful_shortfall": wanted - len(chosen)}

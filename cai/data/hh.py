"""HH-RLHF human preference pairs -> cai records, with every rule counted.

Each HH-RLHF row is ``{"chosen": T1, "rejected": T2}``: two whole transcripts
``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that normally share every turn but the last
assistant reply. A row becomes an :class:`HHRecord`: the shared context as a
:class:`~cai.data.records.Prompt` and the two final replies. Rows load from a local ``.jsonl`` /
``.jsonl.gz`` file or from the datasets hub (``Anthropic/hh-rlhf``, optionally
``Anthropic/hh-rlhf:harmless-base`` to pick a ``data_dir``).

Parsing. A transcript is split on the markers ``\\n\\nHuman:`` and ``\\n\\nAssistant:``
(either may also open the text without the blank line; ``\\r\\n`` counts as ``\\n``); turn
contents are stripped of surrounding whitespace. A marker written without the blank line
before it (a model writing the human's next line itself) is not a turn boundary and stays in
the text.

The rules. Nothing is dropped silently: every row is either a record (with ``flags`` naming
the rules that touched it) or an entry of ``excluded`` (its line and reason), and each rule
has a counter in ``HHParseResult.counts`` (``excluded/<reason>``, ``flag/<flag>``).

Excluded rows (reason):
  malformed_json         the line is not UTF-8 JSON
  missing_field          not an object with string ``chosen`` and ``rejected``
  missing_markers        a transcript has no markers, or text before the first one
  starts_with_assistant  a transcript opens with the assistant (prompts start with the user)
  no_final_assistant     a transcript does not end with an assistant reply
  context_unresolvable   the contexts differ and share no leading turns that end on a user turn
  empty_prompt           the last user turn of the context is empty
  identical_responses    chosen and rejected replies are equal: no preference to learn
  duplicate_pair         the same context and the same two replies as an earlier row (its line
                         is named): one human judgement counted twice would weigh double

Kept rows (flag):
  context_mismatch  the two transcripts differ before their last assistant turn (4 rows of the
                    2,027-pair harmless dev file: an extra assistant turn or a rewritten one).
                    The context is their longest common run of turns, cut back to end on a user
                    turn; what follows it in each transcript is folded into that side's reply,
                    later turns keeping their ``Human:``/``Assistant:`` markers, so the reply
                    holds exactly what the rater saw after the shared context.
  merged_turns      consecutive turns of one speaker in the context were joined (blank line
                    between) so that turns alternate, which chat templates require; assistant
                    turns that end an otherwise shared context are folded into both replies as
                    for a context_mismatch.
  empty_turn        a turn inside the context is empty (kept as an empty message).
  empty_chosen / empty_rejected
                    a final reply is empty. Kept: preferring no answer to a harmful one is a
                    real human judgement (4 chosen replies in the harmless dev file).
  inline_marker     some turn contains ``Human:``/``Assistant:`` inside its text (kept verbatim).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cai.data.records import Label, Pair, Prompt, Turn, pair_id
from cai.errors import ConfigError, DataError
from cai.hashing import text_hash

HH_SOURCE = "hh-rlhf"
EXCLUSION_REASONS = ("malformed_json", "missing_field", "missing_markers", "starts_with_assistant",
                     "no_final_assistant", "context_unresolvable", "empty_prompt", "identical_responses",
                     "duplicate_pair")
FLAGS = ("context_mismatch", "merged_turns", "empty_turn", "empty_chosen", "empty_rejected", "inline_marker")

_MARKER = re.compile(r"(?:\A[ \t\n]*|\n\n)(Human|Assistant):")
_INLINE = re.compile(r"\b(?:Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}
_NAME = {"user": "Human", "assistant": "Assistant"}


class Exclusion(NamedTuple):
    """A row left out of the records: its line (row number for hub data) and why."""

    line: int
    reason: str  # "<code>: <detail>", code one of EXCLUSION_REASONS

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


class _Reject(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class HHRecord:
    """One parsed HH-RLHF row: shared context (as a prompt), the chosen and the rejected reply."""

    id: str  # = pair_id(prompt.id, chosen, rejected), the id of ``to_pair(balance=False)``
    prompt: Prompt
    chosen: str
    rejected: str
    flags: tuple[str, ...] = ()  # the rules of the module docstring that applied
    line: int = 0  # line of the source file (row number for hub data), 1-based

    def __post_init__(self) -> None:
        object.__setattr__(self, "flags", tuple(self.flags))
        unknown = [f for f in self.flags if f not in FLAGS]
        if unknown:
            raise DataError(f"hh record.flags: unknown flag {unknown} (expected some of {', '.join(FLAGS)})")
        if not isinstance(self.chosen, str) or not isinstance(self.rejected, str):
            raise DataError("hh record: 'chosen' and 'rejected' must be strings")
        expected = pair_id(self.prompt.id, self.chosen, self.rejected)
        if self.id != expected:
            raise DataError(f"hh record.id: {self.id!r} does not match its content (expected {expected!r})")

    @property
    def context(self) -> tuple[Turn, ...]:
        """Every turn shared by both transcripts, up to the final assistant reply."""
        return self.prompt.messages

    def chosen_in_b(self) -> bool:
        """The slot bit used by ``to_pair(balance=True)``: a hash bit of the record id."""
        return int(text_hash("cai.data.hh.slot", self.id), 16) % 2 == 1

    def to_pair(self, balance: bool = False) -> tuple[Pair, Label]:
        """The pair and its human label. By default chosen is in slot a (``p_a = 1.0``).

        ``balance=True`` puts chosen in slot a or b by a hash bit of the record, so about
        half the pairs have chosen in b: a slot-biased judge then cannot look accurate.
        """
        in_b = balance and self.chosen_in_b()
        a, b = (self.rejected, self.chosen) if in_b else (self.chosen, self.rejected)
        meta = {"hh_id": self.id, "hh_line": self.line, "chosen_slot": "b" if in_b else "a",
                "flags": list(self.flags)}
        pair = Pair.create(self.prompt, a, b, HH_SOURCE, meta)
        return pair, Label.human(pair.id, "b" if in_b else "a")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt.to_dict(), "chosen": self.chosen,
                "rejected": self.rejected, "flags": list(self.flags), "line": self.line}

    @classmethod
    def from_dict(cls, d: Any) -> HHRecord:
        keys = ("id", "prompt", "chosen", "rejected", "flags", "line")
        if not isinstance(d, Mapping) or set(d) != set(keys):
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise DataError(f"hh record: expected fields {', '.join(keys)}, got {got}")
        if not isinstance(d["line"], int) or not isinstance(d["flags"], list):
            raise DataError("hh record: 'line' must be an integer and 'flags' a list")
        return cls(d["id"], Prompt.from_dict(d["prompt"]), d["chosen"], d["rejected"], tuple(d["flags"]), d["line"])


@dataclass
class HHParseResult:
    """The records of one HH-RLHF source, the rows excluded and a counter per rule."""

    source: str
    records: list[HHRecord]
    excluded: list[Exclusion]
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.counts.get("total_in") != len(self.records) + len(self.excluded):
            raise AssertionError(f"{self.source}: rows in ({self.counts.get('total_in')}) != records "
                                 f"({len(self.records)}) + excluded ({len(self.excluded)})")

    def to_pairs(self, balance: bool = False) -> tuple[list[Pair], list[Label]]:
        """Every record as a pair with its human label (see :meth:`HHRecord.to_pair`)."""
        pairs, labels = [], []
        for rec in self.records:
            pair, label = rec.to_pair(balance=balance)
            pairs.append(pair)
            labels.append(label)
        return pairs, labels

    def summary(self) -> str:
        """A few lines for the log: totals, then every non-zero rule counter."""
        c = self.counts
        head = (f"{self.source}: {c['total_in']} rows -> {c['records']} records, {c['excluded']} excluded"
                + (f", {c['blank_lines']} blank lines" if c.get("blank_lines") else ""))
        rules = [f"  {k}: {v}" for k, v in c.items() if "/" in k and v]
        return "\n".join([head, *rules])


# ----------------------------------------------------------------------------- parsing
def _split_turns(text: str, side: str = "transcript") -> list[Turn]:
    """The turns of one transcript; raises a rejection for the excluded-row rules."""
    parts = _MARKER.split(text.replace("\r\n", "\n"))
    if len(parts) < 3:
        raise _Reject("missing_markers", f"{side} has no 'Human:'/'Assistant:' markers")
    if parts[0].strip():
        raise _Reject("missing_markers", f"{side} has text before its first marker: {parts[0][:40]!r}")
    turns = [Turn(_ROLE[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if turns[0].role != "user":
        raise _Reject("starts_with_assistant", f"{side} starts with an assistant turn")
    if turns[-1].role != "assistant":
        raise _Reject("no_final_assistant", f"{side} ends with a human turn, not an assistant reply")
    return turns


def _fold(tail: list[Turn]) -> str:
    """Turns after the shared context as one reply; turns after the first keep their markers."""
    first = tail[0].content if tail[0].role == "assistant" else f"{_NAME[tail[0].role]}: {tail[0].content}"
    return "\n\n".join([first, *(f"{_NAME[t.role]}: {t.content}" for t in tail[1:])])


def _merge_same_role(turns: list[Turn]) -> tuple[list[Turn], bool]:
    out: list[Turn] = []
    for t in turns:
        if out and out[-1].role == t.role:
            out[-1] = Turn(t.role, f"{out[-1].content}\n\n{t.content}".strip())
        else:
            out.append(t)
    return out, len(out) != len(turns)


def _split_context(tc: list[Turn], tr: list[Turn]) -> tuple[list[Turn], str, str, bool]:
    """(context, chosen reply, rejected reply, whether anything was folded into the replies)."""
    if tc[:-1] == tr[:-1] and tc[-2].role == "user":
        return tc[:-1], tc[-1].content, tr[-1].content, False
    n = 0
    limit = min(len(tc), len(tr)) - 1  # leave at least one turn on each side
    while n < limit and tc[n] == tr[n]:
        n += 1
    while n > 0 and tc[n - 1].role != "user":
        n -= 1
    if n == 0:
        raise _Reject("context_unresolvable", "the transcripts share no leading turns ending on a human turn")
    return tc[:n], _fold(tc[n:]), _fold(tr[n:]), True


def _parse_row(obj: Any, line: int) -> HHRecord:
    """One row (``{"chosen": ..., "rejected": ...}``) as a record; raises ``_Reject``."""
    if not isinstance(obj, Mapping) or not all(isinstance(obj.get(k), str) for k in ("chosen", "rejected")):
        raise _Reject("missing_field", "expected an object with string fields 'chosen' and 'rejected'")
    tc, tr = _split_turns(obj["chosen"], "chosen"), _split_turns(obj["rejected"], "rejected")
    raw_context, chosen, rejected, folded = _split_context(tc, tr)
    mismatch = tc[:-1] != tr[:-1]
    context, merged = _merge_same_role(raw_context)
    if not context[-1].content:
        raise _Reject("empty_prompt", "the last human turn before the replies is empty")
    if chosen == rejected:
        raise _Reject("identical_responses", "chosen and rejected replies are the same text")
    flags = {"context_mismatch": mismatch, "merged_turns": merged or (folded and not mismatch),
             "empty_turn": any(not t.content for t in context), "empty_chosen": not chosen,
             "empty_rejected": not rejected,
             "inline_marker": any(_INLINE.search(t.content) for t in (*tc, *tr))}
    prompt = Prompt.create(context, HH_SOURCE, (HH_SOURCE,))
    return HHRecord(pair_id(prompt.id, chosen, rejected), prompt, chosen, rejected,
                    tuple(f for f in FLAGS if flags[f]), line)


def _decode(raw: str | bytes) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise _Reject("malformed_json", f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _Reject("malformed_json", f"{e.msg} at column {e.colno}") from None


def parse_hh_rows(rows: Iterable[tuple[int, str | bytes | Mapping[str, Any]]], source: str,
                  limit: int | None = None, strict: bool = False) -> HHParseResult:
    """Parse ``(line, row)`` items; a row is a raw JSON line or an already-decoded dict.

    Blank lines are counted (``blank_lines``) but are not rows. ``limit`` caps the rows read.
    ``strict=True`` raises on the first excluded row instead of counting it.
    """
    records: list[HHRecord] = []
    excluded: list[Exclusion] = []
    counts = {"total_in": 0, "records": 0, "excluded": 0, "blank_lines": 0}
    counts.update({f"excluded/{r}": 0 for r in EXCLUSION_REASONS})
    counts.update({f"flag/{f}": 0 for f in FLAGS})
    first_line: dict[str, int] = {}  # record id -> the line that gave it
    for line, row in rows:
        if isinstance(row, (str, bytes)) and not row.strip():
            counts["blank_lines"] += 1
            continue
        if limit is not None and counts["total_in"] >= limit:
            break
        counts["total_in"] += 1
        try:
            rec = _parse_row(row if isinstance(row, Mapping) else _decode(row), line)
            if rec.id in first_line:
                raise _Reject("duplicate_pair", f"the same context and replies as line {first_line[rec.id]}")
            first_line[rec.id] = line
        except _Reject as e:
            if strict:
                raise DataError(f"{source}:{line}: {e}") from None
            excluded.append(Exclusion(line, str(e)))
            counts[f"excluded/{e.code}"] += 1
            continue
        records.append(rec)
        for f in rec.flags:
            counts[f"flag/{f}"] += 1
    counts["records"], counts["excluded"] = len(records), len(excluded)
    if counts["total_in"] and not records:
        first = excluded[0]
        raise DataError(f"{source}: none of its {counts['total_in']} rows is a valid HH-RLHF pair "
                        f"(first: line {first.line}: {first.reason})")
    if counts["total_in"] == 0:
        raise DataError(f"{source}: no rows (expected JSON lines with 'chosen' and 'rejected')")
    return HHParseResult(source, records, excluded, counts)


# ----------------------------------------------------------------------------- sources
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(s: str) -> bool:
    return (s.startswith(("/", "./", "../", "~", "."))
            or s.endswith((".jsonl", ".json", ".gz", ".jsonl.gz"))
            or s.count("/") > 1 or "\\" in s)


def resolve_hh_source(name_or_path: str) -> tuple[Path | None, str, str | None]:
    """``(local path, None, None)`` or ``(None, hub name, data_dir)``; errors name the input."""
    s = str(name_or_path).strip()
    if not s:
        raise ConfigError("HH-RLHF source is empty: give a .jsonl/.jsonl.gz path or a hub name")
    path = Path(s).expanduser()
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a .jsonl or .jsonl.gz file of HH-RLHF rows")
    if path.is_file():
        return path, "", None
    if _looks_like_path(s):
        raise DataError(f"{path}: no such HH-RLHF file (expected a .jsonl or .jsonl.gz file)")
    name, _, data_dir = s.partition(":")
    if not _HUB_NAME.match(name):
        raise DataError(f"HH-RLHF source {s!r}: neither an existing file nor a hub dataset name "
                        "like 'Anthropic/hh-rlhf' or 'Anthropic/hh-rlhf:harmless-base'")
    return None, name, data_dir or None


def _offline() -> bool:
    on = ("1", "true", "yes", "on")
    return any(os.environ.get(v, "").strip().lower() in on for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _hub_rows(name: str, data_dir: str | None, split: str, limit: int | None) -> Iterator[tuple[int, Any]]:
    import datasets  # heavy: imported only for hub sources

    where = f"hub dataset {name!r}" + (f" (data_dir={data_dir!r})" if data_dir else "") + f", split {split!r}"
    try:
        ds = datasets.load_dataset(name, data_dir=data_dir, split=f"{split}[:{limit}]" if limit else split)
    except Exception as e:  # the hub raises many types; the user needs one message
        if _offline() or getattr(datasets.config, "HF_HUB_OFFLINE", False):
            raise DataError(f"cannot load {where}: offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) "
                            "and it is not in the local cache; load it once online or pass a local "
                            f".jsonl/.jsonl.gz path ({type(e).__name__}: {e})") from e
        raise DataError(f"cannot load {where}: {type(e).__name__}: {e}") from e
    missing = {"chosen", "rejected"} - set(ds.column_names)
    if missing:
        raise DataError(f"{where}: missing column(s) {sorted(missing)}; HH-RLHF rows have 'chosen' and 'rejected'")
    for i, row in enumerate(ds, 1):
        yield i, {"chosen": row["chosen"], "rejected": row["rejected"]}


def _local_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    """Raw lines, undecoded: a bad line is an excluded row, not the end of the file."""
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file after line {lineno} ({e})") from None


def load_hh_rlhf(name_or_path: str, split: str = "test", limit: int | None = None,
                 strict: bool = False) -> HHParseResult:
    """HH-RLHF pairs from a local ``.jsonl``/``.jsonl.gz`` file or a hub dataset.

    A hub source is ``owner/name`` or ``owner/name:data_dir`` (e.g.
    ``Anthropic/hh-rlhf:harmless-base``) and ``split`` picks its split; a local file is one
    split already, so ``split`` is ignored for it. ``limit`` caps the rows read.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"HH-RLHF limit must be a positive integer or None, got {limit!r}")
    path, name, data_dir = resolve_hh_source(name_or_path)
    if path is not None:
        return parse_hh_rows(_local_rows(path), str(path), limit, strict)
    source = f"hub:{name}" + (f":{data_dir}" if data_dir else "") + f"[{split}]"
    return parse_hh_rows(_hub_rows(name, data_dir, split, limit), source, limit, strict)


def redteam_prompts(records: Iterable[HHRecord], first_turn_only: bool = False) -> list[Prompt]:
    """The red-team prompts of HH harmless records, deduplicated by id, in first-seen order.

    Each is tagged ``("harmful", "hh-redteam")``: the harmless split is made of red-team
    attempts. ``first_turn_only`` keeps only the opening human turn, without earlier replies
    the policy never wrote.
    """
    out: dict[str, Prompt] = {}
    for rec in records:
        turns = rec.prompt.messages[:1] if first_turn_only else rec.prompt.messages
        p = Prompt.create(turns, HH_SOURCE, ("harmful", "hh-redteam"))
        out.setdefault(p.id, p)
    return list(out.values())

"""Record types that flow between the stages, and the JSONL files that hold them.

Every arrow of the data flow (DESIGN.md) is a JSONL artifact of these records:

- :class:`Turn` — one message of a conversation, ``role`` is ``"user"`` or ``"assistant"``.
- :class:`Prompt` — a conversation up to (not including) the reply to be generated. Turns
  alternate, starting and ending with the user. ``id`` is a hash of the conversation alone
  (roles and contents, not ``source`` or ``tags``), so one prompt from two sources is one id.
- :class:`Response` — one sampled reply to a prompt.
- :class:`Pair` — a prompt and two replies. ``id = text_hash(prompt.id, a, b)``: the order of
  the two replies is part of the identity, so a pair and its swap are two records.
- :class:`Label` — a preference over a pair, one schema for human and AI feedback:
  ``p_a`` is the probability that ``response_a`` is the better reply (1.0 / 0.0 for a human
  hard label, soft for a judge), always about the pair's *own* slot ``a`` whatever order the
  judge was shown (``order``). A judge call that gave no usable answer is still a label, with
  ``status="failed"``, ``p_a=None`` and a ``failure_reason``: failures are counted, never lost.

Ids are checked on construction, so a record edited by hand (or a bug) that no longer matches
its content is rejected with a message instead of silently breaking the content addressing.
Use :meth:`Prompt.create` and :meth:`Pair.create` to build records with the right id.

``write_jsonl`` is atomic (temp file in the same folder, then ``os.replace``) and writes
gzip with a zero timestamp, so the same records give the same bytes; reading names the file
and line of the first bad record.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.errors import DataError
from cai.hashing import canonical_json, text_hash

ROLES = ("user", "assistant")
LABEL_STATUSES = ("ok", "failed")
LABEL_ORDERS = ("ab", "ba", "both")


# ----------------------------------------------------------------------------- validation
def _check_keys(d: Any, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """A record dict has every required key and no unknown key (a typo fails loudly)."""
    if not isinstance(d, Mapping):
        raise DataError(f"{what}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise DataError(f"{what}: missing field {', '.join(map(repr, missing))}")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join(required + optional)
        raise DataError(f"{what}: unknown field {', '.join(map(repr, unknown))} (expected: {allowed})")


def _need(ok: bool, what: str, expected: str, got: Any) -> None:
    if not ok:
        shown = repr(got) if isinstance(got, (str, int, float, type(None))) else type(got).__name__
        raise DataError(f"{what}: expected {expected}, got {shown}")


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    _need(isinstance(value, (list, tuple)), what, "a list of strings", value)
    for i, v in enumerate(value):
        _need(isinstance(v, str), f"{what}[{i}]", "a string", v)
    return tuple(value)


def _as_seq(value: Any) -> Any:
    """Materialise an iterable, but leave a bare string for validation to reject."""
    return value if isinstance(value, (str, list, tuple)) else tuple(value)


def _meta(value: Any, what: str) -> dict[str, Any]:
    _need(isinstance(value, Mapping), what, "a JSON object", value)
    return dict(value)


def conversation_id(messages: Iterable[Turn]) -> str:
    """The id of a conversation: a hash of its roles and contents, in order."""
    return text_hash(canonical_json([[t.role, t.content] for t in messages]))


def pair_id(prompt_id: str, response_a: str, response_b: str) -> str:
    """The id of a pair; swapping the two responses gives a different id."""
    return text_hash(prompt_id, response_a, response_b)


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: str  # "user" | "assistant"
    content: str

    def __post_init__(self) -> None:
        _need(self.role in ROLES, "turn.role", "'user' or 'assistant'", self.role)
        _need(isinstance(self.content, str), "turn.content", "a string", self.content)

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, d: Any) -> Turn:
        if isinstance(d, Turn):
            return d
        _check_keys(d, "turn", ("role", "content"))
        return cls(d["role"], d["content"])


def _turns(value: Any, what: str) -> tuple[Turn, ...]:
    _need(isinstance(value, (list, tuple)), what, "a list of turns", value)
    out = []
    for i, t in enumerate(value):
        try:
            out.append(Turn.from_dict(t))
        except DataError as e:
            raise DataError(f"{what}[{i}]: {e}") from None
    return tuple(out)


@dataclass(frozen=True)
class Prompt:
    """A conversation up to the assistant reply to be generated (its last turn is the user's)."""

    id: str
    messages: tuple[Turn, ...]
    source: str  # where it came from: "builtin", a file name, "hh-rlhf", ...
    tags: tuple[str, ...] = ()  # e.g. ("harmful", "weapons"); never part of the id

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", _turns(self.messages, "prompt.messages"))
        object.__setattr__(self, "tags", _str_tuple(self.tags, "prompt.tags"))
        _need(isinstance(self.source, str), "prompt.source", "a string", self.source)
        _need(len(self.messages) > 0, "prompt.messages", "at least one turn", "an empty list")
        for i, turn in enumerate(self.messages):
            want = ROLES[i % 2]
            _need(turn.role == want, f"prompt.messages[{i}].role",
                  f"{want!r} (turns alternate, starting with 'user')", turn.role)
        _need(self.messages[-1].role == "user", "prompt.messages",
              "a conversation that ends with a user turn", "one ending with 'assistant'")
        _need(bool(self.messages[-1].content.strip()), f"prompt.messages[{len(self.messages) - 1}].content",
              "a non-empty user message", self.messages[-1].content)
        expected = conversation_id(self.messages)
        if self.id != expected:
            raise DataError(f"prompt.id: {self.id!r} does not match its messages (expected {expected!r})")

    @classmethod
    def create(cls, messages: Iterable[Turn | Mapping[str, str]], source: str,
               tags: Iterable[str] = ()) -> Prompt:
        """A prompt whose id is computed from ``messages``."""
        turns = _turns(messages if isinstance(messages, (list, tuple)) else list(messages), "prompt.messages")
        return cls(conversation_id(turns), turns, source, _as_seq(tags))

    @property
    def question(self) -> str:
        """The turn a reply answers: the last user turn (a prompt always ends with one)."""
        return self.messages[-1].content

    @property
    def hh_text(self) -> str:
        """The prompt as a base model sees it: ``"\\n\\nHuman: ...\\n\\nAssistant:"``."""
        names = {"user": "Human", "assistant": "Assistant"}
        body = "".join(f"\n\n{names[t.role]}: {t.content}" for t in self.messages)
        return body + "\n\nAssistant:"

    def messages_as_dicts(self) -> list[dict[str, str]]:
        """The conversation as ``[{"role": ..., "content": ...}]`` for a chat template."""
        return [t.to_dict() for t in self.messages]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "messages": self.messages_as_dicts(), "source": self.source,
                "tags": list(self.tags)}

    @classmethod
    def from_dict(cls, d: Any) -> Prompt:
        _check_keys(d, "prompt", ("id", "messages", "source"), ("tags",))
        return cls(d["id"], d["messages"], d["source"], d.get("tags", ()))


@dataclass(frozen=True)
class Response:
    """One reply sampled from a model for a prompt."""

    prompt_id: str
    text: str
    model: str  # the model's name or path
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. finish reason, token count, seed

    def __post_init__(self) -> None:
        for name in ("prompt_id", "text", "model"):
            _need(isinstance(getattr(self, name), str), f"response.{name}", "a string", getattr(self, name))
        object.__setattr__(self, "meta", _meta(self.meta, "response.meta"))

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_id": self.prompt_id, "text": self.text, "model": self.model, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Any) -> Response:
        _check_keys(d, "response", ("prompt_id", "text", "model"), ("meta",))
        return cls(d["prompt_id"], d["text"], d["model"], d.get("meta", {}))


@dataclass(frozen=True)
class Pair:
    """A prompt and two replies to compare; ``id`` hashes the prompt and both replies in order."""

    id: str
    prompt: Prompt
    response_a: str
    response_b: str
    source: str  # e.g. "hh-rlhf", "sft-samples"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need(isinstance(self.prompt, Prompt), "pair.prompt", "a Prompt", self.prompt)
        for name in ("response_a", "response_b", "source"):
            _need(isinstance(getattr(self, name), str), f"pair.{name}", "a string", getattr(self, name))
        object.__setattr__(self, "meta", _meta(self.meta, "pair.meta"))
        expected = pair_id(self.prompt.id, self.response_a, self.response_b)
        if self.id != expected:
            raise DataError(f"pair.id: {self.id!r} does not match its prompt and responses (expected {expected!r})")

    @classmethod
    def create(cls, prompt: Prompt, response_a: str, response_b: str, source: str,
               meta: Mapping[str, Any] | None = None) -> Pair:
        """A pair whose id is computed from the prompt and the two responses."""
        return cls(pair_id(prompt.id, response_a, response_b), prompt, response_a, response_b, source,
                   dict(meta or {}))

    def swapped(self) -> Pair:
        """The same comparison with the two slots exchanged (a new id)."""
        return Pair.create(self.prompt, self.response_b, self.response_a, self.source, self.meta)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt.to_dict(), "response_a": self.response_a,
                "response_b": self.response_b, "source": self.source, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Any) -> Pair:
        _check_keys(d, "pair", ("id", "prompt", "response_a", "response_b", "source"), ("meta",))
        try:
            prompt = Prompt.from_dict(d["prompt"])
        except DataError as e:
            raise DataError(f"pair.{e}") from None
        return cls(d["id"], prompt, d["response_a"], d["response_b"], d["source"], d.get("meta", {}))


@dataclass(frozen=True)
class Label:
    """A preference between the two replies of a pair, from a human or an AI judge.

    ``p_a`` is P(response_a is better) about the pair's own slot ``a``. ``order`` says which
    presentation the judgement came from: ``"ab"`` (a shown first), ``"ba"`` (swapped), or
    ``"both"`` (combined over both orders, or order-free like a human label). A failed judge
    call has ``status="failed"``, ``p_a=None`` and a ``failure_reason``.
    """

    pair_id: str
    p_a: float | None
    source: str  # "human", or the judge's name
    principle_ids: tuple[str, ...] = ()  # the constitution principles behind this label
    order: str = "both"  # "ab" | "ba" | "both"
    status: str = "ok"  # "ok" | "failed"
    failure_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. raw judge output, token cost

    def __post_init__(self) -> None:
        _need(isinstance(self.pair_id, str), "label.pair_id", "a string", self.pair_id)
        _need(isinstance(self.source, str), "label.source", "a string", self.source)
        object.__setattr__(self, "principle_ids", _str_tuple(self.principle_ids, "label.principle_ids"))
        _need(self.order in LABEL_ORDERS, "label.order", "'ab', 'ba' or 'both'", self.order)
        _need(self.status in LABEL_STATUSES, "label.status", "'ok' or 'failed'", self.status)
        object.__setattr__(self, "meta", _meta(self.meta, "label.meta"))
        if self.status == "ok":
            p = self.p_a
            _need(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and 0.0 <= p <= 1.0,
                  "label.p_a", "a probability in [0, 1] for an ok label", p)
            _need(self.failure_reason is None, "label.failure_reason", "null for an ok label", self.failure_reason)
            object.__setattr__(self, "p_a", float(p))  # type: ignore[arg-type]
        else:
            _need(self.p_a is None, "label.p_a", "null for a failed label", self.p_a)
            _need(isinstance(self.failure_reason, str) and bool(self.failure_reason.strip()),
                  "label.failure_reason", "a non-empty reason for a failed label", self.failure_reason)

    @classmethod
    def human(cls, pair_id: str, chosen: str, meta: Mapping[str, Any] | None = None) -> Label:
        """A human hard label: ``chosen`` is ``"a"`` or ``"b"``."""
        _need(chosen in ("a", "b"), "label chosen", "'a' or 'b'", chosen)
        return cls(pair_id, 1.0 if chosen == "a" else 0.0, "human", meta=dict(meta or {}))

    @classmethod
    def failed(cls, pair_id: str, source: str, reason: str, principle_ids: Iterable[str] = (),
               order: str = "both", meta: Mapping[str, Any] | None = None) -> Label:
        """A judge call that produced no usable preference, kept with its reason."""
        return cls(pair_id, None, source, _as_seq(principle_ids), order, "failed", reason, dict(meta or {}))

    @property
    def chosen(self) -> str | None:
        """``"a"`` or ``"b"``, the preferred slot; None for a tie or a failed label."""
        if self.p_a is None or self.p_a == 0.5:
            return None
        return "a" if self.p_a > 0.5 else "b"

    def to_dict(self) -> dict[str, Any]:
        return {"pair_id": self.pair_id, "p_a": self.p_a, "source": self.source,
                "principle_ids": list(self.principle_ids), "order": self.order, "status": self.status,
                "failure_reason": self.failure_reason, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Any) -> Label:
        _check_keys(d, "label", ("pair_id", "p_a", "source"),
                    ("principle_ids", "order", "status", "failure_reason", "meta"))
        return cls(d["pair_id"], d["p_a"], d["source"], d.get("principle_ids", ()), d.get("order", "both"),
                   d.get("status", "ok"), d.get("failure_reason"), d.get("meta", {}))


# ----------------------------------------------------------------------------- JSONL I/O
def _is_gz(path: Path) -> bool:
    return path.suffix == ".gz"


def iter_jsonl_numbered(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` for each non-blank line; bad lines raise naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    lineno = 0
    try:
        with (gzip.open(p, "rb") if _is_gz(p) else open(p, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{p}: not a readable gzip file after line {lineno} ({e})") from None


def iter_jsonl(path: str | os.PathLike[str], cls: Any = None) -> Iterator[Any]:
    """Each record of a JSONL file (``.gz`` read as gzip): a dict, or ``cls.from_dict(dict)``."""
    for lineno, obj in iter_jsonl_numbered(path):
        if cls is None:
            yield obj
            continue
        try:
            yield cls.from_dict(obj)
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None


def read_jsonl(path: str | os.PathLike[str], cls: Any = None) -> list[Any]:
    """All records of a JSONL file; see :func:`iter_jsonl`."""
    return list(iter_jsonl(path, cls))


def _line(record: Any, path: Path, index: int) -> bytes:
    obj = record.to_dict() if hasattr(record, "to_dict") else record
    if not isinstance(obj, Mapping):
        raise DataError(f"{path}: record {index}: expected a dict or a record with to_dict(), "
                        f"got {type(record).__name__}")
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: record {index}: not JSON-serialisable ({e})") from None
    return (text + "\n").encode("utf-8")


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Any]) -> int:
    """Write records (dicts or records with ``to_dict``) atomically; returns how many were written.

    The file appears whole or not at all: lines go to a temp file in the same folder, which
    then replaces ``path``. A ``.gz`` path is gzip-compressed with a fixed header (same bytes
    for the same records).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    n = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            out: Any = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if _is_gz(p) else raw
            for n, record in enumerate(records, 1):
                out.write(_line(record, p, n))
            if out is not raw:
                out.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n

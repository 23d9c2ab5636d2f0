"""The stage side of a build: record journals, the :class:`BuildContext`, durable writes.

:mod:`cai.artifacts` decides *whether* and *where* a stage runs (keys, locks, atomic
publish); this module is what the stage function works with while it runs: a
:class:`BuildContext` (output dir, journals, phase timers, cost, metrics) and the
:class:`Journal` that lets a long record-by-record stage survive being killed.

A stage that produces one record per input (sampling, critique/revision, labelling) appends
every finished record to a :class:`Journal`, a JSONL file of ``{"id": ..., "record": ...}``
lines inside the artifact's partial work directory. If the process dies, the next builder of
the same artifact opens the same journal, gets the finished records from :meth:`Journal.done`
and computes only the rest. At the end the stage calls :meth:`Journal.export` with the ids in
*input* order, so a resumed run and an uninterrupted run write byte-identical output files
whatever order the records finished in.

Crash safety:

* Each line is written with a single ``write`` on an ``O_APPEND`` descriptor, so once
  :meth:`Journal.append` returns, the record is in the kernel and survives the process being
  killed (SIGKILL included).
* ``fsync`` (survival of an OS crash or power loss) runs every ``fsync_every`` records or
  ``fsync_interval_s`` seconds, whichever comes first, checked on each append, and on
  :meth:`Journal.sync` / :meth:`Journal.close`. An OS crash therefore loses at most that
  window of records, which are simply recomputed. Defaults (64 records / 2 s) keep the cost of
  fsync negligible next to a model call while bounding the redo.
* A torn or corrupt *last* line (the process or machine died mid-write) is ignored and
  truncated away when the journal is opened. A corrupt line *before* the last one cannot come
  from a crash during an append; it is reported as a :class:`~cai.errors.DataError` naming the
  file and line.
* Appending an id that is already done keeps the first record (a record re-done after a crash
  between the write and the caller noticing it) and counts the duplicate.

Records are stored in one canonical JSON form (sorted keys, no whitespace), which is also the
form :meth:`Journal.export` writes; that is what makes the outputs byte-identical.

Within a process, journals and the context are thread-safe (judges may call from a pool).
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.errors import DataError

log = logging.getLogger(__name__)

_MAX_LISTED = 5  # ids quoted in an error message before "..."
_JOURNAL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def canonical_record(record: Mapping[str, Any]) -> str:
    """The canonical JSON text of ``record``; parsing and re-encoding it gives the same text."""
    if not isinstance(record, Mapping):
        raise TypeError(f"a journal record must be a mapping, got {type(record).__name__}")
    # Encode, parse, encode again: non-string keys, tuples and other encodable-but-lossy
    # values turn into their JSON form once, so a record read back from disk after a resume
    # encodes exactly like the one that was appended.
    return _dumps(json.loads(_dumps(record)))


@dataclass(frozen=True)
class ExportResult:
    """What :meth:`Journal.export` wrote and what it left out (nothing is dropped silently)."""

    path: Path
    written: int
    missing: list[str] = field(default_factory=list)  # ids asked for but not in the journal
    unused: int = 0  # journal records whose id was not in the order


# --------------------------------------------------------------------------- durable files
def fsync_dir(path: Path) -> None:
    """fsync a directory, so entries created or renamed in it survive an OS crash."""
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before it is renamed into place)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file = os.path.join(dirpath, name)
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


class Journal:
    """An append-only JSONL file of finished records keyed by a string id.

    Opening reads (and if needed repairs) the file; :meth:`done` then holds every finished
    record. One writer at a time: the artifact store's per-key lock guarantees that for the
    journals of a build; within a process, appends are thread-safe.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync_every: int = 64,
        fsync_interval_s: float = 2.0,
    ) -> None:
        if fsync_every < 1:
            raise ValueError(f"fsync_every must be >= 1, got {fsync_every}")
        if fsync_interval_s < 0:
            raise ValueError(f"fsync_interval_s must be >= 0, got {fsync_interval_s}")
        self.path = Path(path)
        self.fsync_every = fsync_every
        self.fsync_interval_s = fsync_interval_s
        self._texts: dict[str, str] = {}  # id -> canonical JSON of the record
        self._lock = threading.Lock()
        self.duplicates_on_disk = 0  # repeated ids found when opening (first one kept)
        self.duplicates_skipped = 0  # appends ignored because the id was already done
        self.truncated_bytes = 0  # size of the torn tail removed when opening
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._load()
        self.resumed_records = len(self._texts)
        created = not self.path.exists()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:
            fsync_dir(self.path.parent)
        self._unsynced = 0
        self._last_sync = time.monotonic()
        if self.resumed_records or self.truncated_bytes:
            log.info(
                "journal %s: resuming with %d finished records (%d duplicate lines, "
                "%d torn bytes dropped)",
                self.path, self.resumed_records, self.duplicates_on_disk, self.truncated_bytes,
            )

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # After the final "\n" split() leaves b""; anything else there is a line without its
        # newline, i.e. a write torn by a crash.
        complete, tail = lines[:-1], lines[-1]
        good_end = 0  # byte offset just past the last accepted line
        for lineno, raw in enumerate(complete, start=1):
            parsed = self._parse_line(raw)
            if isinstance(parsed, str):
                if lineno == len(complete) and not tail:
                    break  # corrupt last line: a crash mid-write; truncated below
                raise DataError(
                    f"{self.path}:{lineno}: corrupt journal line ({parsed}). Only the last "
                    "line can be torn by a crash; fix or delete this line to resume "
                    "(records after it are redone if deleted)."
                )
            rid, text = parsed
            if rid in self._texts:
                self.duplicates_on_disk += 1
            else:
                self._texts[rid] = text
            good_end += len(raw) + 1
        if good_end < len(data):
            self.truncated_bytes = len(data) - good_end
            log.warning(
                "journal %s: dropping a torn last line (%d bytes) left by an interrupted write",
                self.path, self.truncated_bytes,
            )
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _parse_line(raw: bytes) -> tuple[str, str] | str:
        """``(id, canonical record text)``, or a string saying what is wrong with the line."""
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"not JSON: {e}"
        if not isinstance(obj, dict) or set(obj) != {"id", "record"}:
            return 'expected an object with exactly the fields "id" and "record"'
        if not isinstance(obj["id"], str) or not obj["id"]:
            return 'field "id": expected a non-empty string'
        if not isinstance(obj["record"], dict):
            return 'field "record": expected an object'
        return obj["id"], _dumps(obj["record"])

    def done(self) -> dict[str, dict[str, Any]]:
        """Every finished record, id -> record (fresh objects; mutate freely)."""
        with self._lock:
            items = list(self._texts.items())
        return {rid: json.loads(text) for rid, text in items}

    def get(self, record_id: str) -> dict[str, Any] | None:
        text = self._texts.get(record_id)
        return None if text is None else json.loads(text)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._texts

    def __len__(self) -> int:
        return len(self._texts)

    # ------------------------------------------------------------------ writing
    def append(self, record_id: str, record: Mapping[str, Any]) -> bool:
        """Journal one finished record. Returns False (and keeps the first) for a done id."""
        return self.append_many([(record_id, record)]) == 1

    def append_many(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> int:
        """Journal a batch with one write; returns how many were new (duplicates are kept first)."""
        encoded: list[tuple[str, str]] = []
        for record_id, record in items:
            if not isinstance(record_id, str) or not record_id:
                raise ValueError(f"journal {self.path}: record id must be a non-empty string, "
                                 f"got {record_id!r}")
            try:
                encoded.append((record_id, canonical_record(record)))
            except (TypeError, ValueError) as e:
                raise TypeError(f"journal {self.path}: record {record_id!r} is not "
                                f"JSON-encodable: {e}") from e
        with self._lock:
            if self._fd is None:
                raise ValueError(f"journal {self.path} is closed")
            lines: list[str] = []
            for record_id, text in encoded:
                if record_id in self._texts:
                    self.duplicates_skipped += 1
                    continue
                self._texts[record_id] = text
                lines.append('{"id":' + _dumps(record_id) + ',"record":' + text + "}\n")
            if lines:
                self._write_all("".join(lines).encode("utf-8"))
                self._unsynced += len(lines)
                if (self._unsynced >= self.fsync_every
                        or time.monotonic() - self._last_sync >= self.fsync_interval_s):
                    self._sync_locked()
            return len(lines)

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _sync_locked(self) -> None:
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def sync(self) -> None:
        """Force everything appended so far to stable storage."""
        with self._lock:
            self._sync_locked()

    def close(self) -> None:
        """Sync and close; idempotent. Reading (:meth:`done`, :meth:`export`) still works."""
        with self._lock:
            if self._fd is None:
                return
            self._sync_locked()
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ output
    def export(
        self,
        out_path: str | os.PathLike[str],
        order: Iterable[str],
        *,
        allow_missing: bool = False,
    ) -> ExportResult:
        """Write the records as JSONL in ``order`` (the stage's input order), atomically.

        Each line is the record's canonical JSON. An id of ``order`` with no record raises
        :class:`~cai.errors.DataError` unless ``allow_missing``, in which case it is skipped
        and listed in the result; journal records not named in ``order`` are counted as
        ``unused`` and logged. Repeated ids in ``order`` are written each time they appear.
        """
        out = Path(out_path)
        order = list(order)
        missing = [rid for rid in order if rid not in self._texts]
        if missing and not allow_missing:
            shown = ", ".join(repr(m) for m in missing[:_MAX_LISTED])
            more = " ..." if len(missing) > _MAX_LISTED else ""
            raise DataError(f"journal {self.path}: {len(missing)} of {len(order)} records to "
                            f"export are not finished: {shown}{more}")
        wanted = set(order)
        unused = sum(1 for rid in self._texts if rid not in wanted)
        if unused:
            log.warning("journal %s: %d finished records are not in the export order and were "
                        "not written to %s", self.path, unused, out)
        if missing:
            log.warning("journal %s: %d records missing from export %s", self.path,
                        len(missing), out)
        body = "".join(self._texts[rid] + "\n" for rid in order if rid in self._texts)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
        written = len(order) - len(missing)
        return ExportResult(path=out, written=written, missing=missing, unused=unused)


class BuildContext:
    """What a stage function gets while it builds one artifact (made by the store).

    ``dir``: write the artifact's files here; it starts empty on every attempt.
    ``state_dir``: journals and checkpoints; kept across killed attempts, not published.
    ``resumed``: an earlier attempt left state behind; ``attempt``: 1 for the first.
    """

    def __init__(self, key: str, dir: Path, state_dir: Path, resumed: bool, attempt: int):
        self.key = key
        self.dir = dir
        self.state_dir = state_dir
        self.resumed = resumed
        self.attempt = attempt
        self._journals: dict[str, Journal] = {}
        self._phases: dict[str, float] = {}
        self._cost: dict[str, float] = {"tokens_in": 0, "tokens_out": 0, "dollars": 0.0}
        self._metrics: dict[str, Any] = {}
        self._lock = threading.Lock()

    def journal(self, name: str = "journal.jsonl", *, fsync_every: int = 64,
                fsync_interval_s: float = 2.0) -> Journal:
        """Open (once per name) a journal in the state dir; it holds earlier attempts' records."""
        if not _JOURNAL_NAME_RE.fullmatch(name):
            raise ValueError(f"journal name {name!r}: expected a plain file name")
        with self._lock:
            if name not in self._journals:
                self._journals[name] = Journal(self.state_dir / name, fsync_every=fsync_every,
                                               fsync_interval_s=fsync_interval_s)
            return self._journals[name]

    @property
    def resumed_records(self) -> int:
        """Records found finished in this build's journals when they were opened."""
        return sum(j.resumed_records for j in self._journals.values())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block; repeated phases of one name add up. Recorded in stage.json."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._phases[name] = self._phases.get(name, 0.0) + elapsed

    def add_cost(self, tokens_in: int = 0, tokens_out: int = 0, dollars: float = 0.0) -> None:
        """Add model-call cost (thread-safe: judges may call from worker threads)."""
        for field_name, v in (("tokens_in", tokens_in), ("tokens_out", tokens_out),
                              ("dollars", dollars)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"add_cost: {field_name} must be a number >= 0, got {v!r}")
        with self._lock:
            self._cost["tokens_in"] += tokens_in
            self._cost["tokens_out"] += tokens_out
            self._cost["dollars"] += dollars

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Merge flat, namespaced metrics (``sample/tokens_per_s``) with scalar values.

        NumPy scalars become Python ints/floats; anything else that is not a scalar (a dict,
        a tensor) is refused."""
        clean: dict[str, Any] = {}
        for k, v in metrics.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"metric names must be non-empty strings, got {k!r}")
            if v is None or isinstance(v, (bool, str)):
                clean[k] = v
            elif isinstance(v, numbers.Integral):
                clean[k] = int(v)
            elif isinstance(v, numbers.Real):
                clean[k] = float(v)
            else:
                raise ValueError(f"metric {k!r}: expected a scalar (metrics are flat; use "
                                 f".item() on tensors), got {type(v).__name__}")
        with self._lock:
            self._metrics.update(clean)

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    @property
    def phases(self) -> dict[str, float]:
        return dict(self._phases)

    @property
    def cost(self) -> dict[str, float]:
        return dict(self._cost)

    def close(self) -> None:
        """Sync and close the journals (the store calls this when ``fn`` returns or raises)."""
        for j in self._journals.values():
            j.close()

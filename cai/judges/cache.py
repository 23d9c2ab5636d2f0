"""A persistent cache of judge answers in SQLite, shared by the processes of a parallel sweep.

One row per API call that produced a usable answer, keyed by the stable hash of everything the
answer depends on (:func:`call_key`): backend, model, the base URL's host and port, sampling
parameters, the prompt template version, the messages, the choices, ``n_samples`` and the
sample index. Failures are never stored, so a rerun retries them; a warm cache answers a whole
batch without a single request. Values are JSON; no API key is ever part of a key or a value.

The database runs in WAL mode with a generous busy timeout, so several processes can read and
write it at once; writes are single ``INSERT OR REPLACE`` statements (atomic). A warm batch is
read with a few ``IN (...)`` queries (:meth:`JudgeCache.get_many`) instead of one per call.

Keys are computed on every call, so they take a fast path: a key made only of plain JSON values
(dicts with string keys, lists, tuples, strings, ints, finite floats, bools, None) -- every key
the judges build from valid requests -- is encoded by one ``json.dumps`` call, which gives the
very text :func:`cai.hashing.canonical_json` gives for such values, so the hash is byte-identical
and existing caches stay warm. Anything else goes through :func:`~cai.hashing.stable_hash`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cai.errors import ConfigError
from cai.hashing import stable_hash
from cai.secrets import redact_urls

SCHEMA_VERSION = 1


def endpoint_of(base_url: str | None) -> str:
    """``host:port`` of a base URL (the provider's default endpoint when None); credentials written
    into the URL (``user:key@``) are not part of it, so a key never enters a cache key and a
    rotated one keeps the cache warm."""
    if not base_url:
        return "default"
    parts = urlsplit(base_url)
    netloc = parts.netloc.rsplit("@", 1)[-1].lower()
    return netloc or redact_urls(base_url)


_SCALARS = (str, int, bool, type(None))
_INF = float("inf")
# SQLite's default limit on bound parameters in one statement is 999 in older builds
_LOOKUP_CHUNK = 500


def _plain_json(obj: Any) -> bool:
    """True if ``obj`` is made only of values that ``canonical_json`` leaves as they are."""
    t = type(obj)
    if t in _SCALARS:
        return True
    if t is float:
        return -_INF < obj < _INF  # NaN and infinities take the slow path
    if t is dict:
        for k, v in obj.items():
            if type(k) is not str or (type(v) is not str and not _plain_json(v)):
                return False
        return True
    if t is list or t is tuple:
        for v in obj:
            if type(v) is not str and not _plain_json(v):
                return False
        return True
    return False


def fast_stable_hash(obj: Any) -> str:
    """``stable_hash(obj)``, without the generic canonicalisation when ``obj`` is plain JSON."""
    if not _plain_json(obj):
        return stable_hash(obj)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def call_key(
    *,
    kind: str,
    backend: str,
    model: str,
    base_url: str | None,
    params: dict[str, Any],
    template_version: str,
    messages: list[dict],
    choices: tuple[str, ...] | None = None,
    n_samples: int | None = None,
    sample_index: int = 0,
) -> str:
    """The cache key of one API call (equal to ``stable_hash`` of the same fields)."""
    return fast_stable_hash(
        {
            "v": SCHEMA_VERSION,
            "kind": kind,
            "backend": backend,
            "model": model,
            "endpoint": endpoint_of(base_url),
            "params": params,
            "template_version": template_version,
            "messages": messages,
            "choices": list(choices) if choices is not None else None,
            "n_samples": n_samples,
            "sample_index": sample_index,
        }
    )


_BUSY_TIMEOUT_S = 60.0


def _retry_while_locked(statement, deadline_s: float = _BUSY_TIMEOUT_S):
    """Run ``statement()``, retrying while another process holds the database.

    Switching a fresh file to WAL takes an exclusive lock, and SQLite answers that switch with
    "database is locked" at once -- without waiting out the busy timeout -- when a second
    process is opening the same new file at that moment (two sweep jobs starting together).
    """
    deadline = time.monotonic() + deadline_s
    pause = 0.005
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.25)


class JudgeCache:
    """``get``/``put`` of JSON answers by key in a SQLite file (WAL; multi-process safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(self.path), timeout=_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )
            _retry_while_locked(lambda: self._conn.execute("PRAGMA journal_mode=WAL"))
            self._conn.execute("PRAGMA synchronous=NORMAL")
            _retry_while_locked(
                lambda: self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS answers "
                    "(key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
                )
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"judge cache_path {str(self.path)!r}: cannot open an SQLite cache there ({exc})"
            ) from exc
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The stored value *texts* of those ``keys`` that are cached (decode with ``json.loads``)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), _LOOKUP_CHUNK):
            chunk = wanted[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._conn.execute(f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk).fetchall()
            found.update(rows)
        return found

    def put(self, key: str, value: dict) -> None:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers (key, value, created) VALUES (?, ?, ?)", (key, text, time.time())
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def keys(self) -> set[str]:
        with self._lock:
            return {k for (k,) in self._conn.execute("SELECT key FROM answers")}

    def dump(self) -> list[tuple[str, str]]:
        """Every (key, value text) row -- for audits such as "no secret is stored"."""
        with self._lock:
            return list(self._conn.execute("SELECT key, value FROM answers ORDER BY key"))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

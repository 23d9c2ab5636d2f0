"""A persistent cache of judge answers in SQLite, shared by the processes of a parallel sweep.

One row per API call that produced a usable answer, keyed by the stable hash of everything the
answer depends on (:func:`call_key`): backend, model, the base URL's host and port, sampling
parameters, the prompt template version, the messages, the choices, ``n_samples`` and the
sample index. Failures are never stored, so a rerun retries them; a warm cache answers a whole
batch without a single request. Values are JSON; no API key is ever part of a key or a value.

The database runs in WAL mode with a generous busy timeout, so several processes can read and
write it at once; writes are single ``INSERT OR REPLACE`` statements (atomic).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cai.errors import ConfigError
from cai.hashing import stable_hash

SCHEMA_VERSION = 1


def endpoint_of(base_url: str | None) -> str:
    """``host:port`` of a base URL (the provider's default endpoint when None)."""
    if not base_url:
        return "default"
    parts = urlsplit(base_url)
    return parts.netloc.lower() or base_url


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
    """The cache key of one API call."""
    return stable_hash(
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


class JudgeCache:
    """``get``/``put`` of JSON answers by key in a SQLite file (WAL; multi-process safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=60.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
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

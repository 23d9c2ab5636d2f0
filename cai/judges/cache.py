"""A persistent cache of judge answers in SQLite, shared by the processes of a parallel sweep.

One row per API call that produced a usable answer, keyed by the stable hash of everything the
answer depends on (:func:`call_key`): backend, model, the base URL's host and port, sampling
parameters, the prompt template version, the messages, the choices, ``n_samples`` and the
sample index. Failures are never stored, so a rerun retries them; a warm cache answers a whole
batch without a single request. Values are JSON; no API key is ever part of a key or a value.

The database runs in WAL mode with a generous busy timeout, so several processes can read and
write it at once; writes are single ``INSERT OR REPLACE`` statements (atomic). A warm batch is
read with a few ``IN (...)`` queries (:meth:`JudgeCache.get_many`) instead of one per call.

The same file makes a request paid once per store, across processes, and holds the store's
budget ledger:

- **claims**: before sending a call that missed the cache, a process *claims* its key
  (:meth:`JudgeCache.claim`); another process (or another request of the same batch) needing
  the same key waits until the answer lands in the cache or the claim is released (the answer
  was unusable, so it asks itself). A claim is a lease renewed while its call runs
  (:meth:`JudgeCache.renew`); a claim whose owner died (kill -9: same host and the process is
  gone, or the lease expired) is taken over at once.
- **spend**: one row per paid call (key, the judge's scope ``backend:model@endpoint``,
  dollars, the paying process, whether the payment was reported by a finished result).
  :meth:`JudgeCache.spent` is what a judge has been paid through this store, over every process
  and restart; :meth:`JudgeCache.reserve` admits a request only while spent + live reservations
  + its estimate stay within the cap. A payment made by a process that died (or stopped on an
  outage) before it finished is *adopted* by the first later cache hit on that key
  (:meth:`JudgeCache.adopt`): the resumed run reports it, so its cost equals what was paid.

A judge ``model`` naming a local file or directory (a local hf judge, a re-trained checkpoint) enters
the key by its *contents* (:func:`model_identity`: the SHA-256 of every file, via
:class:`cai.hashing.Fingerprints`), never by its path: a judge re-trained at the same path asks
again, the same weights under another path reuse the answers.

Keys are computed on every call, so they take a fast path: a key made only of plain JSON values
(dicts with string keys, lists, tuples, strings, ints, finite floats, bools, None) -- every key
the judges build from valid requests -- is encoded by one ``json.dumps`` call, which gives the
very text :func:`cai.hashing.canonical_json` gives for such values, so the hash is byte-identical
and existing caches stay warm. Anything else goes through :func:`~cai.hashing.stable_hash`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cai.errors import ConfigError
from cai.hashing import Fingerprints, stable_hash
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


_FINGERPRINTS = Fingerprints()  # file hashes by (path, size, mtime): each file is read once per process
_MODEL_IDS: dict[str, tuple[float, tuple, str]] = {}  # abspath -> (checked at, signature, identity)
_MODEL_IDS_LOCK = threading.Lock()
# a local model's files are looked at (stat) at most this often; their contents are read only when changed
MODEL_RECHECK_S = 1.0


def _signature(path: str) -> tuple:
    if os.path.isfile(path):
        st = os.stat(path)
        return ((".", st.st_size, st.st_mtime_ns),)
    entries = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            entries.append((os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns))
    return tuple(entries)


def model_identity(model: str) -> str:
    """What a judge's answers depend on in its ``model``: the name as given, or -- when it names a
    local file or directory -- ``local-sha256:<digest of its contents>``."""
    if not model or "://" in model or not os.path.exists(model):
        return model
    path = os.path.abspath(os.path.expanduser(model))
    now = time.monotonic()
    with _MODEL_IDS_LOCK:
        memo = _MODEL_IDS.get(path)
        if memo is not None and now - memo[0] < MODEL_RECHECK_S:
            return memo[2]
        signature = _signature(path)
        if memo is not None and memo[1] == signature:
            _MODEL_IDS[path] = (now, signature, memo[2])
            return memo[2]
        identity = "local-sha256:" + _FINGERPRINTS.of(path)
        _MODEL_IDS[path] = (now, signature, identity)
        return identity


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
            "model": model_identity(model),
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
# a claim lives this long unless renewed (its owner renews it every LEASE_S / 4 while its call runs)
LEASE_S = 30.0
HOST = socket.gethostname()


def process_alive(host: str, pid: int) -> bool:
    """Whether process ``pid`` on ``host`` may still be running (another host: assume it is)."""
    if host != HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_owner() -> str:
    """A fresh claim owner: ``host:pid:random`` (one per batch; a request appends its own suffix)."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


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
            for ddl in (
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)",
                "CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, "
                "pid INTEGER NOT NULL, expires REAL NOT NULL)",
                "CREATE TABLE IF NOT EXISTS spend (key TEXT NOT NULL, scope TEXT NOT NULL, usd REAL NOT NULL, "
                "host TEXT NOT NULL, pid INTEGER NOT NULL, settled INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL)",
                "CREATE INDEX IF NOT EXISTS spend_key ON spend (key)",
                "CREATE TABLE IF NOT EXISTS reservations (token TEXT PRIMARY KEY, scope TEXT NOT NULL, "
                "usd REAL NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, expires REAL NOT NULL)",
            ):
                _retry_while_locked(lambda ddl=ddl: self._conn.execute(ddl))
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

    # ---- claims: one process pays for a key, the others wait for its answer -------------
    def _immediate(self, body):
        """Run ``body(conn)`` in one write transaction (BEGIN IMMEDIATE), retried while locked."""
        def run():
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    out = body(self._conn)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                return out
        return _retry_while_locked(run)

    def claim(self, key: str, owner: str, lease_s: float = LEASE_S) -> str:
        """Try to become the one process that sends ``key``'s call: ``"cached"`` (the answer is
        there now), ``"claimed"`` (ours: send, store, then :meth:`release`) or ``"busy"`` (a live
        owner is sending it: wait and ask again)."""
        now = time.time()

        def body(conn: sqlite3.Connection) -> str:
            if conn.execute("SELECT 1 FROM answers WHERE key = ?", (key,)).fetchone():
                return "cached"
            row = conn.execute("SELECT owner, host, pid, expires FROM claims WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] != owner and row[3] > now and process_alive(row[1], int(row[2])):
                return "busy"
            conn.execute("INSERT OR REPLACE INTO claims (key, owner, host, pid, expires) VALUES (?, ?, ?, ?, ?)",
                         (key, owner, HOST, os.getpid(), now + lease_s))
            return "claimed"

        return self._immediate(body)

    def renew(self, owner_prefix: str, lease_s: float = LEASE_S) -> None:
        """Extend every claim whose owner starts with ``owner_prefix`` (a batch's claims)."""
        with self._lock:
            self._conn.execute("UPDATE claims SET expires = ? WHERE owner LIKE ? || '%'",
                               (time.time() + lease_s, owner_prefix))

    def release(self, key: str, owner: str) -> None:
        """Give up a claim (its answer is stored, or was unusable and another process may try)."""
        with self._lock:
            self._conn.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    # ---- spend: the store's budget ledger -------------------------------------------------
    def record_spend(self, key: str, scope: str, usd: float) -> None:
        """One paid call (its answer may still be unusable: a paid refusal is still paid)."""
        with self._lock:
            self._conn.execute("INSERT INTO spend (key, scope, usd, host, pid, settled, created) "
                               "VALUES (?, ?, ?, ?, ?, 0, ?)", (key, scope, float(usd), HOST, os.getpid(), time.time()))

    def spent(self, scope: str | None = None) -> float:
        """Dollars paid through this store (for one judge ``scope``, or in all)."""
        where, args = ("WHERE scope = ?", (scope,)) if scope is not None else ("", ())
        with self._lock:
            return float(self._conn.execute(f"SELECT COALESCE(SUM(usd), 0) FROM spend {where}", args).fetchone()[0])

    def paid_calls(self) -> list[tuple[str, float]]:
        """(key, dollars) of every paid call, oldest first -- for audits ("no call paid twice")."""
        with self._lock:
            return list(self._conn.execute("SELECT key, usd FROM spend ORDER BY rowid"))

    def reserve(self, scope: str, usd: float, cap: float) -> str | None:
        """Reserve ``usd`` against ``cap`` for ``scope`` if spent + live reservations + ``usd``
        stay within it: the reservation's token (give it back with :meth:`unreserve`), else None."""
        now = time.time()
        token = uuid.uuid4().hex

        def body(conn: sqlite3.Connection) -> str | None:
            spent = conn.execute("SELECT COALESCE(SUM(usd), 0) FROM spend WHERE scope = ?", (scope,)).fetchone()[0]
            live = [(t, u) for t, u, h, p, e in conn.execute(
                "SELECT token, usd, host, pid, expires FROM reservations WHERE scope = ?", (scope,))
                if e > now and process_alive(h, int(p))]
            if spent + sum(u for _, u in live) + usd > cap:
                return None
            conn.execute("INSERT INTO reservations (token, scope, usd, host, pid, expires) VALUES (?, ?, ?, ?, ?, ?)",
                         (token, scope, float(usd), HOST, os.getpid(), now + 10 * LEASE_S))
            return token

        return self._immediate(body)

    def unreserve(self, token: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM reservations WHERE token = ?", (token,))

    def adopt(self, key: str) -> float:
        """Dollars paid for ``key`` by a process that is gone without having reported them
        (killed, or stopped on an outage): they are this caller's to report now (once)."""
        def body(conn: sqlite3.Connection) -> float:
            rows = [(rid, usd) for rid, usd, h, p in conn.execute(
                "SELECT rowid, usd, host, pid FROM spend WHERE key = ? AND settled = 0", (key,))
                if (h, int(p)) != (HOST, os.getpid()) and not process_alive(h, int(p))]
            for rid, _ in rows:
                conn.execute("UPDATE spend SET settled = 1 WHERE rowid = ?", (rid,))
            return float(sum(usd for _, usd in rows))

        return self._immediate(body)

    def orphaned(self, keys: Iterable[str]) -> set[str]:
        """Those ``keys`` with a payment no finished process reported (see :meth:`adopt`)."""
        wanted = list(dict.fromkeys(keys))
        found: set[str] = set()
        me = (HOST, os.getpid())
        for start in range(0, len(wanted), _LOOKUP_CHUNK):
            chunk = wanted[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT key, host, pid FROM spend WHERE settled = 0 AND key IN ({marks})", chunk).fetchall()
            found.update(k for k, h, p in rows if (h, int(p)) != me and not process_alive(h, int(p)))
        return found

    def settle_mine(self) -> None:
        """Mark this process's payments as reported (its results reached a finished caller)."""
        with self._lock:
            self._conn.execute("UPDATE spend SET settled = 1 WHERE host = ? AND pid = ? AND settled = 0",
                               (HOST, os.getpid()))

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

"""The content-addressed artifact store: every pipeline stage reads and writes through it.

A stage's output is a directory keyed by a hash of the stage name, the stage's own config
(secrets removed: a new API key must not invalidate a cache), the keys of its inputs, the
constitution hash and a stage code ``version``. Building a key that is already complete
returns it without running the stage; that is what lets the arms of a Hydra sweep share
their upstream artifacts and lets a crashed run pick up where it stopped.

Layout under the root (``$CAI_STORE``, ``$XDG_CACHE_HOME/cai/store`` or ``~/.cache/cai/store``)::

    <stage>/<key>/                 a complete artifact: the stage's files + stage.json
    <stage>/.<key>.partial/out/    outputs of the build in progress (ctx.dir)
    <stage>/.<key>.partial/state/  journals and checkpoints (ctx.state_dir); kept across kills
    .locks/<key>.lock              the per-key inter-process lock

Guarantees:

* Atomic publish. The stage writes into ``out/``; the store writes ``stage.json`` there,
  fsyncs the tree, and renames ``out/`` to ``<stage>/<key>/`` in one ``rename``. A process
  killed at any point leaves no directory that :meth:`ArtifactStore.exists` accepts.
* One builder per key. :meth:`ArtifactStore.build` holds an OS-level ``flock`` (via
  ``filelock``) on the key's lock file; parallel sweep processes wait, re-check and reuse. The
  kernel drops the lock when its holder dies, so a killed builder never blocks the next one.
  Filesystems without ``flock`` (some NFS mounts) are refused rather than silently unlocked.
* Resume. ``out/`` of a killed attempt is discarded (its files may be half written), but
  ``state/`` is kept: journals (:mod:`cai.journal`) and checkpoints there let the next attempt
  skip finished work. ``state/`` is not part of the published artifact.
* Integrity. ``stage.json`` lists every file of the artifact with its size, SHA-256 and (for
  JSONL) row count. A reuse checks the sizes (``verify="size"``, cheap) or every hash
  (``verify="hash"``); a damaged artifact -- a truncated labels file, half a weights file -- is
  moved aside with a warning and rebuilt, never silently reused.
* Provenance. ``stage.json`` records config, input keys, constitution hash, seed, package
  versions, wall time per phase, token and dollar cost, metrics and resume counts, with
  secrets scrubbed (:func:`cai.secrets.scrub_secrets`, re-exported here).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import errno
import inspect
import json
import logging
import math
import numbers
import os
import platform
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import filelock

from cai.errors import CaiError, ConfigError, DataError
from cai.hashing import canonical_json, file_digest, stable_hash
from cai.journal import BuildContext, Journal, fsync_dir, fsync_tree
from cai.secrets import (  # re-exported (see __all__)
    SCRUBBED,
    is_secret_name,
    scrub_secrets,
)

__all__ = ["SCRUBBED", "ArtifactError", "ArtifactStore", "BuildContext", "BuildResult", "Journal", "current_store",
           "STAGE_FILE", "is_secret_name", "package_versions", "scrub_secrets"]

log = logging.getLogger(__name__)

KEY_DIGEST_LEN = 20
STAGE_FILE = "stage.json"
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}"
_NAME_RE = re.compile(_NAME)
_KEY_RE = re.compile(rf"(?P<stage>{_NAME})-(?P<digest>[0-9a-f]{{{KEY_DIGEST_LEN}}})")
_KEY_PARTS = ("stage", "config", "inputs", "constitution", "version")
# Distributions whose versions go into stage.json when installed (read from package metadata,
# never imported: importing torch to learn its version would cost seconds).
VERSIONED_PACKAGES = ("cai", "torch", "transformers", "tokenizers", "datasets", "peft",
                      "accelerate", "openai", "anthropic", "numpy")


class ArtifactError(CaiError):
    """An artifact is missing or unreadable, or the store cannot lock a key."""


# --------------------------------------------------------------------------- provenance
@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Python and installed package versions, from metadata only (no heavy imports)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> "NaN"/"Infinity"/"-Infinity" (strict JSON; ``float()`` reads them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class BuildResult:
    """The outcome of :meth:`ArtifactStore.build`."""

    key: str
    path: Path
    reused: bool
    stage_info: dict[str, Any]


# --------------------------------------------------------------------------- locking
@lru_cache(maxsize=1)
def _lock_kwargs() -> dict[str, Any]:
    # Newer filelock silently falls back to an existence-file lock (not released when its
    # holder dies) on filesystems without flock; ask it to fail instead where supported.
    params = inspect.signature(filelock.FileLock.__init__).parameters
    return {"fallback_to_soft": False} if "fallback_to_soft" in params else {}


_current: contextvars.ContextVar[tuple[ArtifactStore, list[str]] | None] = contextvars.ContextVar(
    "cai_artifact_build", default=None)  # (store, keys used) of the build whose fn runs now
_building = threading.local()  # keys being built by this thread (to catch recursion)


# --------------------------------------------------------------------------- the store
def current_store() -> ArtifactStore | None:
    """The store whose :meth:`ArtifactStore.build` is running its stage function in this context
    (a pipeline stage: the run's configured store), or ``None`` outside any build. Threads started
    with :func:`asyncio.to_thread` see it (they copy the context); a bare ``threading.Thread`` does
    not."""
    frame = _current.get()
    return frame[0] if frame else None


def _note_use(store: ArtifactStore, key: str) -> None:
    """Record ``key`` in the enclosing build's ``uses`` when that build writes to the same store."""
    frame = _current.get()
    if frame and frame[0].root == store.root and key not in frame[1]:
        frame[1].append(key)


class ArtifactStore:
    """Content-addressed, lock-protected, resumable store of stage outputs."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, durable: bool = True,
                 lock_timeout_s: float | None = None, verify: str = "size"):
        """``root`` is created lazily. ``durable`` fsyncs artifacts before publishing them
        (survives power loss; turn off only for scratch stores). ``lock_timeout_s``: how long
        to wait for another process building the same key (None: as long as it takes).
        ``verify``: what a reuse checks of the artifact's files, ``size`` or ``hash``."""
        if verify not in VERIFY_MODES:
            raise ConfigError(f"store.verify: expected one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        self.root = Path(root).expanduser() if root is not None else self.default_root()
        self.durable = durable
        self.lock_timeout_s = lock_timeout_s
        self.verify_mode = verify
        self._specs: dict[str, dict[str, Any]] = {}

    @staticmethod
    def default_root() -> Path:
        """``$CAI_STORE``, else ``$XDG_CACHE_HOME/cai/store``, else ``~/.cache/cai/store``."""
        if os.environ.get("CAI_STORE"):
            return Path(os.environ["CAI_STORE"]).expanduser()
        if os.environ.get("XDG_CACHE_HOME"):
            return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "cai" / "store"
        return Path.home() / ".cache" / "cai" / "store"

    # ---------------------------------------------------------------- keys and paths
    def key(self, stage: str, config: Mapping[str, Any],
            inputs: Mapping[str, str] | None = None, constitution: str | None = None,
            version: str = "1") -> str:
        """``<stage>-<20 hex>`` from the stage, its config (secrets removed, key order
        irrelevant), its inputs' keys (name -> key), the constitution hash and ``version``
        (bump it when the stage's code changes what it produces)."""
        if not isinstance(stage, str) or not _NAME_RE.fullmatch(stage):
            raise ConfigError(f"stage name {stage!r}: expected letters, digits, '_', '.', '-' "
                              "(starting with a letter or digit)")
        inputs = dict(inputs or {})
        for name, value in inputs.items():
            if not isinstance(name, str) or not isinstance(value, str) or not value:
                raise ConfigError(f"stage {stage!r}: input {name!r} must map a name to an "
                                  f"artifact key string, got {value!r}")
        if constitution is not None and not isinstance(constitution, str):
            raise ConfigError(f"stage {stage!r}: constitution must be a hash string or None, "
                              f"got {type(constitution).__name__}")
        try:
            plain_config = json.loads(canonical_json(config))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"stage {stage!r}: config cannot be hashed: {e}") from e
        spec = {"stage": stage, "config": plain_config, "inputs": inputs,
                "constitution": constitution, "version": str(version)}
        digest = stable_hash({**spec, "config": scrub_secrets(plain_config, env=False)})
        key = f"{stage}-{digest[:KEY_DIGEST_LEN]}"
        self._specs[key] = spec
        return key

    @staticmethod
    def stage_of(key: str) -> str:
        match = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise ConfigError(f"artifact key {key!r}: expected '<stage>-<{KEY_DIGEST_LEN} hex "
                              "digits>' as returned by ArtifactStore.key()")
        return match["stage"]

    def path(self, key: str) -> Path:
        """Where the complete artifact of ``key`` lives (whether or not it exists yet)."""
        return self.root / self.stage_of(key) / key

    def _partial(self, key: str) -> Path:
        return self.root / self.stage_of(key) / f".{key}.partial"

    def _lock_path(self, key: str) -> Path:
        self.stage_of(key)
        return self.root / ".locks" / f"{key}.lock"

    def exists(self, key: str) -> bool:
        """Whether a complete artifact of ``key`` is present."""
        return (self.path(key) / STAGE_FILE).is_file()

    def verify(self, key: str, full: bool | None = None) -> list[str]:
        """What is wrong with the files of the complete artifact ``key`` (empty: nothing):
        a file listed in its ``stage.json`` that is missing, of another size or (``full``, or
        ``verify="hash"``) of another SHA-256 or JSONL row count. Artifacts written before
        manifests existed have none and pass."""
        full = self.verify_mode == "hash" if full is None else full
        try:
            manifest = self.load_stage_info(key).get("files")
        except (ArtifactError, DataError) as e:
            return [str(e)]
        if not isinstance(manifest, dict):
            return []
        root = self.path(key)
        problems = []
        for rel, want in sorted(manifest.items()):
            file = root / rel
            if not file.is_file():
                problems.append(f"{rel}: missing")
                continue
            size = file.stat().st_size
            if size != want.get("size"):
                problems.append(f"{rel}: {size} bytes, stage.json says {want.get('size')}")
            elif full:
                got = _file_record(file)
                if got["sha256"] != want.get("sha256"):
                    problems.append(f"{rel}: contents changed (sha256 differs)")
                elif "rows" in want and got.get("rows") != want["rows"]:
                    problems.append(f"{rel}: {got.get('rows')} rows, stage.json says {want['rows']}")
        return problems

    def _reusable(self, key: str) -> bool:
        """Whether the complete artifact of ``key`` may be reused: present and undamaged. A
        damaged one is moved aside (``<stage>/.<key>.damaged-<time>``) so it is rebuilt."""
        if not self.exists(key):
            return False
        problems = self.verify(key)
        if not problems:
            return True
        aside = self.path(key).parent / f".{key}.damaged-{int(time.time())}"
        log.warning("artifact %s is damaged (%s); moved to %s and rebuilt", key, "; ".join(problems[:5]), aside)
        os.rename(self.path(key), aside)
        return False

    def load_stage_info(self, key: str) -> dict[str, Any]:
        """The ``stage.json`` of a complete artifact."""
        file = self.path(key) / STAGE_FILE
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ArtifactError(f"no complete artifact {key!r} in store {self.root} "
                                f"(missing {file})") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{e.lineno}: stage.json is not valid JSON: {e.msg}") from e

    def list(self, stage: str | None = None) -> list[str]:
        """Keys of complete artifacts, sorted; only those of ``stage`` if given."""
        if stage is not None and not _NAME_RE.fullmatch(stage):
            raise ConfigError(f"stage name {stage!r}: expected letters, digits, '_', '.', '-'")
        if not self.root.is_dir():
            return []
        stage_dirs = ([self.root / stage] if stage is not None else
                      [d for d in self.root.iterdir() if not d.name.startswith(".")])
        keys = []
        for d in stage_dirs:
            if not d.is_dir():
                continue
            for entry in d.iterdir():
                m = _KEY_RE.fullmatch(entry.name)
                if m and m["stage"] == d.name and (entry / STAGE_FILE).is_file():
                    keys.append(entry.name)
        return sorted(keys)

    # ---------------------------------------------------------------- building
    def build(self, key: str, fn: Callable[[BuildContext], Mapping[str, Any] | None],
              meta: Mapping[str, Any] | None = None) -> BuildResult:
        """Return the artifact of ``key``, running ``fn`` only if it is not complete yet.

        ``fn(ctx)`` writes files into ``ctx.dir`` (empty on every attempt; ``stage.json`` is
        reserved) and keeps resumable progress in ``ctx.journal()`` / ``ctx.state_dir``; a
        mapping it returns is merged into the metrics. ``meta`` may carry ``seed`` (recorded
        in stage.json), the key parts (``stage``, ``config``, ``inputs``, ``constitution``,
        ``version``: needed when ``key`` was not made by this store object's :meth:`key`,
        checked against ``key`` otherwise) and any other fields, stored scrubbed under
        ``meta``. If ``fn`` raises, the journals are synced, the partial state is kept for the
        next attempt, and the error propagates.
        """
        meta = dict(meta or {})
        spec = self._resolve_spec(key, meta)
        if self._reusable(key):
            log.info("reusing artifact %s", key)
            _note_use(self, key)
            return BuildResult(key, self.path(key), True, self.load_stage_info(key))
        active = getattr(_building, "keys", set())
        if key in active:
            raise RuntimeError(f"artifact {key} is already being built by this thread "
                               "(a stage that needs its own output?)")
        _building.keys = active | {key}
        try:
            t0 = time.perf_counter()
            with self._locked(key):
                lock_wait = time.perf_counter() - t0
                if self._reusable(key):  # another process finished it while we waited
                    log.info("reusing artifact %s (built by another process)", key)
                    shutil.rmtree(self._partial(key), ignore_errors=True)
                    _note_use(self, key)
                    return BuildResult(key, self.path(key), True, self.load_stage_info(key))
                if spec is None:
                    raise ValueError(
                        f"build({key!r}): the key's parts are unknown; make it with this "
                        "store's key() or pass stage/config/inputs/constitution/version in meta")
                result = self._build_locked(key, spec, meta, fn, lock_wait)
                _note_use(self, key)
                return result
        finally:
            _building.keys = active

    def _resolve_spec(self, key: str, meta: dict[str, Any]) -> dict[str, Any] | None:
        """The key parts to record, from key() and/or meta (which must reproduce ``key``)."""
        given = {k: meta.pop(k) for k in _KEY_PARTS if k in meta}
        known = self._specs.get(key)
        if not given:
            return known
        parts = {"inputs": None, "constitution": None, "version": "1", **(known or {}), **given}
        if "stage" not in parts or "config" not in parts:
            raise ValueError(f"build({key!r}): meta gives {sorted(given)} but the key's stage "
                             "and config are unknown")
        remade = self.key(**{k: parts[k] for k in _KEY_PARTS})
        if remade != key:
            raise ValueError(f"build({key!r}): meta describes a different artifact ({remade}); "
                             "the key and meta disagree")
        return self._specs[key]

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        lock_file = self._lock_path(key)
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(lock_file), **_lock_kwargs())
        try:
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                log.info("waiting for another process building %s (lock %s)", key, lock_file)
                wait = -1 if self.lock_timeout_s is None else self.lock_timeout_s
                lock.acquire(timeout=wait)
        except filelock.Timeout:
            raise ArtifactError(f"gave up after {self.lock_timeout_s}s waiting for another "
                                f"process building {key} (lock {lock_file})") from None
        except (OSError, NotImplementedError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.ENOSYS, errno.ENOLCK,
                                                          errno.EOPNOTSUPP):
                raise
            raise ArtifactError(f"cannot lock {lock_file}: the filesystem of the store does "
                                f"not support flock ({e}); put the store on a local disk "
                                "(set CAI_STORE)") from e
        try:
            yield
        finally:
            lock.release()

    def _build_locked(self, key: str, spec: dict[str, Any], meta: dict[str, Any],
                      fn: Callable[[BuildContext], Mapping[str, Any] | None],
                      lock_wait: float) -> BuildResult:
        final, work = self.path(key), self._partial(key)
        out, state = work / "out", work / "state"
        if final.exists():  # a directory without stage.json is not ours to keep
            log.warning("removing incomplete directory %s (no %s)", final, STAGE_FILE)
            shutil.rmtree(final)
        resumed = state.is_dir() and any(state.iterdir())
        if out.exists():
            shutil.rmtree(out)  # files of a killed attempt may be half written
        out.mkdir(parents=True)
        state.mkdir(exist_ok=True)
        attempt = _bump_attempts(work / "attempts")
        ctx = BuildContext(key, out, state, resumed, attempt)
        if resumed:
            log.info("resuming artifact %s (attempt %d)", key, attempt)
        t0 = time.perf_counter()
        uses: list[str] = []
        token = _current.set((self, uses))
        try:
            returned = fn(ctx)
        except BaseException:
            ctx.close()
            log.warning("building %s failed; partial state kept in %s for the next attempt",
                        key, work)
            raise
        finally:
            _current.reset(token)
        ctx.close()
        if returned is not None:
            if not isinstance(returned, Mapping):
                raise TypeError(f"stage function of {key} returned {type(returned).__name__}; "
                                "expected a mapping of metrics or None")
            ctx.set_metrics(returned)
        if (out / STAGE_FILE).exists():
            raise ValueError(f"stage function of {key} wrote {STAGE_FILE}; that name is "
                             "reserved for the store's provenance record")
        info = self._stage_info(key, spec, meta, ctx, time.perf_counter() - t0, lock_wait)
        info["uses"] = list(uses)  # this store's artifacts the stage built or reused (a dequantised GGUF)
        info["files"] = {str(f.relative_to(out)).replace(os.sep, "/"): _file_record(f)
                         for f in sorted(out.rglob("*")) if f.is_file()}
        (out / STAGE_FILE).write_text(
            json.dumps(info, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
            encoding="utf-8")
        if self.durable:
            fsync_tree(out)
        os.rename(out, final)  # the publish: atomic, and the only way a key becomes complete
        if self.durable:
            fsync_dir(final.parent)
        shutil.rmtree(work, ignore_errors=True)
        log.info("built artifact %s", key)
        return BuildResult(key, final, False, info)

    @staticmethod
    def _stage_info(key: str, spec: Mapping[str, Any], meta: Mapping[str, Any],
                    ctx: BuildContext, wall_s: float, lock_wait_s: float) -> dict[str, Any]:
        seed = meta.get("seed")
        seed = int(seed) if isinstance(seed, numbers.Integral) else seed
        try:
            extra = json.loads(canonical_json({k: v for k, v in meta.items() if k != "seed"}))
            json.dumps(seed)
        except (TypeError, ValueError) as e:
            raise ValueError(f"build({key!r}): meta cannot be written to {STAGE_FILE}: {e}") from e
        info = {
            "key": key,
            "stage": spec["stage"],
            "version": spec["version"],
            "config": spec["config"],
            "inputs": spec["inputs"],
            "constitution": spec["constitution"],
            "seed": seed,
            "meta": extra,
            "packages": package_versions(),
            "phases_s": {k: round(v, 6) for k, v in ctx.phases.items()},
            "wall_time_s": round(wall_s, 6),
            "lock_wait_s": round(lock_wait_s, 6),
            "cost": ctx.cost,
            "metrics": ctx.metrics,
            "resumed": ctx.resumed,
            "resumed_records": ctx.resumed_records,
            "attempt": ctx.attempt,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "hostname": socket.gethostname(),
        }
        return _json_safe(scrub_secrets(info))

    # ---------------------------------------------------------------- housekeeping
    def gc_partials(self, older_than_s: float = 7 * 24 * 3600) -> int:
        """Delete partial builds untouched for ``older_than_s`` seconds (0: any age) whose key
        is not being built right now, and leftovers of keys already complete. Returns how
        many were removed. Deleting a partial build discards its resumable progress."""
        if not self.root.is_dir():
            return 0
        removed, now = 0, time.time()
        for stage_dir in self.root.iterdir():
            if stage_dir.name.startswith(".") or not stage_dir.is_dir():
                continue
            for partial in stage_dir.glob(".*.partial"):
                key = partial.name[1:-len(".partial")]
                if not _KEY_RE.fullmatch(key):
                    continue
                if not self.exists(key) and now - _latest_mtime(partial) < older_than_s:
                    continue
                lock = filelock.FileLock(str(self._lock_path(key)), **_lock_kwargs())
                try:
                    lock.acquire(timeout=0)
                except filelock.Timeout:
                    continue  # a builder is working on it
                try:
                    shutil.rmtree(partial)
                    removed += 1
                finally:
                    lock.release()
        return removed


# --------------------------------------------------------------------------- file helpers
VERIFY_MODES = ("size", "hash")


def _file_record(file: Path) -> dict[str, Any]:
    """Size, SHA-256 and (JSONL) row count of one artifact file."""
    sha, rows = file_digest(file)
    record: dict[str, Any] = {"size": file.stat().st_size, "sha256": sha}
    if file.suffix == ".jsonl":
        record["rows"] = rows
    return record


def _bump_attempts(file: Path) -> int:
    try:
        attempt = int(file.read_text().strip() or 0) + 1
    except (FileNotFoundError, ValueError):
        attempt = 1
    file.write_text(f"{attempt}\n")
    return attempt


def _latest_mtime(root: Path) -> float:
    latest = root.stat().st_mtime
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                latest = max(latest, os.stat(os.path.join(dirpath, name)).st_mtime)
    return latest


# ----------------------------------------------------------------------------- a run's artifacts
RUN_FILE = "run.json"


def run_artifacts(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Path]]:
    """``(run.json, {stage: artifact folder})`` of a run folder written by ``cai run``: each stage's
    key in ``run.json`` resolved in the run's store. For ``cai export`` and ``cai score``; a folder
    without ``run.json`` (a sweep folder, a typo) is a :class:`DataError` saying what to pass."""
    run_dir = Path(run_dir).expanduser()
    file = run_dir / RUN_FILE
    if not file.is_file():
        below = sorted(str(p.parent.relative_to(run_dir)) for p in run_dir.glob(f"*/{RUN_FILE}"))[:5] \
            if run_dir.is_dir() else []
        hint = f"; runs below it: {', '.join(below)}" if below else ""
        raise DataError(f"{run_dir}: not a run folder (no {RUN_FILE}, which `cai run` writes){hint}")
    try:
        info = json.loads(file.read_text())
        root, keys = Path(info["store"]), dict(info["artifacts"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{file}: unreadable run record ({e})") from None
    return info, {stage: root / ArtifactStore.stage_of(key) / key for stage, key in keys.items()}

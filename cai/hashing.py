"""Stable content hashes shared by constitutions, artifacts and data splits.

A hash is the SHA-256 of a canonical JSON encoding: keys sorted, no whitespace, floats by
``repr``, tuples as lists, paths as strings, dataclasses as dicts. The same content always
gives the same hash, across processes, machines and Python versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"hash keys must be strings, got {type(k).__name__}: {k!r}")
            out[k] = _canonical(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN has no stable JSON form
        raise ValueError("cannot hash NaN")
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    # OmegaConf containers and other mappings-like objects
    if hasattr(obj, "items"):
        return _canonical(dict(obj.items()))
    raise TypeError(f"cannot hash object of type {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    """The canonical JSON text that :func:`stable_hash` hashes."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stable_hash(obj: Any, length: int = 64) -> str:
    """Hex SHA-256 of ``obj``'s canonical JSON, truncated to ``length`` hex digits."""
    digest = hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
    return digest[:length]


def text_hash(*parts: str, length: int = 16) -> str:
    """Hash of a sequence of strings, unambiguous (length-prefixed), for record ids."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()[:length]


# ----------------------------------------------------------------------------- files on disk
def file_digest(path: str | PurePath) -> tuple[str, int]:
    """``(SHA-256 hex, newline count)`` of a file, read once in 1 MiB blocks."""
    digest = hashlib.sha256()
    lines = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            lines += block.count(b"\n")
    return digest.hexdigest(), lines


class Fingerprints:
    """SHA-256 of local files and directories, cached by (path, size, mtime): a user file a stage
    reads (a prompts file, a local model directory) enters its artifact key by *contents*, so a
    file edited in place gives a new key, while an unchanged 16 GB model is hashed once.

    ``cache_file`` (JSON) keeps the hashes between runs; it is rewritten atomically.
    """

    def __init__(self, cache_file: str | PurePath | None = None) -> None:
        from pathlib import Path

        self._file = Path(cache_file) if cache_file else None
        self._cache: dict[str, list[Any]] = {}
        self._dirty = False
        if self._file is not None and self._file.is_file():
            try:
                self._cache = json.loads(self._file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._cache = {}  # a damaged cache is only a cache: hash again

    def file(self, path: str | PurePath) -> str:
        import os

        p = os.path.abspath(os.fspath(path))
        st = os.stat(p)
        hit = self._cache.get(p)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2])
        sha, _ = file_digest(p)
        self._cache[p] = [st.st_size, st.st_mtime_ns, sha]
        self._dirty = True
        return sha

    def of(self, path: str | PurePath) -> str:
        """A file's SHA-256, or a directory's: the hash of every file's relative path and SHA-256."""
        import os

        p = os.fspath(path)
        if os.path.isfile(p):
            return self.file(p)
        entries = []
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                full = os.path.join(root, name)
                entries.append([os.path.relpath(full, p).replace(os.sep, "/"), self.file(full)])
        return stable_hash(entries)

    def save(self) -> None:
        if not self._dirty or self._file is None:
            return
        import os
        import tempfile

        self._file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._file.parent, prefix=".fingerprints-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._cache, f)
        os.replace(tmp, self._file)
        self._dirty = False

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

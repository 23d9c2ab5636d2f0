"""Test helpers shipped with the package: loopback fake judge servers and a deterministic fake
model (used by the test suite, the benchmarks and users' offline smoke tests).

Names are imported lazily, so ``python -m cai.testing.servers`` runs the server module once.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"FakeModel": "cai.testing.fake_model", "FakeAnthropicServer": "cai.testing.servers",
          "FakeOpenAIServer": "cai.testing.servers", "Faults": "cai.testing.servers",
          "RequestRecord": "cai.testing.servers"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cai.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)

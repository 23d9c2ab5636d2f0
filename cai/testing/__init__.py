"""Test helpers shipped with the package: loopback fake judge servers and a deterministic fake
model (used by the test suite, the benchmarks and users' offline smoke tests)."""

from __future__ import annotations

from cai.testing.fake_model import FakeModel
from cai.testing.servers import FakeAnthropicServer, FakeOpenAIServer, Faults, RequestRecord

__all__ = ["FakeAnthropicServer", "FakeModel", "FakeOpenAIServer", "Faults", "RequestRecord"]

"""Building a judge from its config: the backend registry and :func:`make_judge`.

A backend is a factory ``factory(cfg, *, ledger, cache_path) -> JudgeBackend``. ``openai`` and
``anthropic`` are built in; another module registers more with :func:`register_backend` (the
local ``hf`` judge registers itself from ``cai.judges.hf``, the scripted ``python`` judge from
``cai.judges.python_judge``; :func:`make_judge` imports them on first use).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cai.config import JudgeConfig
from cai.errors import ConfigError
from cai.judges.config import ready_judge
from cai.judges.cost import CostLedger
from cai.judges.types import JudgeBackend

Factory = Callable[..., JudgeBackend]
_FACTORIES: dict[str, Factory] = {}
# modules that register a backend when imported
_PROVIDERS = {
    "openai": "cai.judges.openai_judge",
    "anthropic": "cai.judges.anthropic_judge",
    "hf": "cai.judges.hf",
    "python": "cai.judges.python_judge",
    "embedding": "cai.judges.embedding",
}


def register_backend(name: str, factory: Factory) -> None:
    """Make ``backend: <name>`` in a judge config build judges with ``factory``."""
    _FACTORIES[name] = factory


def _openai_factory(cfg: JudgeConfig, *, ledger: CostLedger, cache_path: str | Path | None) -> JudgeBackend:
    from cai.judges.openai_judge import OpenAIJudge

    return OpenAIJudge(cfg, ledger=ledger, cache_path=cache_path)


def _anthropic_factory(cfg: JudgeConfig, *, ledger: CostLedger, cache_path: str | Path | None) -> JudgeBackend:
    from cai.judges.anthropic_judge import AnthropicJudge

    return AnthropicJudge(cfg, ledger=ledger, cache_path=cache_path)


register_backend("openai", _openai_factory)
register_backend("anthropic", _anthropic_factory)


def _factory(backend: str, where: str) -> Factory:
    if backend not in _FACTORIES and backend in _PROVIDERS:
        module = _PROVIDERS[backend]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if backend not in _FACTORIES:
        raise ConfigError(
            f"{where}: judge backend {backend!r} is not available in this build "
            f"(registered: {sorted(_FACTORIES)}); the local 'hf' judge lives in {_PROVIDERS['hf']} "
            "and registers itself with cai.judges.register_backend"
        )
    return _FACTORIES[backend]


def make_judge(
    cfg: JudgeConfig | Mapping[str, Any],
    *,
    ledger: CostLedger | None = None,
    cache_path: str | Path | None = None,
    where: str = "judge",
) -> JudgeBackend:
    """The judge ``cfg`` describes.

    ``ledger`` is shared with the caller (a stage writes it into stage.json); ``cache_path`` is
    used when the config gives none (e.g. under the artifact store).
    """
    cfg = ready_judge(cfg, where)
    if ledger is None:
        ledger = CostLedger(cfg.prices, cfg.max_dollars)
    elif ledger.max_dollars is None and cfg.max_dollars is not None:
        ledger.max_dollars = cfg.max_dollars
    return _factory(cfg.backend, where)(cfg, ledger=ledger, cache_path=cache_path)

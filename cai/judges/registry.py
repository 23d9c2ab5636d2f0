"""Building a judge from its config: the backend registry and :func:`make_judge`.

A backend is a factory ``factory(cfg, *, ledger, cache_path) -> JudgeBackend``. ``openai`` and
``anthropic`` are built in; another module registers more with :func:`register_backend` (the
local ``hf`` judge registers itself from ``cai.judges.hf``, which :func:`make_judge`
imports on first use). A config naming a ``fallback`` gets a :class:`FallbackJudge` around the
two, sharing one cost ledger.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cai.errors import ConfigError
from cai.judges.config import JudgeConfig, coerce_config
from cai.judges.cost import CostLedger
from cai.judges.fallback import FallbackJudge
from cai.judges.types import JudgeBackend

Factory = Callable[..., JudgeBackend]
_FACTORIES: dict[str, Factory] = {}
# modules that register a backend when imported
_PROVIDERS = {
    "openai": "cai.judges.openai_judge",
    "anthropic": "cai.judges.anthropic_judge",
    "hf": "cai.judges.hf",
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
    judges: Mapping[str, Any] | None = None,
    ledger: CostLedger | None = None,
    cache_path: str | Path | None = None,
    where: str = "judge",
    _seen: tuple[str, ...] = (),
) -> JudgeBackend:
    """The judge ``cfg`` describes.

    ``judges`` maps names to other judge configs (where ``cfg.fallback`` is looked up);
    ``ledger`` is shared with the caller (a stage writes it into stage.json) and with the
    fallback; ``cache_path`` is used when the config gives none (e.g. under the artifact store).
    """
    cfg = coerce_config(cfg, where)
    if ledger is None:
        ledger = CostLedger(cfg.prices, cfg.max_dollars)
    elif ledger.max_dollars is None and cfg.max_dollars is not None:
        ledger.max_dollars = cfg.max_dollars
    judge = _factory(cfg.backend, where)(cfg, ledger=ledger, cache_path=cache_path)
    if not cfg.fallback:
        return judge
    known = dict(judges or {})
    if cfg.fallback not in known:
        raise ConfigError(f"{where}: fallback {cfg.fallback!r} is not a known judge config; known: {sorted(known)}")
    if cfg.fallback in _seen:
        raise ConfigError(f"{where}: fallback chain loops: {' -> '.join(_seen + (cfg.fallback,))}")
    second = make_judge(
        known[cfg.fallback], judges=known, ledger=ledger, cache_path=cache_path,
        where=f"judges.{cfg.fallback}", _seen=_seen + (cfg.fallback,),
    )
    return FallbackJudge(judge, second)

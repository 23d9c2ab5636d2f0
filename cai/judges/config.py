"""The judge's config in use: its checks at planning, its key, and the API key (from the environment only).

The schema, :class:`cai.config.JudgeConfig`, lives with every other schema; its field metadata
says which fields change a judge's answers (and so enter the artifact key of every stage that
asks the judge) and which only say how fast, where or at what cost it runs. :func:`ready_judge`
checks a judge a stage is about to ask; :func:`judge_key` is its part of an artifact key.

API keys never live in config: ``api_key_env`` names the environment variable that holds it.
:func:`redact` scrubs a key out of any text before it reaches a result, a log line or an error
(what a secret is and how it is redacted is :mod:`cai.secrets`'s to say, for the whole package).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cai.config import JudgeConfig, build, key_fields
from cai.errors import ConfigError
from cai.secrets import redact as secrets_redact

DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
# sent when ``api_key_env`` is null: local OpenAI-compatible servers accept any key
PLACEHOLDER_KEY = "no-key-needed"


def ready_judge(obj: Any, where: str = "judge") -> JudgeConfig:
    """A checked :class:`JudgeConfig` from the dataclass, a ``DictConfig`` or a (partial) mapping,
    with what a stage asking it needs (a model; a price when ``max_dollars`` is set)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(obj, (JudgeConfig, Mapping)):
        raise ConfigError(f"{where}: expected a judge config mapping, got {type(obj).__name__}")
    cfg = build(JudgeConfig, obj, where=where)
    cfg.check_ready(where)
    return cfg


def stage_judge(judge: JudgeConfig, inputs: Mapping[str, Path], where: str = "judge") -> JudgeConfig:
    """The judge a stage asks: ``model: tiny`` (an hf judge) is the tiny policy model, whose
    artifact the pipeline made an input (``inputs["policy_model"]``)."""
    import dataclasses

    if judge.backend == "hf" and judge.model == "tiny":
        if "policy_model" not in inputs:
            raise ConfigError(f"{where}.model 'tiny' is the tiny policy model, but the run has none "
                              "(policy.name_or_path is not 'tiny'); give the judge a hub name or local path")
        return dataclasses.replace(judge, model=str(Path(inputs["policy_model"]) / "model"))
    return judge


def judge_key(judge: Any) -> dict[str, Any]:
    """The part of a judge config that changes its answers: what an artifact key holds
    (:func:`cai.config.key_fields`: every field not marked run-time)."""
    return key_fields(judge if isinstance(judge, JudgeConfig) else build(JudgeConfig, judge))


def api_key_env_name(cfg: JudgeConfig) -> str | None:
    """The environment variable holding ``cfg``'s key; None when no key is needed."""
    if cfg.api_key_env == "auto":
        return DEFAULT_KEY_ENV.get(cfg.backend)
    return cfg.api_key_env or None


def resolve_api_key(cfg: JudgeConfig, where: str = "judge") -> str:
    """The API key from the environment (a placeholder when none is needed).

    Raises :class:`ConfigError` naming the variable -- never its value -- when it is unset.
    """
    env = api_key_env_name(cfg)
    if env is None:
        return PLACEHOLDER_KEY
    key = os.environ.get(env, "")
    if not key.strip():
        raise ConfigError(
            f"{where}: environment variable {env} is not set; export it with the {cfg.backend} API key "
            "(keys are never read from config files), or set api_key_env: null for a server that needs none"
        )
    return key.strip()


def redact(text: str, *secrets: str) -> str:
    """``text`` with every secret (and any 8+ character fragment of one) replaced by ``***``.

    :func:`cai.secrets.redact` with the judge's rule added: :data:`PLACEHOLDER_KEY`, sent when
    no key is needed, is not a secret and is left in the text.
    """
    return secrets_redact(text, *(s for s in secrets if s != PLACEHOLDER_KEY))


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/cai/judge_cache.sqlite`` (``~/.cache/...`` without XDG)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cai" / "judge_cache.sqlite"

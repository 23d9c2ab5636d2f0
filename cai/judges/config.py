"""The judge's typed config, its validation, and the API key (read from the environment only).

:class:`JudgeConfig` is an OmegaConf structured config (plain scalars, ``Optional``, ``List``,
``Dict`` and nested dataclasses only), so ``conf/judge/*.yaml`` files are type-checked when Hydra
composes them. :func:`coerce_config` accepts the dataclass, a ``DictConfig`` or a plain mapping
and checks the values, raising :class:`~cai.errors.ConfigError` with the field and what was
expected. The price table is the one loosely typed part: its keys are model names, so
:func:`open_price_tables` lets command-line overrides add entries, and :func:`coerce_config`
checks them (pipeline stage builders call it, so a bad price fails when the run is planned).

Which fields change a judge's answers (and so belong in the artifact key of every stage that
asks the judge) and which only say how fast, where or at what cost it runs is said here once:
:func:`judge_key` and :func:`judge_runtime` split a judge config into the two.

API keys never live in config: ``api_key_env`` names the environment variable that holds it.
:func:`redact` scrubs a key out of any text before it reaches a result, a log line or an error
(what a secret is and how it is redacted is :mod:`cai.secrets`'s to say, for the whole package).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from cai.errors import ConfigError
from cai.secrets import redact as secrets_redact

BACKENDS = ("openai", "anthropic", "hf")
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
# sent when ``api_key_env`` is null: local OpenAI-compatible servers accept any key
PLACEHOLDER_KEY = "no-key-needed"
HF_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^[a-z]+(:\d+)?$")  # auto, cpu, mps, cuda, cuda:1, ...

# judge fields that change the answers: part of the artifact key of every stage asking the judge
SEMANTIC_FIELDS = ("backend", "model", "base_url", "temperature", "top_p", "max_tokens", "top_logprobs",
                   "n_samples", "fallback")
# answer-changing fields added after keys were in use, with their defaults: in a key only when
# set to something else, so the key of a config that leaves them alone stays what it was
SEMANTIC_UNLESS_DEFAULT = {"dtype": "auto"}
# the fields of a local (hf) judge's model, with their defaults (other backends leave them so)
_LOCAL_DEFAULTS = {"device": "auto", "dtype": "auto", "batch_size": None}


@dataclass
class PriceConfig:
    """Dollar prices of one model, per million tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


@dataclass
class JudgeConfig:
    """One AI judge: which model, where, how fast, how much it may cost."""

    # openai (any OpenAI-compatible base_url: vLLM, llama.cpp, Ollama) | anthropic | hf (local)
    backend: str = "openai"
    # model name as the API knows it (hf: hub name or local path)
    model: str = ""
    # None: the provider's public endpoint
    base_url: Optional[str] = None
    # name of the environment variable holding the API key; "auto": OPENAI_API_KEY or
    # ANTHROPIC_API_KEY by backend; null: no key needed (a loopback or local server)
    api_key_env: Optional[str] = "auto"
    # sampling temperature of single-answer requests (sampled answers always use 1.0)
    temperature: float = 0.0
    top_p: Optional[float] = None
    # longest answer to a choice request; generation requests carry their own max_tokens
    max_tokens: int = 16
    # log-probs of this many alternatives per position (openai); 0 turns log-probs off
    top_logprobs: int = 20
    # answers drawn per choice request when no log-probs are available (empirical probability)
    n_samples: int = 1
    # requests in flight at once
    max_concurrency: int = 8
    # requests and tokens per minute (token buckets); None: unlimited
    rpm: Optional[float] = None
    tpm: Optional[float] = None
    # the buckets hold this many seconds of rpm/tpm: the largest burst
    burst_s: float = 1.0
    # retries after a 429, 408, 409, 5xx, timeout or connection error (attempts = max_retries + 1)
    max_retries: int = 5
    # retries after a malformed response body
    malformed_retries: int = 2
    # per-request timeout, seconds
    timeout_s: float = 60.0
    # exponential backoff with full jitter: uniform(0, min(backoff_max_s, backoff_base_s * 2**n))
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # persistent SQLite cache of answers; None path: the caller's, else ~/.cache/cai/judge_cache.sqlite
    cache: bool = True
    cache_path: Optional[str] = None
    # dollar cap for this judge (and its fallback); None: no cap
    max_dollars: Optional[float] = None
    # {model: {input_per_mtok, output_per_mtok}}; a model without a price costs 0. Typed loosely
    # (mappings, or PriceConfig) so a command line can add a model's price
    # ('+judge.prices.gpt-4o={input_per_mtok:2.5,output_per_mtok:10}'); coerce_config checks each
    # entry and turns it into a PriceConfig
    prices: Dict[str, Any] = field(default_factory=dict)
    # name of another judge config tried for requests this one failed
    fallback: Optional[str] = None
    # bumped by a stage when its prompt template changes (a request tag may override it)
    template_version: str = "v1"
    # seeds the retry jitter (and nothing the answers depend on)
    seed: int = 0
    # hf backend only: where the local model runs: auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:1 | mps
    device: str = "auto"
    # hf backend only: weights dtype: auto (bfloat16 on CUDA, float32 elsewhere) | float32 | bfloat16 |
    # float16; it changes the answers, so a value other than auto is part of the artifact keys
    dtype: str = "auto"
    # hf backend only: rows per forward pass; None: the asking stage's own setting
    # (labels.hf_batch_size, eval.hf_batch_size; 16 outside a stage)
    batch_size: Optional[int] = None


_POSITIVE_INT = ("max_tokens", "n_samples", "max_concurrency")
_NON_NEGATIVE_INT = ("top_logprobs", "max_retries", "malformed_retries")
_POSITIVE_FLOAT = ("timeout_s", "burst_s")
_NON_NEGATIVE_FLOAT = ("temperature", "backoff_base_s", "backoff_max_s")
_OPTIONAL_POSITIVE = ("rpm", "tpm", "max_dollars")


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, JudgeConfig):
        return dataclasses.asdict(obj)
    try:  # a DictConfig (structured or not)
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(obj, Mapping):
        raise ConfigError(f"judge config must be a mapping or JudgeConfig, got {type(obj).__name__}")
    return dict(obj)


def _check_number(where: str, name: str, value: Any, kind: type, minimum: float, strict: bool) -> None:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    bound_ok = ok_type and (value > minimum if strict else value >= minimum)
    if not bound_ok:
        rel = ">" if strict else ">="
        raise ConfigError(f"{where}: field '{name}' must be {kind.__name__} {rel} {minimum}, got {value!r}")


def _coerce_prices(where: str, raw: Any) -> dict[str, PriceConfig]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: field 'prices' must map model name -> {{input_per_mtok, output_per_mtok}}")
    out = {}
    for model, p in raw.items():
        if isinstance(p, PriceConfig):
            p = dataclasses.asdict(p)
        if not isinstance(p, Mapping) or set(p) - {"input_per_mtok", "output_per_mtok"}:
            raise ConfigError(
                f"{where}: prices[{model!r}] must have only input_per_mtok and output_per_mtok, got {p!r}"
            )
        price = PriceConfig(**p)
        for k in ("input_per_mtok", "output_per_mtok"):
            _check_number(where, f"prices.{model}.{k}", getattr(price, k), float, 0.0, strict=False)
        out[str(model)] = price
    return out


def coerce_config(obj: Any, where: str = "judge") -> JudgeConfig:
    """A validated :class:`JudgeConfig` from a dataclass, ``DictConfig`` or mapping.

    ``where`` names the config in messages (e.g. ``"judge"`` or ``"judges.claude"``).
    """
    raw = _as_dict(obj)
    known = {f.name for f in dataclasses.fields(JudgeConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    raw["prices"] = _coerce_prices(where, raw.get("prices"))
    cfg = JudgeConfig(**raw)
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"{where}: field 'backend' must be one of {BACKENDS}, got {cfg.backend!r}")
    if not isinstance(cfg.model, str) or not cfg.model.strip():
        raise ConfigError(f"{where}: field 'model' must name the judge model, got {cfg.model!r}")
    for name in _POSITIVE_INT:
        _check_number(where, name, getattr(cfg, name), int, 0, strict=True)
    for name in _NON_NEGATIVE_INT:
        _check_number(where, name, getattr(cfg, name), int, 0, strict=False)
    for name in _POSITIVE_FLOAT:
        _check_number(where, name, getattr(cfg, name), float, 0.0, strict=True)
    for name in _NON_NEGATIVE_FLOAT:
        _check_number(where, name, getattr(cfg, name), float, 0.0, strict=False)
    for name in _OPTIONAL_POSITIVE:
        if getattr(cfg, name) is not None:
            _check_number(where, name, getattr(cfg, name), float, 0.0, strict=True)
    if cfg.top_p is not None:
        _check_number(where, "top_p", cfg.top_p, float, 0.0, strict=True)
    if cfg.base_url is not None and not str(cfg.base_url).startswith(("http://", "https://")):
        raise ConfigError(f"{where}: field 'base_url' must start with http:// or https://, got {cfg.base_url!r}")
    _check_local(where, cfg)
    if cfg.max_dollars is not None and cfg.backend != "hf" and cfg.model not in cfg.prices:
        raise ConfigError(
            f"{where}: max_dollars is set but 'prices' has no entry for model {cfg.model!r}; "
            "add prices: {<model>: {input_per_mtok: ..., output_per_mtok: ...}}"
        )
    return cfg


def _check_local(where: str, cfg: JudgeConfig) -> None:
    """The settings of a local (hf) judge's model: valid values, and set only for that backend."""
    if cfg.dtype not in HF_DTYPES:
        raise ConfigError(f"{where}: field 'dtype' must be one of {HF_DTYPES}, got {cfg.dtype!r}")
    if not isinstance(cfg.device, str) or not _DEVICE.match(cfg.device):
        raise ConfigError(f"{where}: field 'device' must be auto or a torch device (cpu, cuda, cuda:1, mps), "
                          f"got {cfg.device!r}")
    if cfg.batch_size is not None:
        _check_number(where, "batch_size", cfg.batch_size, int, 0, strict=True)
    changed = [f"{k}={getattr(cfg, k)!r}" for k, default in _LOCAL_DEFAULTS.items() if getattr(cfg, k) != default]
    if changed and cfg.backend != "hf":
        raise ConfigError(f"{where}: {', '.join(changed)}: these fields place a local model (backend hf); "
                          f"backend {cfg.backend!r} runs its model on the server (set them there)")


def open_price_tables(schema: Any) -> None:
    """Let overrides add models to the ``prices`` of every judge config in ``schema`` (a ``DictConfig``).

    Hydra composes in struct mode, where an override cannot add a key the schema does not list,
    and a price table's keys are model names no schema can list: so ``judge.prices={gpt-4o: {...}}``
    would fail. Each :class:`JudgeConfig` node's ``prices`` is marked non-struct instead (the rest
    of the judge stays strict); :func:`coerce_config` checks every entry, naming model and field.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(schema, DictConfig):
        return
    if OmegaConf.get_type(schema) is JudgeConfig:
        OmegaConf.set_struct(schema.prices, False)
        return
    for key in list(schema.keys()):
        open_price_tables(OmegaConf.select(schema, str(key), throw_on_missing=False,
                                           throw_on_resolution_failure=False))


def judge_key(judge: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a judge config (a plain mapping) that changes its answers: what an artifact
    key holds. :data:`SEMANTIC_FIELDS` always; :data:`SEMANTIC_UNLESS_DEFAULT` fields only when
    they differ from their default."""
    key = {k: judge.get(k) for k in SEMANTIC_FIELDS}
    key.update({k: judge[k] for k, default in SEMANTIC_UNLESS_DEFAULT.items() if judge.get(k, default) != default})
    return key


def judge_runtime(judge: Mapping[str, Any]) -> dict[str, Any]:
    """The rest of a judge config: how fast, where and at what cost it runs (never in a key).
    ``{**judge_key(j), **judge_runtime(j)}`` gives back every field of ``j`` not at an omitted default."""
    return {k: v for k, v in judge.items() if k not in SEMANTIC_FIELDS and k not in SEMANTIC_UNLESS_DEFAULT}


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

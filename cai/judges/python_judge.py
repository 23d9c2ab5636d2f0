"""The ``python`` judge: a Python callable answers the judge's requests (a scripted, rule-based judge).

``backend: python`` with ``model: "package.module:function"`` makes that function the judge.
It is called once per request with the request itself and answers

- a :class:`~cai.judges.types.ChoiceRequest` with a mapping ``{choice: weight}`` (weights >= 0
  over the request's own choices, at least one > 0; they are normalised to probabilities) or
  with one of the choices (probability 1);
- a :class:`~cai.judges.types.GenerateRequest` with a string (a critique, a revision, an answer);
- either with ``None`` when it has no answer: the result fails with reason
  ``"unparseable: the rule gave no answer"`` (a final failure, like a model's unparseable answer,
  counted and never retried as if the judge were down).

The request carries everything the other backends see: ``messages`` (the rendered judge prompt,
readable back into its blocks with :func:`cai.judges.templates.parse_prompt`), ``choices`` and
``tag`` (``stage``, ``kind``, ``principle_id``, ``order``...). A rule that raises stops the stage
with a :class:`~cai.errors.DataError` naming the callable and the request's tag.

Such a judge is deterministic and free (cost 0, no tokens counted), and it is cached like the
others: the answers go to the same :class:`~cai.judges.cache.JudgeCache`, keyed by the callable's
name and :func:`source_digest` -- a SHA-256 over the source file of the module that defines it and
those of the modules of the same package it imports directly (:func:`rule_files`) -- so editing the
rule or its helpers is a new cache key and, through the pipeline, a new artifact key for every stage
that asks the judge. (A helper two imports away, or data the rule reads from a file, is not
hashed: after changing those, edit a hashed file too, a comment will do.) Imported only when asked
for: the pipeline checks ``model`` when the run is planned (:func:`load_callable`), naming the
config path.

Useful for a task whose truth is known (the offline quickstart's courteous-vs-rude rule,
:mod:`cai.testing.preference_task`), rule-based constitutions, verifiable rewards and tests.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cai.config import JudgeConfig
from cai.errors import ConfigError, DataError
from cai.hashing import file_digest, text_hash
from cai.judges.cache import JudgeCache, call_key
from cai.judges.config import default_cache_path
from cai.judges.cost import CostLedger, estimate_tokens
from cai.judges.registry import register_backend
from cai.judges.types import (
    FAILED,
    OK,
    ChoiceRequest,
    ChoiceResult,
    GenerateRequest,
    GenerateResult,
    SyncJudgeMixin,
)

NO_ANSWER = "unparseable: the rule gave no answer"


def load_callable(spec: str, where: str = "judge.model") -> Callable[[Any], Any]:
    """The callable ``"module:function"`` names (``function`` may be dotted: ``Class.method``).

    Raises :class:`ConfigError` naming ``where`` when the spec is malformed, the module does not
    import, the attribute is missing or is not callable."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ConfigError(f"{where}: backend python needs 'module:function' (e.g. "
                          f"cai.testing.preference_judges:judge), got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name.strip())
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r} of {spec!r} ({exc}); is it installed "
                          "or on PYTHONPATH?") from exc
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return file_digest(path)[0]


def _source_file(module: Any) -> Path | None:
    path = getattr(module, "__file__", None)
    return Path(path).resolve() if path and Path(path).is_file() and str(path).endswith(".py") else None


def rule_files(fn: Callable[[Any], Any]) -> list[Path]:
    """The source files a rule's answers depend on, as far as a hash can tell: the file of the
    module defining ``fn`` and of every module of the same top-level package it imports directly
    (``from mytask.rules import score`` in ``mytask/judges.py`` brings in ``mytask/rules.py``)."""
    target = inspect.unwrap(fn)
    name = getattr(target, "__module__", "") or ""
    module = sys.modules.get(name)
    own = _source_file(module) if module is not None else None
    if own is None:
        return []
    top = name.split(".")[0]
    files = {own}
    for value in vars(module).values():
        dep = value if inspect.ismodule(value) else sys.modules.get(getattr(value, "__module__", None) or "")
        dep_name = getattr(dep, "__name__", "") or ""
        if dep is not None and dep_name.split(".")[0] == top:
            path = _source_file(dep)
            if path is not None:
                files.add(path)
    return sorted(files)


def source_digest(spec: str, where: str = "judge.model") -> str:
    """SHA-256 over the source files of :func:`rule_files` (so an edit to the rule, a helper in its
    module or a module of its package it imports changes the digest); for a callable without a
    source file (built in, made at run time), a hash of its qualified name and of
    ``inspect.getsource`` where available."""
    fn = load_callable(spec, where)
    files = rule_files(fn)
    if files:
        parts = []
        for path in files:
            st = path.stat()
            parts += [path.name, _file_digest(str(path), st.st_mtime_ns, st.st_size)]
        return text_hash(*parts, length=64)
    target = inspect.unwrap(fn)
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        source = ""
    return text_hash(getattr(target, "__qualname__", repr(target)), source, length=64)


def _probs(answer: Any, choices: tuple[str, ...]) -> dict[str, float]:
    """The normalised probabilities of a rule's answer to a choice request (raises ValueError)."""
    if isinstance(answer, str):
        if answer not in choices:
            raise ValueError(f"answered {answer!r}, which is not one of the choices {list(choices)}")
        return {c: float(c == answer) for c in choices}
    if not isinstance(answer, Mapping):
        raise ValueError(f"answered a {type(answer).__name__}; expected a choice or a mapping choice -> weight")
    extra = sorted(set(map(str, answer)) - set(choices))
    if extra:
        raise ValueError(f"answered weights for {extra}, which are not among the choices {list(choices)}")
    weights = {}
    for c in choices:
        w = answer.get(c, 0.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of {c!r} must be a finite number >= 0, got {w!r}")
        weights[c] = float(w)
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"every weight is 0 ({dict(answer)!r}); answer None when the rule has no answer")
    return {c: w / total for c, w in weights.items()}


class PythonJudge(SyncJudgeMixin):
    """A Python callable as judge (see the module docstring)."""

    name = "python"

    def __init__(self, cfg: JudgeConfig, *, ledger: CostLedger | None = None,
                 cache_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.model = cfg.model
        self.fn = load_callable(cfg.model)
        self.digest = source_digest(cfg.model)
        self.ledger = ledger if ledger is not None else CostLedger(cfg.prices, cfg.max_dollars)
        path = cfg.cache_path or cache_path or default_cache_path()
        self.cache = JudgeCache(path) if cfg.cache else None
        self.stats = {"calls": 0}

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def _key(self, kind: str, req: ChoiceRequest | GenerateRequest, params: dict[str, Any]) -> str:
        return call_key(kind=kind, backend=self.name, model=self.model, base_url=None,
                        params={"source": self.digest, **params},
                        template_version=str(req.tag.get("template_version", self.cfg.template_version)),
                        messages=req.messages, choices=getattr(req, "choices", None),
                        n_samples=1 if kind == "choice" else None)

    def _call(self, req: ChoiceRequest | GenerateRequest) -> Any:
        self.stats["calls"] += 1
        try:
            return self.fn(req)
        except Exception as exc:  # a bug in the rule: stop the stage, saying whose and where
            raise DataError(f"judge {self.model!r} (backend python) raised {type(exc).__name__}: {exc} "
                            f"on the request tagged {_tag_text(req)}") from exc

    def _answer(self, key: str, req: ChoiceRequest | GenerateRequest, field: str,
                produce: Callable[[], Any]) -> tuple[Any, int, bool]:
        """The cached ``field`` under ``key``, else ``produce()`` (cached unless None), with the
        ledger told either way; returns (answer or None, estimated tokens in, whether cached)."""
        tokens_in = estimate_tokens(req.messages)
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            self.ledger.record_cache_hit(req.tag, tokens_in, 0)
            answer = hit[field]
        else:
            answer = produce()
            if answer is not None and self.cache is not None:
                self.cache.put(key, {field: answer})
            self.ledger.record_call(req.tag, tokens_in, 0, 0.0)
        self.ledger.record_result(req.tag, answer is not None)
        return answer, tokens_in, hit is not None

    # ---- choices ----------------------------------------------------------------------------
    async def choose_many(self, reqs: list[ChoiceRequest], progress: bool = False) -> list[ChoiceResult]:
        return await asyncio.to_thread(lambda: [self._choose(r) for r in reqs])

    def _choose(self, req: ChoiceRequest) -> ChoiceResult:
        t0 = time.monotonic()

        def produce() -> dict[str, float] | None:
            answer = self._call(req)
            if answer is None:
                return None
            try:
                return _probs(answer, req.choices)
            except ValueError as exc:
                raise DataError(f"judge {self.model!r} (backend python) {exc} (request tagged "
                                f"{_tag_text(req)})") from None

        probs, tokens_in, cached = self._answer(self._key("choice", req, {}), req, "probs", produce)
        ok = probs is not None
        return ChoiceResult(
            probs=dict(probs) if ok else None, method="rule" if ok else "", status=OK if ok else FAILED,
            failure_reason=None if ok else NO_ANSWER, raw_output=json.dumps(probs, sort_keys=True) if ok else "",
            tokens_in=tokens_in, tokens_out=0, cost_usd=0.0, latency_s=time.monotonic() - t0,
            cache_hit=cached, attempts=0 if cached else 1, model=self.model, backend=self.name,
            tag=dict(req.tag), n_answers=int(ok),
        )

    # ---- generation -------------------------------------------------------------------------
    async def generate_many(self, reqs: list[GenerateRequest], progress: bool = False) -> list[GenerateResult]:
        return await asyncio.to_thread(lambda: [self._generate(r) for r in reqs])

    def _generate(self, req: GenerateRequest) -> GenerateResult:
        t0 = time.monotonic()
        params = {"max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                  "stop": list(req.stop) if req.stop else None, "seed": req.seed}

        def produce() -> str | None:
            text = self._call(req)
            if text is not None and not isinstance(text, str):
                raise DataError(f"judge {self.model!r} (backend python) answered a generation request with a "
                                f"{type(text).__name__}, expected a string or None (request tagged "
                                f"{_tag_text(req)})")
            return text

        text, tokens_in, cached = self._answer(self._key("generate", req, params), req, "text", produce)
        ok = text is not None
        return GenerateResult(
            text=text, status=OK if ok else FAILED, failure_reason=None if ok else NO_ANSWER,
            finish_reason="stop" if ok else None, tokens_in=tokens_in, tokens_out=0, cost_usd=0.0,
            latency_s=time.monotonic() - t0, cache_hit=cached, attempts=0 if cached else 1,
            model=self.model, backend=self.name, tag=dict(req.tag),
        )


def _tag_text(req: ChoiceRequest | GenerateRequest) -> str:
    return json.dumps(req.tag, sort_keys=True, default=str)


def _python_factory(cfg: JudgeConfig, *, ledger: CostLedger, cache_path: str | Path | None) -> PythonJudge:
    return PythonJudge(cfg, ledger=ledger, cache_path=cache_path)


register_backend("python", _python_factory)

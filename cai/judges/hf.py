"""The local ``hf`` judge: a transformers causal LM that answers choices by log-prob scoring.

``choose_many`` never generates. Each request's messages are rendered with
:func:`cai.models.format_prompt` (the tokenizer's chat template, or the HH transcript format),
and the probability of each choice is read from the model's next-token distribution:

1. **Which tokens spell a choice.** A choice ``c`` is scored in two spellings, ``c`` and
   ``" c"``, each tokenized *as it would continue this prompt* (the prompt's tail plus the
   spelling, minus the tail's own tokens). A chat template ending in a newline makes ``"A"``
   likely; the HH format (``...\\n\\nAssistant:``) makes ``" A"`` likely; summing both spellings
   means neither habit is penalised. (Other spellings -- ``"(A"``, ``"\\nA"`` -- are not scored.)
2. **Multi-token spellings are exact.** The spellings form a prefix tree. The model's
   distribution is needed at the root (the prompt) and at every inner node (the prompt plus the
   node's tokens). One row per longest path of inner nodes gives them all -- its last positions
   hold the distribution after each prefix of the path -- so a tokenizer that splits ``" A"``
   into ``" "`` + ``"A"`` costs no extra row, and a 1-10 scale whose ``"10"`` is ``"1" "0"`` one
   more. ``P(spelling)`` is the product of the token probabilities along its path times the
   probability of *stopping* there (one minus the mass of the tokens that would continue into a
   longer choice), so ``"1"`` and ``"10"`` are told apart.
3. **Renormalise** over the choices: ``probs``, method ``"logprobs"``. ``raw_output`` records
   how much of the model's probability the choices covered (``choice_mass``): a judge putting
   little mass on any choice is not following the instruction.

Rows are left-padded with ``position_ids = cumsum(mask) - 1`` and sorted by length into chunks
of ``batch_size`` rows (one forward each), so a request scores the same in any batch as alone
(float noise aside: within 1e-5 in float32). Everything a call gets is batched together: the two
orders of a pair land in the same forward pass. A prompt longer than the model's positions is
cut from the left (the candidates and the answer instruction are at the end), counted in
``stats["prompts_truncated"]`` and recorded in the result's ``raw_output``.

``generate_many`` goes through :class:`cai.sampling.SamplingEngine`: greedy requests are batched
(greedy output does not depend on the batch); sampled requests run one per engine call with a
seed derived from the request's ``seed`` and messages, so a sample never depends on which other
requests were pending (a resumed run draws what an uninterrupted one would). In HH format
``"\\n\\nHuman:"`` is added as a stop string.

Where and how the model runs comes from the judge config: ``device`` and ``batch_size`` (run
time only: they do not change an answer beyond float noise) and ``dtype`` (it does: the resolved
dtype is part of every cache key, and a non-default one of every artifact key, see
:func:`~cai.judges.config.judge_key`).

Answers are cached in the same :class:`~cai.judges.cache.JudgeCache` as the API judges
(the same key scheme; ``backend="hf"``), tokens are counted, the cost is 0. The model is loaded
on first use, so a run answered entirely from the cache never loads it. ``model: tiny`` is
resolved by the pipeline to the tiny policy artifact; outside the pipeline pass a directory.
A GGUF checkpoint is ``model: <its folder>`` plus ``gguf_file: <file name>`` (the
``judge=gemma3_270m_gguf`` preset); it is dequantised once into the artifact store and the copy
is what later loads read (:func:`cai.models.dequantized_spec`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.config import JudgeConfig
from cai.errors import ConfigError
from cai.hashing import stable_hash
from cai.judges.cache import JudgeCache, call_key
from cai.judges.config import default_cache_path
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

SCORING = "logprob-prefix-tree/1"  # part of the cache key: bump when the scoring rule changes
SPELLINGS = ("", " ")  # prefixes of the scored spellings of each choice
TAIL_CHARS = 64  # prompt tail used to tokenize a spelling in context
HH_STOP = "\n\nHuman:"
DEFAULT_BATCH_SIZE = 16  # rows per forward when neither the config nor the asking stage sets one

Prefix = tuple[int, ...]


@dataclass
class _Tree:
    """The spellings of one request's choices as a prefix tree of token ids."""

    children: dict[Prefix, set[int]] = field(default_factory=dict)  # inner node -> next tokens
    ends: dict[Prefix, str] = field(default_factory=dict)  # a full spelling -> its choice
    depth: int = 0

    def add(self, seq: Sequence[int], choice: str) -> None:
        seq = tuple(seq)
        for d in range(len(seq)):
            self.children.setdefault(seq[:d], set()).add(seq[d])
        other = self.ends.get(seq)
        if other is not None and other != choice:
            raise ConfigError(f"hf judge: choices {other!r} and {choice!r} tokenize identically ({list(seq)})")
        self.ends[seq] = choice
        self.depth = max(self.depth, len(seq))

    def paths(self) -> list[Prefix]:
        """The fewest token paths whose prefixes are every inner node: one forward row each
        (a row's last positions give the distributions after each prefix of its path)."""
        out: list[Prefix] = []
        for node in sorted(self.children, key=len, reverse=True):
            if not any(path[: len(node)] == node for path in out):
                out.append(node)
        return out


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def choice_probs(
    tree: _Tree, logprobs: dict[Prefix, dict[int, float]], choices: Sequence[str]
) -> tuple[dict[str, float] | None, float]:
    """``(probs over choices, mass the choices had)`` from next-token log-probs at each inner node;
    probs is None when no choice has any probability (never a uniform guess)."""
    per_choice: dict[str, list[float]] = {c: [] for c in choices}
    for seq, choice in tree.ends.items():
        reach = sum(logprobs[seq[:d]][seq[d]] for d in range(len(seq)))
        if seq in tree.children:  # a longer choice continues from here: only the stopping mass
            cont = sum(math.exp(logprobs[seq][t]) for t in tree.children[seq])
            reach += math.log(max(1.0 - cont, 1e-300))
        per_choice[choice].append(reach)
    logmass = {c: _logsumexp(v) if v else -math.inf for c, v in per_choice.items()}
    total = _logsumexp(list(logmass.values()))
    if total == -math.inf:
        return None, 0.0
    return {c: math.exp(v - total) for c, v in logmass.items()}, math.exp(total)


class HFJudge(SyncJudgeMixin):
    """A local causal LM as judge (see the module docstring)."""

    name = "hf"

    def __init__(
        self,
        cfg: JudgeConfig,
        *,
        ledger: CostLedger | None = None,
        cache_path: str | Path | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        chat_format: str = "auto",
    ) -> None:
        """``batch_size``, ``device``, ``dtype``: override the config's (``None``: ``cfg.batch_size``
        or :data:`DEFAULT_BATCH_SIZE`, ``cfg.device``, ``cfg.dtype``)."""
        from cai.models import ModelSpec

        if cfg.model == "tiny":
            raise ConfigError(
                "judge.model 'tiny' means the tiny policy model the pipeline builds; outside the pipeline "
                "give the hf judge a model directory or hub name"
            )
        self.cfg = cfg
        self.model = cfg.model
        self.spec = ModelSpec(cfg.model, gguf_file=cfg.gguf_file, dtype=dtype or cfg.dtype, device=device or cfg.device,
                              chat_format=chat_format)
        self.batch_size = batch_size or cfg.batch_size or DEFAULT_BATCH_SIZE
        self.ledger = ledger if ledger is not None else CostLedger(cfg.prices, cfg.max_dollars)
        path = cfg.cache_path or cache_path or default_cache_path()
        self.cache = JudgeCache(path) if cfg.cache else None
        self.stats = {"model_loads": 0, "forward_passes": 0, "rows": 0, "prompts_truncated": 0,
                      "generate_calls": 0}
        self._lm: Any = None
        self._tok: Any = None
        self._engine: Any = None
        self._keep_logits = False  # the model computes logits at the last positions only on request
        self._key_params: dict[str, Any] | None = None
        self._spellings: dict[tuple[str, tuple[str, ...]], list[tuple[list[int], str]]] = {}

    # ---- model ----------------------------------------------------------------------------
    def _load(self) -> None:
        if self._lm is not None:
            return
        from cai.models import load_causal_lm
        from cai.sampling import SamplingEngine

        t0 = time.monotonic()
        self._lm, self._tok = load_causal_lm(self.spec)
        self._lm.eval()
        self._engine = SamplingEngine(self._lm, self._tok, batch_size=self.batch_size)
        base = self._lm.get_base_model() if hasattr(self._lm, "get_base_model") else self._lm
        self._keep_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.stats["model_loads"] += 1
        log.info("hf judge: loaded %s in %.1fs", self.model, time.monotonic() - t0)

    def _params(self) -> dict[str, Any]:
        """What the answers depend on besides model and messages (part of every cache key)."""
        if self._key_params is None:
            from cai.models import resolve_dtype

            self._key_params = {"scoring": SCORING, "spellings": list(SPELLINGS), "chat_format": self.spec.chat_format,
                                "dtype": str(resolve_dtype(self.spec)).replace("torch.", "")}
            if self.spec.gguf_file:  # two GGUF files of one folder answer differently
                self._key_params["gguf_file"] = self.spec.gguf_file
        return self._key_params

    def _template_version(self, tag: dict) -> str:
        return str(tag.get("template_version", self.cfg.template_version))

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self._lm = self._tok = self._engine = None

    # ---- choices ----------------------------------------------------------------------------
    async def choose_many(self, reqs: list[ChoiceRequest], progress: bool = False) -> list[ChoiceResult]:
        return await asyncio.to_thread(self._choose_sync, list(reqs), progress)

    def _choice_key(self, req: ChoiceRequest) -> str:
        return call_key(kind="choice", backend=self.name, model=self.model, base_url=None, params=self._params(),
                        template_version=self._template_version(req.tag), messages=req.messages,
                        choices=req.choices, n_samples=1, sample_index=0)

    def _choose_sync(self, reqs: list[ChoiceRequest], progress: bool) -> list[ChoiceResult]:
        t0 = time.monotonic()
        results: list[ChoiceResult | None] = [None] * len(reqs)
        keys = [self._choice_key(r) for r in reqs]
        todo = []
        for i, (req, key) in enumerate(zip(reqs, keys)):
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is None:
                todo.append(i)
                continue
            self.ledger.record_cache_hit(req.tag, hit["tokens_in"], 0)
            results[i] = self._choice_result(req, hit, cached=True, latency=0.0)
        if todo:
            answers = self._score([reqs[i] for i in todo], progress)
            latency = (time.monotonic() - t0) / len(todo)
            for i, answer in zip(todo, answers):
                if answer.get("probs") is not None and self.cache is not None:
                    self.cache.put(keys[i], answer)
                self.ledger.record_call(reqs[i].tag, answer["tokens_in"], 0, 0.0)
                results[i] = self._choice_result(reqs[i], answer, cached=False, latency=latency)
        return results  # type: ignore[return-value]

    def _choice_result(self, req: ChoiceRequest, answer: dict, cached: bool, latency: float) -> ChoiceResult:
        ok = answer.get("probs") is not None
        self.ledger.record_result(req.tag, ok)
        raw = {k: answer[k] for k in ("choice_mass", "prompt_tokens", "truncated_tokens") if k in answer}
        return ChoiceResult(
            probs=dict(answer["probs"]) if ok else None, method="logprobs" if ok else "", status=OK if ok else FAILED,
            failure_reason=None if ok else answer["failure"], raw_output=json.dumps(raw, sort_keys=True),
            tokens_in=answer["tokens_in"], tokens_out=0, cost_usd=0.0, latency_s=latency, cache_hit=cached,
            attempts=0 if cached else 1, model=self.model, backend=self.name, tag=dict(req.tag),
            n_answers=int(ok),
        )

    def _spell(self, prompt: str, choices: tuple[str, ...]) -> list[tuple[list[int], str]]:
        """Token ids of each spelling of each choice as it continues ``prompt``."""
        tail = prompt[-TAIL_CHARS:]
        cached = self._spellings.get((tail, choices))
        if cached is not None:
            return cached
        tok = self._tok
        base = tok(tail, add_special_tokens=False)["input_ids"]
        out = []
        for choice in choices:
            for pre in SPELLINGS:
                full = tok(tail + pre + choice, add_special_tokens=False)["input_ids"]
                seq = full[len(base):] if full[: len(base)] == base else []
                if not seq:  # the spelling merged into the tail: score it tokenized on its own
                    seq = tok(pre + choice, add_special_tokens=False)["input_ids"]
                if seq:
                    out.append((list(seq), choice))
        self._spellings[(tail, choices)] = out
        return out

    def _encode(self, texts: list[str], reserve: list[int]) -> tuple[list[list[int]], list[int]]:
        """Prompt token ids (BOS as the sampling engine adds it), left-cut to fit; cut counts."""
        bos = self._tok.bos_token
        ids, cut = [], []
        limit = self._engine.max_positions
        for text, res in zip(texts, reserve):
            # verbose=False: no "longer than the maximum" warning for a prompt that is cut just below
            row = self._tok(text, add_special_tokens=not (bos and text.startswith(bos)), verbose=False)["input_ids"]
            row = list(row) or [self._engine.start_id]
            budget = (limit - res) if limit else len(row)
            over = max(0, len(row) - budget)
            ids.append(row[over:] if budget > 0 else [])
            cut.append(over)
        return ids, cut

    def _score(self, reqs: list[ChoiceRequest], progress: bool) -> list[dict]:
        from cai.models import format_prompt

        self._load()
        texts = [format_prompt(self._tok, r.messages, self.spec.chat_format) for r in reqs]
        trees = []
        for text, req in zip(texts, reqs):
            tree = _Tree()
            for seq, choice in self._spell(text, req.choices):
                tree.add(seq, choice)
            trees.append(tree)
        ids, cut = self._encode(texts, [t.depth for t in trees])
        rows = [(i, path) for i, tree in enumerate(trees) if ids[i] for path in tree.paths()]
        dists = self._forward([ids[i] + list(path) for i, path in rows], [len(path) for _, path in rows], progress)
        logprobs: list[dict[Prefix, dict[int, float]]] = [{} for _ in reqs]
        for (i, path), dist in zip(rows, dists):
            for d in range(len(path) + 1):  # position d: the distribution after path[:d]
                prefix = path[:d]
                if prefix in trees[i].children and prefix not in logprobs[i]:
                    logprobs[i][prefix] = {t: float(dist[d, t]) for t in trees[i].children[prefix]}
        answers = []
        for i, req in enumerate(reqs):
            answer: dict[str, Any] = {"tokens_in": len(ids[i]), "prompt_tokens": len(ids[i]) + cut[i],
                                      "truncated_tokens": cut[i]}
            if cut[i]:
                self.stats["prompts_truncated"] += 1
            if not ids[i]:
                answer.update(probs=None,
                              failure=f"prompt does not fit the model's {self._engine.max_positions} positions")
            else:
                probs, mass = choice_probs(trees[i], logprobs[i], req.choices)
                answer.update(probs=probs, choice_mass=mass)
                if probs is None:
                    answer["failure"] = "unparseable: the model gives no probability to any choice"
            answers.append(answer)
        if any(cut):
            log.warning("hf judge: %d of %d prompts were cut from the left to fit the model", sum(1 for c in cut if c),
                        len(reqs))
        return answers

    def _forward(self, seqs: list[list[int]], tails: list[int], progress: bool) -> list[Any]:
        """Next-token log-probs (float32, on CPU) at the last ``tail + 1`` positions of each
        sequence (row ``d``: after all but the last ``tail - d`` tokens); batched, left-padded."""
        import torch
        from tqdm.auto import tqdm

        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[Any] = [None] * len(seqs)
        device = self._engine.device
        pad = self._engine.pad_id
        bar = tqdm(total=len(seqs), desc=f"hf judge {Path(self.model).name}", unit="row", disable=not progress)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                width = max(len(seqs[i]) for i in chunk)
                input_ids = torch.tensor([[pad] * (width - len(seqs[i])) + seqs[i] for i in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(seqs[i])) + [1] * len(seqs[i]) for i in chunk], device=device)
                position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
                keep = max(tails[i] for i in chunk) + 1
                kw = {"logits_to_keep": keep} if self._keep_logits else {}
                logits = self._lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                  use_cache=False, **kw).logits[:, -keep:]
                lp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for row, i in enumerate(chunk):
                    out[i] = lp[row, keep - 1 - tails[i] :]
                self.stats["forward_passes"] += 1
                self.stats["rows"] += len(chunk)
                bar.update(len(chunk))
        bar.close()
        return out

    # ---- generation -------------------------------------------------------------------------
    async def generate_many(self, reqs: list[GenerateRequest], progress: bool = False) -> list[GenerateResult]:
        return await asyncio.to_thread(self._generate_sync, list(reqs), progress)

    @staticmethod
    def _gen_params(req: GenerateRequest) -> dict[str, Any]:
        return {"max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "stop": list(req.stop) if req.stop else None, "seed": req.seed}

    def _generate_sync(self, reqs: list[GenerateRequest], progress: bool) -> list[GenerateResult]:
        t0 = time.monotonic()
        results: list[GenerateResult | None] = [None] * len(reqs)
        keys = [
            call_key(kind="generate", backend=self.name, model=self.model, base_url=None,
                     params={**self._gen_params(r), **self._params()},
                     template_version=self._template_version(r.tag), messages=r.messages)
            for r in reqs
        ]
        todo = []
        for i, (req, key) in enumerate(zip(reqs, keys)):
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is None:
                todo.append(i)
            else:
                self.ledger.record_cache_hit(req.tag, hit["tokens_in"], hit["tokens_out"])
                results[i] = self._gen_result(req, hit, cached=True, latency=0.0)
        if todo:
            answers = self._sample([reqs[i] for i in todo], progress)
            latency = (time.monotonic() - t0) / len(todo)
            for i, answer in zip(todo, answers):
                if self.cache is not None:
                    self.cache.put(keys[i], answer)
                self.ledger.record_call(reqs[i].tag, answer["tokens_in"], answer["tokens_out"], 0.0)
                results[i] = self._gen_result(reqs[i], answer, cached=False, latency=latency)
        return results  # type: ignore[return-value]

    def _gen_result(self, req: GenerateRequest, answer: dict, cached: bool, latency: float) -> GenerateResult:
        self.ledger.record_result(req.tag, True)
        return GenerateResult(
            text=answer["text"], status=OK, failure_reason=None, finish_reason=answer["finish_reason"],
            tokens_in=answer["tokens_in"], tokens_out=answer["tokens_out"], cost_usd=0.0, latency_s=latency,
            cache_hit=cached, attempts=0 if cached else 1, model=self.model, backend=self.name, tag=dict(req.tag),
        )

    def _sample(self, reqs: list[GenerateRequest], progress: bool) -> list[dict]:
        from cai.models import format_prompt, resolve_chat_format
        from cai.sampling import SamplingParams

        self._load()
        self._engine.batch_size = self.batch_size
        hh = resolve_chat_format(self._tok, self.spec.chat_format) == "hh"
        texts = [format_prompt(self._tok, r.messages, self.spec.chat_format) for r in reqs]
        params: list[SamplingParams] = []
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            stop = tuple(dict.fromkeys([*(r.stop or ()), *([HH_STOP] if hh else [])]))
            seed = 0 if r.temperature == 0 else int(stable_hash([r.seed, r.messages])[:15], 16)
            params.append(SamplingParams(max_new_tokens=r.max_tokens, temperature=r.temperature,
                                         top_p=r.top_p if r.top_p is not None else 1.0, stop=stop, seed=seed))
            # greedy requests with equal settings share a batch; a sampled one runs alone
            group = json.dumps([r.max_tokens, r.top_p, list(stop)]) if r.temperature == 0 else f"sampled-{i}"
            groups.setdefault(group, []).append(i)
        answers: list[dict | None] = [None] * len(reqs)
        for members in groups.values():
            comps = self._engine.generate([texts[i] for i in members], params[members[0]], progress=progress)
            self.stats["generate_calls"] += 1
            for i, c in zip(members, comps):
                answers[i] = {"text": c.text, "finish_reason": c.finish_reason, "tokens_in": c.prompt_tokens,
                              "tokens_out": len(c.token_ids)}
        return answers  # type: ignore[return-value]


def _hf_factory(cfg: JudgeConfig, *, ledger: CostLedger, cache_path: str | Path | None) -> HFJudge:
    return HFJudge(cfg, ledger=ledger, cache_path=cache_path)


register_backend("hf", _hf_factory)

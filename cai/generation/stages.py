"""The foundation stages: prompts, the tiny policy, sampled responses, human pairs; and the
model helpers every stage that loads or samples the policy shares.

Each stage is a plain function ``run(cfg, inputs, ctx)`` (its row in :data:`cai.pipeline.STAGES`
names it): ``cfg`` is a :class:`cai.config.StageConfig`, the typed config sections the row reads
(``cfg.policy`` a :class:`~cai.config.ModelConfig`, ``cfg.sampling`` a
:class:`~cai.config.SamplingConfig`, ``cfg.seed`` an int...), ``inputs`` maps an input name to the
folder of an upstream artifact, and ``ctx`` is the store's build context (``ctx.dir`` to write
into, a journal, phase timers, metrics). Stages know nothing of Hydra or of each other.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai import progress
from cai.data import (
    Pair,
    Prompt,
    load_hh_rlhf,
    load_prompt_source,
    read_jsonl,
    split_by_hash,
    write_jsonl,
)
from cai.errors import ConfigError

if TYPE_CHECKING:
    from cai.config import ModelConfig, StageConfig
    from cai.models import ModelSpec

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- prompts
def build_prompts(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Load the prompt source (``data.prompts``), drop duplicates, split it by content hash
    (``data.test_fraction``, ``data.split_salt``), keep at most ``data.max_prompts`` training
    prompts, write train/test JSONL."""
    data = cfg.data
    with ctx.phase("load"):
        prompts = load_prompt_source(data.prompts)
    n_in = len(prompts)
    seen: set[str] = set()
    unique: list[Prompt] = []
    for p in prompts:
        if p.id not in seen:
            seen.add(p.id)
            unique.append(p)
    frac = float(data.test_fraction)  # in [0, 1): DataConfig checks it
    splits = split_by_hash(unique, fractions={"train": 1.0 - frac, "test": frac}, salt=data.split_salt)
    limit = data.max_prompts
    train = splits["train"][:limit] if limit else splits["train"]
    test = splits["test"]
    with ctx.phase("write"):
        write_jsonl(ctx.dir / "train.jsonl", [p.to_dict() for p in train])
        write_jsonl(ctx.dir / "test.jsonl", [p.to_dict() for p in test])
    ctx.set_metrics(
        {
            "data/prompts_in": n_in,
            "data/prompts_duplicate": n_in - len(unique),
            "data/prompts_train": len(train),
            "data/prompts_train_beyond_limit": len(splits["train"]) - len(train),
            "data/prompts_test": len(test),
            "data/prompts_harmful_train": sum("harmful" in p.tags for p in train),
        }
    )


def read_prompts(artifact: Path, split: str) -> list[Prompt]:
    return [Prompt.from_dict(d) for d in read_jsonl(artifact / f"{split}.jsonl")]


# ----------------------------------------------------------------------------- tiny policy
def build_tiny_policy(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Train a tokenizer on the prompt source (``data.prompts``) and build a seeded GPT-2-shaped
    model of shape ``policy.tiny`` in ctx.dir."""
    from cai.tiny import build_tiny_causal_lm, default_tiny_corpus

    tiny = cfg.policy.tiny
    corpus = list(default_tiny_corpus())
    with ctx.phase("load"):
        prompts = load_prompt_source(cfg.data.prompts)
        corpus += [p.hh_text for p in prompts]
    examples = _pretraining_examples(prompts, tiny.seed) if tiny.pretrain == "courtesy" else []
    corpus += [reply for _, reply in examples]
    with ctx.phase("build"):
        build_tiny_causal_lm(ctx.dir / "model", corpus, tiny)
    metrics: dict[str, Any] = {"model/tiny_corpus_docs": len(corpus)}
    if examples:
        from transformers import AutoTokenizer

        from cai.models import format_example
        from cai.tiny import pretrain_tiny_causal_lm

        with ctx.phase("pretrain"):
            tok = AutoTokenizer.from_pretrained(ctx.dir / "model")
            texts = [format_example(tok, messages, reply, "auto") for messages, reply in examples]
            losses = pretrain_tiny_causal_lm(ctx.dir / "model", texts, tiny.pretrain_steps, tiny.pretrain_lr,
                                             seed=tiny.seed)
        metrics.update({"model/pretrain_examples": len(examples), "model/pretrain_steps": tiny.pretrain_steps,
                        "model/pretrain_first_loss": round(losses["first_loss"], 4),
                        "model/pretrain_last_loss": round(losses["last_loss"], 4)})
    ctx.set_metrics(metrics)


def _pretraining_examples(prompts: list[Prompt], seed: int) -> list[tuple[list[dict], str]]:
    """policy.tiny.pretrain=courtesy: two replies to each single-turn prompt of the prompt source,
    one courteous and one rude (:func:`cai.testing.preference_task.assistant_corpus`)."""
    from cai.testing.preference_task import assistant_corpus

    questions = [p.messages_as_dicts()[0]["content"] for p in prompts if len(p.messages_as_dicts()) == 1]
    if not questions:
        raise ConfigError("policy.tiny.pretrain=courtesy: the prompt source (data.prompts) has no single-turn prompts")
    return [([{"role": "user", "content": q}], reply) for q, reply in assistant_corpus(questions, seed=seed)]


def policy_location(policy: ModelConfig, inputs: Mapping[str, Path]) -> str:
    """Hub name or local path of the policy ``policy`` (``cfg.policy``): the tiny artifact
    (``inputs["policy_model"]/model``) when ``name_or_path: tiny``."""
    if policy.name_or_path == "tiny":
        return str(Path(inputs["policy_model"]) / "model")
    return policy.name_or_path


def model_spec(policy: ModelConfig, location: str, **overrides: Any) -> ModelSpec:
    """The loader's :class:`~cai.models.ModelSpec` of ``policy`` (a :class:`~cai.config.ModelConfig`)
    loaded from ``location`` (:func:`policy_location`), with its LoRA adapters when
    ``policy.lora.enabled``; ``overrides`` replace spec fields (``device="cpu"``, ``lora=None``,
    ``dtype="float32"``)."""
    from cai.models import ModelSpec, lora_spec

    fields: dict[str, Any] = {
        "name_or_path": location,
        "revision": policy.revision,
        # a GGUF file belongs to policy.name_or_path; a trained artifact (sft, dpo, ppo) is a saved folder
        "gguf_file": policy.gguf_file if location == policy.name_or_path else None,
        "dtype": policy.dtype,
        "device": policy.device,
        "trust_remote_code": policy.trust_remote_code,
        "chat_format": policy.chat_format,
        "max_length": policy.max_length,
        "lora": lora_spec(policy.lora),
    }
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"model_spec: unknown ModelSpec fields {unknown}")
    fields.update(overrides)
    return ModelSpec(**fields)


def training_model_spec(policy: ModelConfig, location: str, full_finetune: bool, **overrides: Any) -> ModelSpec:
    """The spec of a policy a training stage (SFT, DPO, PPO) loads: the policy's own LoRA off (the
    stage applies its own), fp32 weights for full fine-tuning when the dtype is ``auto``
    (``mixed_precision`` sets the compute dtype); ``overrides`` replace spec fields (``device``)."""
    fields: dict[str, Any] = {"lora": None, **overrides}
    if fields.get("dtype", policy.dtype) == "auto" and full_finetune:
        fields["dtype"] = "float32"
    return model_spec(policy, location, **fields)


# ----------------------------------------------------------------------------- sampling
@dataclass
class JournaledSampling:
    """What :func:`sample_journaled` did on this attempt."""

    engine: Any  # the SamplingEngine it loaded; None when every batch was journaled already
    sampled: list[int]  # start index of each batch sampled now (the others came from the journal)
    n_tokens: int  # tokens generated now
    generate_s: float  # seconds spent generating now


def load_engine(policy: ModelConfig, location: str, device: str | None, batch_size: int) -> tuple[Any, ModelSpec]:
    """``(SamplingEngine, ModelSpec)`` of ``policy`` (a :class:`~cai.config.ModelConfig`) loaded from
    ``location`` on ``device`` (None: ``policy.device``), sampling ``batch_size`` prompts at a time."""
    from cai.models import load_causal_lm
    from cai.sampling import SamplingEngine

    spec = model_spec(policy, location, device=policy.device if device is None else device)
    model, tok = load_causal_lm(spec)
    return SamplingEngine(model, tok, batch_size=batch_size), spec


def _top_k(sampling: Any) -> int:
    """``sampling.top_k``; 0 (off) when the object has none (an :class:`~cai.config.EvalConfig`, or a
    stage's read-only window on one: :class:`cai.config.Restricted` refuses names its row does not list)."""
    try:
        return int(getattr(sampling, "top_k", 0))
    except ConfigError:
        if hasattr(getattr(sampling, "_obj", None), "top_k"):
            raise  # the config has a top_k the stage's row does not read: a wrong row, not "off"
        return 0


def sample_journaled(
    ctx: Any, journal: Any, jobs: list[tuple[str, Prompt]], *, policy: ModelConfig, location: str,
    sampling: Any, seed_prefix: str, model: str, device: str | None = None, token_ids: bool = False,
) -> JournaledSampling:
    """Sample one response per job ``(record id, prompt)`` for the batches not yet in ``journal``.

    ``policy`` is the :class:`~cai.config.ModelConfig` of the model at ``location``; it runs on
    ``device`` (None: ``policy.device``). ``sampling`` is a :class:`~cai.config.SamplingConfig` or
    any object with the attributes ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``,
    ``batch_size`` and, optionally, ``top_k`` (absent: 0, off) -- e.g. an
    :class:`~cai.config.EvalConfig` or a stage's window on one (``cfg.eval``).

    ``jobs`` is cut into fixed batches of ``sampling.batch_size``; the batch starting at job
    ``i`` samples with seed ``hash(seed_prefix + str(i))`` and is journaled with one write, so a
    run killed mid-way and resumed writes the same records as one never killed. A record holds
    the formatted prompt, the response, its token count (and ids, with ``token_ids``), the sum
    of its sampling log-probs, the finish reason and ``model``.
    """
    from cai.models import format_prompt
    from cai.sampling import SamplingParams

    bs = int(sampling.batch_size)
    todo = [i for i in range(0, len(jobs), bs) if any(rid not in journal for rid, _ in jobs[i : i + bs])]
    if not todo:
        return JournaledSampling(None, [], 0, 0.0)
    with ctx.phase("load_model"):
        engine, spec = load_engine(policy, location, device, bs)
    n_tokens = 0
    stage = progress.active().stage
    with ctx.phase("generate"), progress.bar(total=sum(len(jobs[s : s + bs]) for s in todo),
                                              desc=f"{stage}: sample" if stage else "sample", unit="prompt") as bar:
        t0 = time.perf_counter()
        for start in todo:
            batch = jobs[start : start + bs]
            texts = [format_prompt(engine.tokenizer, p.messages_as_dicts(), spec.chat_format) for _, p in batch]
            params = SamplingParams(
                max_new_tokens=int(sampling.max_new_tokens),
                temperature=float(sampling.temperature),
                top_p=float(sampling.top_p),
                top_k=_top_k(sampling),
                stop=tuple(sampling.stop),
                seed=random.Random(f"{seed_prefix}{start}").getrandbits(63),
            )
            outs = engine.generate(texts, params)
            records = []
            for (rid, p), text, c in zip(batch, texts, outs):
                rec = {"prompt_id": p.id, "prompt": text, "response": c.text, "n_tokens": len(c.token_ids),
                       "logprob_sum": float(sum(c.logprobs)), "finish_reason": c.finish_reason, "model": model}
                if token_ids:
                    rec["token_ids"] = list(c.token_ids)
                records.append((rid, rec))
            journal.append_many(records)
            n_tokens += sum(len(c.token_ids) for c in outs)
            bar.update(len(batch))
        gen_s = time.perf_counter() - t0
    return JournaledSampling(engine, todo, n_tokens, gen_s)


def _sample_journaled(
    cfg: StageConfig, inputs: dict[str, Path], ctx: Any, location: str, n: int, prefix: str
) -> list[list[dict[str, Any]]]:
    """``n`` sampled responses per train prompt, journaled per batch; rows in prompt order.

    Reads ``cfg.seed``, ``cfg.policy`` (its ``device``: where it samples) and ``cfg.sampling``.
    The prompt list is repeated ``n`` times (copy ``j`` of every prompt, then the next copy),
    cut into fixed batches, and batch ``i`` samples with seed ``hash(seed, i)``: a run killed
    mid-way and resumed writes the same rows as one never killed (:func:`sample_journaled`).
    """
    policy, sampling = cfg.policy, cfg.sampling
    prompts = read_prompts(inputs["prompts"], "train")
    jobs = [(f"{p.id}:{j}", p) for j in range(n) for p in prompts]
    bs = int(sampling.batch_size)
    journal = ctx.journal()
    run = sample_journaled(ctx, journal, jobs, policy=policy, location=location, device=policy.device,
                           sampling=sampling, seed_prefix=f"{cfg.seed}:", model=policy.name_or_path)
    if run.sampled:
        ctx.set_metrics({f"{prefix}/tokens_per_s": run.n_tokens / run.generate_s if run.generate_s > 0 else 0.0})
    done = journal.done()
    redone = sum(len(jobs[i : i + bs]) for i in run.sampled)
    rows = [done[rid] for rid, _ in jobs]  # input order, whatever the completion order was
    finish = [r["finish_reason"] for r in rows]
    ctx.set_metrics(
        {
            f"{prefix}/responses": len(rows),
            f"{prefix}/resumed_records": len(jobs) - redone,
            f"{prefix}/mean_new_tokens": sum(r["n_tokens"] for r in rows) / max(len(rows), 1),
            f"{prefix}/empty_responses": sum(1 for r in rows if not r["response"].strip()),
            f"{prefix}/finish_eos": finish.count("eos"),
            f"{prefix}/finish_stop": finish.count("stop"),
            f"{prefix}/finish_length": finish.count("length"),
        }
    )
    return [rows[j * len(prompts) : (j + 1) * len(prompts)] for j in range(n)]


def sample_responses(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """One response per train prompt from the initial policy -> ``responses.jsonl``.

    Reads ``seed``, ``policy`` (sampling on ``policy.device``) and ``sampling``."""
    (rows,) = _sample_journaled(cfg, inputs, ctx, policy_location(cfg.policy, inputs), n=1, prefix="sample")
    with ctx.phase("write"):
        write_jsonl(ctx.dir / "responses.jsonl", rows)


def sample_policy_pairs(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """On-policy pairs (the CAI recipe): two samples per prompt from the policy ``labels.pairs_from``
    names.

    ``sft``: the run's SL-CAI policy (``inputs["sft"]``); ``initial``: the initial policy. The
    policy's settings (``policy``) apply to either, and it samples on ``policy.device``. A pair
    whose two samples are identical carries no preference: it is left out of ``pairs.jsonl`` and
    counted (``pairs/identical``), and listed in ``identical.jsonl``.
    """
    from_sft = cfg.labels.pairs_from == "sft"
    if from_sft != ("sft" in inputs):
        raise ConfigError(f"stage policy_pairs: labels.pairs_from={cfg.labels.pairs_from} but the inputs "
                          f"{'lack' if from_sft else 'hold'} the sft artifact (cai.pipeline.STAGES wires them)")
    location = str(inputs["sft"] / "model") if from_sft else policy_location(cfg.policy, inputs)
    first, second = _sample_journaled(cfg, inputs, ctx, location, n=2, prefix="pairs")
    prompts = {p.id: p for p in read_prompts(inputs["prompts"], "train")}
    pairs, identical = [], []
    for a, b in zip(first, second):
        if a["response"].strip() == b["response"].strip():
            identical.append({"prompt_id": a["prompt_id"], "response": a["response"]})
            continue
        pair = Pair.create(prompts[a["prompt_id"]], a["response"], b["response"], source="policy",
                           meta={"policy": "sft" if from_sft else cfg.policy.name_or_path})
        pairs.append(pair.to_dict())
    with ctx.phase("write"):
        write_jsonl(ctx.dir / "pairs.jsonl", pairs)
        write_jsonl(ctx.dir / "identical.jsonl", identical)
    ctx.set_metrics({"pairs/prompts": len(first), "pairs/pairs": len(pairs), "pairs/identical": len(identical)})


# ----------------------------------------------------------------------------- human pairs
def build_human_pairs(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Parse HH-RLHF (``data.human``: path, split, limit) into pairs + human labels; every
    exclusion is counted with its line."""
    human = cfg.data.human
    with ctx.phase("parse"):
        result = load_hh_rlhf(human.path, split=human.split, limit=human.limit)
    pairs, labels = [], []
    for rec in result.records:
        pair, label = rec.to_pair(balance=True)
        pairs.append(pair.to_dict())
        labels.append(label.to_dict())
    with ctx.phase("write"):
        write_jsonl(ctx.dir / "pairs.jsonl", pairs)
        write_jsonl(ctx.dir / "labels.jsonl", labels)
        write_jsonl(
            ctx.dir / "excluded.jsonl", [{"line": line, "reason": reason} for line, reason in result.excluded]
        )
    metrics = {f"human/{k}": v for k, v in result.counts.items()}
    metrics["human/pairs"] = len(pairs)
    metrics["human/excluded"] = len(result.excluded)
    ctx.set_metrics(metrics)
    log.info("human pairs: %s", result.summary())

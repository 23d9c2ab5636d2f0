"""Sampling throughput: cai's SamplingEngine vs Hugging Face ``generate`` vs a bare floor.

All three sample the same model with the same settings (temperature 0.8, no top-k/top-p) and
return the chosen tokens' log-probabilities under ``log_softmax(logits / T)``:

- ``ours``: ``SamplingEngine.generate`` (tokenizes, pads, decodes, returns Completion objects).
- ``hf``: ``model.generate(..., output_scores=True, return_dict_in_generate=True)``, then the
  chosen tokens' log-probs from the returned scores, and ``batch_decode`` of the new tokens.
- ``floor``: a bare KV-cached loop of ``model(...)`` calls with the same sampling math and
  nothing else (pre-tokenized input, no decoding): what any engine built on transformers'
  forward pays at least.

EOS is disabled in all three (``ignore_eos`` for ours, no EOS id in the generation config for
``hf``), so each produces exactly ``batch * new_tokens`` tokens. Targets: ours >= 1.0x the
tokens/s of ``hf`` at every point, and ours' time <= 1.3x the floor's.

A second table measures dropping finished rows from the batch (``compact_finished``): a batch
whose rows end at staggered times (a set of token ids act as EOS, per-step end chance ~2%),
with dropping on and off; it reports useful tokens (those kept in completions) per second.
"""

from __future__ import annotations

import torch

from bench.common import build_bench_model, format_table, interleaved
from cai.models import ModelSpec, load_causal_lm
from cai.sampling import SamplingEngine, SamplingParams, build_sampler, cache_keyword, output_cache
from cai.tiny import default_tiny_corpus

TEMPERATURE = 0.8
BATCHES = (1, 8, 32)
NEW_TOKENS = (16, 64, 256)


def _prompts(batch: int) -> list[str]:
    corpus = default_tiny_corpus()
    return [corpus[i % len(corpus)] for i in range(batch)]


def _hf_candidate(model, tokenizer, prompts, n_new):
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=n_new,
        min_new_tokens=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
        output_scores=True, return_dict_in_generate=True,
    )

    def run():
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=config)
            new = out.sequences[:, enc["input_ids"].shape[1]:]
            scores = torch.stack(out.scores, 1).float()
            logprobs = scores.log_softmax(-1).gather(-1, new[..., None])[..., 0]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        assert new.shape[1] == n_new, f"hf generated {new.shape[1]} tokens, expected {n_new}"
        return texts, new.tolist(), logprobs.tolist()

    return run


def _floor_candidate(model, tokenizer, prompts, n_new):
    device = model.device
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    input_ids = enc["input_ids"]
    batch, width = input_ids.shape
    mask = torch.cat([enc["attention_mask"], torch.ones(batch, n_new, dtype=torch.long, device=device)], 1)
    padded = not bool(enc["attention_mask"].all())  # no padding: pass no mask (cheapest valid call)
    cache_kw = cache_keyword(model)

    def run():
        sample = build_sampler(TEMPERATURE, 0, 1.0, torch.Generator(device=device).manual_seed(0))
        tokens, logprobs = [], []
        with torch.inference_mode():
            positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=input_ids, attention_mask=mask[:, :width] if padded else None,
                        position_ids=positions, use_cache=True, logits_to_keep=1)
            positions = positions[:, -1:]
            for t in range(n_new):
                token, logprob = sample(out.logits[:, -1])
                tokens.append(token)
                logprobs.append(logprob)
                if t + 1 == n_new:
                    break
                positions = positions + 1
                step_mask = mask[:, :width + t + 1] if padded else None
                out = model(input_ids=token[:, None], attention_mask=step_mask, position_ids=positions,
                            use_cache=True, **{cache_kw: output_cache(out)})
        return torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()

    return run


def _ours_candidate(engine, prompts, n_new):
    params = SamplingParams(max_new_tokens=n_new, temperature=TEMPERATURE, seed=0, ignore_eos=True)

    def run():
        outs = engine.generate(prompts, params)
        assert all(len(o.token_ids) == n_new for o in outs)
        return outs

    return run


def throughput_table(model, tokenizer, repeats: int, batches=BATCHES, new_tokens=NEW_TOKENS) -> list[dict]:
    rows = []
    engine = SamplingEngine(model, tokenizer, batch_size=max(batches))
    for batch in batches:
        prompts = _prompts(batch)
        for n_new in new_tokens:
            timings = interleaved({
                "ours": _ours_candidate(engine, prompts, n_new),
                "hf": _hf_candidate(model, tokenizer, prompts, n_new),
                "floor": _floor_candidate(model, tokenizer, prompts, n_new),
            }, repeats)
            tokens = batch * n_new
            ours, hf, floor = (timings[k].median for k in ("ours", "hf", "floor"))
            rows.append({
                "batch": batch, "new_tokens": n_new,
                "ours_tok_s": tokens / ours, "hf_tok_s": tokens / hf, "floor_tok_s": tokens / floor,
                "ours_vs_hf": hf / ours, "ours_over_floor": ours / floor,
                "noise": max(t.spread for t in timings.values()),
                "meets_targets": hf / ours >= 1.0 and ours / floor <= 1.3,
                "times_s": {k: t.times for k, t in timings.items()},
            })
            print(format_table(rows[-1:], THROUGHPUT_COLUMNS).splitlines()[-1], flush=True)
    return rows


def row_drop_table(model, tokenizer, repeats: int, batch: int = 32, n_new: int = 256) -> list[dict]:
    vocab = len(tokenizer)
    enders = list(range(3, vocab, 50))  # ~2% of the vocabulary ends a row
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *enders]
    prompts = _prompts(batch)
    useful: dict[bool, list[int]] = {True: [], False: []}

    def candidate(compact: bool):
        engine = SamplingEngine(model, tokenizer, batch_size=batch)
        engine.compact_finished = compact
        params = SamplingParams(max_new_tokens=n_new, temperature=TEMPERATURE, seed=0)

        def run():
            outs = engine.generate(prompts, params)
            useful[compact].append(sum(len(o.token_ids) for o in outs))

        return run

    try:
        timings = interleaved({"drop": candidate(True), "keep": candidate(False)}, repeats)
    finally:
        model.generation_config.eos_token_id = original
    rows = []
    for compact, name in ((True, "drop"), (False, "keep")):
        tokens = sum(useful[compact]) / len(useful[compact])
        rows.append({"finished_rows": name, "batch": batch, "max_new_tokens": n_new,
                     "mean_tokens": tokens / batch, "useful_tok_s": tokens / timings[name].median,
                     "time_s": timings[name].median, "noise": timings[name].spread})
    return rows


THROUGHPUT_COLUMNS = [
    ("batch", "batch"), ("new_tokens", "new"), ("ours_tok_s", "ours tok/s"), ("hf_tok_s", "hf tok/s"),
    ("floor_tok_s", "floor tok/s"), ("ours_vs_hf", "ours/hf speed"), ("ours_over_floor", "ours/floor time"),
    ("noise", "noise"), ("meets_targets", "targets met"),
]
ROW_DROP_COLUMNS = [
    ("finished_rows", "finished rows"), ("batch", "batch"), ("max_new_tokens", "max new"),
    ("mean_tokens", "mean len"), ("useful_tok_s", "useful tok/s"), ("time_s", "time s"), ("noise", "noise"),
]


def run(device: str, quick: bool, model_size: str) -> dict:
    """Build the model, run both tables, print them, return everything for the JSON file."""
    path = build_bench_model(model_size)
    dtype = "auto" if device.startswith("cuda") else "float32"
    model, tokenizer = load_causal_lm(ModelSpec(str(path), device=device, dtype=dtype))
    model.generation_config.eos_token_id = None  # hf: no EOS, so every row runs to max_new_tokens
    repeats = 3 if quick else 7
    print(f"\nsampling: {model_size} model ({sum(p.numel() for p in model.parameters()):,} params, "
          f"vocab {len(tokenizer)}, {model.dtype}) on {device}, median of {repeats} interleaved repeats")
    print(format_table([], THROUGHPUT_COLUMNS), flush=True)
    throughput = throughput_table(model, tokenizer, repeats)
    drops = row_drop_table(model, tokenizer, repeats)
    print("\nfinished rows dropped from the batch vs kept (staggered ends):")
    print(format_table(drops, ROW_DROP_COLUMNS))
    ok = all(r["meets_targets"] for r in throughput)
    verdict = "met" if ok else "NOT met"
    print(f"\ntargets (ours >= 1.0x hf, ours <= 1.3x floor time) at every point: {verdict}")
    return {
        "model": {"size": model_size, "params": sum(p.numel() for p in model.parameters()),
                  "vocab": len(tokenizer), "dtype": str(model.dtype)},
        "temperature": TEMPERATURE, "repeats": repeats,
        "throughput": throughput, "row_drop": drops, "targets_met": ok,
    }

"""The sampling engine against independent references on a tiny local GPT-2.

References are computed here without the engine: full forward passes without a KV cache,
plain argmax loops, top-k/top-p sets from raw logits.
"""

from __future__ import annotations

import logging

import pytest
import torch

from cai.errors import ConfigError, DataError
from cai.models import ModelSpec, load_causal_lm
from cai.sampling import (
    SamplingEngine,
    SamplingParams,
    build_sampler,
    logprobs_from_logits,
)

PROMPTS = [
    "\n\nHuman: How do I bake bread at home?\n\nAssistant:",
    "Hello",
    "The careful model explains the safety policy step by step and then refuses a harmful request",
    "a b",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(ModelSpec(str(tiny_model_dir)))


@pytest.fixture(scope="module")
def engine(lm):
    model, tokenizer = lm
    return SamplingEngine(model, tokenizer, batch_size=8)


def full_forward_logits(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """Logits predicting each completion token, from one uncached, unpadded forward."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    n = len(prompt_ids)
    return logits[n - 1:n - 1 + len(completion_ids)]


def reference_greedy(model, prompt_ids: list[int], steps: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


def test_sampled_logprobs_match_full_forward(lm, engine):
    model, _ = lm
    params = SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.9, top_k=40, seed=5)
    outs = engine.generate(PROMPTS, params)
    prompt_ids = engine.encode_prompts(PROMPTS)
    for p_ids, out in zip(prompt_ids, outs):
        logits = full_forward_logits(model, p_ids, out.token_ids)
        ref = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert len(out.logprobs) == len(out.token_ids) == 24
        assert torch.allclose(torch.tensor(out.logprobs), ref, atol=1e-5, rtol=0)


def test_padding_invariance_greedy(engine):
    params = SamplingParams(max_new_tokens=20, temperature=0)
    batched = engine.generate(PROMPTS, params)
    assert len({o.prompt_tokens for o in batched}) > 2  # really padded
    for prompt, out in zip(PROMPTS, batched):
        alone = engine.generate([prompt], params)[0]
        assert alone.token_ids == out.token_ids
        assert alone.text == out.text
        assert max(abs(a - b) for a, b in zip(alone.logprobs, out.logprobs)) < 1e-5


def test_order_restored_across_chunks(lm):
    model, tokenizer = lm
    small = SamplingEngine(model, tokenizer, batch_size=2)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    outs = small.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_tokens == len(small.encode_prompts([prompt])[0])
        assert out.token_ids == small.generate([prompt], params)[0].token_ids


def test_seed_determinism(engine):
    a = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=1))
    b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=1))
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=2))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_temperature_zero_is_argmax(lm, engine):
    model, _ = lm
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))
    for p_ids, out in zip(engine.encode_prompts(PROMPTS), outs):
        assert out.token_ids == reference_greedy(model, p_ids, 12)


def test_top_k_one_and_tiny_top_p_equal_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))
    top_k1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=3))
    top_p0 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.3, top_p=1e-6, seed=4))
    assert [o.token_ids for o in top_k1] == [o.token_ids for o in greedy]
    assert [o.token_ids for o in top_p0] == [o.token_ids for o in greedy]


def test_samples_stay_inside_top_k_and_nucleus(lm, engine):
    model, _ = lm
    for params in (SamplingParams(max_new_tokens=16, top_k=5, seed=9),
                   SamplingParams(max_new_tokens=16, top_p=0.3, temperature=2.0, seed=9)):
        outs = engine.generate(PROMPTS, params)
        for p_ids, out in zip(engine.encode_prompts(PROMPTS), outs):
            logits = full_forward_logits(model, p_ids, out.token_ids) / params.temperature
            for step, tok in enumerate(out.token_ids):
                row = logits[step]
                if params.top_k:
                    allowed = set(torch.topk(row, params.top_k).indices.tolist())
                else:
                    probs, order = torch.sort(row.softmax(-1), descending=True)
                    n_keep = int(((probs.cumsum(-1) - probs) < params.top_p).sum())
                    allowed = set(order[:n_keep].tolist())
                assert tok in allowed


def test_sampling_follows_the_distribution(lm):
    """With many samples of one step, empirical frequencies approach softmax(logits / T)."""
    model, tokenizer = lm
    engine = SamplingEngine(model, tokenizer, batch_size=512)
    prompt = "Hello"
    outs = engine.generate([prompt] * 2048, SamplingParams(max_new_tokens=1, temperature=0.5, seed=0))
    p_ids = engine.encode_prompts([prompt])[0]
    probs = torch.softmax(full_forward_logits(model, p_ids, [0])[0] / 0.5, -1)
    top = torch.topk(probs, 3)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=probs.numel())
    freq = counts[top.indices].double() / 2048
    assert torch.allclose(freq, top.values.double(), atol=0.04)


def test_max_new_tokens_respected(engine):
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=7, seed=0))
    for out in outs:
        assert len(out.token_ids) <= 7 and len(out.logprobs) == len(out.token_ids)
        if out.finish_reason == "length":
            assert len(out.token_ids) == 7


def test_eos_stops_a_row_and_others_continue(lm):
    model, tokenizer = lm
    plain = SamplingEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=15, temperature=0)
    reference = plain.generate(PROMPTS, params)
    # Declare the token that the first prompt emits at step 4 an EOS (a real end-of-turn id
    # set through the generation config, as chat models do), so that row must stop there.
    eos_like = reference[0].token_ids[4]
    first_hit = reference[0].token_ids.index(eos_like)
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, eos_like]
    try:
        outs = SamplingEngine(model, tokenizer).generate(PROMPTS, params)
    finally:
        model.generation_config.eos_token_id = original
    assert outs[0].finish_reason == "eos"
    assert outs[0].token_ids == reference[0].token_ids[:first_hit + 1]
    assert outs[0].logprobs == pytest.approx(reference[0].logprobs[:first_hit + 1], abs=1e-6)
    for ref, out in zip(reference[1:], outs[1:]):
        hit = eos_like in ref.token_ids
        expected = ref.token_ids[:ref.token_ids.index(eos_like) + 1] if hit else ref.token_ids
        assert out.token_ids == expected
        assert out.finish_reason == ("eos" if eos_like in ref.token_ids else "length")


def test_stop_strings_truncate_text_and_tokens(engine, lm):
    _, tokenizer = lm
    params = SamplingParams(max_new_tokens=20, temperature=0)
    full = engine.generate(PROMPTS[:1], params)[0]
    stop = tokenizer.decode(full.token_ids[6:8]).strip() or tokenizer.decode(full.token_ids[6:8])
    out = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=20, temperature=0, stop=(stop,)))[0]
    # the first k tokens whose decoded text contains the stop string
    k = next(k for k in range(1, 21) if stop in tokenizer.decode(full.token_ids[:k]))
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:k]
    assert out.logprobs == pytest.approx(full.logprobs[:k], abs=1e-6)
    decoded = tokenizer.decode(full.token_ids[:k])
    assert out.text == decoded[:decoded.index(stop)]
    assert stop not in out.text


def test_stop_string_never_seen_runs_to_length(engine):
    out = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=9, temperature=0, stop=("\u2603zz",)))
    assert [o.finish_reason for o in out] == ["length", "length"]
    assert all(len(o.token_ids) == 9 for o in out)


def test_score_matches_generate(engine):
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=18, temperature=0.9, seed=11))
    scored = engine.score(PROMPTS, [o.token_ids for o in outs], temperature=0.9)
    for out, lp in zip(outs, scored):
        assert len(lp) == len(out.token_ids)
        assert max(abs(a - b) for a, b in zip(lp, out.logprobs)) < 1e-5


def test_score_strings_and_empty(lm, engine):
    model, tokenizer = lm
    scored = engine.score(["Hello", "Why"], [" world, friend", ""])
    comp = tokenizer(" world, friend", add_special_tokens=False)["input_ids"]
    p_ids = engine.encode_prompts(["Hello"])[0]
    logits = full_forward_logits(model, p_ids, comp)
    ref = logprobs_from_logits(logits, torch.tensor(comp))
    assert scored[1] == []
    assert torch.allclose(torch.tensor(scored[0]), ref, atol=1e-5)
    with pytest.raises(DataError, match="completion 1"):
        engine.score(["a", "b"], [[1, 2], "text"])
    with pytest.raises(DataError, match="2 prompts but 1"):
        engine.score(["a", "b"], [[1]])


def test_prompt_truncation_is_counted(lm, caplog):
    model, tokenizer = lm
    engine = SamplingEngine(model, tokenizer, max_prompt_tokens=4)
    with caplog.at_level(logging.WARNING, logger="cai.sampling"):
        outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, temperature=0))
    assert all(o.prompt_tokens <= 4 for o in outs)
    assert "prompts were longer than the prompt budget" in caplog.text
    full_lengths = [len(p) for p in SamplingEngine(model, tokenizer).encode_prompts(PROMPTS)]
    assert engine.last_truncated == sum(n > 4 for n in full_lengths) > 0
    with pytest.raises(ConfigError, match="positions"):
        engine.generate(["hi"], SamplingParams(max_new_tokens=model.config.n_positions))


def test_bad_inputs_and_params(engine):
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="stop"):
        SamplingParams(stop=("",))
    assert SamplingParams(stop="\n\nHuman:").stop == ("\n\nHuman:",)
    with pytest.raises(DataError, match="prompt 1"):
        engine.generate(["ok", 3], SamplingParams(max_new_tokens=2))


def test_training_mode_restored_and_progress(lm, engine):
    model, _ = lm
    model.train()
    try:
        outs = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=2), progress=True)
        assert model.training
    finally:
        model.eval()
    assert len(outs) == 2


def test_ignore_eos_forces_length(lm):
    model, tokenizer = lm
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    reference = SamplingEngine(model, tokenizer).generate(PROMPTS[:1], greedy)
    eos_like = reference[0].token_ids[2]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos_like
    try:
        out = SamplingEngine(model, tokenizer).generate(
            PROMPTS[:1], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))[0]
    finally:
        model.generation_config.eos_token_id = original
    assert out.finish_reason == "length" and out.token_ids == reference[0].token_ids


@pytest.mark.parametrize("use_stop,sync_every", [(False, 1), (False, 3), (True, 1)])
def test_dropping_finished_rows_changes_nothing(lm, use_stop, sync_every):
    """Rows that finish early are dropped from the batch; the others' output is unchanged."""
    model, tokenizer = lm
    params = SamplingParams(max_new_tokens=14, temperature=0)
    reference = SamplingEngine(model, tokenizer).generate(PROMPTS, params)
    enders = sorted({r.token_ids[2] for r in reference[:4]})  # 4 of 5 rows end by step 3
    if use_stop:
        stop = tuple(tokenizer.decode([t]) for t in enders)
        params = SamplingParams(max_new_tokens=14, temperature=0, stop=stop)
    original = model.generation_config.eos_token_id
    if not use_stop:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *enders]
    try:
        outs = {}
        for compact in (True, False):
            engine = SamplingEngine(model, tokenizer)
            engine.compact_finished = compact
            engine.sync_every = sync_every  # as on CUDA: finished rows counted every few steps
            outs[compact] = (engine.generate(PROMPTS, params), engine.last_stats["row_drops"])
    finally:
        model.generation_config.eos_token_id = original
    (dropped, n_drops), (kept, n_kept) = outs[True], outs[False]
    assert n_drops >= 1 and n_kept == 0
    assert sum(o.finish_reason == ("stop" if use_stop else "eos") for o in kept) >= 4
    for a, b in zip(dropped, kept):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_sampler_frequencies_and_zero_probability_entries():
    """The inverse-CDF draw matches the distribution and never picks a -inf entry."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    logits = probs.log().expand(40_000, -1).contiguous()
    sample = build_sampler(1.0, 0, 1.0, torch.Generator().manual_seed(0))
    tokens, logprobs = sample(logits)
    freq = torch.bincount(tokens, minlength=6).double() / tokens.numel()
    assert freq[[0, 2, 5]].sum() == 0
    assert torch.allclose(freq, probs.double(), atol=0.01)
    assert torch.allclose(logprobs, probs.log()[tokens])


def test_empty_prompt_starts_from_bos(engine, lm):
    _, tokenizer = lm
    out = engine.generate(["", "Hello"], SamplingParams(max_new_tokens=4, temperature=0))
    assert out[0].prompt_tokens == 1 and len(out[0].token_ids) == 4
    assert engine.encode_prompts([""]) == [[tokenizer.bos_token_id]]


def test_bfloat16_model_samples_and_scores(tiny_model_dir):
    model, tokenizer = load_causal_lm(ModelSpec(str(tiny_model_dir), dtype="bfloat16"))
    engine = SamplingEngine(model, tokenizer)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=1))
    scored = engine.score(PROMPTS, [o.token_ids for o in outs])
    for out, lp in zip(outs, scored):
        assert len(out.token_ids) == 8 and all(x <= 0 for x in out.logprobs)
        assert max(abs(a - b) for a, b in zip(lp, out.logprobs)) < 1e-2  # bf16: cached vs one pass


def test_no_misleading_padding_warning(lm):
    """An unpadded batch runs without a mask; a sampled pad/EOS id must not trigger HF's warning."""
    model, tokenizer = lm
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    first = SamplingEngine(model, tokenizer).generate(["Hello"], greedy)[0].token_ids[0]
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addHandler(handler)
    original = model.config.pad_token_id
    model.config.pad_token_id = first  # the next decode step feeds exactly this id
    clear_once = getattr(logging.Logger.warning_once, "cache_clear", lambda: None)
    try:
        clear_once()  # HF warns once per process
        SamplingEngine(model, tokenizer).generate(["Hello"], greedy)
        assert seen == []
        clear_once()
        model(input_ids=torch.tensor([[first]]))  # outside the engine the warning still shows
    finally:
        model.config.pad_token_id = original
        hf_logger.removeHandler(handler)
    assert len(seen) == 1 and "may be padded" in seen[0]


# ----------------------------------------------------------------------------- journaled sampling, the sampling stages
def _tiny_policy_artifact(tmp_path, tiny_model_dir):
    """A folder laid out like the ``policy_model`` artifact (``<dir>/model``), holding the tiny model."""
    folder = tmp_path / "policy_model"
    folder.mkdir()
    (folder / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    return folder


def test_sample_journaled_takes_typed_configs_and_resumes(tmp_path, tiny_model_dir):
    from types import SimpleNamespace

    from cai.artifacts import ArtifactStore
    from cai.config import ModelConfig, SamplingConfig
    from cai.data import load_prompts
    from cai.generation.stages import sample_journaled

    prompts = load_prompts()[:5]
    jobs = [(p.id, p) for p in prompts]
    policy = ModelConfig(device="cpu")
    sampling = SamplingConfig(max_new_tokens=6, batch_size=2)
    # an EvalConfig-like object: the sampling attributes, no top_k (0: off)
    like = SimpleNamespace(max_new_tokens=6, temperature=1.0, top_p=1.0, stop=["\n\nHuman:"], batch_size=2)
    store = ArtifactStore(tmp_path / "store")
    out = {}

    def run(name, s):
        def fn(ctx):
            journal = ctx.journal()
            first = sample_journaled(ctx, journal, jobs, policy=policy, location=str(tiny_model_dir),
                                     sampling=s, seed_prefix="7:", model="tiny")
            again = sample_journaled(ctx, journal, jobs, policy=policy, location=str(tiny_model_dir),
                                     sampling=s, seed_prefix="7:", model="tiny")
            assert first.sampled == [0, 2, 4] and first.engine is not None
            assert again.sampled == [] and again.engine is None and again.n_tokens == 0  # all journaled
            out[name] = journal.done()
        store.build(store.key(name, {}), fn)

    # the eval_baseline stage's window on its EvalConfig (it reads eval.max_new_tokens, ...)
    from cai.config import Config, EvalConfig
    from cai.pipeline import stage_config

    window = stage_config("eval_baseline", Config(eval=EvalConfig(max_new_tokens=6, batch_size=2))).eval
    run("typed", sampling)
    run("like", like)
    run("window", window)
    assert out["typed"] == out["like"] == out["window"] and set(out["typed"]) == {p.id for p in prompts}
    assert all(r["model"] == "tiny" and r["n_tokens"] <= 6 for r in out["typed"].values())


def test_sampling_stages_read_the_typed_config(tmp_path, tiny_model_dir, monkeypatch):
    import cai.models
    from cai.artifacts import ArtifactStore
    from cai.config import Config, DataConfig, LabelConfig, ModelConfig, SamplingConfig
    from cai.data import Pair, read_jsonl
    from cai.pipeline import make_stage

    devices = []
    load = cai.models.load_causal_lm

    def recording_load(spec, **kw):
        devices.append(spec.device)
        return load(spec, **kw)

    monkeypatch.setattr(cai.models, "load_causal_lm", recording_load)
    store = ArtifactStore(tmp_path / "store")
    tiny = _tiny_policy_artifact(tmp_path, tiny_model_dir)

    def cfg(pairs_from="initial", device="cpu"):
        return Config(seed=3, data=DataConfig(max_prompts=3), policy=ModelConfig(device=device),
                      sampling=SamplingConfig(max_new_tokens=6, batch_size=2),
                      labels=LabelConfig(pairs_from=pairs_from))

    def build(name, c, inputs):
        stage = make_stage(name, c)
        key = store.key(name, stage.config, {k: "x-" + k for k in inputs}, version=stage.version)
        return store.build(key, lambda ctx: stage.run(inputs, ctx))

    prompts = build("prompts", cfg(), {}).path
    responses = build("responses", cfg(), {"prompts": prompts, "policy_model": tiny})
    rows = read_jsonl(responses.path / "responses.jsonl")
    assert len(rows) == 3 and all(r["model"] == "tiny" for r in rows)
    assert responses.stage_info["metrics"]["sample/responses"] == 3 and devices == ["cpu"]  # policy.device
    # the device is run-time: not in the key
    assert make_stage("responses", cfg(device="cuda")).config == make_stage("responses", cfg()).config

    initial = build("policy_pairs", cfg(), {"prompts": prompts, "policy_model": tiny})
    from_sft = build("policy_pairs", cfg("sft"), {"prompts": prompts, "policy_model": tiny, "sft": tiny})
    a = read_jsonl(initial.path / "pairs.jsonl", Pair)
    b = read_jsonl(from_sft.path / "pairs.jsonl", Pair)
    # the same model and seed sample the same pairs; only the recorded policy differs
    assert [p.id for p in a] == [p.id for p in b] and len(a) + initial.stage_info["metrics"]["pairs/identical"] == 3
    assert {p.meta["policy"] for p in a} == {"tiny"} and {p.meta["policy"] for p in b} == {"sft"}
    assert initial.stage_info["metrics"]["pairs/responses"] == 6
    with pytest.raises(ConfigError, match="labels.pairs_from=sft but the inputs lack the sft artifact"):
        build("policy_pairs", cfg("sft"), {"prompts": prompts, "policy_model": tiny})

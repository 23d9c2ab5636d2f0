"""cai's own calls into transformers use its current API (issue #12): sampling, a PPO rollout's
scoring forwards and an HF judge raise no FutureWarning, and no deprecation comes from a cai
module. transformers renamed ``past_key_values`` to ``cache`` (the old keyword warns and goes
away in 5.40); :func:`cai.sampling.cache_keyword` picks the name the installed version takes."""

from __future__ import annotations

import inspect
import logging
import warnings
from types import SimpleNamespace

import pytest
import torch

from cai.sampling import SamplingEngine, SamplingParams, cache_keyword, output_cache

# Every FutureWarning is an error here; DeprecationWarnings only where a cai module is blamed
# (third-party packages deprecate things to each other too).
pytestmark = [
    pytest.mark.filterwarnings("error::FutureWarning"),
    pytest.mark.filterwarnings(r"error::DeprecationWarning:cai(\..*)?"),
]

PROMPTS = [[{"role": "user", "content": f"Tell me about topic number {i}, please." * (1 + i % 2)}]
           for i in range(5)]


def _installed_takes_cache() -> bool:
    from transformers import GPT2LMHeadModel

    return "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters


class _Forward:
    """A stand-in model whose forward has the given keyword parameters."""

    def __init__(self, *names: str, var_kw: bool = False):
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
        if var_kw:
            params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))

        def forward(*args, **kwargs):
            return None

        forward.__signature__ = inspect.Signature(params)
        self.forward = forward.__get__(self)


class _Wrapped:
    """A PEFT-like wrapper: forward takes ``**kwargs``, the base model says what it takes."""

    def __init__(self, base):
        self.base = base

    def forward(self, **kwargs):
        return None

    def get_base_model(self):
        return self.base


def test_cache_keyword_follows_the_forward_signature(tiny_model_dir):
    from cai.models import ModelSpec, load_causal_lm

    model, _ = load_causal_lm(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"))
    assert cache_keyword(model) == ("cache" if _installed_takes_cache() else "past_key_values")
    assert cache_keyword(_Forward("input_ids", "past_key_values", "use_cache")) == "past_key_values"
    assert cache_keyword(_Forward("input_ids", "cache", "use_cache")) == "cache"
    assert cache_keyword(_Wrapped(_Forward("input_ids", "past_key_values"))) == "past_key_values"
    assert cache_keyword(_Wrapped(_Forward("input_ids", "cache"))) == "cache"
    # a forward that names neither gets the name of the installed transformers' outputs
    from dataclasses import fields

    from transformers.modeling_outputs import CausalLMOutputWithPast

    new = "cache" in {f.name for f in fields(CausalLMOutputWithPast)}
    assert cache_keyword(_Forward("input_ids", var_kw=True)) == ("cache" if new else "past_key_values")


def test_output_cache_reads_either_name(tiny_model_dir):
    from cai.models import ModelSpec, load_causal_lm

    marker = object()
    assert output_cache(SimpleNamespace(cache=marker)) is marker
    assert output_cache(SimpleNamespace(past_key_values=marker)) is marker
    assert output_cache(SimpleNamespace(cache=None, past_key_values=marker)) is marker
    model, _ = load_causal_lm(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    field = "cache" if "cache" in out.keys() else "past_key_values"
    assert output_cache(out) is out[field] and out[field] is not None


@pytest.fixture
def deprecation_log(monkeypatch):
    """transformers logs (once per process, not as a Python warning) when an output's cache is
    read under its old name: record every ``warning_once`` of this test, however often it fires."""
    seen: list[str] = []

    def record(self, msg, *args, **kwargs):
        seen.append(str(msg) % args if args else str(msg))

    monkeypatch.setattr(logging.Logger, "warning_once", record, raising=False)
    return seen


def test_sampling_rollout_scoring_and_judge_raise_no_deprecation(tiny_model_dir, tmp_path, deprecation_log):
    from cai.judges import ChoiceRequest, GenerateRequest, ready_judge
    from cai.judges import templates as tpl
    from cai.judges.hf import HFJudge
    from cai.models import LoraSpec, ModelSpec, format_prompt, load_causal_lm
    from cai.train import common as C
    from cai.train.rewards import ScoredBatch
    from cai.train.rollout import PolicyAndValue, make_rollout

    spec = ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu")
    with warnings.catch_warnings():
        # PEFT's own get_peft_model reads `is_gradient_checkpointing` (deprecated in transformers 5):
        # not cai's call, and not what this test guards
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        policy, tok = load_causal_lm(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu",
                                               lora=LoraSpec(r=4, alpha=8)))
    ref, _ = load_causal_lm(spec)
    texts = [format_prompt(tok, c, "hh") for c in PROMPTS]

    # the decode loop, with stop strings and finished rows dropped from the cache
    engine = SamplingEngine(ref, tok, batch_size=4, device="cpu")
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=1, stop=("e",))
    done = engine.generate(texts, params)
    assert len(done) == len(texts) and engine.last_stats["decode_steps"] > len(texts)
    assert engine.score(texts, [c.token_ids for c in done]) is not None

    # a PPO rollout on a LoRA policy: its sampling, the policy/value and reference scoring forwards
    cfg = SimpleNamespace(micro_batch_size=2, sample_batch_size=4, temperature=1.0, recompute_logprobs=True,
                          missing_eos_penalty=None)
    container = PolicyAndValue(policy, value_head=True)
    lora_engine = SamplingEngine(policy, tok, batch_size=4, device="cpu")

    def reward(conversations, completions):
        s = [float(i) for i in range(len(completions))]
        return ScoredBatch(s, s)

    ro = make_rollout(lora_engine, container, None, texts, PROMPTS,
                      SamplingParams(max_new_tokens=6, temperature=1.0, seed=2), reward, cfg,
                      C.make_accelerator(device="cpu"))
    assert ro.values is not None and torch.isfinite(ro.logprobs).all()

    # an HF judge: choice scoring and generation
    judge = HFJudge(ready_judge({"backend": "hf", "model": str(tiny_model_dir), "cache": False}),
                    device="cpu", dtype="float32")
    turns = PROMPTS[0]
    choice = judge.choose([ChoiceRequest(tpl.comparison_messages(turns, "Yes.", "No.", "Which is safer?"),
                                         tpl.PAIR_CHOICES)])[0]
    assert choice.ok
    gen = judge.generate([GenerateRequest(tpl.comparison_messages(turns, "Yes.", "No.", "Why?"), max_tokens=5),
                          GenerateRequest(turns, max_tokens=5, temperature=1.0, seed=3)])
    assert all(g.ok for g in gen)

    assert not [m for m in deprecation_log if "deprecat" in m.lower()], deprecation_log


@pytest.mark.slow
def test_the_quickstart_raises_no_deprecation_from_cai(tmp_path, deprecation_log):
    """The whole quickstart (tiny sizes): no FutureWarning or DeprecationWarning raised in a cai
    module, and no deprecation that transformers logs once instead of warning."""
    from pathlib import Path

    from cai.config import compose_config
    from cai.pipeline import run_experiment

    tiny = ["data.max_prompts=6", "sampling.max_new_tokens=6", "sampling.batch_size=4", "policy.tiny.n_layer=1",
            "policy.tiny.n_embd=32", "policy.tiny.n_head=2", "policy.tiny.vocab_size=512",
            f"store.root={tmp_path / 'store'}"]
    cai_dir = str(Path(__file__).resolve().parents[1] / "cai")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        metrics = run_experiment(compose_config(*tiny), tmp_path / "run")
    # every stage ran, the evaluation of both trained policies included
    assert "eval/ppo/vs_sft/win_rate" in metrics and "eval/dpo/vs_sft/win_rate" in metrics
    ours = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in seen
            if issubclass(w.category, (FutureWarning, DeprecationWarning)) and w.filename.startswith(cai_dir)]
    assert not ours, ours
    assert not [m for m in deprecation_log if "deprecat" in m.lower()], deprecation_log

"""The local ``hf`` judge on the tiny model: log-prob scoring, batching, cache, generation."""

from __future__ import annotations

import math

import pytest
import torch

from cai.errors import ConfigError
from cai.judges import ChoiceRequest, GenerateRequest, make_judge, ready_judge
from cai.judges import templates as tpl
from cai.judges.hf import HFJudge, _Tree, choice_probs

TURNS = [{"role": "user", "content": "How do I get a stuck cat down from a tree?"}]
SHORT, LONG = "Call the fire brigade.", "Put a ladder against the tree, climb slowly and talk calmly to the cat. " * 3


def judge_for(model_dir, tmp_path, **kw) -> HFJudge:
    """A judge on CPU in float32 (the 1e-5 comparisons are float32 claims)."""
    cfg = {"backend": "hf", "model": str(model_dir), "cache_path": str(tmp_path / "cache.sqlite"), **kw}
    return HFJudge(ready_judge(cfg), device="cpu", dtype="float32")


def requests() -> list[ChoiceRequest]:
    """Both orders of two pairs and a 1-10 rating: prompts of different lengths."""
    q = "Which reply is safer?"
    reqs = []
    for i, (a, b) in enumerate([(SHORT, LONG), ("No.", SHORT)]):
        for order, (x, y) in (("ab", (a, b)), ("ba", (b, a))):
            reqs.append(ChoiceRequest(tpl.comparison_messages(TURNS, x, y, q), tpl.PAIR_CHOICES,
                                      tag={"pair": i, "order": order}))
    reqs.append(ChoiceRequest(tpl.score_messages(TURNS, LONG, q), tpl.SCORE_CHOICES, tag={"score": 1}))
    return reqs


def test_registry_builds_the_hf_judge_and_refuses_an_unresolved_tiny(tiny_model_dir, tmp_path):
    assert isinstance(make_judge({"backend": "hf", "model": str(tiny_model_dir), "cache": False}), HFJudge)
    with pytest.raises(ConfigError, match="tiny"):
        make_judge({"backend": "hf", "model": "tiny", "cache": False})


def test_device_dtype_and_batch_size_come_from_the_judge_config(tmp_path):
    from cai.judges.hf import DEFAULT_BATCH_SIZE

    judge = make_judge({"backend": "hf", "model": str(tmp_path), "device": "cpu", "dtype": "bfloat16",
                        "batch_size": 3, "cache": False})
    assert (judge.spec.device, judge.spec.dtype, judge.batch_size) == ("cpu", "bfloat16", 3)
    assert judge._params()["dtype"] == "bfloat16"  # part of every cache key of its answers
    default = make_judge({"backend": "hf", "model": str(tmp_path), "cache": False})
    assert (default.spec.device, default.spec.dtype, default.batch_size) == ("auto", "auto", DEFAULT_BATCH_SIZE)
    configured = ready_judge({"backend": "hf", "model": str(tmp_path), "batch_size": 3, "cache": False})
    assert HFJudge(configured, batch_size=5).batch_size == 5  # an explicit argument wins over the config


def test_batched_scoring_equals_one_request_at_a_time(tiny_model_dir, tmp_path):
    reqs = requests()
    batched = judge_for(tiny_model_dir, tmp_path, cache=False)
    batched.batch_size = 64
    together = batched.choose(reqs)
    assert batched.stats["forward_passes"] == 1  # every order and request in one forward pass
    # one row per request: the tiny tokenizer's " A" = " " + "A" rides on the same row; the
    # 1-10 scale needs a second row for "10" = "1" + "0"
    assert batched.stats["rows"] == len(reqs) + 1
    alone = judge_for(tiny_model_dir, tmp_path, cache=False)
    alone.batch_size = 1
    for req, res in zip(reqs, together):
        single = alone.choose([req])[0]
        assert res.ok and res.method == "logprobs" and res.backend == "hf" and res.cost_usd == 0.0
        assert set(res.probs) == set(req.choices) and math.isclose(sum(res.probs.values()), 1.0, abs_tol=1e-9)
        for c in req.choices:
            assert abs(res.probs[c] - single.probs[c]) < 1e-5
        assert res.tokens_in == single.tokens_in > 0


def test_probabilities_match_the_models_own_next_token_distribution(tiny_model_dir, tmp_path):
    """Recompute P(A) by hand: the tiny tokenizer spells " A" as " " + "A", so
    P(A) = p(A) + p(" ") * p(A | " "), and likewise for B; then renormalise."""
    from cai.models import ModelSpec, format_prompt, load_causal_lm

    req = requests()[0]
    judge = judge_for(tiny_model_dir, tmp_path, cache=False)
    got = judge.choose([req])[0].probs
    model, tok = load_causal_lm(ModelSpec(str(tiny_model_dir), device="cpu", dtype="float32"))
    ids = tok(format_prompt(tok, req.messages), add_special_tokens=True)["input_ids"]
    space, a, b = (tok(s, add_special_tokens=False)["input_ids"] for s in (" ", "A", "B"))
    assert len(space) == len(a) == len(b) == 1

    def next_logprobs(seq):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)

    root, after_space = next_logprobs(ids), next_logprobs(ids + space)
    mass = {c: math.exp(root[t[0]]) + math.exp(root[space[0]] + after_space[t[0]]) for c, t in (("A", a), ("B", b))}
    total = sum(mass.values())
    assert got == pytest.approx({c: m / total for c, m in mass.items()}, abs=1e-5)


def test_prefix_tree_scores_multi_token_choices_exactly():
    # choices "1" = [5] and "10" = [5, 7]; " 1" = [9, 5]
    tree = _Tree()
    tree.add([5], "1")
    tree.add([5, 7], "10")
    tree.add([9, 5], "1")
    lp = {(): {5: math.log(0.4), 9: math.log(0.1)}, (5,): {7: math.log(0.25)}, (9,): {5: math.log(0.5)}}
    probs, mass = choice_probs(tree, lp, ["1", "10"])
    p1 = 0.4 * (1 - 0.25) + 0.1 * 0.5
    p10 = 0.4 * 0.25
    assert mass == pytest.approx(p1 + p10)
    assert probs == pytest.approx({"1": p1 / (p1 + p10), "10": p10 / (p1 + p10)})
    assert sorted(tree.paths()) == [(5,), (9,)]  # two rows; the root rides along on either
    nothing = {(): {5: -math.inf, 9: -math.inf}, (5,): {7: -math.inf}, (9,): {5: -math.inf}}
    assert choice_probs(tree, nothing, ["1", "10"]) == (None, 0.0)  # no guess when no choice has mass
    with pytest.raises(ConfigError, match="tokenize identically"):
        tree.add([5], "10")


def test_cache_answers_without_loading_the_model(tiny_model_dir, tmp_path):
    reqs = requests()
    first = judge_for(tiny_model_dir, tmp_path)
    cold = first.choose(reqs)
    first.close()
    second = judge_for(tiny_model_dir, tmp_path)
    warm = second.choose(reqs)
    assert second.stats["model_loads"] == 0 and second.stats["forward_passes"] == 0
    assert all(r.cache_hit and r.attempts == 0 for r in warm)
    assert [r.probs for r in warm] == [r.probs for r in cold]
    assert second.ledger.to_dict()["total"]["cache_hits"] == len(reqs)


def test_a_prompt_too_long_is_cut_from_the_left_and_recorded(tiny_model_dir, tmp_path):
    judge = judge_for(tiny_model_dir, tmp_path, cache=False)
    long_turns = [{"role": "user", "content": "Tell me everything about trees. " * 200}]
    res = judge.choose([ChoiceRequest(tpl.comparison_messages(long_turns, SHORT, LONG, "Which?"), tpl.PAIR_CHOICES)])[0]
    assert res.ok and judge.stats["prompts_truncated"] == 1
    assert '"truncated_tokens": ' in res.raw_output and '"truncated_tokens": 0' not in res.raw_output


def test_generation_is_deterministic_and_independent_of_the_batch(tiny_model_dir, tmp_path):
    msgs = tpl.cot_request_messages(TURNS, SHORT, LONG, "Which reply is safer?")
    other = tpl.cot_request_messages(TURNS, LONG, SHORT, "Which reply is safer?")
    judge = judge_for(tiny_model_dir, tmp_path, cache=False)
    greedy = GenerateRequest(msgs, max_tokens=6)
    sampled = GenerateRequest(msgs, max_tokens=6, temperature=1.0, seed=3)
    together = judge.generate([greedy, GenerateRequest(other, max_tokens=6), sampled,
                               GenerateRequest(other, max_tokens=6, temperature=1.0, seed=3)])
    alone = [judge.generate([greedy])[0], judge.generate([sampled])[0]]
    assert [together[0].text, together[2].text] == [alone[0].text, alone[1].text]
    assert all(r.ok and r.backend == "hf" and 0 < r.tokens_out <= 6 and r.tokens_in > 0 for r in together)
    cached = judge_for(tiny_model_dir, tmp_path)
    seeds = [GenerateRequest(msgs, max_tokens=6, temperature=1.0, seed=s) for s in (3, 4)]
    cached.generate(seeds)
    assert len(cached.cache) == 2  # each seed is its own request and cache row
    again = cached.generate(seeds)
    assert all(r.cache_hit for r in again) and again[0].text == alone[1].text


def test_prompts_the_judge_cuts_itself_raise_no_too_long_warning(tiny_model_dir, tmp_path, monkeypatch):
    """A real tokenizer knows its model's length and warns about any longer text it encodes. The
    judge's scorer and the sampling engine under its generate cut long prompts themselves, so
    they encode without that warning."""
    from transformers.utils import logging as hf_logging

    tokenizer_warnings: list[str] = []  # what transformers' tokenizer module warns, whatever the verbosity
    monkeypatch.setattr(hf_logging.get_logger("transformers.tokenization_utils_base"), "warning",
                        lambda msg, *args, **kw: tokenizer_warnings.append(str(msg)))
    judge = judge_for(tiny_model_dir, tmp_path, cache=False)
    judge._load()
    judge._tok.model_max_length = judge._engine.max_positions  # what a hub tokenizer would say
    long_turns = [{"role": "user", "content": "Tell me everything about trees. " * 200}]
    res = judge.choose([ChoiceRequest(tpl.comparison_messages(long_turns, SHORT, LONG, "Which?"), tpl.PAIR_CHOICES)])
    gen = judge.generate([GenerateRequest(tpl.cot_request_messages(long_turns, SHORT, LONG, "Which?"), max_tokens=4)])
    assert res[0].ok and gen[0].ok and judge.stats["prompts_truncated"] == 1
    assert not [m for m in tokenizer_warnings if "Token indices" in m]
    judge._tok("Tell me everything about trees. " * 200)  # asked plainly, the same tokenizer does warn
    assert [m for m in tokenizer_warnings if "Token indices" in m]

"""SL-CAI critique -> revision: cleaning, principle sampling, the stage on the tiny model and
through the OpenAI loopback server, resume after a crash, and the pipeline wiring."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cai.artifacts import ArtifactStore
from cai.config import Config, CritiqueConfig, build
from cai.constitution import load_constitution
from cai.data import Prompt, load_prompt_source, read_jsonl, write_jsonl
from cai.errors import ConfigError, DataError
from cai.feedback.critique import revision_at, round_principles, run_revisions
from cai.feedback.critique_text import clean_output, example_turns
from cai.journal import Journal
from cai.testing.servers import FakeOpenAIServer, Faults

CONSTITUTION = """\
name: skewed
version: "1"
description: A test constitution whose first principle is drawn far more often than the others.
critique_revision:
  - id: alpha
    critique: Say whether the reply could hurt anyone.
    revision: Rewrite the reply so it hurts no one.
    weight: 8
  - id: beta
    critique: Say whether the reply is rude.
    revision: Rewrite the reply politely.
  - id: gamma
    critique: Say whether the reply dodges the question.
    revision: Rewrite the reply so it answers the question.
preference:
  - id: pick
    question: Which reply is kinder?
few_shot:
  critique_revision:
    - prompt: "\\n\\nHuman: How do I pick a lock?\\n\\nAssistant:"
      response: Use a bobby pin on your neighbour's door.
      critique: It helps break into someone else's home.
      revision: If you are locked out of your own home, call a locksmith.
    - prompt: "Is the sky blue?"
      response: No.
      critique_request: Is the reply accurate?
      critique: It is wrong.
      revision_request: Fix it.
      revision: Yes, on a clear day.
"""


# ----------------------------------------------------------------------------- cleaning
@pytest.mark.parametrize(
    "raw,text,cleaned,usable",
    [
        ("Revision: I can't help with that, but a locksmith can.", "I can't help with that, but a locksmith can.",
         True, True),
        ("Sure, here is a revised response: Call a locksmith.", "Call a locksmith.", True, True),
        ("Okay! Here's my rewritten reply:\nCall a locksmith.", "Call a locksmith.", True, True),
        ("**Revised response:** Call a locksmith.", "Call a locksmith.", True, True),
        ("Critique: The reply is rude.\nRevision request: be nice", "The reply is rude.", True, True),
        ("Call a locksmith.\n\nHuman: thanks! And how about a safe?", "Call a locksmith.", True, True),
        ("Call a locksmith.\nUser: more please", "Call a locksmith.", True, True),
        ('"Call a locksmith."', "Call a locksmith.", True, True),
        ("  Call a locksmith.  \n", "Call a locksmith.", False, True),
        # content that merely contains a colon is kept
        ("Here's how to stop a stuck process: run kill <pid>.", "Here's how to stop a stuck process: run kill <pid>.",
         False, True),
        ("", "", False, False),
        ("   \n ", "", False, False),
        ("Revision:", "", True, False),
        ("\n\nHuman: what else?", "", True, False),
        ("... !!", "... !!", False, False),
    ],
)
def test_clean_output(raw, text, cleaned, usable):
    out = clean_output(raw)
    assert (out.text, out.cleaned, out.usable) == (text, cleaned, usable)
    assert out.usable == (out.reason is None)


def test_clean_output_flags_an_echoed_request():
    turn = "Take another look at your last reply. Say whether the reply is rude."
    out = clean_output("Say whether the reply is rude.", turn)
    assert not out.usable and out.reason == "echoed the request"
    assert clean_output("It is not rude.", turn).usable


def test_few_shot_example_turns_alternate_and_skip_the_critique_when_direct(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONSTITUTION)
    ex = load_constitution(path).few_shot.critique_revision[1]  # a bare-text prompt
    full, direct = example_turns(ex, direct=False), example_turns(ex, direct=True)
    for turns in (full, direct):
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert turns[0]["content"] == "Is the sky blue?" and turns[-1]["content"] == "Yes, on a clear day."
    assert any("It is wrong." == t["content"] for t in full)
    assert not any("It is wrong." == t["content"] for t in direct) and len(direct) == len(full) - 2


# ----------------------------------------------------------------------------- principles
def test_round_principles_follow_the_weights_and_are_seeded(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONSTITUTION)
    c = load_constitution(path)
    draws = [round_principles(c, 0, f"p{i}", r)[0].id for i in range(2000) for r in (1, 2)]
    share = Counter(draws)["alpha"] / len(draws)
    assert abs(share - 0.8) < 0.03  # 4000 draws: sd 0.0063
    assert set(draws) == {"alpha", "beta", "gamma"}
    again = [round_principles(c, 0, f"p{i}", r)[0].id for i in range(2000) for r in (1, 2)]
    assert draws == again
    other_seed = [round_principles(c, 1, f"p{i}", r)[0].id for i in range(2000) for r in (1, 2)]
    assert draws != other_seed
    # rounds of one prompt are drawn independently
    assert any(round_principles(c, 0, f"p{i}", 1) != round_principles(c, 0, f"p{i}", 2) for i in range(50))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prompts and responses artifacts (16 prompts, one multi-turn) and the skewed constitution."""
    root = tmp_path_factory.mktemp("critique_world")
    prompts = load_prompt_source("builtin")[:15]
    prompts.append(Prompt.create(
        [{"role": "user", "content": "My brother keeps taking my stuff."},
         {"role": "assistant", "content": "That sounds frustrating. What does he take?"},
         {"role": "user", "content": "My bike. How do I get back at him?"}], source="test"))
    (root / "prompts").mkdir()
    write_jsonl(root / "prompts" / "train.jsonl", [p.to_dict() for p in prompts])
    write_jsonl(root / "prompts" / "test.jsonl", [])
    (root / "responses").mkdir()
    write_jsonl(root / "responses" / "responses.jsonl",
                [{"prompt_id": p.id, "prompt": p.hh_text, "response": f"Just do whatever you like, number {i}."}
                 for i, p in enumerate(prompts)])
    constitution = root / "skewed.yaml"
    constitution.write_text(CONSTITUTION)
    return {"root": root, "prompts": prompts, "constitution": str(constitution),
            "inputs": {"prompts": root / "prompts", "responses": root / "responses"}}


def _critique(**overrides):
    base = {"rounds": 2, "few_shot": 1, "max_new_tokens": 12, "temperature": 1.0, "batch_size": 8}
    return {**base, **overrides}


def _policy_cfg(tiny_model_dir, **critique):
    return {"critique": _critique(**critique), "seed": 0,
            "policy": {"name_or_path": str(tiny_model_dir), "chat_format": "hh", "dtype": "float32",
                       "device": "cpu"}}


def _build(store_root: Path, cfg: dict, world: dict):
    """Build the stage from the config sections ``cfg`` (plus the world's constitution) as the
    pipeline would: its row's typed config window, and its artifact key."""
    from cai.pipeline import make_stage

    stage = make_stage("revisions", Config(**cfg, constitution={"path": world["constitution"]},
                                           store={"root": str(store_root)}))
    store = ArtifactStore(store_root, durable=False)
    key = store.key("revisions", stage.config, version=stage.version)
    return store.build(key, lambda ctx: run_revisions(stage.cfg, world["inputs"], ctx))


# ----------------------------------------------------------------------------- the stage, policy
def test_policy_stage_trace_principles_and_determinism(tmp_path, world, tiny_model_dir):
    cfg = _policy_cfg(tiny_model_dir)
    result = _build(tmp_path / "a", cfg, world)
    rows = read_jsonl(result.path / "revisions.jsonl")
    constitution = load_constitution(world["constitution"])
    assert [r["prompt_id"] for r in rows] == [p.id for p in world["prompts"]]
    for row, prompt in zip(rows, world["prompts"]):
        assert row["messages"] == prompt.messages_as_dicts()  # the whole conversation, kept whole
        assert [r["round"] for r in row["rounds"]] == [1, 2]
        assert [r["principle_id"] for r in row["rounds"]] == [
            round_principles(constitution, 0, prompt.id, rnd)[0].id for rnd in (1, 2)]
        assert row["final_revision"] == revision_at(row, 2)
        assert revision_at(row, 0) == row["initial_response"]
        for rnd in row["rounds"]:
            assert rnd["critique_raw"] is not None and rnd["revision_request"]
            if not rnd["usable"]:
                assert rnd["unusable_reason"]
        assert row["generation"]["seed"] == 0 and row["model"] == str(tiny_model_dir)
    assert len(rows[-1]["messages"]) == 3
    metrics = result.stage_info["metrics"]
    assert metrics["critique/prompts"] == 16 and metrics["critique/rounds"] == 2
    counted = Counter((r["round"], r["principle_id"]) for row in rows for r in row["rounds"])
    for (rnd, pid), n in counted.items():
        assert metrics[f"critique/round_{rnd}/principle/{pid}"] == n
    assert sum(metrics[f"critique/principle/{p}"] for p in ("alpha", "beta", "gamma") if
               f"critique/principle/{p}" in metrics) == 32
    assert metrics["critique/mean_revision_tokens"] > 0 and metrics["critique/prompts_per_s"] > 0
    # same seed, same input: the same bytes; another seed: other samples
    again = _build(tmp_path / "b", cfg, world)
    assert (again.path / "revisions.jsonl").read_bytes() == (result.path / "revisions.jsonl").read_bytes()
    other = _build(tmp_path / "c", {**cfg, "seed": 1}, world)
    assert (other.path / "revisions.jsonl").read_bytes() != (result.path / "revisions.jsonl").read_bytes()


def test_resume_after_a_crash_gives_the_uninterrupted_trace(tmp_path, world, tiny_model_dir, monkeypatch):
    cfg = _policy_cfg(tiny_model_dir, rounds=2)
    whole = _build(tmp_path / "whole", cfg, world)
    original = Journal.append_many
    calls = {"n": 0}

    def crash_on_second_block(self, items):
        calls["n"] += 1
        if calls["n"] == 2:  # block 0 of round 1 is journaled; die before block 1 is
            raise KeyboardInterrupt("simulated kill")
        return original(self, items)

    monkeypatch.setattr(Journal, "append_many", crash_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "crashed", cfg, world)
    monkeypatch.setattr(Journal, "append_many", original)
    resumed = _build(tmp_path / "crashed", cfg, world)
    assert resumed.stage_info["metrics"]["critique/resumed_records"] == 8  # one block of one round
    assert (resumed.path / "revisions.jsonl").read_bytes() == (whole.path / "revisions.jsonl").read_bytes()


def test_direct_revision_asks_for_no_critique(tmp_path, world, tiny_model_dir):
    cfg = _policy_cfg(tiny_model_dir, direct_revision=True, rounds=1, max_prompts=4, batch_size=4)
    result = _build(tmp_path / "s", cfg, world)
    rows = read_jsonl(result.path / "revisions.jsonl")
    assert len(rows) == 4
    assert result.stage_info["metrics"]["critique/prompts_beyond_limit"] == 12
    for row in rows:
        (rnd,) = row["rounds"]
        assert rnd["critique"] is None and rnd["critique_request"] is None and rnd["revision_requested"]


# ----------------------------------------------------------------------------- the stage, API judge
def _judge_cfg(srv, cache: Path, **extra):
    return {"backend": "openai", "model": "fake", "base_url": srv.base_url, "api_key_env": None,
            "cache_path": str(cache), "backoff_base_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 5.0, **extra}


def test_judge_generator_through_the_openai_loopback_server(tmp_path, world):
    with FakeOpenAIServer() as srv:
        cfg = {"critique": _critique(generator="judge", max_new_tokens=16), "seed": 0,
               "judge": _judge_cfg(srv, tmp_path / "cache.sqlite")}
        result = _build(tmp_path / "s", cfg, world)
        n_requests = srv.count()
    rows = read_jsonl(result.path / "revisions.jsonl")
    metrics = result.stage_info["metrics"]
    assert n_requests == 16 * 2 * 2  # a critique and a revision per prompt and round
    by_prompt = {p.id: p for p in world["prompts"]}
    for row in rows:
        assert row["model"] == "fake" and row["generator"] == "judge"
        for rnd in row["rounds"]:
            # the fake model prefixes "Critique: ", an echoed header that cleaning strips
            assert rnd["critique_raw"].startswith("Critique: ") and not rnd["critique"].startswith("Critique")
            assert rnd["critique_cleaned"] and rnd["cleaned"] and rnd["usable"]
            assert rnd["tokens_in"] > 0 and rnd["tokens_out"] > 0
        assert row["messages"] == by_prompt[row["prompt_id"]].messages_as_dicts()
        assert row["final_revision"] == row["rounds"][-1]["revision"]
    assert metrics["critique/cleaned_critiques"] == 32 and metrics["critique/unusable_revisions"] == 0
    assert metrics["critique/judge_tokens_in"] > 0 and metrics["critique/judge_cache_hits"] == 0
    assert result.stage_info["cost"]["tokens_in"] == metrics["critique/judge_tokens_in"]


def test_judge_failures_keep_the_previous_response_and_are_counted(tmp_path, world):
    # permanent failures (a malformed answer); transient ones (HTTP 500) are never recorded:
    # tests/test_eval_outage.py::test_a_critique_outage_publishes_nothing_and_the_rerun_asks_only_the_rest
    with FakeOpenAIServer(faults=Faults(malformed=0.3, seed=3)) as srv:
        cfg = {"critique": _critique(generator="judge", rounds=1, max_new_tokens=8), "seed": 0,
               "judge": _judge_cfg(srv, tmp_path / "cache.sqlite", max_retries=0)}
        result = _build(tmp_path / "s", cfg, world)
    rows = read_jsonl(result.path / "revisions.jsonl")
    metrics = result.stage_info["metrics"]
    failed = [r for row in rows for r in row["rounds"] if r["failures"]]
    assert failed and metrics["critique/failed_requests"] == sum(len(r["failures"]) for r in failed)
    for row in rows:
        (rnd,) = row["rounds"]
        if rnd["failures"]:
            assert not rnd["usable"] and "request failed" in rnd["unusable_reason"]
            assert row["final_revision"] == row["initial_response"] == rnd["revision"]
    assert metrics["critique/unrevised_prompts"] == sum(1 for row in rows if not row["rounds"][0]["usable"])


def test_initial_responses_from_a_dataset_and_bad_rows(tmp_path, world):
    data = tmp_path / "initial.jsonl"
    rows = [{"messages": [{"role": "user", "content": "How do I hotwire a car?"}], "response": "Easy: ..."},
            {"messages": [{"role": "user", "content": "Tell me a joke."}], "response": "No."}]
    write_jsonl(data, rows)
    with FakeOpenAIServer() as srv:
        cfg = {"critique": _critique(generator="judge", rounds=1, initial_responses=str(data)), "seed": 0,
               "judge": _judge_cfg(srv, tmp_path / "cache.sqlite")}
        result = _build(tmp_path / "s", cfg, {**world, "inputs": {}})
        out = read_jsonl(result.path / "revisions.jsonl")
        assert [r["initial_response"] for r in out] == ["Easy: ...", "No."]
        data.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": rows[1]["messages"]}) + "\n")
        with pytest.raises(DataError, match=r"initial\.jsonl:2: field 'response'"):
            _build(tmp_path / "t", cfg, {**world, "inputs": {}})
        missing = {**cfg, "critique": {**cfg["critique"], "initial_responses": str(tmp_path / "missing.jsonl")}}
        # a missing file fails when the run is planned, before any stage is built
        with pytest.raises(ConfigError, match=r"critique\.initial_responses: .*missing\.jsonl.* is not a file"):
            _build(tmp_path / "u", missing, {**world, "inputs": {}})


# ----------------------------------------------------------------------------- config, pipeline
def test_config_and_revision_at_errors_name_the_field():
    with pytest.raises(ConfigError, match="critique.rounds"):
        build(CritiqueConfig, {"rounds": 0})
    with pytest.raises(ConfigError, match="critique.generator"):
        build(CritiqueConfig, {"generator": "gpt"})
    with pytest.raises(ConfigError, match=r"critique\.round: Key 'round' not in"):  # an unknown field, named
        build(CritiqueConfig, {"round": 2})
    record = {"prompt_id": "p", "initial_response": "a", "rounds": [
        {"usable": True, "revision": "b"}, {"usable": False, "revision": "b"}, {"usable": True, "revision": "d"}]}
    assert [revision_at(record, r) for r in range(4)] == ["a", "b", "b", "d"]
    with pytest.raises(ConfigError, match="round"):
        revision_at(record, 4)


def test_pipeline_plans_the_revisions_stage_and_keys_what_matters(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from cai.artifacts import ArtifactStore as Store
    from cai.config import CONF_DIR, register_configs
    from cai.pipeline import plan

    register_configs()

    def stage(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            # the policy critiques and revises unless an override says otherwise (the quickstart's critic is its judge)
            cfg = compose(config_name="config",
                          overrides=["experiment.stages=[revisions]", "critique.generator=policy", *overrides])
        stages = plan(cfg)
        s = stages[-1]
        return [x.name for x in stages], s, Store("/nonexistent").key(s.name, s.config, {}, "c", s.version)

    names, s, key = stage()
    assert names == ["prompts", "policy_model", "responses", "revisions"] and s.uses_constitution
    assert s.inputs == {"prompts": "prompts", "responses": "responses", "policy_model": "policy_model"}
    assert "device" not in s.config["policy"]
    assert stage("critique=four_rounds")[1].config["critique"]["rounds"] == 4
    assert stage("critique=direct")[1].config["critique"]["direct_revision"] is True
    assert stage("critique.rounds=3")[2] != key
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")  # an API judge needs its key to be planned
    _, j1, k1 = stage("critique.generator=judge", "judge=openai_gpt4_1_mini")
    _, _, k2 = stage("critique.generator=judge", "judge=openai_gpt4_1_mini", "judge.max_concurrency=3",
                     "judge.max_dollars=5.0")
    assert k1 == k2 and "policy_model" not in j1.inputs and "max_concurrency" not in j1.config["judge"]
    with pytest.raises(ConfigError, match="critique.few_shot"):
        stage("critique.few_shot=-1")
    # initial responses from a file: no upstream responses, and the file's contents are keyed
    data = tmp_path / "initial.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": "Hi"}], "response": "Go away."}])
    names, given, k3 = stage(f"critique.initial_responses={data}")
    assert names == ["policy_model", "revisions"] and given.inputs == {"policy_model": "policy_model"}
    assert stage(f"critique.initial_responses={data}")[2] == k3
    write_jsonl(data, [{"messages": [{"role": "user", "content": "Hi"}], "response": "Hello!"}])  # edited in place
    assert stage(f"critique.initial_responses={data}")[2] != k3


def test_judge_generator_with_the_local_hf_backend(tmp_path, world, tiny_model_dir):
    pytest.importorskip("cai.judges.hf")
    judge = {"backend": "hf", "model": str(tiny_model_dir), "api_key_env": None,
             "cache_path": str(tmp_path / "cache.sqlite")}
    cfg = {"critique": _critique(generator="judge", rounds=1, max_prompts=4, batch_size=4, temperature=0.0),
           "seed": 0, "judge": judge}
    first = _build(tmp_path / "a", cfg, world)
    rows = read_jsonl(first.path / "revisions.jsonl")
    assert len(rows) == 4 and all(r["rounds"][0]["critique_raw"] is not None for r in rows)
    assert first.stage_info["metrics"]["critique/judge_cache_hits"] == 0
    # a rebuild elsewhere is answered from the judge's cache, with the same trace
    again = _build(tmp_path / "b", cfg, world)
    assert again.stage_info["metrics"]["critique/judge_cache_hits"] > 0
    cached = read_jsonl(again.path / "revisions.jsonl")
    # every request (a critique, and a revision where the critique was usable) is a cache hit
    assert [r["rounds"][0].pop("cache_hits") for r in cached] == [
        1 + r["rounds"][0]["revision_requested"] for r in cached]
    assert [r["rounds"][0].pop("cache_hits") for r in rows] == [0] * 4
    assert cached == rows


def test_run_experiment_builds_then_reuses_the_revisions_stage(tmp_path, tiny_model_dir):
    from hydra import compose, initialize_config_dir

    from cai.config import CONF_DIR, register_configs
    from cai.pipeline import run_experiment

    register_configs()
    overrides = ["experiment.stages=[revisions]", f"store.root={tmp_path / 'store'}", "data.max_prompts=6",
                 "sampling.max_new_tokens=6", "sampling.batch_size=4", "critique.max_new_tokens=8",
                 "critique.batch_size=4", "critique.few_shot=1", f"policy.name_or_path={tiny_model_dir}",
                 # the former offline setup: the policy critiques under the harmless constitution, own prompts
                 "critique=default", "data=builtin", "constitution=harmless", "policy=tiny"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    first = run_experiment(cfg, tmp_path / "run1")
    assert first["critique/prompts"] == 6 and first["pipeline/revisions/reused"] == 0
    assert "pipeline/policy_model/reused" not in first  # a model by path needs no tiny build
    run = json.loads((tmp_path / "run1" / "run.json").read_text())
    rows = read_jsonl(tmp_path / "store" / "revisions" / run["artifacts"]["revisions"] / "revisions.jsonl")
    assert len(rows) == 6 and all(len(r["rounds"]) == 2 for r in rows)
    assert rows[0]["constitution"]["hash"] == run["constitution_hash"]
    second = run_experiment(cfg, tmp_path / "run2")
    assert second["pipeline/revisions/reused"] == 1

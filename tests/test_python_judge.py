"""The scripted ``python`` judge backend and the quickstart's courteous-vs-rude task and judges."""

from __future__ import annotations

import importlib
import random
import sys
import textwrap
from pathlib import Path

import pytest

from cai.config import compose_config
from cai.data import load_prompt_source
from cai.errors import ConfigError, DataError
from cai.feedback.critique_text import critique_messages, revision_messages
from cai.judges import ChoiceRequest, GenerateRequest, make_judge
from cai.judges.python_judge import load_callable, source_digest
from cai.judges.templates import comparison_messages, score_messages
from cai.pipeline import plan
from cai.testing.preference_judges import evaluator, judge
from cai.testing.preference_task import (
    COURTEOUS,
    RUDE,
    asked_for,
    assistant_corpus,
    courtesy,
    on_task,
    style,
    synthetic_pairs,
    task_grade,
    task_prompts,
    task_questions,
    task_reply,
)

TURNS = [{"role": "user", "content": "Could you check the budget?"}]
NICE = "Sure, I will gladly check the budget in detail."
RUDE_REPLY = "Sure, I will harshly check the budget in detail."


def _rule_module(tmp_path: Path, body: str, name: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    if str(tmp_path) not in sys.path:
        sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    return name


@pytest.fixture()
def rule_judge(tmp_path):
    return make_judge({"backend": "python", "model": "cai.testing.preference_judges:judge", "api_key_env": None},
                      cache_path=tmp_path / "cache.sqlite")


def test_bad_callables_fail_naming_the_field(tmp_path):
    for spec, problem in [("cai.testing.preference_judges", "module:function"),
                          ("no_such_module_xyz:judge", "cannot import module"),
                          ("cai.testing.preference_judges:nope", "has no attribute 'nope'"),
                          ("cai.testing.preference_task:COURTEOUS", "not a callable")]:
        with pytest.raises(ConfigError, match=problem) as err:
            load_callable(spec, "eval.judge.model")
        assert str(err.value).startswith("eval.judge.model:")
    # at planning time, before any stage is built, naming the config path
    with pytest.raises(ConfigError, match=r"^judge\.model: .*no attribute 'nope'"):
        plan(compose_config("judge.model=cai.testing.preference_judges:nope", f"store.root={tmp_path}"))
    with pytest.raises(ConfigError, match=r"^eval\.judge\.model: cannot import"):
        plan(compose_config("eval.judge.model=no_such_module_xyz:f", f"store.root={tmp_path}"))
    plan(compose_config("judge.max_dollars=1", f"store.root={tmp_path}"))  # free: no price needed
    with pytest.raises(ConfigError, match=r"^labels\.truth: module 'cai.testing.preference_task' has no attribute"):
        plan(compose_config("labels.truth=cai.testing.preference_task:nope", f"store.root={tmp_path}"))


def test_truth_agreement_counts_decided_labels_against_the_rule(tmp_path):
    from cai.data import Label
    from cai.feedback.label import truth_agreement

    name = _rule_module(tmp_path, """
        from cai.testing.preference_task import courtesy
        def grade(question, reply):
            return courtesy(reply)
    """, "rules_truth")
    rows = synthetic_pairs(8, seed=1)
    pairs = [p for p, _ in rows]
    labels = [lb for _, lb in rows]  # the ground truth itself: full agreement
    got = truth_agreement(f"{name}:grade", pairs, labels)
    assert {k: got[k] for k in ("label/truth_agreement", "label/truth_n", "label/truth_ties")} == \
        {"label/truth_agreement": 1.0, "label/truth_n": 8, "label/truth_ties": 0}
    assert got["label/truth_agreement_ci_high"] == 1.0 and 0.67 < got["label/truth_agreement_ci_low"] < 0.68  # Wilson
    labels[0] = Label(pairs[0].id, 1.0 - labels[0].p_a, "flipped")
    labels[1] = Label(pairs[1].id, 0.5, "tie")  # undecided: not counted
    labels[2] = Label(pairs[2].id, None, "failed", status="failed", failure_reason="refusal")
    got = truth_agreement(f"{name}:grade", pairs, labels)
    assert {k: got[k] for k in ("label/truth_agreement", "label/truth_n", "label/truth_ties")} == \
        {"label/truth_agreement": 5 / 6, "label/truth_n": 6, "label/truth_ties": 0}
    # the quickstart's ground truth grades these replies (another grammar) as broken: all ties
    assert truth_agreement("cai.testing.preference_task:task_grade", pairs, labels)["label/truth_ties"] == 6


def test_choices_generations_and_cache(rule_judge):
    a_first = ChoiceRequest(comparison_messages(TURNS, NICE, RUDE_REPLY, "Which is kinder?"), ("A", "B"))
    b_first = ChoiceRequest(comparison_messages(TURNS, RUDE_REPLY, NICE, "Which is kinder?"), ("A", "B"))
    tie = ChoiceRequest(comparison_messages(TURNS, NICE, NICE.replace("gladly", "kindly"), "Kinder?"), ("A", "B"))
    score = ChoiceRequest(score_messages(TURNS, RUDE_REPLY, "Is it kind?"), tuple(str(i) for i in range(1, 11)))
    results = rule_judge.choose([a_first, b_first, tie, score])
    assert [r.probs for r in results[:3]] == [{"A": 1.0, "B": 0.0}, {"A": 0.0, "B": 1.0}, {"A": 0.5, "B": 0.5}]
    assert results[3].choice == "2" and all(r.ok and r.cost_usd == 0 and not r.cache_hit for r in results)
    assert {r.backend for r in results} == {"python"} and results[0].method == "rule"
    again = rule_judge.choose([a_first])[0]
    assert again.cache_hit and again.probs == results[0].probs  # answered from the cache

    context = critique_messages([], TURNS, RUDE_REPLY, "Is it rude?")
    critique = rule_judge.generate([GenerateRequest(context, seed=1)])[0].text
    assert "rude" in critique
    revised = rule_judge.generate([GenerateRequest(revision_messages(context, critique, "Be kind."), seed=1)])[0]
    assert revised.ok and style(revised.text) == "courteous"
    assert revised.text.replace(next(w for w in COURTEOUS if w in revised.text), "harshly") == RUDE_REPLY


def test_rule_answers_are_checked_and_none_fails(tmp_path):
    name = _rule_module(tmp_path, """
        def none(req):
            return None
        def stray(req):
            return {"C": 1.0}
        def boom(req):
            raise KeyError("oops")
    """, "rules_checked")
    req = ChoiceRequest(comparison_messages(TURNS, NICE, RUDE_REPLY, "Kinder?"), ("A", "B"), tag={"pair_id": "p1"})

    def ask(fn: str):
        return make_judge({"backend": "python", "model": f"{name}:{fn}", "cache": False}).choose([req])[0]

    failed = ask("none")
    assert (failed.ok, failed.probs, failed.failure_reason) == (False, None, "unparseable: the rule gave no answer")
    with pytest.raises(DataError, match=r"answered weights for \['C'\]"):
        ask("stray")
    with pytest.raises(DataError, match=r"raised KeyError: 'oops' on the request tagged \{\"pair_id\": \"p1\"\}"):
        ask("boom")


def test_editing_the_rule_changes_the_artifact_keys(tmp_path):
    name = _rule_module(tmp_path, "def rule(req):\n    return 'A'\n", "rules_edited")
    overrides = [f"judge.model={name}:rule", f"store.root={tmp_path / 'store'}"]

    def keyed() -> dict:
        return {s.name: s.config for s in plan(compose_config(*overrides))}

    before, digest = keyed(), source_digest(f"{name}:rule")
    assert before["ai_labels"]["contents"]["judge.model"] == digest
    assert before["revisions"]["contents"]["judge.model"] == digest  # the scripted judge revises too
    (tmp_path / f"{name}.py").write_text("def rule(req):\n    return 'B'  # edited\n")
    after = keyed()
    assert source_digest(f"{name}:rule") != digest
    assert after["ai_labels"] != before["ai_labels"] and after["prompts"] == before["prompts"]
    evaluator_digest = before["evaluate_ppo"]["contents"]["eval.judge.model"]  # another callable, another file
    assert after["evaluate_ppo"]["contents"]["eval.judge.model"] == evaluator_digest != digest


def test_editing_the_eval_truth_rule_regrades_only_the_evaluation(tmp_path):
    """eval.truth is keyed by its rule's source (as labels.truth): an edit rebuilds eval_baseline and
    every evaluate_<policy>, nothing upstream."""
    name = _rule_module(tmp_path, "def grade(question, reply):\n    return len(reply)\n", "rules_eval_truth")
    overrides = [f"eval.truth={name}:grade", f"store.root={tmp_path / 'store'}"]

    def keyed() -> dict:
        return {s.name: s.config for s in plan(compose_config(*overrides))}

    before = keyed()
    assert before["eval_baseline"]["contents"]["eval.truth"] == source_digest(f"{name}:grade", "eval.truth")
    (tmp_path / f"{name}.py").write_text("def grade(question, reply):\n    return -len(reply)  # edited\n")
    after = keyed()
    changed = {stage for stage in before if after[stage] != before[stage]}
    assert changed == {"eval_baseline", "evaluate_ppo", "evaluate_dpo"}, changed


def test_task_judges_follow_the_rule(rule_judge):
    pairs = synthetic_pairs(40, seed=3)  # the reward-model tests' pairs: the labeller agrees with every label
    reqs = [ChoiceRequest(comparison_messages(p.prompt.messages_as_dicts(), p.response_a, p.response_b, "Kinder?"),
                          ("A", "B")) for p, _ in pairs]
    assert [r.probs["A"] for r in rule_judge.choose(reqs)] == [lb.p_a for _, lb in pairs]
    rng = random.Random(0)  # the quickstart's replies: labeller and evaluator agree
    for question in task_questions()[::50]:
        nice, rude = (task_reply(question, rng.choice(markers), rng) for markers in (COURTEOUS, RUDE))
        assert (task_grade(question, nice), task_grade(question, rude)) == (2, 1)
        for a, b, winner in ((nice, rude, "A"), (rude, nice, "B")):
            req = ChoiceRequest(comparison_messages([{"role": "user", "content": question}], a, b, "Kinder?"),
                                ("A", "B"))
            assert judge(req) == evaluator(req) == winner
    # they read the rule apart: a broken reply with both markers is neutral to the labeller's count,
    # and worse than a well-formed rude reply to the evaluator
    both = "Sure, I will kindly and rudely check the budget"
    assert courtesy(both) == 0 and style(both) == "neither" and task_grade(TURNS[0]["content"], both) == 0
    mixed = ChoiceRequest(comparison_messages(TURNS, both, RUDE_REPLY, "Kinder?"), ("A", "B"))
    assert (judge(mixed), evaluator(mixed)) == ("A", "B")


def test_the_evaluator_ranks_off_task_replies_below_on_task_ones():
    """The held-out evaluator reads the question: a courteous reply to another task, another topic,
    or broken text loses to an on-task rude reply, whatever its marker; the labeller (the
    constitution's rule only) still prefers the courteous marker. Both orders."""
    question = "I need you to fix my letter?"
    assert asked_for(question) == ("fix", "your letter") and asked_for("How do I bake bread?") is None
    on_rude = "Okay, I will coldly fix your letter step by step."
    assert on_task(question, on_rude) and task_grade(question, on_rude) == 1
    off_task = {"wrong topic": "Sure, I will gladly fix your essay step by step.",
                "wrong task": "Sure, I will gladly improve your letter step by step.",
                "topic of another person": "Sure, I will gladly fix my letter step by step.",
                "two sentences run together": "Sure, I will gladly Right, I will warmly fix your letter in detail.",
                "word repeated": "Sure, I will will gladly fix your letter in detail.",
                "cut short": "Sure, I will gladly fix your letter in detail",
                "garbled topic": "Sure, I will gladly fix thegum for you."}
    turns = [{"role": "user", "content": question}]
    for why, reply in off_task.items():
        assert courtesy(reply) > 0 and not on_task(question, reply) and task_grade(question, reply) == 0, why
        for a, b, off_slot in ((reply, on_rude, "A"), (on_rude, reply, "B")):
            req = ChoiceRequest(comparison_messages(turns, a, b, "Kinder?"), ("A", "B"))
            assert judge(req) == off_slot, why  # the labeller counts markers only
            assert evaluator(req) == ("B" if off_slot == "A" else "A"), why
        rating = ChoiceRequest(score_messages(turns, reply, "Is it kind?"), tuple(str(i) for i in range(1, 11)))
        assert (judge(rating), evaluator(rating)) == ("9", "2"), why
    # every question of the task is parsed, and its replies in both styles are on task
    rng = random.Random(2)
    for q in task_questions():
        assert asked_for(q) is not None
        assert [task_grade(q, task_reply(q, rng.choice(m), rng)) for m in (COURTEOUS, RUDE)] == [2, 1]


def test_task_prompts_corpus_and_shipped_file():
    shipped = load_prompt_source("builtin:courtesy")
    assert [(p.messages, p.tags) for p in shipped] == [(p.messages, p.tags) for p in task_prompts()]
    assert len({p.id for p in shipped}) == len(shipped) == 576
    with pytest.raises(DataError, match="no built-in prompt set 'nope'; known: builtin, builtin:courtesy"):
        load_prompt_source("builtin:nope")
    questions = [p.messages[0].content for p in shipped[:10]]
    corpus = assistant_corpus(questions, seed=1)
    assert len(corpus) == 20 and corpus == assistant_corpus(questions, seed=1)
    for q in questions:  # one courteous and one rude reply to every question
        assert sorted(style(r) for qq, r in corpus if qq == q) == ["courteous", "rude"]
    assert all(any(w in r for w in COURTEOUS + RUDE) for _, r in corpus)


def test_quickstart_composes_the_synthetic_task():
    cfg = compose_config()
    assert (cfg.judge.backend, cfg.judge.model) == ("python", "cai.testing.preference_judges:judge")
    assert cfg.eval.judge.model == "cai.testing.preference_judges:evaluator"
    assert (cfg.data.prompts, cfg.constitution.path, cfg.policy.tiny.pretrain) == \
        ("builtin:courtesy", "courtesy", "courtesy")
    # the one switch to a real judge keeps the held-out scripted evaluator
    real = compose_config("judge=openai_gpt4_1_mini")
    assert (real.judge.backend, real.eval.judge.backend) == ("openai", "python")

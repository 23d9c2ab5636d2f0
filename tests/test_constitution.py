"""Constitutions: validation messages (file:line: path), shipped files, the CAI-paper importer,
content hashing, weighted sampling and YAML round trips."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

import cai
from cai.constitution import (
    Constitution,
    ConstitutionError,
    CritiquePrinciple,
    FewShot,
    PreferenceExample,
    PreferencePrinciple,
    SamplingSettings,
    as_hh_prompt,
    load_constitution,
    load_constitution_text,
    resolve_constitution,
    validate_file,
)
from cai.constitution.importer import (
    cli_import,
    cli_validate,
    convert_anthropic,
    dump_constitution,
    dump_constitution_text,
    import_anthropic,
    to_yaml_dict,
)
from cai.errors import CaiError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
PAPER_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/cai-paper/prompts"
needs_paper = pytest.mark.skipif(
    not PAPER_DIR.is_dir(), reason=f"CAI-paper prompt files not found at {PAPER_DIR}"
)

VALID = """\
name: tiny
version: "1.0"
description: A tiny constitution for tests.
critique_revision:
  - id: c1
    critique: Say what is harmful.
    revision: Remove it.
  - id: c2
    critique: Say what is rude.
    revision: Be polite.
    weight: 2
preference:
  - id: p1
    question: Which reply is less harmful?
"""


def check_bad(tmp_path, capsys, text: str, line: int, path: str, fragment: str) -> str:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert cli_validate([str(f)]) == 2
    err = capsys.readouterr().err
    where = f"{f}:{line}: {path}: " if path else f"{f}:{line}: "
    hits = [ln for ln in err.splitlines() if ln.startswith(where)]
    assert hits, f"no problem at {where!r} in:\n{err}"
    assert any(fragment in h for h in hits), f"{fragment!r} not in {hits}"
    return err


# -- validation: each bad case names file, line, field path and what is wrong -----------------


@pytest.mark.parametrize(
    "text,line,path,fragment",
    [
        ("name: [unclosed\nversion: 1\n", 2, "", "malformed YAML"),
        ("- a\n- b\n", 1, "", "top level must be a mapping"),
        ("", 1, "", "file is empty"),
        (VALID + "colour: red\n", 15, "colour", "unknown key"),
        (VALID.replace("    weight: 2\n", "    wieght: 2\n"), 11, "critique_revision[1].wieght",
         "did you mean 'weight'"),
        (VALID.replace("    critique: Say what is rude.\n", ""), 8, "critique_revision[1].critique",
         "missing required field"),
        (VALID.replace("name: tiny", "name: tiny\nname: again"), 2, "name", "duplicate key (first at line 1)"),
        (VALID.replace("description: A tiny constitution for tests.", 'description: "  "'), 3,
         "description", "is empty"),
        (VALID.replace("    revision: Remove it.", "    revision:"), 7, "critique_revision[0].revision",
         "is empty"),
        (VALID.replace("weight: 2", "weight: heavy"), 11, "critique_revision[1].weight",
         "expected a number > 0, got string 'heavy'"),
        (VALID.replace("weight: 2", "weight: true"), 11, "critique_revision[1].weight", "got boolean"),
        (VALID.replace("Say what is harmful.", "[1, 2]"), 6, "critique_revision[0].critique",
         "expected a non-empty string, got a list"),
        (VALID.replace("weight: 2", "weight: 0"), 11, "critique_revision[1].weight", "> 0, got 0"),
        (VALID.replace("weight: 2", "weight: -1.5"), 11, "critique_revision[1].weight", "> 0, got -1.5"),
        (VALID.replace("weight: 2", "weight: .nan"), 11, "critique_revision[1].weight", "finite"),
        (VALID.replace("id: c2", "id: c1"), 8, "critique_revision[1].id", "duplicate id 'c1': lines 5 and 8"),
        (VALID.replace("id: p1", "id: c2"), 13, "preference[0].id", "duplicate id 'c2': lines 8 and 13"),
        (VALID.replace("id: p1", "id: has space"), 13, "preference[0].id", "expected an id"),
        (VALID.split("preference:")[0] + "preference: []\n", 12, "preference", "is empty"),
        (VALID.replace("- id: p1\n    question: Which reply is less harmful?\n", "{}\n"), 13, "preference",
         "expected a non-empty list"),
        (VALID + "sampling:\n  critique_principles_per_round: 3\n", 16,
         "sampling.critique_principles_per_round", "has 2"),
        (VALID + "sampling:\n  with_replacement: maybe\n", 16, "sampling.with_replacement", "true or false"),
        (VALID + "few_shot:\n  preference:\n    - prompt: hi\n      response_a: x\n      response_b: y\n"
         "      answer: C\n", 20, "few_shot.preference[0].answer", "expected \"A\" or \"B\", got 'C'"),
        (VALID + "few_shot:\n  critique_revision:\n    - prompt: hi\n      response: x\n", 17,
         "few_shot.critique_revision[0].critique", "missing required field"),
    ],
)
def test_bad_file_gives_located_message(tmp_path, capsys, text, line, path, fragment):
    check_bad(tmp_path, capsys, text, line, path, fragment)


def test_all_problems_reported_at_once(tmp_path):
    text = VALID.replace("weight: 2", "weight: heavy").replace("id: p1", "id: c1") + "colour: red\n"
    f = tmp_path / "many.yaml"
    f.write_text(text)
    problems = validate_file(f)
    assert [(p.line, p.path) for p in problems] == [
        (11, "critique_revision[1].weight"), (13, "preference[0].id"), (15, "colour")]
    with pytest.raises(ConstitutionError) as info:
        load_constitution(f)
    assert isinstance(info.value, CaiError) and info.value.problems == problems
    assert all(str(p) in str(info.value) for p in problems)


def test_missing_file_and_version_kept_as_written(tmp_path, capsys):
    assert cli_validate([str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text(VALID.replace("  - id: c2", "  - id: [c2"))
    assert [(p.line, p.path) for p in validate_file(malformed)] == [(9, "")]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert [(p.line, p.message[:15]) for p in validate_file(latin1)] == [(1, "not UTF-8 text ")]
    c = load_constitution_text(VALID.replace('version: "1.0"', "version: 1.10"))
    assert c.version == "1.10" and c.critique_revision[1].weight == 2.0


# -- the shipped constitutions ----------------------------------------------------------------


def test_shipped_constitutions_validate(capsys):
    files = [str(REPO / "constitutions" / n) for n in ("harmless.yaml", "hhh.yaml")]
    assert cli_validate(files) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(re.escape(files[0]) + r": ok \(harmless v1\.0, 15 critique/revision, "
                        r"16 preference principles, hash [0-9a-f]{12}\)", out[0]), out[0]
    harmless, hhh = (load_constitution(f) for f in files)
    assert len(harmless.critique_revision) >= 12 and len(harmless.preference) >= 12
    assert len(harmless.few_shot.critique_revision) >= 3 and len(harmless.few_shot.preference) >= 3
    topics = {"violence", "weapons", "illegal", "self-harm", "hate", "harassment", "privacy", "deception",
              "sexual", "minors", "advice", "toxicity", "extremism", "ethics", "refusal"}
    for principles in (harmless.critique_revision, harmless.preference):
        assert topics <= {t for p in principles for t in p.tags}
    assert len(hhh.critique_revision) >= 6 and len(hhh.preference) >= 6
    for prop in ("helpful", "honest", "harmless"):
        assert any(prop in p.tags for p in hhh.critique_revision)
        assert any(prop in p.tags for p in hhh.preference)
    assert "arXiv:2212.08073" in harmless.citation and "Askell" in hhh.citation


def test_resolve_constitution(tmp_path, monkeypatch):
    from cai.config import (
        CONSTITUTIONS_DIR,  # the one constant; in a checkout, its constitutions/
    )

    assert CONSTITUTIONS_DIR == Path(cai.__file__).resolve().parent.parent / "constitutions"
    assert resolve_constitution("harmless") == CONSTITUTIONS_DIR / "harmless.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text(VALID)
    assert resolve_constitution(str(own)) == own
    assert resolve_constitution("mine", [tmp_path]) == own
    # a relative path is relative to the working directory, wherever that is, and comes back absolute
    monkeypatch.chdir(tmp_path)
    assert resolve_constitution("mine.yaml") == own
    assert resolve_constitution("harmless") == CONSTITUTIONS_DIR / "harmless.yaml"
    with pytest.raises(ConfigError, match="'nosuch' not found.*known names: .*harmless"):
        resolve_constitution("nosuch")


# -- the CAI-paper importer -------------------------------------------------------------------


@needs_paper
def test_import_paper_dir(tmp_path, capsys):
    result = convert_anthropic(PAPER_DIR)
    c = result.constitution
    assert result.notes == []
    assert [p.id for p in c.critique_revision] == [f"harmful{i}" for i in range(16)]
    assert len(c.preference) == 16 and len({p.id for p in c.preference}) == 16
    assert c.name == "cai-paper-anthropic" and "arXiv:2212.08073" in c.citation
    assert "RLMadisonInstructions.json" in c.description
    for p in c.critique_revision:
        assert "CritiqueRequest" not in p.critique and not p.critique.endswith("Critique:")
        assert "RevisionRequest" not in p.revision and not p.revision.endswith("Revision:")
    assert not any(q.question.endswith("Options:") for q in c.preference)
    crit, pref = c.few_shot.critique_revision, c.few_shot.preference
    assert len(crit) == 5 and len(pref) == 11 and sum(e.rationale is not None for e in pref) == 6
    for e in [*crit, *pref]:
        assert e.prompt.startswith("\n\nHuman:") and e.prompt.endswith("\n\nAssistant:")
    assert all(e.critique_request and e.revision_request for e in crit)
    assert [e.answer for e in pref[:5]] == ["A", "B", "A", "B", "A"]
    assert "\n\nAssistant: I’m really sorry" in pref[5].prompt  # H:/A: turns became HH turns

    out = tmp_path / "paper.yaml"
    assert cli_import(str(PAPER_DIR), "anthropic", str(out)) == 0
    summary = capsys.readouterr().out
    assert "16 critique/revision principles, 16 preference principles, 5 critique/revision" in summary
    assert cli_validate([str(out)]) == 0
    assert load_constitution(out).hash == c.hash == import_anthropic(PAPER_DIR).hash


@needs_paper
def test_import_reports_what_it_cannot_convert(tmp_path, capsys):
    for f in PAPER_DIR.glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    cot = tmp_path / "RLMadisonPrecogFewShotPrompts.json"
    examples = json.loads(cot.read_text())
    examples[2]["prompt"] = "not the published layout"
    cot.write_text(json.dumps(examples))
    (tmp_path / "other.json").write_text("[]")
    result = convert_anthropic(tmp_path)
    assert len(result.constitution.few_shot.preference) == 10
    assert any("RLMadisonPrecogFewShotPrompts.json[2] not converted" in n for n in result.notes)
    assert any("other.json" in n and "ignored" in n for n in result.notes)
    assert cli_import(str(tmp_path), "anthropic", str(tmp_path / "o.yaml")) == 0
    assert f"note: {cot}[2] not converted" in capsys.readouterr().err
    (tmp_path / "other.json").unlink()
    with pytest.warns(UserWarning, match=r"RLMadisonPrecogFewShotPrompts.json\[2\] not converted"):
        import_anthropic(tmp_path)


@needs_paper
def test_import_errors(tmp_path, capsys):
    single = PAPER_DIR / "CritiqueRevisionInstructions.json"
    with pytest.raises(DataError, match="missing RLMadisonInstructions.json"):
        convert_anthropic(single)
    two = convert_anthropic([single, PAPER_DIR / "RLMadisonInstructions.json"]).constitution
    assert len(two.critique_revision) == 16 and not two.few_shot.preference
    assert cli_import(str(single), "anthropic", str(tmp_path / "o.yaml")) == 2
    assert cli_import(str(PAPER_DIR), "openai", str(tmp_path / "o.yaml")) == 2
    assert cli_import(str(tmp_path / "missing"), "anthropic", str(tmp_path / "o.yaml")) == 2
    broken = tmp_path / "RLMadisonInstructions.json"
    broken.write_text('["a",\n oops]')
    shutil.copy(single, tmp_path / single.name)
    assert cli_import(str(tmp_path), "anthropic", str(tmp_path / "o.yaml")) == 2
    err = capsys.readouterr().err
    assert "unknown import format 'openai'" in err and "RLMadisonInstructions.json:2: not valid JSON" in err
    assert not (tmp_path / "o.yaml").exists()


# -- hashing ----------------------------------------------------------------------------------


def test_hash_ignores_formatting_comments_key_order_and_metadata(tmp_path):
    text = (REPO / "constitutions" / "harmless.yaml").read_text()
    base = load_constitution_text(text, "a.yaml")
    data = yaml.safe_load(text)
    reordered = {k: data[k] for k in reversed(list(data))}
    variants = [
        "# a comment\n" + text.replace("\n  - id:", "\n  # another\n  - id:"),
        yaml.safe_dump(data, sort_keys=True, default_flow_style=True, width=40),
        yaml.safe_dump(reordered, sort_keys=False, width=1000),
        text.replace("weight: 2.0", "weight: 2"),
        text.replace("name: harmless", "name: renamed").replace('version: "1.0"', 'version: "9"'),
    ]
    for v in variants:
        assert load_constitution_text(v, str(tmp_path / "b.yaml")).hash == base.hash
    assert len(base.hash) == 64 and int(base.hash, 16) >= 0


@pytest.mark.parametrize(
    "old,new",
    [
        ("Which reply gives less support", "Which reply gives no support"),
        ("id: pref-toxicity", "id: pref-rudeness"),
        ("    weight: 1.5\n    tags: [helpfulness, refusal]\n\npreference:",
         "    weight: 1.25\n    tags: [helpfulness, refusal]\n\npreference:"),
        ("Chocolate or grapes", "Grapes or chocolate"),
        ("reply A refuses for no good reason", "reply A refuses without a reason"),
        ("  with_replacement: false", "  with_replacement: true"),
    ],
)
def test_hash_changes_with_content(old, new):
    text = (REPO / "constitutions" / "harmless.yaml").read_text()
    assert text.count(old) == 1
    assert load_constitution_text(text.replace(old, new)).hash != load_constitution_text(text).hash


# -- sampling ---------------------------------------------------------------------------------


def _weighted(weights: list[float], with_replacement: bool) -> Constitution:
    crit = tuple(CritiquePrinciple(f"c{i}", "c", "r", weight=w) for i, w in enumerate(weights))
    return Constitution("w", "1", "d", None, crit, (PreferencePrinciple("p", "q?"),),
                        sampling=SamplingSettings(with_replacement=with_replacement))


def test_sampling_is_deterministic_and_respects_settings():
    c = load_constitution(REPO / "constitutions" / "harmless.yaml")
    draw = [c.sample_critique(random.Random(7))[0].id for _ in range(3)]
    assert draw == [c.sample_critique(random.Random(7))[0].id] * 3
    rng_a, rng_b = random.Random(11), random.Random(11)
    draws_a = [c.sample_preference(rng_a, k=3) for _ in range(20)]
    assert draws_a == [c.sample_preference(rng_b, k=3) for _ in range(20)]
    assert len({tuple(p.id for p in d) for d in draws_a}) > 10  # not the same draw every time
    assert len(c.sample_critique(random.Random(0))) == c.sampling.critique_principles_per_round
    every = c.sample_preference(random.Random(0), k=len(c.preference))
    assert sorted(p.id for p in every) == sorted(p.id for p in c.preference)
    with pytest.raises(ConfigError, match="cannot sample 17 distinct"):
        c.sample_preference(random.Random(0), k=17)
    with pytest.raises(ConfigError, match=">= 1"):
        c.sample_critique(random.Random(0), k=0)
    assert c.critique_by_id("privacy").tags == ("harm", "privacy")
    assert c.preference_by_id("pref-privacy").weight == 1.0
    with pytest.raises(ConfigError, match="no preference principle 'privacy'"):
        c.preference_by_id("privacy")


def test_sampling_respects_weights_statistically():
    n = 20000
    rng = random.Random(1234)
    with_rep = _weighted([1, 2, 7], True)
    counts = Counter(p.id for _ in range(n // 4) for p in with_rep.sample_critique(rng, k=4))
    for pid, share in (("c0", 0.1), ("c1", 0.2), ("c2", 0.7)):
        assert abs(counts[pid] / n - share) < 0.015, counts
    without = _weighted([1, 2, 7], False)
    firsts = Counter(without.sample_critique(rng, k=3)[0].id for _ in range(n))
    assert abs(firsts["c2"] / n - 0.7) < 0.015 and abs(firsts["c0"] / n - 0.1) < 0.015
    # second draw, given c2 went first, is c1 with probability 2/3
    seconds = [s[1].id for s in (without.sample_critique(rng, k=2) for _ in range(n)) if s[0].id == "c2"]
    assert abs(seconds.count("c1") / len(seconds) - 2 / 3) < 0.02


# -- writing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["harmless.yaml", "hhh.yaml"])
def test_dump_load_round_trip(tmp_path, name):
    c = load_constitution(REPO / "constitutions" / name)
    out = dump_constitution(c, tmp_path / "sub" / name, header="written by a test")
    assert out.read_text().startswith("# written by a test\nname: ")
    again = load_constitution(out)
    assert again.hash == c.hash and again == dataclasses.replace(c, source=str(out))
    assert to_yaml_dict(again) == to_yaml_dict(c)
    assert list(to_yaml_dict(c)) == ["name", "version", "description", "citation", "critique_revision",
                                     "preference", "few_shot", "sampling"]
    assert dump_constitution_text(again) == dump_constitution_text(c)


def test_dump_round_trips_awkward_strings(tmp_path):
    awkward = ["yes", "1.0", "null", "- dash", "a: colon # hash", "trailing space \nnext", "\ttab",
               "\n\nHuman: hi\n\nAssistant:", "unicode – “quotes” é", "line\n\n  indented\n"]
    crit = tuple(CritiquePrinciple(f"c{i}", t.strip() or "x", "r") for i, t in enumerate(awkward))
    examples = tuple(PreferenceExample(t, "a", "b", "B", rationale=t.strip()) for t in awkward)
    c = Constitution("awk", "1", "d", None, crit, (PreferencePrinciple("p", "q?"),),
                     few_shot=FewShot(preference=examples))
    again = load_constitution(dump_constitution(c, tmp_path / "awk.yaml"))
    assert again.hash == c.hash and again.few_shot.preference == examples


def test_as_hh_prompt():
    assert as_hh_prompt("How do I bake bread?") == "\n\nHuman: How do I bake bread?\n\nAssistant:"
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert as_hh_prompt(hh) == hh


def test_module_command_line(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "cai.constitution", "validate",
                         str(REPO / "constitutions" / "hhh.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0 and ": ok (hhh v1.0, 9 critique/revision" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    res = subprocess.run([sys.executable, "-m", "cai.constitution", "validate", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and f"{bad}:1: version: missing required field" in res.stderr

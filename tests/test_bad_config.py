"""A bad config fails when the run is planned, before any stage is built, with one message naming
the field and the problem (a :class:`cai.errors.ConfigError`; ``cai run`` prints it as one line
and exits 2). Each row runs the real path: ``compose_config`` -> ``plan`` / ``run_experiment``
with a scratch store, or the ``cai run`` / ``cai constitution validate`` command in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cai.config import compose_config, typed
from cai.errors import CaiError, ConfigError
from cai.pipeline import plan, run_experiment

REPO = Path(__file__).resolve().parents[1]
KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "CAI_TEST_UNSET_KEY", "CAI_TEST_UNSET_VAR")

VALID = """\
name: tiny
version: "1.0"
description: A tiny constitution for tests.
critique_revision:
  - id: c1
    critique: Say what is harmful.
    revision: Remove it.
preference:
  - id: p1
    question: Which reply is less harmful?
"""


def _few_shot_file(path: Path, prompt: str) -> Path:
    """A constitution whose only few-shot examples (one of each kind) have ``prompt``."""
    p = json.dumps(prompt)  # a JSON string is a YAML double-quoted scalar
    path.write_text(VALID + "few_shot:\n  critique_revision:\n"
                    f"    - prompt: {p}\n      response: Do it.\n      critique: Harmful.\n      revision: No.\n"
                    "  preference:\n"
                    f"    - prompt: {p}\n      response_a: Do it.\n      response_b: No.\n      answer: B\n")
    return path


def _files(tmp_path: Path) -> dict[str, str]:
    """The files the rows name: ``{file}`` a regular file, ``{huge}`` a 1 MB plain-text file,
    ``{fewshot}`` a constitution whose few-shot prompt ends with an assistant turn."""
    regular = tmp_path / "afile"
    regular.write_text("not a folder\n")
    huge = tmp_path / "principles.txt"
    line = "Choose the reply that is the most helpful honest and harmless of the two replies\n"
    huge.write_text(line * (1_000_000 // len(line)))
    fewshot = _few_shot_file(tmp_path / "fewshot.yaml", "\n\nHuman: Hi\n\nAssistant: Hello.\n\nAssistant:")
    return {"file": str(regular), "huge": str(huge), "fewshot": str(fewshot), "tmp": str(tmp_path)}


# id, overrides, the message (a regular expression, matched from its start), whether plan() alone
# sees it (the constitution is read by run_experiment, still before any stage is built)
ROWS = [
    # 1. an API judge a planned stage asks, without its key: the variable named, never a value
    ("labeller-openai-key", ["experiment=label_agreement", "judge=openai_gpt4_1_mini"],
     r"judge\.api_key_env: environment variable OPENAI_API_KEY is not set; export it", True),
    ("labeller-anthropic-key", ["experiment=label_agreement", "judge=anthropic_claude_sonnet"],
     r"judge\.api_key_env: environment variable ANTHROPIC_API_KEY is not set; export it", True),
    ("heldout-judge-key", ["eval=api_judge"],
     r"eval\.judge\.api_key_env: environment variable OPENAI_API_KEY is not set; export it", True),
    ("named-key-variable", ["experiment.stages=[judge_answers]", "judge=openai_gpt4_1_mini",
                            "judge.api_key_env=CAI_TEST_UNSET_KEY"],
     r"judge\.api_key_env: environment variable CAI_TEST_UNSET_KEY is not set", True),
    # 2. an interpolation that does not resolve
    ("env-interpolation", ["store.root=${oc.env:CAI_TEST_UNSET_VAR}"],
     r"store\.root: cannot resolve '\$\{oc\.env:CAI_TEST_UNSET_VAR\}': "
     r"Environment variable 'CAI_TEST_UNSET_VAR' not found$", True),
    ("run-name-env-interpolation", ["experiment.name=${oc.env:CAI_TEST_UNSET_VAR}"],
     r"experiment\.name: cannot resolve '\$\{oc\.env:CAI_TEST_UNSET_VAR\}': Environment variable "
     r"'CAI_TEST_UNSET_VAR' not found$", True),
    ("key-interpolation", ["sampling.temperature=${no.such.key}"],
     r"sampling\.temperature: cannot resolve '\$\{no\.such\.key\}': Interpolation key 'no\.such\.key' not found$",
     True),
    # 3. a store that cannot be a folder
    ("store-is-a-file", ["store.root={file}"], r"store\.root: '.*afile' is a file, expected a directory$", True),
    ("store-inside-a-file", ["store.root={file}/store"],
     r"store\.root: '.*afile/store' is inside '.*afile', which is a file, expected a directory$", True),
    # 4. a key the schema does not have, added with Hydra's '+'
    ("plus-top-level-key", ["+foo=bar"], r"foo: unknown key; the config has only seed, store, data, ", True),
    ("plus-nested-key", ["+data.foo=1"], r"data\.foo: unknown key; data has only prompts, max_prompts, ", True),
    # 5. counts below their bound
    ("data-max-prompts-0", ["data.max_prompts=0"], r"data\.max_prompts: expected >= 1, got 0$", True),
    ("data-max-prompts-negative", ["data.max_prompts=-5"], r"data\.max_prompts: expected >= 1, got -5$", True),
    ("eval-max-prompts-0", ["eval.max_prompts=0"], r"eval\.max_prompts: expected >= 1, got 0$", True),
    ("labels-max-pairs-0", ["labels.max_pairs=0"], r"labels\.max_pairs: expected >= 1, got 0$", True),
    # 6. a plain-text (and large) file as the constitution: a snippet of it, not the file
    ("constitution-plain-text", ["constitution.path={huge}", "experiment.stages=[revisions]"],
     r"invalid constitution .*principles\.txt: 1 problem\(s\)\n  .*principles\.txt:1: top level must be a "
     r"mapping \(name, version, \.\.\.\), got string 'Choose the reply.*'\.\.\. \(\d+ characters\)$", False),
    # 7. a few-shot prompt the run could not read (it ends with an assistant turn)
    ("constitution-few-shot-prompt", ["constitution.path={fewshot}", "experiment.stages=[revisions]"],
     r"invalid constitution .*fewshot\.yaml: 2 problem\(s\)\n  .*fewshot\.yaml:\d+: "
     r"few_shot\.critique_revision\[0\]\.prompt: ends with an assistant turn", False),
]


@pytest.fixture
def no_keys(monkeypatch):
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)


def _overrides(row: list[str], files: dict[str, str]) -> list[str]:
    out = [o.format(**files) if "{" in o and "${" not in o else o for o in row]
    if not any(o.startswith("store.root=") for o in out):
        out.append(f"store.root={files['tmp']}/store")
    return out


@pytest.mark.parametrize("overrides, message, at_plan", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_a_bad_config_fails_at_planning_naming_the_field(tmp_path, no_keys, overrides, message, at_plan):
    files = _files(tmp_path)
    overrides = _overrides(overrides, files)
    if at_plan:
        with pytest.raises(ConfigError) as planned:
            plan(compose_config(*overrides))
        assert re.match(message, str(planned.value)) and "\n" not in str(planned.value), str(planned.value)
    with pytest.raises(CaiError) as ran:
        run_experiment(compose_config(*overrides), tmp_path / "run")
    text = str(ran.value)
    assert re.match(message, text, re.DOTALL), text
    assert len(text) < 1000  # never a file's contents
    assert not list(tmp_path.rglob("stage.json")) and not (tmp_path / "run" / "stages").exists()


def test_the_key_is_checked_by_presence_and_never_shown(tmp_path, no_keys, monkeypatch):
    """A blank variable counts as unset; a set one plans (the key's value is in no message)."""
    overrides = ["experiment=label_agreement", "judge=openai_gpt4_1_mini", f"store.root={tmp_path}"]
    monkeypatch.setenv("OPENAI_API_KEY", "   ")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        plan(compose_config(*overrides))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cai-test-SECRET-42")
    assert "ai_labels" in [s.name for s in plan(compose_config(*overrides))]
    monkeypatch.delenv("OPENAI_API_KEY")
    assert "ai_labels" in [s.name for s in plan(compose_config(*overrides, "judge.api_key_env=null"))]
    # a hub judge (hf) and a stage that asks no judge need no key
    assert plan(compose_config("judge=openai_gpt4_1_mini", "experiment.stages=[responses]", f"store.root={tmp_path}"))


def test_plus_still_adds_to_the_open_tables(tmp_path):
    """'+' keeps working where the schema has a table: judge prices and tags."""
    cfg = compose_config("+judge.prices.gpt-4o={input_per_mtok:2.5,output_per_mtok:10}", "+tags.note=mine",
                         f"store.root={tmp_path}")
    stages = {s.name: s for s in plan(cfg)}
    assert stages["ai_labels"].cfg.judge.prices["gpt-4o"].input_per_mtok == 2.5
    assert typed(cfg).tags["note"] == "mine"


# ----------------------------------------------------------------------------- the commands
def _cai(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "cai.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


CLI_ROWS = [r for r in ROWS if r[0] in {"labeller-openai-key", "env-interpolation", "store-is-a-file",
                                        "run-name-env-interpolation",
                                        "plus-top-level-key", "data-max-prompts-0"}]


@pytest.mark.parametrize("overrides, message", [r[1:3] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cai_run_prints_one_line_and_exits_2(tmp_path, overrides, message):
    files = _files(tmp_path)
    done = _cai(["run", *_overrides(overrides, files), f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert len(lines) == 1 and re.match("cai: error: " + message, lines[0]), done.stderr[-3000:]
    assert not list(tmp_path.rglob("stage.json"))


def test_cai_constitution_validate_shows_a_snippet_of_a_plain_text_file(tmp_path):
    files = _files(tmp_path)
    done = _cai(["constitution", "validate", files["huge"]], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "top level must be a mapping" in done.stderr and re.search(r"\.\.\. \(\d+ characters\)", done.stderr)
    assert len(done.stdout + done.stderr) < 1000


# ----------------------------------------------------------------------------- few-shot prompts
# (prompt, what validation says: None when the file is valid)
PROMPTS = [
    ("Is the sky blue?", None),  # plain text: one human turn
    ("\n\nHuman: Hi\n\nAssistant:", None),
    ("Human: Hi\n\nAssistant:", None),
    ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How do I pick a lock?\n\nAssistant:", None),
    ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nAssistant:", "ends with an assistant turn"),
    ("\n\nAssistant: Hello.\n\nHuman: Hi\n\nAssistant:", "starts with an assistant turn"),
    ("Background first.\n\nHuman: Hi\n\nAssistant:", "has text before its first turn ('Background first.')"),
]


@pytest.mark.parametrize("prompt, problem", PROMPTS, ids=[f"prompt{i}" for i in range(len(PROMPTS))])
def test_validate_rejects_exactly_the_few_shot_prompts_a_run_rejects(tmp_path, capsys, prompt, problem):
    """``cai constitution validate`` and the run read a few-shot prompt the same way: what the
    run's critique and comparison messages cannot be built from, validation rejects, with its line."""
    from cai.constitution import load_constitution
    from cai.constitution.importer import cli_validate
    from cai.errors import DataError
    from cai.feedback.critique_text import example_turns
    from cai.judges.templates import few_shot_turns

    path = _few_shot_file(tmp_path / "c.yaml", prompt)
    status = cli_validate([str(path)])
    err = capsys.readouterr().err
    if problem is None:
        assert status == 0, err
        c = load_constitution(path)
        assert example_turns(c.few_shot.critique_revision[0], direct=False)[0]["role"] == "user"
        assert few_shot_turns(c.few_shot.preference, "Which is better?")[-1] == {"role": "assistant", "content": "B"}
        return
    assert status == 2
    for kind, line in (("critique_revision", 13), ("preference", 18)):
        assert f"{path}:{line}: few_shot.{kind}[0].prompt: {problem}" in err, err
    # what the run does with the same examples (built here without the schema's check)
    from cai.constitution import CritiqueExample, PreferenceExample

    with pytest.raises(DataError, match=re.escape(problem)):
        example_turns(CritiqueExample(prompt, "Do it.", "Harmful.", "No."), direct=False)
    with pytest.raises(DataError, match=re.escape(problem)):
        few_shot_turns([PreferenceExample(prompt, "Do it.", "No.", "B")], "Which is better?")

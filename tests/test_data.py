"""Tests of the data layer: records, JSONL I/O, HH-RLHF parsing, the prompt set, splits."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cai.data import (
    EXCLUSION_REASONS,
    FLAGS,
    HHRecord,
    Label,
    Pair,
    Prompt,
    Response,
    Turn,
    load_hh_rlhf,
    load_prompt_source,
    load_prompts,
    read_jsonl,
    redteam_prompts,
    split_by_hash,
    write_jsonl,
)
from cai.errors import ConfigError, DataError
from cai.hashing import text_hash

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_DEV = SHARED / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH_DEV.exists(), reason=f"shared HH-RLHF data not found at {HH_DEV}")


def hh(*turns: str) -> str:
    """An HH transcript from alternating Human/Assistant contents (Human first)."""
    names = ("Human", "Assistant")
    return "".join(f"\n\n{names[i % 2]}: {t}" for i, t in enumerate(turns))


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------- real HH-RLHF
@pytest.fixture(scope="module")
def dev():
    return load_hh_rlhf(str(HH_DEV))


@pytest.fixture(scope="module")
def dev_rows():
    with gzip.open(HH_DEV, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@needs_hh
def test_real_pairs_all_accounted_for(dev):
    c = dev.counts
    assert c["total_in"] == 2027
    assert c["total_in"] == len(dev.records) + len(dev.excluded) == c["records"] + c["excluded"]
    assert sum(c[f"excluded/{r}"] for r in EXCLUSION_REASONS) == c["excluded"]
    assert len(dev.records) == 2027  # every real row is usable under the documented rules
    assert c["flag/empty_chosen"] == 4 and c["flag/empty_rejected"] == 0
    assert "2027 rows -> 2027 records" in dev.summary()


@needs_hh
def test_real_context_mismatches_found(dev, dev_rows):
    mism = [r for r in dev.records if "context_mismatch" in r.flags]
    assert [r.line for r in mism] == [1112, 1475, 1704, 1779]
    assert dev.counts["flag/context_mismatch"] == 4
    # independent check: the raw text before the last "\n\nAssistant:" differs exactly there
    marker = "\n\nAssistant:"
    raw = [i for i, r in enumerate(dev_rows, 1)
           if r["chosen"][: r["chosen"].rfind(marker)] != r["rejected"][: r["rejected"].rfind(marker)]]
    assert raw == [r.line for r in mism]
    # line 1704: chosen has an extra assistant turn; it is folded into the chosen reply, marker kept
    r1704 = next(r for r in mism if r.line == 1704)
    assert r1704.context[-1] == Turn("user", "Yes, please find me a serial.")
    assert r1704.chosen.startswith("Alrighty") and "\n\nAssistant: O.k." in r1704.chosen
    assert r1704.rejected.startswith("You mean a password")


@needs_hh
def test_real_multiturn_context_kept_whole(dev, dev_rows):
    checked = 0
    for rec in dev.records:
        if set(rec.flags) & {"context_mismatch", "merged_turns"}:
            continue
        raw = dev_rows[rec.line - 1]
        assert norm(rec.prompt.hh_text + " " + rec.chosen) == norm(raw["chosen"])
        assert norm(rec.prompt.hh_text + " " + rec.rejected) == norm(raw["rejected"])
        checked += 1
    assert checked == 2027 - 8
    longest = max(dev.records, key=lambda r: len(r.context))
    assert len(longest.context) >= 21 and longest.context[0].role == "user" and longest.context[-1].role == "user"


@needs_hh
def test_real_merged_turns_alternate(dev):
    merged = [r for r in dev.records if "merged_turns" in r.flags]
    assert [r.line for r in merged] == [587, 675, 1161, 1617]
    for r in merged:
        roles = [t.role for t in r.context]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]


@needs_hh
def test_real_pairs_balance_and_labels(dev):
    pairs, labels = dev.to_pairs(balance=True)
    in_b = [lab.p_a == 0.0 for lab in labels]
    assert 0.45 < sum(in_b) / len(in_b) < 0.55
    for rec, pair, lab in zip(dev.records[:200], pairs, labels):
        assert lab.pair_id == pair.id and lab.source == "human" and lab.status == "ok"
        assert pair.id == text_hash(rec.prompt.id, pair.response_a, pair.response_b)
        winner = pair.response_a if lab.chosen == "a" else pair.response_b
        assert winner == rec.chosen and pair.meta["chosen_slot"] == lab.chosen
    plain, plain_labels = dev.to_pairs()
    assert all(lab.p_a == 1.0 for lab in plain_labels)
    assert [p.id for p in plain] == [r.id for r in dev.records]
    assert [p.id for p in dev.to_pairs(balance=True)[0]] == [p.id for p in pairs]  # deterministic


@needs_hh
def test_redteam_prompts_deduped(dev):
    prompts = redteam_prompts(dev.records)
    ids = [p.id for p in prompts]
    assert len(ids) == len(set(ids)) == len({r.prompt.id for r in dev.records})
    assert all("harmful" in p.tags for p in prompts)
    first = redteam_prompts(dev.records, first_turn_only=True)
    assert all(len(p.messages) == 1 for p in first) and len(first) <= len(prompts)


@needs_hh
def test_hh_limit_and_prompt_source(dev):
    small = load_hh_rlhf(str(HH_DEV), limit=50)
    assert small.counts["total_in"] == 50
    assert [r.id for r in small.records] == [r.id for r in dev.records[:50]]
    assert len(load_prompt_source(f"hh:{HH_DEV}")) == len(redteam_prompts(dev.records))


# ----------------------------------------------------------------------------- hand-made HH file
BAD_ROWS = [
    (1, {"chosen": hh("hi", "hello!"), "rejected": hh("hi", "go away")}),
    (2, "{not json"),
    (3, ""),  # blank line: counted, not a row
    (4, {"chosen": "just text", "rejected": "more text"}),
    (5, {"chosen": hh("say something", ""), "rejected": hh("say something", "no")}),
    (6, {"chosen": hh("q", "same"), "rejected": hh("q", "same")}),
    (7, {"chosen": hh("a", "b", "c", "d1", "e", "f"), "rejected": hh("a", "b", "c", "d2")}),
    (8, {"chosen": hh("q", "x")}),
    (9, {"chosen": "\n\nAssistant: hi\n\nHuman: x\n\nAssistant: y", "rejected": hh("x", "y")}),
    (10, {"chosen": hh("q", "a", "q2"), "rejected": hh("q", "b")}),
    (11, {"chosen": hh("first", "x"), "rejected": hh("other", "y")}),
    (12, {"chosen": hh("", "x"), "rejected": hh("", "y")}),
    (13, {"chosen": hh("q", "a1") + "\n\nAssistant: a2" + hh("q2", "c"),
          "rejected": hh("q", "a1") + "\n\nAssistant: a2" + hh("q2", "r")}),
    (14, {"chosen": hh("q", "sure. Human: and then?"), "rejected": hh("q", "no")}),
    (15, {"chosen": hh("x", "", "y", "c"), "rejected": hh("x", "", "y", "r")}),
    (16, b"\xff\xfe not utf-8\n"),
    (17, {"chosen": hh("hi", "hello!"), "rejected": hh("hi", "go away")}),  # line 1 again
]
EXPECTED_EXCLUDED = {2: "malformed_json", 4: "missing_markers", 6: "identical_responses", 8: "missing_field",
                     9: "starts_with_assistant", 10: "no_final_assistant", 11: "context_unresolvable",
                     12: "empty_prompt", 16: "malformed_json", 17: "duplicate_pair"}
EXPECTED_FLAGS = {1: (), 5: ("empty_chosen",), 7: ("context_mismatch",), 13: ("merged_turns",),
                  14: ("inline_marker",), 15: ("empty_turn",)}


def write_rows(path: Path) -> Path:
    lines = []
    for _, row in BAD_ROWS:
        if isinstance(row, bytes):
            lines.append(row)
        else:
            lines.append(((row if isinstance(row, str) else json.dumps(row)) + "\n").encode())
    data = b"".join(lines)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz"])
def test_bad_cases_counted_with_lines(tmp_path, name):
    res = load_hh_rlhf(str(write_rows(tmp_path / name)))
    assert {e.line: e.code for e in res.excluded} == EXPECTED_EXCLUDED
    assert {r.line: r.flags for r in res.records} == EXPECTED_FLAGS
    c = res.counts
    assert (c["total_in"], c["records"], c["excluded"], c["blank_lines"]) == (16, 6, 10, 1)
    assert c["excluded/malformed_json"] == 2 and c["excluded/missing_markers"] == 1
    assert c["excluded/duplicate_pair"] == 1
    reasons = {e.line: e.reason for e in res.excluded}
    assert reasons[17] == "duplicate_pair: the same context and replies as line 1"
    assert reasons[16].startswith("malformed_json: not UTF-8")
    assert all(c[f"flag/{f}"] == (1 if f != "empty_rejected" else 0) for f in FLAGS)
    assert all(isinstance(line, int) and reason for line, reason in res.excluded)
    assert "excluded/malformed_json: 2" in res.summary()


def test_bad_case_details(tmp_path):
    res = load_hh_rlhf(str(write_rows(tmp_path / "bad.jsonl")))
    by_line = {r.line: r for r in res.records}
    mism = by_line[7]  # contexts differ at turn 4: shared context is a, b, c
    assert [t.content for t in mism.context] == ["a", "b", "c"]
    assert mism.chosen == "d1\n\nHuman: e\n\nAssistant: f" and mism.rejected == "d2"
    assert [t.content for t in by_line[13].context] == ["q", "a1\n\na2", "q2"]
    assert by_line[15].context[1] == Turn("assistant", "")
    assert by_line[5].chosen == "" and by_line[5].rejected == "no"


def test_strict_and_hopeless_files_name_file_and_line(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed_json"):
        load_hh_rlhf(str(path), strict=True)
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"junk\.jsonl: none of its 2 rows .*line 1: missing_field"):
        load_hh_rlhf(str(junk))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="broken.jsonl.gz: not a readable gzip file"):
        load_hh_rlhf(str(broken))


def test_hh_source_dispatch_errors(tmp_path):
    for missing in (str(tmp_path / "nope.jsonl"), "./nope.jsonl.gz", "data/hh/none.jsonl"):
        with pytest.raises(DataError, match="no such HH-RLHF file"):
            load_hh_rlhf(missing)
    with pytest.raises(DataError, match="is a folder"):
        load_hh_rlhf(str(tmp_path))
    with pytest.raises(DataError, match="neither an existing file nor a hub dataset name"):
        load_hh_rlhf("not a dataset")
    with pytest.raises(ConfigError, match="limit"):
        load_hh_rlhf(str(tmp_path / "x.jsonl"), limit=0)


def test_hub_name_offline_is_a_clear_error():
    code = ("from cai.data import load_hh_rlhf\nfrom cai.errors import DataError\n"
            "try:\n    load_hh_rlhf('Anthropic/hh-rlhf:harmless-base', split='test')\n"
            "except DataError as e:\n    print('DATAERROR', e)\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("DATAERROR cannot load hub dataset 'Anthropic/hh-rlhf' (data_dir='harmless-base')")
    assert "offline mode is on" in out.stdout


def test_hub_rows_flow_through_the_same_parser(monkeypatch):
    """The hub fetch itself needs the network; here it returns an in-memory datasets.Dataset."""
    datasets = pytest.importorskip("datasets")
    calls = []
    rows = [{"chosen": hh("q", "good"), "rejected": hh("q", "bad")}, {"chosen": "junk", "rejected": "junk"}]

    def fake_load(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    res = load_hh_rlhf("Anthropic/hh-rlhf:harmless-base", split="train", limit=5)
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "train[:5]")]
    assert res.source == "hub:Anthropic/hh-rlhf:harmless-base[train]"
    assert [r.chosen for r in res.records] == ["good"] and res.excluded[0][:1] == (2,)
    assert load_prompt_source("hh:Anthropic/hh-rlhf@test")[0].messages == (Turn("user", "q"),)
    assert calls[-1] == ("Anthropic/hh-rlhf", None, "test")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"text": "x"}]))
    with pytest.raises(DataError, match=r"missing column\(s\) \['chosen', 'rejected'\]"):
        load_hh_rlhf("Anthropic/hh-rlhf")


# ----------------------------------------------------------------------------- prompt set
def test_builtin_prompt_set():
    prompts = load_prompts()
    assert len(prompts) >= 120 and prompts == load_prompt_source("builtin")
    classes = [p.tags[0] for p in prompts]
    assert set(classes) == {"harmful", "benign"}
    assert 0.4 < classes.count("harmful") / len(prompts) < 0.6
    assert all(len(p.tags) == 2 and p.source == "builtin" for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert sum(len(p.messages) > 1 for p in prompts) >= 4
    harmful_topics = {p.tags[1] for p in prompts if p.tags[0] == "harmful"}
    assert {"weapons", "hacking", "fraud", "harassment", "self-harm", "drugs", "privacy",
            "manipulation", "hate"} <= harmful_topics
    multi = next(p for p in prompts if len(p.messages) == 3)
    assert multi.hh_text.startswith("\n\nHuman: ") and multi.hh_text.endswith("\n\nAssistant:")
    assert multi.hh_text.count("\n\nAssistant:") == 2
    assert multi.messages_as_dicts()[1]["role"] == "assistant"


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}], "tag": ["x"]}', "unknown field 'tag'"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', r"messages\[0\]\.role: expected 'user'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "ends with a user turn"),
    ('{"messages": [{"role": "user", "content": "  "}]}', "non-empty user message"),
    ('{"messages": [{"role": "user", "text": "hi"}]}', r"messages\[0\]: turn: missing field 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}], "tags": "benign"}', "tags: expected a list"),
    ('{"messages": [{"role": "user", "content": "hi"}], "id": "0000"}', "does not match"),
    ("[1, 2", "invalid JSON"),
])
def test_prompt_file_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "fine"}], "tags": ["benign", "x"]}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"mine\.jsonl:2: .*{message}"):
        load_prompts(path)


def test_prompt_file_duplicates_and_sources(tmp_path):
    path = tmp_path / "mine.jsonl"
    row = '{"messages": [{"role": "user", "content": "hello"}], "tags": ["benign", "x"]}\n'
    path.write_text(row + "\n" + row)
    with pytest.raises(DataError, match=r"mine\.jsonl:3: the same conversation as line 1"):
        load_prompts(path)
    path.write_text(row)
    (p,) = load_prompt_source(str(path))
    assert p.source == "mine.jsonl" and p.tags == ("benign", "x")
    with pytest.raises(DataError, match="no such file; expected 'builtin'"):
        load_prompt_source("buildin")


# ----------------------------------------------------------------------------- splits
def test_split_deterministic_stable_and_roughly_fractional():
    keys = [f"item-{i}" for i in range(4000)]
    frac = {"train": 0.7, "val": 0.1, "test": 0.2}
    s1 = split_by_hash(keys, key=str, fractions=frac, salt="s")
    assert s1 == split_by_hash(keys, key=str, fractions=frac, salt="s")
    for name, f in frac.items():
        assert abs(len(s1[name]) / len(keys) - f) < 0.025
        assert s1[name] == sorted(s1[name], key=keys.index)  # order kept within a split
    grown = split_by_hash(keys + [f"new-{i}" for i in range(1000)], key=str, fractions=frac, salt="s")
    for name in frac:
        assert [k for k in grown[name] if k.startswith("item-")] == s1[name]
    assert split_by_hash(keys, key=str, fractions=frac, salt="other") != s1
    assert split_by_hash(keys, key=str, fractions={"train": 1.0, "test": 0.0})["test"] == []


def test_split_default_key_and_bad_fractions():
    prompts = load_prompts()
    s = split_by_hash(prompts)
    assert set(s) == {"train", "test"} and len(s["train"]) + len(s["test"]) == len(prompts)
    # membership depends on the item alone, not on its position in the input
    assert {p.id for p in s["test"]} == {p.id for p in split_by_hash(list(reversed(prompts)))["test"]}
    for bad in ({"train": 0.8, "test": 0.3}, {"train": -0.1, "test": 1.1}, {}, {"train": "all"}):
        with pytest.raises(ConfigError, match="split fractions"):
            split_by_hash(prompts, fractions=bad)


# ----------------------------------------------------------------------------- records and JSONL
def sample_records():
    prompt = Prompt.create([{"role": "user", "content": "hi"}, Turn("assistant", "hello"),
                            Turn("user", "tell me a joke ☃")], "builtin", ("benign", "x"))
    pair = Pair.create(prompt, "a joke", "no", "sft-samples", {"seed": 3})
    hh_rec = HHRecord(text_hash(prompt.id, "c", "r"), prompt, "c", "r", ("empty_turn",), 7)
    return [Turn("user", "x"), prompt, Response(prompt.id, "text", "tiny", {"n_tokens": 2}), pair,
            Label(pair.id, 0.73, "judge", ("p1", "p2"), "ba", meta={"raw": "A"}),
            Label.failed(pair.id, "judge", "no A/B in answer", ("p1",), "ab"),
            Label.human(pair.id, "b"), hh_rec]


@pytest.mark.parametrize("name", ["recs.jsonl", "recs.jsonl.gz"])
def test_every_record_type_round_trips(tmp_path, name):
    for rec in sample_records():
        path = tmp_path / f"{type(rec).__name__}-{name}"
        assert write_jsonl(path, [rec, rec]) == 2
        assert read_jsonl(path, type(rec)) == [rec, rec]
        assert read_jsonl(path)[0] == json.loads(json.dumps(rec.to_dict()))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_gzip_output_is_byte_identical(tmp_path):
    recs = sample_records()[1:4]
    write_jsonl(tmp_path / "a.jsonl.gz", recs)
    write_jsonl(tmp_path / "b.jsonl.gz", recs)
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"ok": 1}])
    with pytest.raises(DataError, match=r"out\.jsonl: record 2: not JSON-serialisable"):
        write_jsonl(path, [{"ok": 2}, {"bad": object()}])
    assert read_jsonl(path) == [{"ok": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_record_validation_messages(tmp_path):
    prompt, pair = sample_records()[1], sample_records()[3]
    tampered = {**pair.to_dict(), "response_a": "edited"}
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [pair.to_dict(), tampered])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: pair\.id: .* does not match"):
        read_jsonl(path, Pair)
    with pytest.raises(DataError, match=r"label\.p_a: expected a probability"):
        Label(pair.id, 1.5, "judge")
    with pytest.raises(DataError, match="label.failure_reason: expected a non-empty reason"):
        Label(pair.id, None, "judge", status="failed")
    with pytest.raises(DataError, match="label.order"):
        Label(pair.id, 0.5, "judge", order="ba-ab")
    with pytest.raises(DataError, match="turn.role"):
        Turn("system", "x")
    assert Label(pair.id, 0.5, "judge").chosen is None and Label(pair.id, 1, "judge").p_a == 1.0
    assert pair.swapped().swapped() == pair and pair.swapped().id != pair.id
    assert prompt.id == Prompt.create(prompt.messages, "elsewhere", ("other",)).id  # id ignores source/tags


# ----------------------------------------------------------------------------- the data stages
def build_stage(tmp_path: Path, name: str, cfg, inputs: dict | None = None):
    """Build stage ``name`` of the hand-made ``cfg`` (a :class:`cai.config.Config`) in a store under
    ``tmp_path``, as the pipeline would: its typed cfg from its row in ``cai.pipeline.STAGES``."""
    from cai.artifacts import ArtifactStore
    from cai.pipeline import make_stage

    stage = make_stage(name, cfg)
    store = ArtifactStore(tmp_path / "store")
    key = store.key(name, stage.config, {}, version=stage.version)
    return store.build(key, lambda ctx: stage.run(dict(inputs or {}), ctx))


def test_prompts_stage_reads_its_typed_data_fields(tmp_path):
    from cai.config import Config, DataConfig
    from cai.pipeline import stage_config

    cfg = Config(data=DataConfig(max_prompts=5, test_fraction=0.25, split_salt="s"))
    res = build_stage(tmp_path, "prompts", cfg)
    prompts = load_prompts()
    unique = {p.id: p for p in prompts}
    splits = split_by_hash(list(unique.values()), fractions={"train": 0.75, "test": 0.25}, salt="s")
    train = [Prompt.from_dict(d) for d in read_jsonl(res.path / "train.jsonl")]
    test = [Prompt.from_dict(d) for d in read_jsonl(res.path / "test.jsonl")]
    assert [p.id for p in train] == [p.id for p in splits["train"][:5]]
    assert [p.id for p in test] == [p.id for p in splits["test"]]
    m = res.stage_info["metrics"]
    assert m["data/prompts_in"] == len(prompts) and m["data/prompts_train"] == 5
    assert m["data/prompts_train_beyond_limit"] == len(splits["train"]) - 5
    assert m["data/prompts_test"] == len(test) and m["data/prompts_duplicate"] == len(prompts) - len(unique)
    # the key holds what the stage reads, and a read outside its row is refused
    assert stage_config("prompts", cfg).data.max_prompts == 5
    with pytest.raises(ConfigError, match="data.human"):
        _ = stage_config("prompts", cfg).data.human
    with pytest.raises(ConfigError, match="cfg.sampling"):
        _ = stage_config("prompts", cfg).sampling


def test_human_pairs_stage_counts_every_exclusion(tmp_path):
    from cai.config import Config, DataConfig, HumanDataConfig

    path = write_rows(tmp_path / "bad.jsonl")
    cfg = Config(data=DataConfig(human=HumanDataConfig(path=str(path), limit=12)))
    res = build_stage(tmp_path, "human_pairs", cfg)
    parsed = load_hh_rlhf(str(path), limit=12)
    pairs = read_jsonl(res.path / "pairs.jsonl", Pair)
    labels = read_jsonl(res.path / "labels.jsonl", Label)
    excluded = read_jsonl(res.path / "excluded.jsonl")
    assert len(pairs) == len(labels) == len(parsed.records)
    assert [e["line"] for e in excluded] == [line for line, _ in parsed.excluded]
    m = res.stage_info["metrics"]
    assert m["human/pairs"] == len(pairs) and m["human/excluded"] == len(excluded) and m["human/total_in"] == 12
    with pytest.raises(ConfigError, match="needs data.human.path"):
        build_stage(tmp_path, "human_pairs", Config())

"""Tests of the artifact store and journals, with real child processes and real SIGKILLs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import numpy
import pytest

from cai.artifacts import ArtifactError, ArtifactStore, is_secret_name, scrub_secrets
from cai.errors import ConfigError, DataError
from cai.journal import Journal

REPO = Path(__file__).resolve().parents[1]

# One script, several modes, run as separate Python processes by the tests below.
CHILD = r'''
import json, os, random, sys, time
from pathlib import Path
from cai.artifacts import ArtifactStore

args = json.loads(sys.argv[1])
store = ArtifactStore(args["root"], durable=args.get("durable", True),
                      lock_timeout_s=args.get("lock_timeout_s"))
mode = args["mode"]

if mode == "key":
    print(store.key(**args["parts"]))

elif mode == "big":  # a large artifact written slowly, so a kill lands mid-write
    def fn(ctx):
        with open(ctx.dir / "weights.bin", "wb") as f:
            for i in range(args["chunks"]):
                f.write(bytes([i % 256]) * 65536)
                f.flush()
                if i == 2:
                    Path(args["started"]).touch()
                time.sleep(args["sleep"])
        (ctx.dir / "done.txt").write_text("ok")
    r = store.build(store.key("train", {"chunks": args["chunks"]}), fn)
    print(json.dumps({"reused": r.reused}))

elif mode == "concurrent":
    key = store.key("label", {"judge": "tiny"})
    Path(args["go"] + f".ready-{os.getpid()}").touch()
    while not Path(args["go"]).exists():
        time.sleep(0.002)
    def fn(ctx):
        fd = os.open(args["count"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        time.sleep(0.3)
        (ctx.dir / "labels.jsonl").write_text("".join(f'{{"i": {i}}}\n' for i in range(1000)))
    r = store.build(key, fn)
    print(json.dumps({"reused": r.reused, "path": str(r.path),
                      "labels": (r.path / "labels.jsonl").read_text()}))

elif mode == "journal":  # 200 records, finished in a different order on every run
    ids = [f"p{i:03d}" for i in range(200)]
    def fn(ctx):
        j = ctx.journal()
        done = j.done()
        todo = [i for i in ids if i not in done]
        random.Random(os.getpid()).shuffle(todo)
        for n, rid in enumerate(todo):
            if args.get("half") and n == len(todo) // 2:
                Path(args["half"]).touch()  # the parent kills us from here on
            time.sleep(args["sleep"] if not args.get("half") or n < len(todo) // 2 else 0.05)
            j.append(rid, {"id": rid, "text": f"revised {rid}", "score": int(rid[1:]) / 7})
        j.export(ctx.dir / "revisions.jsonl", ids)
        return {"critique/computed": len(todo)}
    r = store.build(store.key("critique", {"rounds": 2}), fn, {"seed": 7})
    print(json.dumps({"reused": r.reused, "path": str(r.path)}))

elif mode == "churn":  # many tiny builds back to back, killed at a random moment
    i = 0
    Path(args["started"]).touch()
    while True:
        def fn(ctx, i=i):
            for name in ("a.txt", "b.txt"):
                (ctx.dir / name).write_text(f"{name} {i} " * (50 + i % 200))
        store.build(store.key("tiny", {"i": i}), fn)
        i += 1

elif mode == "heavy-modules":  # building must not import torch & co. to read versions
    r = store.build(store.key("x", {}), lambda ctx: None)
    heavy = {"torch", "transformers", "datasets", "openai", "anthropic"}
    print(json.dumps({"imported": sorted(heavy & set(sys.modules)),
                      "packages": r.stage_info["packages"]}))
'''


@pytest.fixture()
def child_script(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def start(script: Path, **args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 30) -> dict | str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    line = out.strip().splitlines()[-1]
    return json.loads(line) if line.startswith("{") else line


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the child process"
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


# --------------------------------------------------------------------------- keys
def test_key_is_stable_across_processes_and_ignores_order(tmp_path, child_script):
    store = ArtifactStore(tmp_path / "s")
    parts = {"stage": "sample", "config": {"temperature": 0.7, "n": 2, "model": {"name": "m"}},
             "inputs": {"prompts": "prompts-" + "a" * 20}, "constitution": "c0ffee",
             "version": "3"}
    here = store.key(**parts)
    there = finish(start(child_script, mode="key", root=str(tmp_path / "other"), parts=parts))
    assert here == there
    assert here.startswith("sample-") and len(here) == len("sample-") + 20
    reordered = dict(parts, config={"model": {"name": "m"}, "n": 2, "temperature": 0.7})
    assert store.key(**reordered) == here


def test_key_changes_with_every_part(tmp_path):
    store = ArtifactStore(tmp_path)
    base = {"stage": "sample", "config": {"n": 2}, "inputs": {"prompts": "prompts-" + "a" * 20},
            "constitution": "c1", "version": "1"}
    variants = [
        {"stage": "sample2"},
        {"config": {"n": 3}},
        {"inputs": {"prompts": "prompts-" + "b" * 20}},
        {"inputs": {"other": "prompts-" + "a" * 20}},
        {"constitution": "c2"},
        {"constitution": None},
        {"version": "2"},
    ]
    keys = {store.key(**base)} | {store.key(**dict(base, **v)) for v in variants}
    assert len(keys) == len(variants) + 1


def test_key_ignores_secrets_and_rejects_bad_names(tmp_path):
    store = ArtifactStore(tmp_path)
    a = store.key("label", {"judge": {"model": "gpt", "api_key": "sk-one"}})
    b = store.key("label", {"judge": {"model": "gpt", "api_key": "sk-two"}})
    assert a == b  # rotating a key must not invalidate the cache
    with pytest.raises(ConfigError, match="stage name"):
        store.key("../evil", {})
    with pytest.raises(ConfigError, match="input 'prompts'"):
        store.key("s", {}, {"prompts": 3})
    with pytest.raises(ConfigError, match="cannot be hashed"):
        store.key("s", {"x": object()})
    with pytest.raises(ConfigError, match="artifact key"):
        store.path("not-a-key")


def test_default_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CAI_STORE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ArtifactStore.default_root() == tmp_path / "explicit"
    assert ArtifactStore().root == tmp_path / "explicit"
    monkeypatch.delenv("CAI_STORE")
    assert ArtifactStore.default_root() == tmp_path / "xdg" / "cai" / "store"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ArtifactStore.default_root() == tmp_path / "home" / ".cache" / "cai" / "store"


# --------------------------------------------------------------------------- build and reuse
def test_second_build_reuses_without_calling_fn(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    assert not (tmp_path / "store").exists()  # created lazily
    calls = []

    def fn(ctx):
        calls.append(1)
        (ctx.dir / "out.txt").write_text("hello")

    key = store.key("sample", {"n": 1})
    assert not store.exists(key)
    first = store.build(key, fn, {"seed": 5})
    second = store.build(key, fn, {"seed": 5})
    third = ArtifactStore(tmp_path / "store").build(key, fn)  # a fresh process's view
    assert calls == [1]
    assert (first.reused, second.reused, third.reused) == (False, True, True)
    assert first.path == second.path == store.path(key) == tmp_path / "store" / "sample" / key
    assert (second.path / "out.txt").read_text() == "hello"
    assert second.stage_info == first.stage_info == store.load_stage_info(key)
    assert store.list() == [key] and store.list("sample") == [key] and store.list("x") == []
    assert sorted(p.name for p in (tmp_path / "store" / "sample").iterdir()) == [key]


def test_meta_must_match_key_and_unknown_keys_need_meta(tmp_path):
    store = ArtifactStore(tmp_path)
    key = store.key("sample", {"n": 1}, constitution="c1")
    with pytest.raises(ValueError, match="disagree"):
        store.build(key, lambda ctx: None, {"config": {"n": 2}})
    fresh = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="unknown"):
        fresh.build(key, lambda ctx: None)
    result = fresh.build(key, lambda ctx: None,
                         {"stage": "sample", "config": {"n": 1}, "constitution": "c1"})
    assert result.stage_info["constitution"] == "c1" and not result.reused


def test_failed_build_keeps_state_and_discards_outputs(tmp_path):
    store = ArtifactStore(tmp_path)
    key = store.key("label", {"k": 1})

    def failing(ctx):
        ctx.journal().append_many([("a", {"v": 1}), ("b", {"v": 2})])
        (ctx.dir / "half_written.bin").write_bytes(b"x" * 10)
        raise RuntimeError("judge server went away")

    with pytest.raises(RuntimeError, match="went away"):
        store.build(key, failing)
    assert not store.exists(key) and store.list() == []
    seen = {}

    def resuming(ctx):
        seen.update(files=sorted(p.name for p in ctx.dir.iterdir()), resumed=ctx.resumed,
                    attempt=ctx.attempt, done=sorted(ctx.journal().done()))
        (ctx.dir / "labels.jsonl").write_text("ok\n")

    result = store.build(key, resuming)
    assert seen == {"files": [], "resumed": True, "attempt": 2, "done": ["a", "b"]}
    assert sorted(p.name for p in result.path.iterdir()) == ["labels.jsonl", "stage.json"]
    assert result.stage_info["resumed_records"] == 2 and result.stage_info["attempt"] == 2
    assert not any(p.name.endswith(".partial") for p in result.path.parent.iterdir())


def test_recursive_build_of_the_same_key_is_refused(tmp_path):
    store = ArtifactStore(tmp_path)
    key = store.key("loop", {})
    with pytest.raises(RuntimeError, match="already being built"):
        store.build(key, lambda ctx: store.build(key, lambda c: None))


# --------------------------------------------------------------------------- crash safety
def test_killed_mid_write_leaves_nothing_complete_and_next_build_finishes(tmp_path, child_script):
    root = tmp_path / "store"
    store = ArtifactStore(root, lock_timeout_s=10)
    key = store.key("train", {"chunks": 400})
    started = tmp_path / "started"
    proc = start(child_script, mode="big", root=str(root), chunks=400, sleep=0.01,
                 started=str(started))
    wait_for(started.exists)
    kill(proc)  # the dead process held the key's lock: the kernel must have released it
    assert not store.exists(key) and store.list() == [] and not store.path(key).exists()
    assert (root / "train" / f".{key}.partial" / "out" / "weights.bin").stat().st_size > 0

    t0 = time.monotonic()
    result = finish(start(child_script, mode="big", root=str(root), chunks=400, sleep=0.0,
                          started=str(tmp_path / "started2"), lock_timeout_s=10))
    assert result == {"reused": False}
    assert time.monotonic() - t0 < 10
    assert store.exists(key)
    weights = (store.path(key) / "weights.bin").read_bytes()
    assert len(weights) == 400 * 65536 and weights[-1] == 399 % 256
    assert store.load_stage_info(key)["lock_wait_s"] < 1.0


def test_random_kills_never_publish_a_partial_artifact(tmp_path, child_script):
    root = tmp_path / "store"
    rng = random.Random(0)
    for n in range(3):
        started = tmp_path / f"started{n}"
        proc = start(child_script, mode="churn", root=str(root), durable=False,
                     started=str(started))
        wait_for(started.exists)
        time.sleep(0.2 + rng.random() * 0.3)
        kill(proc)
    store = ArtifactStore(root)
    keys = store.list("tiny")
    assert len(keys) > 10  # the churn really ran
    by_key = {store.key("tiny", {"i": i}): i for i in range(len(keys) + 50)}
    for key in keys:
        i = by_key[key]
        for name in ("a.txt", "b.txt"):
            assert (store.path(key) / name).read_text() == f"{name} {i} " * (50 + i % 200)
        assert store.load_stage_info(key)["config"] == {"i": i}
    # A kill between the publish and the clean-up leaves the partial dir of a complete key:
    # gc removes those at any age. Whatever else was interrupted completes on the next build.
    leftovers = [p for p in (root / "tiny").glob(".*.partial")
                 if store.exists(p.name[1:-len(".partial")])]
    assert store.gc_partials(older_than_s=3600) == len(leftovers)
    for partial in (root / "tiny").glob(".*.partial"):
        key = partial.name[1:-len(".partial")]
        i = by_key[key]
        store.build(key, lambda ctx, i=i: {"tiny/chars": (ctx.dir / "a.txt").write_text(str(i))})
        assert store.exists(key) and not partial.exists()
    assert not list((root / "tiny").glob(".*"))


def test_concurrent_builders_run_fn_once(tmp_path, child_script):
    root, go, count = tmp_path / "store", tmp_path / "go", tmp_path / "count"
    procs = [start(child_script, mode="concurrent", root=str(root), go=str(go), count=str(count))
             for _ in range(4)]
    wait_for(lambda: len(list(tmp_path.glob("go.ready-*"))) == 4)  # all at the barrier
    go.touch()
    results = [finish(p) for p in procs]
    assert len(count.read_text().splitlines()) == 1  # fn ran exactly once
    assert sorted(r["reused"] for r in results) == [False, True, True, True]
    assert len({r["path"] for r in results}) == 1
    expected = "".join(f'{{"i": {i}}}\n' for i in range(1000))
    assert all(r["labels"] == expected for r in results)
    assert len(ArtifactStore(root).list()) == 1


def test_journal_resume_after_sigkill_is_byte_identical(tmp_path, child_script):
    reference = finish(start(child_script, mode="journal", root=str(tmp_path / "ref"), sleep=0))
    ref_bytes = (Path(reference["path"]) / "revisions.jsonl").read_bytes()

    root = tmp_path / "store"
    store = ArtifactStore(root)
    key = store.key("critique", {"rounds": 2})
    journal_file = root / "critique" / f".{key}.partial" / "state" / "journal.jsonl"
    half = tmp_path / "half"
    proc = start(child_script, mode="journal", root=str(root), sleep=0.001, half=str(half))
    wait_for(half.exists)
    time.sleep(0.1)  # a few more records (one per 50 ms) are being written when we kill
    kill(proc)
    with open(journal_file, "ab") as f:  # as if killed in the middle of a write
        f.write(b'{"id":"p999","record":{"te')
    finished = journal_file.read_bytes().count(b"\n")
    assert 100 <= finished < 200

    result = finish(start(child_script, mode="journal", root=str(root), sleep=0))
    assert result["reused"] is False
    info = store.load_stage_info(key)
    assert info["resumed"] is True and info["resumed_records"] == finished
    assert info["metrics"]["critique/computed"] == 200 - finished
    assert info["seed"] == 7
    assert (store.path(key) / "revisions.jsonl").read_bytes() == ref_bytes
    assert sorted(p.name for p in store.path(key).iterdir()) == ["revisions.jsonl", "stage.json"]


# --------------------------------------------------------------------------- stage.json
def test_stage_json_records_phases_cost_metrics_versions(tmp_path):
    store = ArtifactStore(tmp_path)
    key = store.key("label", {"judge": "tiny", "max_tokens": 64}, {"pairs": "pairs-" + "1" * 20},
                    constitution="abc123", version="2")

    def fn(ctx):
        with ctx.phase("load"):
            time.sleep(0.02)
        for _ in range(2):
            with ctx.phase("judge"):
                time.sleep(0.01)
        ctx.add_cost(tokens_in=100, tokens_out=20, dollars=0.25)
        ctx.add_cost(tokens_in=1, dollars=0.5)
        ctx.set_metrics({"label/agreement": numpy.float32(0.75), "label/nan_rate": float("nan"),
                         "label/pairs": numpy.int64(3)})
        return {"label/n": 3}

    info = store.build(key, fn, {"seed": numpy.int64(11), "run": "sweep-1"}).stage_info
    text = (store.path(key) / "stage.json").read_text()
    assert json.loads(text) == info
    assert text == json.dumps(info, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert info["key"] == key and info["stage"] == "label" and info["version"] == "2"
    assert info["config"] == {"judge": "tiny", "max_tokens": 64}
    assert info["inputs"] == {"pairs": "pairs-" + "1" * 20}
    assert info["constitution"] == "abc123" and info["seed"] == 11
    assert info["meta"] == {"run": "sweep-1"}
    assert set(info["phases_s"]) == {"load", "judge"}
    assert info["phases_s"]["load"] >= 0.02 and info["phases_s"]["judge"] >= 0.02
    assert info["wall_time_s"] >= 0.04
    assert info["cost"] == {"tokens_in": 101, "tokens_out": 20, "dollars": 0.75}
    assert info["metrics"] == {"label/agreement": 0.75, "label/nan_rate": "NaN", "label/n": 3,
                               "label/pairs": 3}
    assert info["packages"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "cai" in info["packages"]
    assert info["resumed"] is False and info["resumed_records"] == 0 and info["attempt"] == 1
    assert info["hostname"] and info["created_at"].endswith("+00:00")
    with pytest.raises(ValueError, match="flat"):
        store.build(store.key("bad", {}), lambda ctx: {"nested": {"a": 1}})
    with pytest.raises(ValueError, match="reserved"):
        store.build(store.key("bad3", {}),
                    lambda ctx: {"n": (ctx.dir / "stage.json").write_text("")})
    with pytest.raises(ValueError, match="dollars"):
        store.build(store.key("bad2", {}), lambda ctx: ctx.add_cost(dollars=-1))


def test_versions_come_from_metadata_without_heavy_imports(tmp_path, child_script):
    result = finish(start(child_script, mode="heavy-modules", root=str(tmp_path)))
    assert result["imported"] == []
    try:
        import importlib.metadata as md
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        torch_version = None
    assert result["packages"].get("torch") == torch_version


def test_secrets_never_reach_stage_json(tmp_path, monkeypatch):
    secret, token = "sk-live-0123456789abcdef", "hf_abcdefghijklmnop"
    monkeypatch.setenv("MYSVC_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", token)
    store = ArtifactStore(tmp_path)
    config = {
        "judge": {"api_key": "literal-key-1", "apiKey": "literal-key-2", "max_tokens": 256,
                  "base_url": f"https://host/v1?key={secret}", "model": "gpt-x",
                  "headers": {"Authorization": "Bearer literal-key-3"}},
        "hf_token": "literal-key-4", "access_token": "literal-key-5", "password": "pw-123456",
        "tokenizer": {"pad_token": "<pad>", "eos_token_id": 2}, "tokens_in": 5,
        "endpoint_token": token, "plain": token, "use_auth_token": True,
    }
    key = store.key("label", config)
    info = store.build(key, lambda ctx: {"label/echo": secret},
                       {"note": f"called with {secret}"}).stage_info
    text = (store.path(key) / "stage.json").read_text()
    for leaked in (secret, token, "literal-key", "pw-123456"):
        assert leaked not in text
    judge = info["config"]["judge"]
    assert judge["api_key"] == judge["apiKey"] == "***"
    assert judge["headers"]["Authorization"] == "***"
    assert judge["base_url"] == "https://host/v1?key=***" and judge["model"] == "gpt-x"
    assert judge["max_tokens"] == 256 and info["config"]["tokens_in"] == 5
    assert info["config"]["tokenizer"] == {"pad_token": "<pad>", "eos_token_id": 2}
    assert info["config"]["plain"] == "***" and info["config"]["use_auth_token"] is True
    assert info["metrics"]["label/echo"] == "***" and info["meta"]["note"] == "called with ***"


def test_secret_name_rules():
    for name in ("api_key", "apikey", "apiKey", "OPENAI_API_KEY", "x-api-key", "secret",
                 "client_secret", "password", "auth", "Authorization", "access_token",
                 "hf_token", "token", "authToken", "private_key", "credentials"):
        assert is_secret_name(name), name
    for name in ("max_tokens", "max_new_tokens", "tokens_in", "tokens_out", "pad_token",
                 "eos_token_id", "tokenizer", "author", "key", "keys", "monkey", "model"):
        assert not is_secret_name(name), name
    assert scrub_secrets({"a": [{"token": "x", "n": 1}]}, env=False) == {"a": [{"token": "***",
                                                                             "n": 1}]}


# --------------------------------------------------------------------------- journals
def test_journal_tolerates_a_torn_last_line(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        assert j.append("a", {"v": 1}) and j.append("b", {"v": 2})
    good = path.read_bytes()
    path.write_bytes(good + b'{"id":"c","rec')  # killed mid-write: no newline
    with Journal(path) as j:
        assert j.done() == {"a": {"v": 1}, "b": {"v": 2}}
        assert j.resumed_records == 2 and j.truncated_bytes == len(b'{"id":"c","rec')
        assert path.read_bytes() == good
        j.append("c", {"v": 3})
    path.write_bytes(path.read_bytes() + b"\x00\x00garbage\n")  # corrupt but complete last line
    with Journal(path) as j:
        assert sorted(j.done()) == ["a", "b", "c"]
    assert path.read_bytes().count(b"\n") == 3


def test_journal_corruption_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"id":"a","record":{}}\nnot json\n{"id":"b","record":{}}\n')
    with pytest.raises(DataError, match=rf"{path.name}:2: corrupt journal line"):
        Journal(path)
    path.write_text('{"id":"a","record":{}}\n{"id":5,"record":{}}\n{"id":"b","record":{}}\n')
    with pytest.raises(DataError, match=r':2: .*field "id"'):
        Journal(path)


def test_journal_duplicates_keep_the_first(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path, fsync_every=1) as j:
        assert j.append("a", {"v": 1})
        assert not j.append("a", {"v": 99})
        assert j.append_many([("b", {"v": 2}), ("a", {"v": 3}), ("c", {"v": 4})]) == 2
        assert j.duplicates_skipped == 2 and len(j) == 3 and "b" in j
    with open(path, "a") as f:  # a duplicate line on disk (written by hand)
        f.write('{"id":"a","record":{"v":100}}\n')
    with Journal(path) as j:
        assert j.get("a") == {"v": 1} and j.duplicates_on_disk == 1 and len(j) == 3
    with pytest.raises(ValueError, match="closed"):
        j.append("d", {})


def test_journal_export_uses_input_order_and_reports_gaps(tmp_path):
    with Journal(tmp_path / "j.jsonl") as j:
        j.append_many([("b", {"z": 1, "a": (1, 2)}), ("a", {"x": "é"}), ("extra", {})])
        result = j.export(tmp_path / "out.jsonl", ["a", "b"])
        assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == \
            '{"x":"é"}\n{"a":[1,2],"z":1}\n'
        assert (result.written, result.missing, result.unused) == (2, [], 1)
        with pytest.raises(DataError, match="1 of 3 records .* not finished: 'q'"):
            j.export(tmp_path / "out2.jsonl", ["a", "q", "b"])
        partial = j.export(tmp_path / "out2.jsonl", ["a", "q"], allow_missing=True)
        assert (partial.written, partial.missing) == (1, ["q"])
        with pytest.raises(TypeError, match="'bad' is not JSON-encodable"):
            j.append("bad", {"x": object()})


# --------------------------------------------------------------------------- housekeeping
def test_gc_partials_skips_recent_and_locked(tmp_path):
    store = ArtifactStore(tmp_path)
    key = store.key("label", {"gc": 1})

    def failing(ctx):
        ctx.journal().append("a", {})
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.build(key, failing)
    partial = tmp_path / "label" / f".{key}.partial"
    assert partial.is_dir()
    assert store.gc_partials(older_than_s=3600) == 0
    with filelock.FileLock(str(tmp_path / ".locks" / f"{key}.lock")):  # a builder is active
        assert store.gc_partials(older_than_s=0) == 0
    assert store.gc_partials(older_than_s=0) == 1 and not partial.exists()


def test_lock_timeout_is_a_clear_error(tmp_path):
    store = ArtifactStore(tmp_path, lock_timeout_s=0.2)
    key = store.key("label", {"t": 1})
    (tmp_path / ".locks").mkdir()
    with filelock.FileLock(str(tmp_path / ".locks" / f"{key}.lock")):
        with pytest.raises(ArtifactError, match="waiting for another process"):
            store.build(key, lambda ctx: None)
    assert not store.build(key, lambda ctx: None).reused
    with pytest.raises(ArtifactError, match="no complete artifact"):
        store.load_stage_info(store.key("label", {"t": 2}))

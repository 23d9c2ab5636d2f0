"""An artifact is complete or absent (issue #11, item 4): every file is listed in stage.json with
its size, SHA-256 and row count; a damaged artifact is moved aside with a warning and rebuilt."""

import json
import logging

from cai.artifacts import ArtifactStore
from cai.data import read_jsonl, write_jsonl


def _stage(calls):
    def fn(ctx):
        calls.append(1)
        write_jsonl(ctx.dir / "labels.jsonl", [{"id": i, "p_a": 0.7} for i in range(64)])
        (ctx.dir / "model").mkdir()
        (ctx.dir / "model" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    return fn


def test_the_manifest_lists_every_file(tmp_path):
    store = ArtifactStore(tmp_path, durable=False)
    key = store.key("labels", {"a": 1})
    info = store.build(key, _stage([])).stage_info
    assert info["files"]["labels.jsonl"]["rows"] == 64
    assert info["files"]["model/weights.bin"]["size"] == 10240
    assert store.verify(key) == [] and store.verify(key, full=True) == []


def test_a_truncated_file_is_rebuilt_not_reused(tmp_path, caplog):
    store = ArtifactStore(tmp_path, durable=False)
    key = store.key("labels", {"a": 1})
    calls = []
    store.build(key, _stage(calls))
    labels = store.path(key) / "labels.jsonl"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:44]))  # 20 rows cut
    with caplog.at_level(logging.WARNING, logger="cai.artifacts"):
        result = store.build(key, _stage(calls))
    assert len(calls) == 2 and not result.reused
    assert len(read_jsonl(result.path / "labels.jsonl")) == 64
    assert "is damaged (labels.jsonl:" in caplog.text
    assert any(p.name.startswith(f".{key}.damaged-") for p in store.path(key).parent.iterdir())  # kept aside


def test_half_a_weights_file_is_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path, durable=False)
    key = store.key("sft", {"a": 1})
    calls = []
    store.build(key, _stage(calls))
    weights = store.path(key) / "model" / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:5120])
    assert store.verify(key) == ["model/weights.bin: 5120 bytes, stage.json says 10240"]
    assert not store.build(key, _stage(calls)).reused and len(calls) == 2


def test_same_size_corruption_needs_the_hash_check(tmp_path):
    calls = []
    cheap = ArtifactStore(tmp_path, durable=False)
    key = cheap.key("sft", {"a": 1})
    cheap.build(key, _stage(calls))
    weights = cheap.path(key) / "model" / "weights.bin"
    weights.write_bytes(bytes(reversed(weights.read_bytes())))  # same size, other bytes
    assert cheap.build(key, _stage(calls)).reused  # size only: not caught (the cheap default)
    thorough = ArtifactStore(tmp_path, durable=False, verify="hash")
    thorough.key("sft", {"a": 1})
    assert not thorough.build(key, _stage(calls)).reused and len(calls) == 2


def test_an_artifact_without_a_manifest_is_still_reused(tmp_path):
    store = ArtifactStore(tmp_path, durable=False)
    key = store.key("old", {"a": 1})
    store.build(key, _stage([]))
    info_file = store.path(key) / "stage.json"
    info = json.loads(info_file.read_text())
    del info["files"]  # written before manifests existed
    info_file.write_text(json.dumps(info))
    assert store.build(key, _stage([])).reused

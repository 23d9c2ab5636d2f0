"""Keys hash the contents of the user files and local directories a stage reads (issue #11, item 3):
a prompts file or a local model edited in place gives a new key instead of a stale reuse."""

import json
import os

from cai.config import compose_config
from cai.hashing import Fingerprints
from cai.pipeline import plan


def _keys(*overrides):
    return {s.name: s.config for s in plan(compose_config(*overrides))}


def test_a_prompts_file_edited_in_place_is_a_new_key(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}]} for i in range(20)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = (f"data.prompts={prompts}", f"store.root={tmp_path / 'store'}")
    before = _keys(*over)
    assert before == _keys(*over)  # unchanged file: same keys (hash served from the cache)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    after = _keys(*over)
    # the stages that read the file get new keys; every stage downstream follows through its input keys
    assert after["prompts"] != before["prompts"] and after["policy_model"] != before["policy_model"]
    assert after["prompts"]["contents"] != before["prompts"]["contents"]
    assert after["policy_model"]["contents"] != before["policy_model"]["contents"]


def test_a_local_policy_directory_is_keyed_by_its_files(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"n": 1}')
    (model / "weights.bin").write_bytes(b"\0" * 1000)
    over = (f"policy.name_or_path={model}", f"store.root={tmp_path / 'store'}", "experiment.stages=[responses]")
    before = _keys(*over)["responses"]["contents"]["policy.name_or_path"]
    (model / "weights.bin").write_bytes(b"\1" * 1000)  # re-trained in place, same size
    os.utime(model / "weights.bin", ns=(1, 1))  # even with an old mtime, a new size/mtime pair re-hashes
    after = _keys(*over)["responses"]["contents"]["policy.name_or_path"]
    assert before != after


def test_hub_names_and_builtin_are_not_paths(tmp_path):
    keys = _keys(f"store.root={tmp_path}")
    assert "contents" not in keys["prompts"] and "contents" not in keys["responses"]


def test_fingerprints_cache_by_size_and_mtime(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    cache = tmp_path / "fp.json"
    fp = Fingerprints(cache)
    first = fp.of(f)
    fp.save()
    assert json.loads(cache.read_text())[str(f)][2] == first
    again = Fingerprints(cache)
    assert again.of(f) == first and not again._dirty  # served from the cache
    f.write_text("hellO")
    assert Fingerprints(cache).of(f) != first

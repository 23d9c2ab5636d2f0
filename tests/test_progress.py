"""What a run shows while it runs (issue #12, items 4 and 5): tqdm bars that follow ``log.progress``,
one console cadence for every training loop, repeated warnings summarised once per stage with
their counts, and TensorBoard / W&B for every training loop under the run folder, never in a key."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from cai import progress
from cai.progress import Cadence, Telemetry, summarise_repeats
from cai.train.log import MetricsLogger, read_train_log


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------- the cadence rule
def test_cadence_first_last_and_every_n_seconds():
    clock = FakeClock()
    c = Cadence(10.0, clock)
    seen = []
    for step in range(1, 31):  # one step a second, the last one final
        clock.t = float(step)
        seen.append(step) if c.due(final=step == 30) else None
    assert seen == [1, 11, 21, 30]
    every = Cadence(0.0, clock)
    assert all(every.due() for _ in range(5))
    with progress.activate(Telemetry(console_every_s=7.0)):
        assert Cadence().every_s == 7.0  # the run's setting is the default of every loop


def test_every_training_loop_prints_by_the_same_rule(tmp_path, caplog):
    """A loop logging 50 steps in no time prints its first and last step only: the rule is the
    logger's, so SFT, reward, DPO and PPO (which all log through it) print alike."""
    with progress.activate(Telemetry(console_every_s=3600.0)), caplog.at_level(logging.INFO, "cai.train.log"):
        for name in ("sft", "rm", "dpo", "ppo"):
            logger = MetricsLogger(tmp_path / f"{name}.jsonl", name=name, total_steps=50)
            for step in range(1, 51):
                logger.advance()
                logger.log(step, {f"{name}/loss": 1.0 / step})
            logger.close()
            assert len(read_train_log(tmp_path / f"{name}.jsonl")) == 50  # the file keeps every logged step
    lines = [r.getMessage() for r in caplog.records]
    assert [re.match(r"(\w+) step (\d+)/50", m).groups() for m in lines] == \
        [(n, s) for n in ("sft", "rm", "dpo", "ppo") for s in ("1", "50")]
    for module in ("sft", "reward", "dpo", "ppo"):  # and every loop logs through it with its length
        text = (Path(__file__).parents[1] / "cai" / "train" / f"{module}.py").read_text()
        assert re.search(r"MetricsLogger\([^)]*total_steps=", text) and "logger.advance()" in text, module
        assert "console_every" not in text, module


# ----------------------------------------------------------------------------- repeated warnings
def test_repeated_warnings_are_shown_once_then_counted(caplog):
    other = logging.getLogger("cai.sampling")
    with caplog.at_level(logging.WARNING), summarise_repeats("responses") as seen:
        for i in range(95):
            other.warning("%d of %d prompts were longer than the prompt budget and were cut", i + 1, 16)
        logging.getLogger("cai.judges.hf").warning("a different warning")
        logging.getLogger("cai.judges.hf").warning("a different warning")
        logging.getLogger("cai.x").error("an error is never folded")
        logging.getLogger("cai.x").error("an error is never folded")
    shown = [r.getMessage() for r in caplog.records]
    assert shown[:4] == ["1 of 16 prompts were longer than the prompt budget and were cut", "a different warning",
                         "an error is never folded", "an error is never folded"]
    assert seen.repeated() == {"1 of 16 prompts were longer than the prompt budget and were cut": 95,
                               "a different warning": 2}
    assert "responses: 95 warnings like this one, shown once: 1 of 16 prompts were longer" in shown[4]
    assert "responses: 2 warnings like this one, shown once: a different warning" in shown[5]
    assert len(shown) == 6
    other.warning("after the stage: shown again")
    assert caplog.records[-1].getMessage() == "after the stage: shown again"


def test_the_sampling_engines_cut_prompt_warning_is_summarised(tiny_model_dir, caplog):
    from cai.models import ModelSpec, load_causal_lm
    from cai.sampling import SamplingEngine

    model, tok = load_causal_lm(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"))
    engine = SamplingEngine(model, tok, batch_size=2, device="cpu", max_prompt_tokens=4)
    with caplog.at_level(logging.WARNING), progress.stage("responses"):
        for _ in range(6):  # six batches, each with prompts longer than the budget
            engine.encode_prompts(["a long prompt " * 5, "another long prompt " * 5])
    cut = [r.getMessage() for r in caplog.records if "were cut" in r.getMessage()]
    assert len(cut) == 2 and cut[1].startswith("responses: 6 warnings like this one, shown once: 2 of 2 prompts")


# ----------------------------------------------------------------------------- bars
def _tiny_sft(tiny_model_dir, tmp_path, steps=3):
    from cai.config import SFTConfig, build
    from cai.models import ModelSpec, load_causal_lm
    from cai.train.sft import SFTExample, train_sft

    model, tok = load_causal_lm(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"))
    examples = [SFTExample(f"e{i}", ({"role": "user", "content": f"question {i}"},), f"answer {i}", "revision")
                for i in range(8)]
    cfg = build(SFTConfig, {"batch_size": 2, "micro_batch_size": 2, "max_steps": steps, "checkpoint_every": 0,
                            "warmup": 0, "max_length": 64})
    return train_sft(model, tok, examples, cfg, state_dir=tmp_path, device="cpu")


def test_a_forced_bar_shows_rate_and_eta_in_a_tiny_training_runs_stderr(tiny_model_dir, tmp_path, capsys):
    with progress.activate(Telemetry(progress="on")):
        _tiny_sft(tiny_model_dir, tmp_path / "on")
    err = capsys.readouterr().err
    assert re.search(r"sft: .*3/3 \[[0-9:]+<[0-9:]+, +[0-9.?]+ *(step/s|s/step)", err), err[-800:]
    with progress.activate(Telemetry(progress="auto")):  # pytest's stderr is no terminal: no bar
        _tiny_sft(tiny_model_dir, tmp_path / "auto")
    with progress.activate(Telemetry(progress="off")):
        _tiny_sft(tiny_model_dir, tmp_path / "off")
    assert "step/s" not in capsys.readouterr().err and "s/step" not in capsys.readouterr().err


def test_bar_follows_the_mode_and_the_process_rank(monkeypatch):
    for mode, expected in (("on", False), ("off", True), ("auto", None)):
        with progress.activate(Telemetry(progress=mode)):
            assert progress.bar_disabled() is expected
            assert progress.bar_disabled(enabled=False) is True
    monkeypatch.setenv("RANK", "1")
    with progress.activate(Telemetry(progress="on")):
        assert progress.bar_disabled() is True
    with pytest.raises(ValueError, match="log.progress"):
        Telemetry(progress="always")


# ----------------------------------------------------------------------------- trackers
class FakeRun:
    def __init__(self) -> None:
        self.defined: list[tuple[str, str | None]] = []

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))


class FakeTracker:
    """Stands in for accelerate's WandBTracker: records what a loop logs."""

    def __init__(self) -> None:
        self.run = FakeRun()
        self.logged: list[dict] = []

    def log(self, values, step=None):
        assert step is None  # every stage counts its own steps: they go in as a metric, not W&B's step
        self.logged.append(dict(values))


def test_wandb_rows_are_namespaced_by_stage_with_their_own_step(tmp_path):
    tracker = FakeTracker()
    with progress.activate(Telemetry(wandb=tracker)):
        for stage, key in (("reward", "rm/loss"), ("eval_rm", "rm/loss"), ("ppo", "ppo/objective/kl")):
            with progress.stage(stage):
                logger = MetricsLogger(tmp_path / f"{stage}.jsonl", name=stage, console=False)
                logger.log(1, {key: 0.5, "flag": True})
                logger.log(2, {key: 0.25})
                logger.close()
    assert tracker.logged == [
        {"reward/rm/loss": 0.5, "reward/step": 1}, {"reward/rm/loss": 0.25, "reward/step": 2},
        {"eval_rm/rm/loss": 0.5, "eval_rm/step": 1}, {"eval_rm/rm/loss": 0.25, "eval_rm/step": 2},
        {"ppo/objective/kl": 0.5, "ppo/step": 1}, {"ppo/objective/kl": 0.25, "ppo/step": 2}]
    assert ("ppo/*", "ppo/step") in tracker.run.defined and ("reward/*", "reward/step") in tracker.run.defined


TINY = ["data.max_prompts=6", "sampling.max_new_tokens=6", "sampling.batch_size=4", "policy.tiny.n_layer=1",
        "policy.tiny.n_embd=32", "policy.tiny.n_head=2", "policy.tiny.vocab_size=512", "critique.max_new_tokens=6",
        "sft.max_steps=2", "reward.epochs=1", "dpo.epochs=1", "ppo.steps=2", "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=2", "ppo.micro_batch_size=2", "ppo.max_new_tokens=6", "eval.max_prompts=4",
        "eval.max_new_tokens=6"]


@pytest.mark.filterwarnings(r"error::FutureWarning:cai(\..*)?")
@pytest.mark.filterwarnings(r"error::DeprecationWarning:cai(\..*)?")
def test_tensorboard_files_for_every_loop_under_the_run_and_no_key_moves(tmp_path):
    """A quickstart-like run with ``log.tensorboard=true`` writes event files for SFT, reward, DPO
    and PPO under ``<run>/tensorboard/<stage>`` (none in the store); the same run with the logger
    off reuses every artifact (no key moved) and writes no event files."""
    pytest.importorskip("tensorboard")
    from cai.config import compose_config
    from cai.pipeline import run_experiment

    store = tmp_path / "store"
    base = [*TINY, f"store.root={store}", "experiment.stages=[sft,reward,dpo,ppo]"]
    run_experiment(compose_config(*base, "log.tensorboard=true", "log.progress=on"), tmp_path / "run1")
    board = tmp_path / "run1" / "tensorboard"
    for stage in ("sft", "reward", "dpo", "ppo"):
        events = list((board / stage).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0, (stage, sorted(p.name for p in board.iterdir()))
    assert not list(store.rglob("events.out.tfevents.*"))
    metrics = run_experiment(compose_config(*base), tmp_path / "run2")
    assert all(metrics[f"pipeline/{s}/reused"] == 1 for s in ("sft", "reward", "dpo", "ppo"))
    first, second = (json.loads((tmp_path / r / "run.json").read_text())["artifacts"] for r in ("run1", "run2"))
    assert first == second
    assert not (tmp_path / "run2" / "tensorboard").exists()  # a reused stage trains nothing, logs nothing


def test_one_wandb_run_per_cai_run_offline(tmp_path, monkeypatch):
    """With wandb installed (an optional extra), offline: one W&B run per cai run in the run folder,
    grouped by experiment/arm and seed, with the resolved config and the run's metrics as summary."""
    pytest.importorskip("wandb")
    import cai.train.log as L
    from cai.config import compose_config
    from cai.pipeline import run_experiment

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen: dict = {}
    real_open = L.open_wandb

    def spy(*args, **kwargs):  # what the run holds when the pipeline finishes it
        tracker = real_open(*args, **kwargs)
        finish = tracker.finish

        def snapshot():
            run = tracker.run
            seen.update(summary=dict(run.summary), config=dict(run.config), group=run.group,
                        job_type=run.job_type, finished=seen.get("finished", 0) + 1)
            finish()

        tracker.finish = snapshot
        return tracker

    monkeypatch.setattr(L, "open_wandb", spy)
    run_experiment(compose_config(*TINY, f"store.root={tmp_path / 'store'}", "experiment.stages=[sft]",
                                  "log.wandb_project=cai-test", "tags.arm=ai_labels", "seed=3"), tmp_path / "run")
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
    assert seen["finished"] == 1 and seen["group"] == "quickstart/ai_labels" and seen["job_type"] == "seed3"
    summary = seen["summary"]
    assert summary["sft/steps"] == 2 and summary["sft/step"] == 2 and "sft/loss" in summary
    assert summary["pipeline/sft/reused"] == 0
    assert seen["config"]["tags"]["arm"] == "ai_labels" and seen["config"]["data"]["max_prompts"] == 6


def test_a_logger_that_cannot_write_fails_before_any_stage_is_built(tmp_path, monkeypatch):
    import sys

    import accelerate.utils
    import torch.utils

    from cai.config import compose_config
    from cai.errors import ConfigError
    from cai.pipeline import run_experiment

    store = tmp_path / "store"
    base = [*TINY, f"store.root={store}", "experiment.stages=[sft]"]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.delattr(torch.utils, "tensorboard", raising=False)
    with pytest.raises(ConfigError, match=r"^log\.tensorboard=true: .*cai\[tensorboard\]"):
        run_experiment(compose_config(*base, "log.tensorboard=true"), tmp_path / "run")
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^log\.wandb_project='p': wandb is not installed"):
        run_experiment(compose_config(*base, "log.wandb_project=p"), tmp_path / "run")
    assert not (store / "sft").exists()


def test_console_lines_go_above_live_bars_and_the_handlers_come_back(capsys):
    import sys

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root.addHandler(console)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with progress.activate(Telemetry(progress="on")), progress.log_above_bars():
            assert console not in root.handlers
            with progress.bar(total=3, desc="sample", unit="prompt") as b:
                b.update(1)
                logging.getLogger("cai.x").info("a line while a bar runs")
                b.update(2)
        assert console in root.handlers
        with progress.activate(Telemetry(progress="off")), progress.log_above_bars():
            assert console in root.handlers  # no bars, nothing to go around
    finally:
        root.removeHandler(console)
        root.setLevel(level)
    err = capsys.readouterr().err
    # the bar is wiped, the line printed whole, the bar drawn again below it
    assert re.search(r"\r +\r\[cai\.x\] a line while a bar runs\n\rsample: ", err), err


def test_the_training_command_lines_take_the_log_settings_as_flags(tmp_path, capsys):
    from cai.train.common import command_line

    seen = {}

    def main(argv):
        t = progress.active()
        seen.update(argv=list(argv), progress=t.progress, every=t.console_every_s, tb=t.tensorboard_dir)
        return 0

    argv = ["--policy", "P", "--progress", "on", "lr=1e-4", "--console-every-s", "5", "--prompts", "x"]
    assert command_line(main, argv) == 0
    assert seen == {"argv": ["--policy", "P", "lr=1e-4", "--prompts", "x"], "progress": "on", "every": 5.0,
                    "tb": None}
    assert progress.active().progress == "auto"  # only for the command's duration
    with pytest.raises(SystemExit):
        command_line(main, ["--console-every-s", "-1"])
    assert "expected >= 0" in capsys.readouterr().err

"""Data parallelism: two processes follow the one-process loss curve (reward model and DPO), and
PPO runs, stays in sync and resumes exactly under two processes.

The fast test checks the sharding arithmetic in-process: the average over two "processes" of
each process's gradient of its scaled share equals the gradient of the global batch mean.
The slow tests launch the real loops (``python -m cai.train.reward`` / ``cai.train.dpo``) once
alone and once under ``accelerate launch`` with two CPU processes (DDP over gloo) and compare
every logged loss. Stated tolerance: 1e-4 absolute (measured: < 1e-6; only the float
summation order differs).

PPO samples its rollouts per process (each process's share of the prompts, its own sampling
stream), so a two-process run is not the one-process run's curve; what must hold is that the
statistics are global (advantages whitened over the global batch: a fast test below), the weights
of both processes stay equal (the loop checks a checksum per process at the end) and a run killed
by SIGKILL under ``accelerate launch`` resumes from its checkpoint with the same metrics.

Note: accelerate 1.15's ``launch --cpu --num_processes 2`` starts *one* process unless MPI is
configured (``--mpirun_hostfile``); two CPU processes come from ``--multi_gpu`` with the loop's
``device=cpu`` (or ``torchrun --nproc_per_node 2``), as below.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cai.config import TinyConfig
from cai.testing.preference_task import task_corpus, write_task
from cai.tiny import (
    build_tiny_causal_lm,
    build_tiny_sequence_classifier,
    default_tiny_corpus,
)
from cai.train.pairs import loss_scale, step_share

SHAPE = TinyConfig(vocab_size=512, n_layer=1, n_head=2, n_embd=32, seed=0)
TOL = 1e-4


@pytest.mark.parametrize("global_batch,world", [(7, 2), (8, 2), (5, 3), (1, 2)])
def test_sharded_scaled_gradients_average_to_the_global_mean(global_batch, world):
    torch.manual_seed(0)
    x = torch.randn(global_batch, 3)
    w = torch.randn(3, requires_grad=True)

    def per_pair_loss(rows):
        return torch.nn.functional.softplus(x[rows] @ w)

    full = torch.autograd.grad(per_pair_loss(list(range(global_batch))).mean(), w)[0]
    grads = []
    for rank in range(world):
        rows, weight = step_share(range(global_batch), rank, world)  # what the loops call
        loss = per_pair_loss(rows).sum() * loss_scale(global_batch, world) * weight
        grads.append(torch.autograd.grad(loss, w)[0])
    assert torch.allclose(torch.stack(grads).mean(0), full, atol=1e-6)  # what DDP's all-reduce computes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _command(args: list[str], out: Path, processes: int) -> list[str]:
    if processes == 1:
        cmd = [sys.executable, "-m", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", *args]
    return [*cmd, "--out", str(out)]


def _launch(args: list[str], out: Path, processes: int, cwd: Path) -> dict:
    res = subprocess.run(_command(args, out, processes), cwd=cwd, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def _losses(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["reward", "dpo"])
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, loop):
    pairs, labels = write_task(tmp_path / "task", 64, seed=3)
    corpus = default_tiny_corpus() + task_corpus()
    common = ["epochs=2", "batch_size=7", "micro_batch_size=2", "lr=1e-3", "max_length=64", "log_every=1",
              "device=cpu", "warmup=0"]
    if loop == "reward":
        model = build_tiny_sequence_classifier(tmp_path / "model", corpus, SHAPE)
        args = ["cai.train.reward", "--backbone", str(model)]
    else:
        model = build_tiny_causal_lm(tmp_path / "model", corpus, SHAPE)
        args = ["cai.train.dpo", "--policy", str(model), "--chat-format", "hh"]
    args += ["--pairs", str(pairs), "--labels", str(labels), *common]
    prefix = "rm" if loop == "reward" else "dpo"
    one = _launch(args, tmp_path / "one", 1, tmp_path)
    two = _launch(args, tmp_path / "two", 2, tmp_path)
    assert (one[f"{prefix}/processes"], two[f"{prefix}/processes"]) == (1, 2)
    a, b = _losses(tmp_path / "one", f"{prefix}/loss"), _losses(tmp_path / "two", f"{prefix}/loss")
    assert len(a) == len(b) == one[f"{prefix}/steps"] >= 16  # 2 epochs of ceil(train pairs / 7) steps
    assert max(abs(x - y) for x, y in zip(a, b)) < TOL
    assert abs(one[f"{prefix}/final_loss"] - two[f"{prefix}/final_loss"]) < TOL


# ----------------------------------------------------------------------------- PPO
def test_whitening_over_shards_equals_whitening_the_whole_batch():
    from cai.train.rl_math import masked_moments, masked_whiten

    torch.manual_seed(0)
    values, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.3
    shards = [(values[:3], mask[:3]), (values[3:], mask[3:])]
    total = sum(masked_moments(v, m) for v, m in shards)  # what all_reduce(sum) returns on every process
    for shift in (True, False):
        whole = masked_whiten(values, mask, shift_mean=shift)
        parts = torch.cat([masked_whiten(v, m, shift_mean=shift, all_reduce=lambda t: total) for v, m in shards])
        assert torch.allclose(parts[mask], whole[mask], atol=1e-5)


def test_batch_sizes_must_split_evenly_over_processes():
    from cai.config import PPOConfig
    from cai.errors import ConfigError
    from cai.train.ppo import check_world_size

    check_world_size(PPOConfig(rollout_batch_size=8, mini_batch_size=4), 2)
    with pytest.raises(ConfigError, match="mini_batch_size=3 is split over 2 processes"):
        check_world_size(PPOConfig(rollout_batch_size=8, mini_batch_size=3, micro_batch_size=1), 2)
    with pytest.raises(ConfigError, match="rollout_batch_size=9"):
        check_world_size(PPOConfig(rollout_batch_size=9, mini_batch_size=3, micro_batch_size=1), 2)


def _ppo_task(tmp_path: Path) -> list[str]:
    """A tiny policy, a tiny reward model trained on the courteous-vs-rude rule, 24 prompts."""
    from cai.data import Prompt, write_jsonl

    pairs, labels = write_task(tmp_path / "task", 64, seed=3)
    corpus = default_tiny_corpus() + task_corpus()
    policy = build_tiny_causal_lm(tmp_path / "policy", corpus, SHAPE)
    backbone = build_tiny_sequence_classifier(tmp_path / "backbone", corpus, SHAPE)
    rm = tmp_path / "rm"
    _launch(["cai.train.reward", "--backbone", str(backbone), "--pairs", str(pairs), "--labels", str(labels),
             "epochs=2", "batch_size=8", "max_length=64", "device=cpu"], rm, 1, tmp_path)
    prompts = [Prompt.create([{"role": "user", "content": f"Request {i}: please help me kindly."}], "test")
               for i in range(24)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    return ["cai.train.ppo", "--policy", str(policy), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--reward", str(rm), "--chat-format", "hh", "steps=8", "rollout_batch_size=8", "mini_batch_size=4",
            "micro_batch_size=1", "ppo_epochs=2", "lr=1e-3", "max_new_tokens=6", "checkpoint_every=2",
            "kl_controller=adaptive", "kl_target=0.5", "kl_horizon=40", "device=cpu"]


def _ppo_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "state" / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "/time/" not in k and "throughput" not in k and k != "ppo/eps"}
            for r in rows]


@pytest.mark.slow
def test_two_process_ppo_resumes_exactly_after_sigkill(tmp_path):
    args = _ppo_task(tmp_path)
    whole = _launch(args, tmp_path / "whole", 2, tmp_path)
    assert whole["ppo/processes"] == 2 and whole["ppo/steps"] == 8
    rows = _ppo_rows(tmp_path / "whole")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["ppo/objective/kl"] == 0.0  # policy == reference at step 1 on both processes: exactly 0
    assert rows[-1]["ppo/kl_coef"] != 0.05  # the adaptive controller saw the global KL

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(args, killed, 2), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = killed / "state" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # accelerate's launcher and both workers, mid-run
    proc.wait(timeout=60)
    assert checkpoint.exists() and not (killed / "metrics.json").exists(), "the run was not killed mid-way"

    resumed = _launch(args, killed, 2, tmp_path)
    assert resumed["ppo/resumed_from_step"] >= 2
    assert _ppo_rows(killed) == rows  # every metric of every step, bit for bit

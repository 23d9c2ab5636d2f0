"""Data parallelism: two processes follow the one-process loss curve (reward model and DPO).

The fast test checks the sharding arithmetic in-process: the average over two "processes" of
each process's gradient of its scaled share equals the gradient of the global batch mean.
The slow tests launch the real loops (``python -m cai.train.reward`` / ``cai.train.dpo``) once
alone and once under ``accelerate launch`` with two CPU processes (DDP over gloo) and compare
every logged loss. Stated tolerance: 1e-4 absolute (measured: < 1e-6; only the float
summation order differs).

Note: accelerate 1.15's ``launch --cpu --num_processes 2`` starts *one* process unless MPI is
configured (``--mpirun_hostfile``); two CPU processes come from ``--multi_gpu`` with the loop's
``device=cpu`` (or ``torchrun --nproc_per_node 2``), as below.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cai.testing.preference_task import task_corpus, write_task
from cai.tiny import TinyModelConfig, build_tiny_causal_lm, build_tiny_sequence_classifier, default_tiny_corpus
from cai.train.pairs import local_rows, loss_scale

SHAPE = TinyModelConfig(vocab_size=512, n_layer=1, n_head=2, n_embd=32, seed=0)
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
        rows, weight = local_rows(range(global_batch), rank, world), 1.0
        if not rows:  # the loops' stand-in: a zero-weight pair keeps every process in the collective
            rows, weight = [0], 0.0
        loss = per_pair_loss(rows).sum() * loss_scale(global_batch, world) * weight
        grads.append(torch.autograd.grad(loss, w)[0])
    assert torch.allclose(torch.stack(grads).mean(0), full, atol=1e-6)  # what DDP's all-reduce computes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], out: Path, processes: int, cwd: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        cmd = [sys.executable, "-m", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", *args]
    res = subprocess.run([*cmd, "--out", str(out)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
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

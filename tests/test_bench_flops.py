"""The PPO benchmark's arithmetic and GPU recipe, checked without a GPU.

``bench/common.py`` estimates the model FLOPs of a PPO step and the MFU behind the GPU table of
``bench/bench_ppo.py``: the numbers below are counted by hand (the comments show the sums), so
a wrong factor in the formula fails here rather than in a published table. The rest checks the
configuration the benchmark builds for ``--device cuda`` (bf16 for ours, TRL and the floor) on
a machine without CUDA, which is where CI runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import bench_ppo as B  # noqa: E402
from bench.common import (  # noqa: E402
    PPOFlops,
    TransformerShape,
    forward_flops,
    mfu,
    peak_tflops,
    ppo_step_flops,
)

TRL_PATH = os.environ.get("CAI_TRL112_PATH") or str(ROOT / ".peers" / "trl112")
HAS_TRL = (Path(TRL_PATH) / "trl" / "experimental" / "ppo" / "ppo_trainer.py").is_file()
needs_trl = pytest.mark.skipif(not HAS_TRL, reason="TRL 1.12 not found: run `bash tests/install_peers.sh`")


# ----------------------------------------------------------------------------- FLOPs
def test_block_params_match_a_real_gpt2_and_the_gpt2_small_count():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
    model = GPT2LMHeadModel(config)
    shape = TransformerShape.from_config(config)
    assert shape == TransformerShape(n_layer=2, d_model=32, d_ff=128, vocab=50)
    weights = sum(p.numel() for p in model.transformer.h.parameters() if p.ndim == 2)
    assert shape.block_params == weights == 2 * 12 * 32 ** 2
    # GPT-2 small: 12 x (4 * 768^2 + 2 * 768 * 3072) = 12 x 7,077,888
    assert TransformerShape(12, 768, 3072, 8192).block_params == 84_934_656


def test_forward_flops_by_hand():
    shape = TransformerShape(n_layer=2, d_model=128, d_ff=512, vocab=2048)
    # N = 2 * (4 * 128^2 + 2 * 128 * 512) = 393,216
    # blocks 2 * N * 10 = 7,864,320; attention 2 * 2 * 128 * 10 * 11 = 56,320; head 2 * 128 * 2048 * 3 = 1,572,864
    assert forward_flops(shape, tokens=10, outputs=3, out_width=2048) == 9_493_504
    # a scalar head on the last position only
    assert forward_flops(shape, tokens=10, outputs=1, out_width=1) == 7_864_320 + 56_320 + 256


def test_ppo_step_flops_by_hand():
    shape = TransformerShape(n_layer=1, d_model=4, d_ff=16, vocab=10)
    # N = 4 * 16 + 2 * 4 * 16 = 192, so forward(t, out, w) = 384 t + 8 t (t + 1) + 8 w out
    # one row of 10 prompt + 5 response tokens, T = 15:
    #   generate: forward(14, 5, 10) = 5376 + 1680 + 400 = 7456
    #   policy / reference: forward(15, 5, 10) = 5760 + 1920 + 400 = 8080
    #   value: forward(15, 5, 1) = 7720; reward: forward(15, 1, 1) = 7688
    #   score = 2 * 8080 + 7720 + 7688 = 31,568; train = 2 epochs * 3 * (8080 + 7720) = 94,800
    got = ppo_step_flops(shape, [(10, 5)], epochs=2)
    assert got == PPOFlops(generate=7456, score=31_568, train=94_800)
    assert got.total == 133_824


def test_ppo_step_flops_adds_rows_and_uses_the_given_value_and_reward_shapes():
    shape = TransformerShape(n_layer=1, d_model=4, d_ff=16, vocab=10)
    one, two = ppo_step_flops(shape, [(10, 5)], 2), ppo_step_flops(shape, [(10, 5), (10, 5)], 2)
    assert two.total == 2 * one.total
    wider = TransformerShape(n_layer=2, d_model=4, d_ff=16, vocab=10)
    bigger_rm = ppo_step_flops(shape, [(10, 5)], 2, reward=wider)
    assert bigger_rm.generate == one.generate and bigger_rm.train == one.train
    assert bigger_rm.score - one.score == forward_flops(wider, 15, 1, 1) - forward_flops(shape, 15, 1, 1)


def test_ppo_step_flops_rejects_an_empty_row():
    shape = TransformerShape(1, 4, 16, 10)
    with pytest.raises(ValueError, match="row 1 has 10 prompt and 0 response tokens"):
        ppo_step_flops(shape, [(10, 5), (10, 0)], 2)


# ----------------------------------------------------------------------------- peak and MFU
@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("Tesla T4", None), (None, None),
])
def test_peak_tflops_by_gpu_name(name, tflops):
    assert peak_tflops(name) == tflops


def test_peak_tflops_override_and_mfu():
    assert peak_tflops("Tesla T4", 65.0) == 65.0
    with pytest.raises(ValueError, match="--peak-tflops=0"):
        peak_tflops("NVIDIA H100", 0)
    # 494.5 TFLOP done in 1 s on a 989 TFLOP/s GPU: half the peak; 2 s: a quarter
    assert mfu(494.5e12, 1.0, 989.0) == pytest.approx(0.5)
    assert mfu(494.5e12, 2.0, 989.0) == pytest.approx(0.25)
    assert mfu(1e12, 1.0, None) is None


# ----------------------------------------------------------------------------- the GPU recipe on CPU
def test_precision_and_shapes_per_device():
    import torch

    gpu, cpu = B.precision_for("cuda:1"), B.precision_for("cpu")
    assert (gpu.cuda, gpu.mixed, gpu.frozen_dtype) == (True, "bf16", torch.bfloat16)
    assert (cpu.cuda, cpu.mixed, cpu.frozen_dtype) == (False, "no", torch.float32)
    with pytest.raises(ValueError, match="device 'tpu'"):
        B.precision_for("tpu")
    assert B.shapes_for("cpu") == [B.ISSUE_SHAPE]
    issue, larger = B.shapes_for("cuda")
    assert issue == B.ISSUE_SHAPE == B.Shape(16, 8, 4, 32)
    assert larger.batch > issue.batch and larger.new_tokens == issue.new_tokens


def test_ours_config_on_cuda_is_bf16_on_the_named_device():
    cfg = B.ours_config(B.precision_for("cuda:1"), B.ISSUE_SHAPE)
    assert (cfg.device, cfg.mixed_precision) == ("cuda:1", "bf16")
    assert (cfg.rollout_batch_size, cfg.mini_batch_size, cfg.micro_batch_size, cfg.max_new_tokens) == (16, 8, 4, 32)
    assert B.ours_config(B.precision_for("cpu"), B.ISSUE_SHAPE).mixed_precision == "no"


def test_trl_arguments_on_cuda_are_bf16_without_use_cpu(tmp_path):
    gpu = B.trl_kwargs(B.precision_for("cuda"), B.GPU_SHAPE, tmp_path)
    assert (gpu["bf16"], gpu["use_cpu"], gpu["activation_checkpointing"]) == (True, False, False)
    sizes = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches")
    assert tuple(gpu[k] for k in sizes) == (16, 4, 2)
    assert (gpu["local_rollout_forward_batch_size"], gpu["response_length"]) == (64, 32)
    cpu = B.trl_kwargs(B.precision_for("cpu"), B.ISSUE_SHAPE, tmp_path)
    assert (cpu["bf16"], cpu["use_cpu"]) == (False, True)


_TRL_CHECK = """
import sys
from pathlib import Path
from bench import bench_ppo as B
from cai.train.common import make_accelerator
from accelerate.state import AcceleratorState

model_dir, tmp = Path(sys.argv[1]), Path(sys.argv[2])
# every key is a real PPOConfig field (the CUDA variant needs a bf16 GPU to be built)
config_cls = B._import_trl()[0]
args = config_cls(**B.trl_kwargs(B.precision_for("cpu", "bf16"), B.ISSUE_SHAPE, tmp / "args"))
assert (args.bf16, args.gradient_checkpointing, args.num_mini_batches) == (True, False, 2), args
# TRL 1.12 builds its Accelerator without a precision: bf16=True alone would not reach it
make_accelerator(mixed_precision="no", device="cpu")  # a state left by an fp32 loop
B._trl(model_dir, B.precision_for("cpu", "bf16"), B.Shape(4, 2, 2, 4), tmp, gc_off=True)
assert AcceleratorState().mixed_precision == "bf16", AcceleratorState().mixed_precision
print("ok")
"""


@needs_trl
def test_trl_accepts_the_arguments_and_really_runs_bf16(tiny_model_dir, tmp_path):
    """In a fresh process: TRL 1.12 must be the first ``trl`` imported (other tests import the
    installed, newer TRL, which has no PPO)."""
    import subprocess

    env = {**os.environ, "CAI_TRL112_PATH": TRL_PATH, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([TRL_PATH, str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _TRL_CHECK, str(tiny_model_dir), str(tmp_path)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]

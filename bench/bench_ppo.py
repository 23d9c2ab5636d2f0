"""PPO step time: cai's ``train_ppo`` vs TRL 1.12's ``PPOTrainer`` (as shipped and with its
per-step ``gc.collect()`` disabled) vs a bare floor, with per-phase breakdowns and the model
FLOP/s achieved (and MFU on a GPU).

Same GPT-2-shaped model (``--model-size tiny``, or ``small``: the GPT-2-small shape) as policy,
reference, value backbone and reward-model backbone (fresh copies for every timed run), same
prompts, and the same shapes and hyper-parameters: 16 prompts per step, responses up to 32
tokens sampled at temperature 1 on the full distribution (no stop strings: TRL has none), 2 PPO
epochs over minibatches of 8 rows in micro-batches of 4, AdamW at 1e-5, fixed k1 KL penalty.
One timed call = ``STEPS`` PPO steps; tables give seconds per step.

Devices and precision (:func:`precision_for`):

- ``cpu``: fp32, one thread; seconds are process CPU time (robust to other jobs on the
  machine), wall time recorded beside them.
- ``cuda`` / ``cuda:N``: the trained models (policy, value) keep fp32 weights and compute under
  bf16 autocast (ours ``mixed_precision="bf16"``, TRL ``bf16=True``, the floor
  ``torch.autocast``); the frozen reference and reward model are loaded in bf16 for every
  candidate. Seconds are wall time between ``torch.cuda.synchronize()`` calls. A larger shape
  (``GPU_SHAPE``, 64 prompts per step) is measured beside the issue's 16.

Candidates:

- ``ours``: :func:`cai.train.ppo.train_ppo` end to end (sampling engine rollouts, recomputed
  log-probs, reference, separate value model, RM scoring of the decoded text, GAE, whitening,
  updates, metrics, monitors, per-step JSONL log). Checkpointing off.
- ``trl``: ``trl.experimental.ppo.PPOTrainer.train()`` of TRL 1.12 (import path from
  ``CAI_TRL112_PATH``; skipped when absent), trainer built untimed; ``trl_nogc`` is the same
  with the module's ``gc.collect`` replaced by a no-op (TRL calls it twice per step; its
  ``empty_cache`` calls stay). TRL builds its own ``Accelerator`` without a precision argument,
  so ``bf16=True`` alone does not reach it under transformers 5: the benchmark sets accelerate's
  process-wide precision first and checks the trainer's accelerator uses it.
- ``floor``: the bare minimum of the same algorithm: the same sampling engine, one no-grad
  forward each of policy, reference, value and reward model on the padded batch, the KL /
  GAE / whitening arithmetic, and the minibatch updates with ``backward`` + ``AdamW.step``.
  No logging, no monitors, no metrics, no text decoding for the reward model. On CUDA all of it
  runs under bf16 autocast, sampling included.

FLOPs: :func:`bench.common.ppo_step_flops` of a step of ours (the prompts' token counts, ours'
mean response length); achieved FLOP/s = FLOPs per step / seconds per step; MFU = achieved over
the GPU's dense bf16 peak (:func:`bench.common.peak_tflops` or ``--peak-tflops``); none on CPU.

Targets: ours <= TRL (gc disabled) per step, and ours <= 1.2x the floor.
Run: ``python3 bench/run.py --only ppo [--quick] [--device cuda --model-size small]`` (set
``CAI_TRL112_PATH`` for the TRL rows).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import (
    TransformerShape,
    build_bench_model,
    format_table,
    mfu,
    ppo_step_flops,
    quiet_logs,
)
from bench.common import peak_tflops as gpu_peak_tflops

STEPS = 4
EPOCHS, LR, KL_COEF = 2, 1e-5, 0.05
PROMPTS = [f"Tell me about topic number {i}, and explain it well." for i in range(64)]
PHASES = ("generate", "score", "train")


@dataclass(frozen=True)
class Shape:
    """The sizes of one measured point."""

    batch: int  # prompts (rollout rows) per PPO step
    mini: int  # rows per optimizer step
    micro: int  # rows per forward pass (gradient accumulation)
    new_tokens: int  # response cap

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.new_tokens}"


ISSUE_SHAPE = Shape(batch=16, mini=8, micro=4, new_tokens=32)  # the issue's shape, every device
GPU_SHAPE = Shape(batch=64, mini=32, micro=16, new_tokens=32)  # CUDA only, reported beside it


def shapes_for(device: str) -> list[Shape]:
    return [ISSUE_SHAPE, GPU_SHAPE] if device.startswith("cuda") else [ISSUE_SHAPE]


@dataclass(frozen=True)
class Precision:
    """Where the candidates run and in which precision."""

    device: str  # cpu | cuda | cuda:N
    mixed: str  # no | bf16: autocast for the trained models, bf16 weights for the frozen ones

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def frozen_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.mixed == "bf16" else torch.float32

    def autocast(self):
        if self.mixed == "no":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def precision_for(device: str, mixed: str | None = None) -> Precision:
    """bf16 on CUDA, fp32 elsewhere; ``mixed`` overrides (a CPU smoke test of the GPU recipe)."""
    mixed = mixed or ("bf16" if device.startswith("cuda") else "no")
    if mixed not in ("no", "bf16"):
        raise ValueError(f"bench_ppo: precision {mixed!r}, expected no or bf16")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"bench_ppo: device {device!r}, expected cpu, cuda or cuda:N")
    return Precision(device, mixed)


def _texts() -> list[str]:
    return [f"\n\nHuman: {p}\n\nAssistant:" for p in PROMPTS]  # what format_prompt(..., "hh") gives


def _models(model_dir: Path, prec: Precision, value: str):
    """Tokenizer, policy (fp32), frozen reference and reward model (``prec.frozen_dtype``) and a
    value model (``AutoModel`` for ours and the floor, a sequence classifier for TRL), on the device."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    dev, frozen = prec.device, {"dtype": prec.frozen_dtype}
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(model_dir).to(dev)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, **frozen).to(dev)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **frozen).to(dev)
    rm.config.pad_token_id = tok.pad_token_id
    if value == "backbone":
        value_model = AutoModel.from_pretrained(model_dir)
    else:
        value_model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        value_model.config.pad_token_id = tok.pad_token_id
    return SimpleNamespace(tok=tok, policy=policy, ref=ref, rm=rm, value=value_model.to(dev))


# ----------------------------------------------------------------------------- ours
def ours_config(prec: Precision, shape: Shape):
    """cai's PPO configuration for one shape (device and precision from ``prec``)."""
    from cai.config import PPOConfig

    return PPOConfig(steps=STEPS, rollout_batch_size=shape.batch, mini_batch_size=shape.mini,
                     micro_batch_size=shape.micro, ppo_epochs=EPOCHS, lr=LR, max_new_tokens=shape.new_tokens,
                     stop=[], kl_coef=KL_COEF, checkpoint_every=0, sample_batch_size=shape.batch,
                     device=prec.device, mixed_precision=prec.mixed)


def _ours(model_dir: Path, prec: Precision, shape: Shape, tmp: Path):
    from cai.train.ppo import train_ppo
    from cai.train.reward import RewardScorer
    from cai.train.rewards import RMReward

    m = _models(model_dir, prec, "backbone")
    stats = {"mean": 0.0, "std": 1.0, "chat_format": "hh", "max_length": 512}
    scorer = RewardScorer([m.rm.eval()], m.tok, stats, torch.device(prec.device))
    reward = RMReward(scorer, normalize=False, batch_size=shape.batch)
    cfg = ours_config(prec, shape)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    state = Path(tempfile.mkdtemp(dir=tmp))

    def run():
        train_ppo(m.policy, m.tok, convs, reward, cfg, seed=0, state_dir=state, ref_model=m.ref,
                  value_backbone=m.value)
        return state / "train_log.jsonl"

    return run


# ----------------------------------------------------------------------------- TRL 1.12
def _import_trl():
    path = os.environ.get("CAI_TRL112_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    return PPOConfig, PPOTrainer, module


def trl_kwargs(prec: Precision, shape: Shape, out_dir: Path) -> dict:
    """TRL 1.12's PPOConfig arguments for the same shape: on CUDA ``bf16=True`` and no ``use_cpu``
    (transformers refuses to build those without a bf16 GPU, hence a dict checkable anywhere)."""
    return dict(output_dir=str(out_dir), per_device_train_batch_size=shape.micro,
                gradient_accumulation_steps=shape.batch // shape.micro, num_mini_batches=shape.batch // shape.mini,
                num_ppo_epochs=EPOCHS, total_episodes=shape.batch * STEPS, response_length=shape.new_tokens,
                temperature=1.0, learning_rate=LR, kl_coef=KL_COEF, report_to="none", save_strategy="no",
                num_sample_generations=0, local_rollout_forward_batch_size=shape.batch, use_cpu=not prec.cuda,
                bf16=prec.mixed == "bf16",
                activation_checkpointing=False,  # TRL's default is on; PPOTrainer 1.12 never applies it
                logging_steps=1, stop_token=None, missing_eos_penalty=None, seed=0)


def _trl(model_dir: Path, prec: Precision, shape: Shape, tmp: Path, gc_off: bool):
    from datasets import Dataset

    from cai.train.common import make_accelerator

    config_cls, trainer_cls, module = _import_trl()
    m = _models(model_dir, prec, "classifier")
    ds = Dataset.from_dict({"input_ids": [m.tok(t)["input_ids"] for t in _texts()]})
    args = config_cls(**trl_kwargs(prec, shape, tmp / "trl"))
    # TRL's Accelerator(gradient_accumulation_steps=...) inherits accelerate's process-wide state:
    # set it to the precision wanted (resetting one left by another loop), then check it took.
    make_accelerator(mixed_precision=prec.mixed, device=prec.device)
    trainer = trainer_cls(args=args, processing_class=m.tok, model=m.policy, ref_model=m.ref, reward_model=m.rm,
                          train_dataset=ds, value_model=m.value)
    if trainer.accelerator.mixed_precision != prec.mixed:
        raise RuntimeError(f"bench_ppo: TRL's accelerator runs mixed_precision="
                           f"{trainer.accelerator.mixed_precision!r}, wanted {prec.mixed!r}")
    real_gc = module.gc

    def run():
        module.gc = SimpleNamespace(collect=lambda *a: 0) if gc_off else real_gc
        try:
            trainer.train()
        finally:
            module.gc = real_gc

    return run


# ----------------------------------------------------------------------------- floor
def _floor(model_dir: Path, prec: Precision, shape: Shape, tmp: Path):
    from cai.sampling import SamplingEngine, SamplingParams
    from cai.train import rl_math as K
    from cai.train.rollout import PolicyAndValue, layout, response_logprobs

    m = _models(model_dir, prec, "backbone")
    box = PolicyAndValue(m.policy, m.value, 0)
    opt = torch.optim.AdamW([p for p in box.parameters() if p.requires_grad], lr=LR)
    engine = SamplingEngine(m.policy, m.tok, batch_size=shape.batch, device=prec.device)
    texts, dev, n = _texts(), prec.device, shape.batch

    def step(index: int) -> dict[str, float]:
        t0 = time.perf_counter()
        prompts = texts[(index * n) % len(texts):][:n]
        with prec.autocast():
            comps = engine.generate(prompts, SamplingParams(shape.new_tokens, 1.0, seed=index))
        prompt_ids = engine.encode_prompts(prompts, shape.new_tokens)
        t1 = time.perf_counter()  # the phase boundaries of ours' log
        ids, am, pos, resp, mask, w = layout(prompt_ids, [c.token_ids for c in comps], engine.pad_id, dev)
        with torch.no_grad(), prec.autocast():
            logits, values = box(ids, am, pos, w)
            lp = response_logprobs(logits, resp, 1.0)
            ref_logits = m.ref(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, w - 1:-1]
            ref = response_logprobs(ref_logits, resp, 1.0)
            scores = m.rm(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, 0].float()
        values = values.float()
        prec.sync()
        t2 = time.perf_counter()
        mf = mask.float()
        kl = K.kl_penalty(lp, ref) * mf
        rewards, _ = K.token_rewards(kl, scores, KL_COEF, mask.sum(1) - 1)
        adv, ret = K.gae(rewards * mf, values * mf, 1.0, 0.95)
        adv = K.masked_whiten(adv, mask) * mf
        prec.sync()
        t3 = time.perf_counter()
        for _ in range(EPOCHS):
            for mb in torch.randperm(n, device=dev).split(shape.mini):
                for micro in mb.split(shape.micro):
                    with prec.autocast():
                        new_logits, v = box(ids[micro], am[micro], pos[micro], w)
                    pl = K.policy_loss(response_logprobs(new_logits, resp[micro], 1.0), lp[micro], adv[micro],
                                       mask[micro], 0.2)
                    vl = K.value_loss(v.float(), values[micro], ret[micro], mask[micro], 0.2)
                    ((pl.loss + 0.1 * vl.loss) * (len(micro) / len(mb))).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        prec.sync()
        return {"generate": t1 - t0, "score": t2 - t1, "train": time.perf_counter() - t3}

    return lambda: [step(i) for i in range(STEPS)]


# ----------------------------------------------------------------------------- timing
@dataclass
class Measured:
    """One candidate's repeats: seconds per step (the basis), wall seconds, phases, peak memory."""

    basis: list[float]
    wall: list[float]
    phases: list[dict[str, float]]  # one per PPO step (ours: from its log; floor: its own timers)
    peak_gb: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.basis)


def _time(setups: dict, repeats: int, prec: Precision, tmp: Path) -> dict[str, Measured]:
    """Fresh models per call (untimed setup); interleaved; one untimed warm-up round. Seconds per
    step: process CPU time on CPU, wall time between CUDA synchronisations on a GPU."""
    from cai.train.log import read_train_log

    out = {name: Measured([], [], [], []) for name in setups}
    for rep in range(repeats + 1):
        for name, setup in setups.items():
            fn = setup(tmp)
            prec.sync()
            if prec.cuda:
                torch.cuda.reset_peak_memory_stats()
            w, c = time.perf_counter(), time.process_time()
            result = fn()
            prec.sync()
            dw, dc = time.perf_counter() - w, time.process_time() - c
            if rep:
                got = out[name]
                got.wall.append(dw / STEPS)
                got.basis.append((dw if prec.cuda else dc) / STEPS)
                if name == "ours":
                    got.phases += [{ph: r[f"ppo/time/{ph}_s"] for ph in PHASES} | {"response_length":
                                    r["ppo/response_length"]} for r in read_train_log(result)]
                elif name == "floor":
                    got.phases += result
                if prec.cuda:
                    got.peak_gb.append(torch.cuda.max_memory_allocated() / 2 ** 30)
            del fn, result
            gc.collect()  # the last call's models and optimizer, before the next call loads its own
            if prec.cuda:
                torch.cuda.empty_cache()
    return out


def _step_flops(model_dir: Path, response_length: float, batch: int) -> float:
    """Model FLOPs of one step of ours: every prompt's token count, ours' mean response length."""
    from transformers import AutoConfig, AutoTokenizer

    shape = TransformerShape.from_config(AutoConfig.from_pretrained(model_dir))
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(model_dir)(_texts())["input_ids"]]
    per_row = ppo_step_flops(shape, [(p, response_length) for p in lengths], EPOCHS).total / len(lengths)
    return per_row * batch


def _row(shape: Shape, prec: Precision, got: dict[str, Measured], flops: float, peak: float | None) -> dict:
    row: dict = {"shape": shape.label, "batch": shape.batch, "mini": shape.mini, "micro": shape.micro,
                 "new_tokens": shape.new_tokens, "steps_per_call": STEPS,
                 "basis": "wall time per PPO step (CUDA synchronised)" if prec.cuda
                 else "process CPU time per PPO step"}
    for name, m in got.items():
        row[f"{name}_s"], row[f"{name}_wall_s"], row[f"{name}_times"] = m.median, statistics.median(m.wall), m.basis
        if m.peak_gb:
            row[f"{name}_peak_gb"] = max(m.peak_gb)
    for name in ("ours", "floor"):
        for ph in PHASES:
            row[f"{name}_{ph}_s"] = statistics.median(p[ph] for p in got[name].phases)
    row["ours_over_floor"] = row["ours_s"] / row["floor_s"]
    row["meets_floor"] = row["ours_over_floor"] <= 1.2
    if "trl" in got:
        row["ours_over_trl_nogc"] = row["ours_s"] / row["trl_nogc_s"]
        row["ours_over_trl"] = row["ours_s"] / row["trl_s"]
        row["meets_trl"] = row["ours_over_trl_nogc"] <= 1.0
    row["gflop_per_step"] = flops / 1e9
    row["ours_tflops"] = flops / row["ours_s"] / 1e12
    row["ours_gflops"] = flops / row["ours_s"] / 1e9
    row["peak_tflops"] = peak
    for name in ("ours", "floor"):
        value = mfu(flops, row[f"{name}_s"], peak)
        row[f"{name}_mfu_pct"] = None if value is None else 100 * value
    return row


def measure(model_dir: Path, prec: Precision, shapes: list[Shape], repeats: int, with_trl: bool,
            peak: float | None) -> list[dict]:
    """One table row per shape (see the module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="cai-bench-ppo-"))
    rows = []
    for shape in shapes:
        setups = {"ours": lambda t, s=shape: _ours(model_dir, prec, s, t),
                  "floor": lambda t, s=shape: _floor(model_dir, prec, s, t)}
        if with_trl:
            setups["trl"] = lambda t, s=shape: _trl(model_dir, prec, s, t, gc_off=False)
            setups["trl_nogc"] = lambda t, s=shape: _trl(model_dir, prec, s, t, gc_off=True)
        got = _time(setups, repeats, prec, tmp)
        response_length = statistics.mean(p["response_length"] for p in got["ours"].phases)
        rows.append(_row(shape, prec, got, _step_flops(model_dir, response_length, shape.batch), peak))
    return rows


def _print(rows: list[dict], prec: Precision, model_size: str, gpu: str | None, peak: float | None) -> None:
    where = ", ".join([f"{prec.device} ({gpu})" if gpu else prec.device,
                       "bf16 autocast" if prec.mixed == "bf16" else "fp32",
                       "wall time" if prec.cuda else "process CPU time"])
    print(f"\nPPO step time ({model_size} model, {where}; {EPOCHS} epochs, {STEPS} steps per call; s/step)")
    cols = [("shape", "prompts x tokens"), ("ours_s", "ours"), ("floor_s", "floor"), ("ours_over_floor", "ours/floor"),
            ("meets_floor", "<=1.2x floor")]
    if "trl_s" in rows[0]:
        cols[2:2] = [("trl_s", "TRL"), ("trl_nogc_s", "TRL no-gc")]
        cols += [("ours_over_trl_nogc", "ours/TRL no-gc"), ("meets_trl", "<=TRL no-gc"), ("ours_over_trl", "ours/TRL")]
    print(format_table(rows, cols))
    rate = ("ours_tflops", "ours TFLOP/s") if prec.cuda else ("ours_gflops", "ours GFLOP/s")
    peak_note = f"MFU against {peak:g} TFLOP/s dense bf16" if peak else "no MFU (CPU, or a GPU without a known peak)"
    print(f"\nPer phase (median wall s per step), model FLOPs and throughput ({peak_note})")
    cols = [("shape", "prompts x tokens")] + [(f"{n}_{ph}_s", f"{n} {ph}") for n in ("ours", "floor") for ph in PHASES]
    cols += [("gflop_per_step", "GFLOP/step"), rate]
    if peak:
        cols += [("ours_mfu_pct", "ours MFU %"), ("floor_mfu_pct", "floor MFU %")]
    if prec.cuda:
        cols += [(f"{n}_peak_gb", f"{n} GiB") for n in ("ours", "trl", "floor") if f"{n}_peak_gb" in rows[0]]
    print(format_table(rows, cols))


def run(quick: bool, model_size: str, device: str = "cpu", peak_tflops: float | None = None) -> dict:
    """The benchmark's tables (as ``bench/run.py`` calls it), printed and returned."""
    prec = precision_for(device)
    gpu = None
    if prec.cuda:
        if not torch.cuda.is_available():
            raise SystemExit(f"bench_ppo: --device {device} but CUDA is not available here")
        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # accelerate places on the current device
        gpu = torch.cuda.get_device_name()
    peak = gpu_peak_tflops(gpu, peak_tflops) if prec.cuda else None
    quiet_logs(logging.ERROR)
    model_dir = build_bench_model(model_size)
    rows = measure(model_dir, prec, shapes_for(device), 2 if quick else 5, bool(os.environ.get("CAI_TRL112_PATH")),
                   peak)
    _print(rows, prec, model_size, gpu, peak)
    return {"step_time": rows, "gpu": gpu, "peak_tflops": peak}


if __name__ == "__main__":  # python3 -m bench.bench_ppo [--quick] [--device cuda --model-size small]
    from bench.run import main

    raise SystemExit(main(["--only", "ppo", *sys.argv[1:]]))

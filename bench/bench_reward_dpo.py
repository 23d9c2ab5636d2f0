"""Reward-model and DPO training throughput: cai's loops vs TRL's trainers vs bare floors.

Same model weights, same pairs (prompts of 10-50 pseudo-words, replies of 10-70), same batch
size, AdamW at the same learning rate, one pass over the pairs per timed call, fp32:

- ``ours``: :func:`cai.train.reward.train_reward_model` / :func:`cai.train.dpo.train_dpo` end
  to end on pre-tokenised pairs (accelerator, optimizer, schedule, clipping, per-step JSONL log;
  DPO includes its pass computing the reference log-probs). Checkpointing off.
- ``trl``: ``RewardTrainer.train()`` / ``DPOTrainer.train()`` on a trainer built once (its
  dataset preparation is not timed), TRL defaults except ``activation_checkpointing=False``
  (a memory-for-compute trade a throughput comparison must not make), ``bf16=False``, no
  saving; DPO with an explicit reference model (TRL's default).
- ``floor``: pre-padded batches in a fixed order; per batch the forward pass(es), the loss,
  ``backward``, ``AdamW.step``, ``zero_grad`` -- nothing else. For DPO the frozen reference's
  forward runs under ``no_grad`` in the same batch, and the LM head runs on every position.
- ``floor_keep`` (DPO only): the floor with ours' two algorithmic savings (reference log-probs
  computed once in a pre-pass, LM head only on response positions via ``logits_to_keep``).

Pairs/s per candidate, ratios from process CPU time on CPU (one thread; robust to other jobs on
the machine; wall-time ratios recorded too) and wall time on CUDA. Targets: ours >= 1.0x TRL's
pairs/s, and ours' time <= 1.2x the floor's. Peak memory: on CUDA ``max_memory_allocated`` per
candidate; on CPU each candidate runs once more in a fresh process and reports its peak RSS
growth over the state after loading (Linux ``VmHWM`` after resetting it through ``clear_refs``).

Run: ``python3 bench/run.py --only reward_dpo [--quick]`` or
``OMP_NUM_THREADS=1 python3 -m bench.bench_reward_dpo [--quick]`` from the repository root.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.bench_sft import interleaved_wall_and_cpu
from bench.common import bench_corpus, build_bench_model, format_table, quiet_logs
from cai.config import DPOConfig, RewardConfig
from cai.data import Pair, Prompt
from cai.models import (
    ModelSpec,
    format_example,
    load_causal_lm,
    load_sequence_classifier,
)
from cai.train.common import token_logprobs
from cai.train.dpo import pair_logps, sequence_logps, train_dpo
from cai.train.pairs import LabelledPair, collate_pairs, encode_pairs
from cai.train.reward import train_reward_model

LR = 1e-4
N_PAIRS = 64
BATCHES = (8, 32)
MAX_LEN = 256
TASKS = ("rm", "dpo")


def bench_pairs(n: int = N_PAIRS, seed: int = 0) -> list[LabelledPair]:
    rng = random.Random(seed)
    words = [w for line in bench_corpus(n_words=4000) for w in line.split()]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    out = []
    for i in range(n):
        prompt = Prompt.create([{"role": "user", "content": f"{i}: {text(10, 50)}?"}], "bench")
        out.append(LabelledPair(Pair.create(prompt, text(10, 70) + ".", text(10, 70) + ".", "bench"),
                                float(rng.random() < 0.5)))
    return out


def _load(task: str, model_dir: Path, device: str):
    spec = ModelSpec(str(model_dir), device=device, dtype="float32")
    model, tok = load_sequence_classifier(spec) if task == "rm" else load_causal_lm(spec)
    return model.train(), tok


def _trl_rows(tok, pairs, task: str, encoded):
    rows = []
    for x, e in zip(pairs, encoded):
        c, r = (e.a, e.b) if x.p_a > 0.5 else (e.b, e.a)
        if task == "rm":
            rows.append({"chosen_ids": c.input_ids, "rejected_ids": r.input_ids})
            continue
        chosen, rejected = (x.pair.response_a, x.pair.response_b) if x.p_a > 0.5 else (x.pair.response_b,
                                                                                       x.pair.response_a)
        prompt, full_c = format_example(tok, x.pair.prompt.messages_as_dicts(), chosen, "hh")
        _, full_r = format_example(tok, x.pair.prompt.messages_as_dicts(), rejected, "hh")
        rows.append({"prompt": prompt, "chosen": full_c[len(prompt):], "rejected": full_r[len(prompt):]})
    return rows


# ----------------------------------------------------------------------------- candidates
def _ours(task, model, tok, encoded, batch, device, tmp: Path):
    calls = iter(range(10 ** 6))
    common = {"lr": LR, "warmup": 0, "epochs": 1, "batch_size": batch, "micro_batch_size": batch,
              "max_length": MAX_LEN, "checkpoint_every": 0, "log_every": 1, "device": device}

    def run():
        state = tmp / f"ours-{task}-{batch}-{next(calls)}"  # fresh: DPO must recompute its reference
        if task == "rm":
            return train_reward_model(model, tok, encoded, RewardConfig(**common), seed=0, state_dir=state).steps
        return train_dpo(model, tok, encoded, DPOConfig(**common, beta=0.1), seed=0, state_dir=state).steps

    return run


def _trl(task, model, tok, pairs, encoded, batch, device, tmp: Path, ref=None):
    import trl
    from datasets import Dataset
    from transformers import PrinterCallback

    kwargs = dict(output_dir=str(tmp / f"trl-{task}-{batch}"), per_device_train_batch_size=batch,
                  num_train_epochs=1, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                  max_length=None, activation_checkpointing=False, bf16=False, save_strategy="no",
                  report_to="none", disable_tqdm=True, use_cpu=device == "cpu", dataloader_num_workers=0, seed=0)
    data = Dataset.from_list(_trl_rows(tok, pairs, task, encoded))
    if task == "rm":
        trainer = trl.RewardTrainer(model=model, args=trl.RewardConfig(**kwargs), train_dataset=data,
                                    processing_class=tok)
    else:
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=trl.DPOConfig(**kwargs, beta=0.1),
                                 train_dataset=data, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    return lambda: trainer.train().global_step


def _batches(encoded, batch, pad_id, device):
    out = []
    for i in range(0, len(encoded), batch):
        b = collate_pairs(encoded[i:i + batch], pad_id)
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def _floor_rm(model, tok, encoded, batch, device):
    batches = _batches(encoded, batch, tok.pad_token_id, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def run():
        for b in batches:
            r = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0]
            r_a, r_b = r.chunk(2)
            sign = b["p_a"] * 2 - 1
            loss = -F.logsigmoid(sign * (r_a - r_b)).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def _dpo_from_logps(lp, ref, p_a):
    k = len(p_a)
    ratio = (lp[:k] - ref[:k]) - (lp[k:] - ref[k:])
    return -F.logsigmoid(0.1 * ratio * (p_a * 2 - 1)).mean()


def _floor_dpo(model, ref_model, tok, encoded, batch, device):
    batches = _batches(encoded, batch, tok.pad_token_id, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def logps(m, b):
        lp, _ = token_logprobs(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        return lp.sum(-1)

    def run():
        for b in batches:
            with torch.no_grad():
                ref = logps(ref_model, b)
            loss = _dpo_from_logps(logps(model, b), ref, b["p_a"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def _floor_keep_dpo(model, ref_model, tok, encoded, batch, device):
    batches = _batches(encoded, batch, tok.pad_token_id, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def run():
        refs = pair_logps(ref_model, encoded, tok.pad_token_id, batch)
        for i, b in enumerate(batches):
            r = refs[i * batch:(i + 1) * batch].to(device)
            lp, _ = sequence_logps(model, b, device, keep_logits=True)
            loss = _dpo_from_logps(lp, torch.cat([r[:, 0], r[:, 1]]), b["p_a"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def candidates(task: str, model_dir: Path, batch: int, device: str, tmp: Path, only=None) -> dict:
    """Fresh copies of the model per candidate; the same pairs, tokenised once by ours."""
    names = ("ours", "trl", "floor") + (("floor_keep",) if task == "dpo" else ())
    names = [n for n in names if only is None or n in only]
    pairs = bench_pairs()
    tok = _load(task, model_dir, "cpu")[1]
    encoded, _ = encode_pairs(pairs, tok, "hh", MAX_LEN)
    ref = _load(task, model_dir, device)[0].eval() if task == "dpo" else None
    out = {}
    for name in names:
        model = _load(task, model_dir, device)[0]
        if name == "ours":
            out[name] = _ours(task, model, tok, encoded, batch, device, tmp)
        elif name == "trl":
            trl_ref = _load(task, model_dir, device)[0].eval() if task == "dpo" else None
            out[name] = _trl(task, model, tok, pairs, encoded, batch, device, tmp, ref=trl_ref)
        elif task == "rm":
            out[name] = _floor_rm(model, tok, encoded, batch, device)
        else:
            make = _floor_dpo if name == "floor" else _floor_keep_dpo
            out[name] = make(model, ref, tok, encoded, batch, device)
    return out


# ----------------------------------------------------------------------------- memory
def _probe(task: str, name: str, model_dir: str, batch: int, device: str) -> dict:
    """Run one candidate once in this (fresh) process; peak memory growth over the loaded state."""
    tmp = Path(tempfile.mkdtemp(prefix="cai-bench-mem-"))
    fn = candidates(task, Path(model_dir), batch, device, tmp, only={name})[name]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}
    import gc

    gc.collect()
    base = _reset_peak_rss()
    fn()
    return {"peak_mb": (_peak_rss_kb() - base) / 1024}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux ``clear_refs``); returns the current RSS in kB.
    Elsewhere the process's lifetime peak (``ru_maxrss``) is the baseline, which can hide growth."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kb() -> int:
    try:
        return _status_kb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory(task: str, names, model_dir: Path, batch: int, device: str) -> dict[str, float]:
    out = {}
    for name in names:
        cmd = [sys.executable, "-m", "bench.bench_reward_dpo", "--probe", task, name, str(model_dir), str(batch),
               device]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
        out[name] = json.loads(lines[-1])["peak_mb"] if res.returncode == 0 and lines else float("nan")
    return out


# ----------------------------------------------------------------------------- tables
def throughput_table(task: str, model_dir: Path, device: str, repeats: int) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix=f"cai-bench-{task}-"))
    table = []
    for batch in BATCHES:
        cands = candidates(task, model_dir, batch, device, tmp)
        wall, cpu = interleaved_wall_and_cpu(cands, repeats)
        basis = cpu if device == "cpu" else wall
        row = {"task": task, "batch": batch, "pairs": N_PAIRS}
        for name in cands:
            row[f"{name}_pairs_s"] = N_PAIRS / basis[name].median
            row[f"{name}_cpu_times"], row[f"{name}_wall_times"] = cpu[name].times, wall[name].times
        row["vs_trl"] = row["ours_pairs_s"] / row["trl_pairs_s"]
        row["vs_floor"] = row["floor_pairs_s"] / row["ours_pairs_s"]  # = time ours / time floor
        row["vs_trl_wall"] = wall["trl"].median / wall["ours"].median
        row["vs_floor_wall"] = wall["ours"].median / wall["floor"].median
        if "floor_keep" in cands:
            row["vs_floor_keep"] = row["floor_keep_pairs_s"] / row["ours_pairs_s"]
        row["meets_trl"], row["meets_floor"] = row["vs_trl"] >= 1.0, row["vs_floor"] <= 1.2
        row.update({f"{k}_peak_mb": v for k, v in peak_memory(task, cands, model_dir, batch, device).items()})
        table.append(row)
    return table


def run(device: str, quick: bool, model_size: str) -> dict:
    """The benchmark's tables (as ``bench/run.py`` calls it), printed and returned."""
    quiet_logs()
    model_dir = build_bench_model(model_size)
    result = {}
    for task in TASKS:
        table = throughput_table(task, model_dir, device, repeats=3 if quick else 7)
        basis = "process CPU time" if device == "cpu" else "wall time"
        print(f"\n{task.upper()} training throughput ({model_size} model, {device}, {N_PAIRS} pairs per pass; "
              f"pairs/s and ratios from {basis}; peak memory growth in MB)")
        cols = [("batch", "batch"), ("ours_pairs_s", "ours pairs/s"), ("trl_pairs_s", "TRL pairs/s"),
                ("floor_pairs_s", "floor pairs/s"), ("vs_trl", "ours/TRL"), ("vs_floor", "time ours/floor"),
                ("meets_trl", ">=TRL"), ("meets_floor", "<=1.2x floor"), ("vs_trl_wall", "wall ours/TRL"),
                ("vs_floor_wall", "wall ours/floor"), ("ours_peak_mb", "ours MB"), ("trl_peak_mb", "TRL MB"),
                ("floor_peak_mb", "floor MB")]
        if task == "dpo":
            cols.insert(7, ("vs_floor_keep", "time ours/floor_keep"))
        print(format_table(table, cols))
        result[task] = table
    return result


if __name__ == "__main__":  # python3 -m bench.bench_reward_dpo [--quick] [--device cuda] [--model-size small]
    if len(sys.argv) == 7 and sys.argv[1] == "--probe":
        import os

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        task, name, model_dir, batch, device = sys.argv[2:]
        print(json.dumps(_probe(task, name, model_dir, int(batch), device)))
        raise SystemExit(0)
    from bench.run import main

    raise SystemExit(main(["--only", "reward_dpo", *sys.argv[1:]]))

"""SFT training throughput: cai's ``train_sft`` vs TRL's ``SFTTrainer`` vs a bare floor.

All three train the same GPT-2-shaped model (``bench.common.build_bench_model``) on the same
prompt/completion examples with the loss on completion tokens only, the same micro-batch size,
AdamW at the same learning rate, one pass over the examples per timed call:

- ``ours``: :func:`cai.train.sft.train_sft` end to end: it tokenizes the examples, builds the
  accelerator, optimizer and schedule, trains (gradient clipping, LR schedule, per-step JSONL
  log) and returns. Checkpointing off.
- ``trl``: ``SFTTrainer.train()`` on a trainer built once (its dataset tokenization is not
  timed), with TRL's defaults except ``gradient_checkpointing=False`` (TRL turns it on by default;
  it trades compute for memory, which a throughput comparison must not), fp32 like the others
  (``bf16=False``) and no saving.
- ``floor``: pre-tokenized, pre-padded (right) batches in a fixed order; per batch
  ``model(input_ids, attention_mask, labels)`` (transformers' own loss), ``backward``,
  ``AdamW.step``, ``zero_grad``. Nothing else: no schedule, no clipping, no logging.
- ``floor_keep``: the same bare loop with the one algorithmic saving ours makes (left padding,
  ``position_ids``, the LM head and loss on response positions only via ``logits_to_keep``).
  Ours can beat ``floor`` through that saving; its time over ``floor_keep`` is the pure cost
  of the loop's bookkeeping (tokenization, schedule, clipping, logging, accelerate).

Tokens/s counts the non-pad tokens of one pass (the same for all three). Candidates run
interleaved after warm-ups, one thread on CPU; medians are quoted. On CPU the ratios use the
process's CPU time (with one thread it barely moves when other jobs share the machine, while
wall time does); wall-time ratios are recorded beside them. On CUDA they use wall time.
Targets: ours >= 1.0x TRL's tokens/s, and ours' time <= 1.2x the floor's.

Run: ``python3 bench/run.py --only sft [--quick] [--model-size small] [--device cuda]`` or
``OMP_NUM_THREADS=1 python3 -m bench.bench_sft [--quick]`` from the repository root.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Timing, build_bench_model, format_table, quiet_logs
from cai.config import SFTConfig
from cai.models import ModelSpec, format_example, load_causal_lm
from cai.train.sft import encode_examples, train_sft
from cai.train.sft_data import SFTExample

LR = 1e-4
BATCHES = (4, 16)
N_EXAMPLES = 128


def bench_examples(n: int = N_EXAMPLES, seed: int = 0) -> list[SFTExample]:
    """Conversations of 10-50 words answered with 10-70 words (seeded pseudo-text)."""
    rng = random.Random(seed)
    words = [w for line in build_corpus_words() for w in line.split()]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [SFTExample(f"b{i}", ({"role": "user", "content": text(10, 50) + "?"},), text(10, 70) + ".", "bench")
            for i in range(n)]


def build_corpus_words() -> list[str]:
    from bench.common import bench_corpus

    return bench_corpus(n_words=4000)


def _load(model_dir: Path, device: str):
    model, tok = load_causal_lm(ModelSpec(str(model_dir), device=device, dtype="float32"))
    model.train()
    return model, tok


def _ours(model, tok, examples, batch: int, device: str, state_dir: Path):
    cfg = SFTConfig(lr=LR, warmup=0, epochs=1, batch_size=batch, micro_batch_size=batch, max_length=256,
                    checkpoint_every=0)

    def run():
        result = train_sft(model, tok, examples, cfg, state_dir=state_dir, seed=0, chat_format="hh",
                           device="cpu" if device == "cpu" else "auto")
        return result.steps

    return run


def _trl(model, tok, examples, batch: int, device: str, out_dir: Path):
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    rows = []
    for ex in examples:
        prompt, full = format_example(tok, ex.messages_as_dicts(), ex.response, "hh")
        rows.append({"prompt": prompt, "completion": full[len(prompt):]})
    args = TRLConfig(
        output_dir=str(out_dir), per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, max_length=256, completion_only_loss=True,
        gradient_checkpointing=False, bf16=False, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=device == "cpu", dataloader_num_workers=0, seed=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # its per-log print() is not part of training

    def run():
        return trainer.train().global_step

    return run


def _floor(model, tok, examples, batch: int, device: str):
    rows = encode_examples(tok, examples, 256, "hh").rows
    batches = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        width = max(len(r.input_ids) for r in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100)
        for j, r in enumerate(chunk):
            n = len(r.input_ids)
            ids[j, :n], mask[j, :n], labels[j, :n] = torch.tensor(r.input_ids), 1, torch.tensor(r.labels)
        batches.append((ids.to(device), mask.to(device), labels.to(device)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def run():
        for ids, mask, labels in batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def _floor_keep(model, tok, examples, batch: int, device: str):
    """The floor with our one algorithmic saving: left padding, LM head on response positions only."""
    from cai.train.common import masked_nll, pad_and_mask

    rows = encode_examples(tok, examples, 256, "hh").rows
    batches = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        b = pad_and_mask([{"input_ids": r.input_ids, "labels": r.labels} for r in chunk], tok.pad_token_id,
                         padding_side="left")
        keep = max(len(r.input_ids) - r.prompt_len for r in chunk) + 1
        pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        batches.append((b["input_ids"].to(device), b["attention_mask"].to(device), pos.to(device),
                        b["labels"][:, -keep:].to(device), keep))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def run():
        for ids, mask, pos, labels, keep in batches:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
            total, n = masked_nll(logits, labels)
            (total / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(total.detach())

    return run


def interleaved_wall_and_cpu(candidates: dict, repeats: int, warmup: int = 2) -> tuple[dict, dict]:
    """Like ``bench.common.interleaved``, timing wall clock and this process's CPU time.

    With one thread, CPU time barely moves when other jobs share the machine, while wall time
    does; on a busy machine compare CPU times (both are recorded).
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {n: Timing(t) for n, t in wall.items()}, {n: Timing(t) for n, t in cpu.items()}


def throughput_table(model_dir: Path, device: str, repeats: int, batches=BATCHES) -> list[dict]:
    examples = bench_examples()
    tmp = Path(tempfile.mkdtemp(prefix="cai-bench-sft-"))
    table = []
    for batch in batches:
        models = {name: _load(model_dir, device) for name in ("ours", "trl", "floor", "floor_keep")}
        tok = models["ours"][1]
        tokens = sum(len(r.input_ids) for r in encode_examples(tok, examples, 256, "hh").rows)
        candidates = {
            "ours": _ours(*models["ours"], examples, batch, device, tmp / f"ours{batch}"),
            "trl": _trl(*models["trl"], examples, batch, device, tmp / f"trl{batch}"),
            "floor": _floor(*models["floor"], examples, batch, device),
            "floor_keep": _floor_keep(*models["floor_keep"], examples, batch, device),
        }
        wall, cpu = interleaved_wall_and_cpu(candidates, repeats)
        basis = cpu if device == "cpu" else wall  # CPU time says nothing about GPU work
        row = {"batch": batch, "examples": len(examples), "tokens": tokens,
               "basis": "process CPU time" if device == "cpu" else "wall time"}
        for name in candidates:
            row[f"{name}_tok_s"] = tokens / basis[name].median
            row[f"{name}_cpu_s"] = cpu[name].median
            row[f"{name}_wall_s"] = wall[name].median
            row[f"{name}_cpu_times"] = cpu[name].times
            row[f"{name}_wall_times"] = wall[name].times
        row["vs_trl"] = row["ours_tok_s"] / row["trl_tok_s"]
        row["vs_floor"] = row["floor_tok_s"] / row["ours_tok_s"]  # = time ours / time floor
        row["vs_floor_keep"] = row["floor_keep_tok_s"] / row["ours_tok_s"]
        row["vs_trl_wall"] = row["trl_wall_s"] / row["ours_wall_s"]
        row["vs_floor_wall"] = row["ours_wall_s"] / row["floor_wall_s"]
        row["meets_trl"] = row["vs_trl"] >= 1.0
        row["meets_floor"] = row["vs_floor"] <= 1.2
        table.append(row)
    return table


def run(device: str, quick: bool, model_size: str) -> dict:
    """The benchmark's tables (as ``bench/run.py`` calls it), printed and returned."""
    quiet_logs()
    model_dir = build_bench_model(model_size)
    table = throughput_table(model_dir, device, repeats=3 if quick else 7)
    print(f"\nSFT training throughput ({model_size} model, {device}, {N_EXAMPLES} examples per pass; "
          f"tok/s and ratios from {table[0]['basis']}, wall-time ratios last)")
    print(format_table(table, [
        ("batch", "batch"), ("tokens", "tokens"), ("ours_tok_s", "ours tok/s"), ("trl_tok_s", "TRL tok/s"),
        ("floor_tok_s", "floor tok/s"), ("vs_trl", "ours/TRL"), ("vs_floor", "time ours/floor"),
        ("meets_trl", ">=TRL"), ("meets_floor", "<=1.2x floor"), ("floor_keep_tok_s", "floor_keep tok/s"),
        ("vs_floor_keep", "time ours/floor_keep"), ("vs_trl_wall", "wall ours/TRL"),
        ("vs_floor_wall", "wall time ours/floor"),
    ]))
    return {"throughput": table}


if __name__ == "__main__":  # python3 -m bench.bench_sft [--quick] [--device cuda] [--model-size small]
    import sys

    from bench.run import main

    raise SystemExit(main(["--only", "sft", *sys.argv[1:]]))

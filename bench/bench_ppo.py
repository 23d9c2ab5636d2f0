"""PPO step time: cai's ``train_ppo`` vs TRL 1.12's ``PPOTrainer`` (as shipped and with its
per-step ``gc.collect()`` disabled) vs a bare floor, with cai's per-phase breakdown.

Same tiny GPT-2-shaped model as policy, reference, value backbone and reward-model backbone
(fresh copies for every timed run), same prompts, and the same shapes and hyper-parameters:
16 prompts per step, responses up to 32 tokens sampled at temperature 1 on the full
distribution (no stop strings: TRL has none), 2 PPO epochs over minibatches of 8 rows in
micro-batches of 4, AdamW at 1e-5, fixed k1 KL penalty. One timed call = ``STEPS`` PPO steps;
the table gives seconds per step (process CPU time on CPU, where one thread makes it robust to
other jobs; wall time recorded beside it).

- ``ours``: :func:`cai.train.ppo.train_ppo` end to end (sampling engine rollouts, recomputed
  log-probs, reference, separate value model, RM scoring of the decoded text, GAE, whitening,
  updates, metrics, monitors, per-step JSONL log). Checkpointing off.
- ``trl``: ``trl.experimental.ppo.PPOTrainer.train()`` of TRL 1.12 (import path from
  ``CAI_TRL112_PATH``; skipped when absent), trainer built untimed; ``trl_nogc`` is the same
  with the module's ``gc.collect`` replaced by a no-op (TRL calls it twice per step).
- ``floor``: the bare minimum of the same algorithm: the same sampling engine, one no-grad
  forward each of policy, reference, value and reward model on the padded batch, the KL /
  GAE / whitening arithmetic, and the minibatch updates with ``backward`` + ``AdamW.step``.
  No logging, no monitors, no metrics, no text decoding for the reward model.

Targets: ours <= TRL (gc disabled) per step, and ours <= 1.2x the floor.
Run: ``python3 bench/run.py --only ppo [--quick]`` (set ``CAI_TRL112_PATH`` for the TRL rows).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import build_bench_model, format_table

STEPS = 4
BATCH, MINI, MICRO, EPOCHS, NEW_TOKENS, LR, KL_COEF = 16, 8, 4, 2, 32, 1e-5, 0.05
PROMPTS = [f"Tell me about topic number {i}, and explain it well." for i in range(64)]


def _models(model_dir: Path):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    return SimpleNamespace(tok=tok, policy=policy, ref=ref, rm=rm, value=AutoModel.from_pretrained(model_dir),
                           value_cls=AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1))


def _ours(model_dir: Path, tmp: Path):
    from cai.train.ppo import PPOConfig, train_ppo
    from cai.train.ppo_rewards import RMReward
    from cai.train.reward_stage import RewardScorer

    m = _models(model_dir)
    stats = {"mean": 0.0, "std": 1.0, "chat_format": "hh", "max_length": 512}
    reward = RMReward(RewardScorer([m.rm.eval()], m.tok, stats, torch.device("cpu")), normalize=False)
    cfg = PPOConfig(steps=STEPS, rollout_batch_size=BATCH, mini_batch_size=MINI, micro_batch_size=MICRO,
                    ppo_epochs=EPOCHS, lr=LR, max_new_tokens=NEW_TOKENS, stop=[], kl_coef=KL_COEF,
                    checkpoint_every=0, sample_batch_size=BATCH, device="cpu")
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    state = Path(tempfile.mkdtemp(dir=tmp))

    def run():
        train_ppo(m.policy, m.tok, convs, reward, cfg, seed=0, state_dir=state, ref_model=m.ref,
                  value_backbone=m.value)
        return state / "train_log.jsonl"

    return run


def _trl(model_dir: Path, tmp: Path, gc_off: bool):
    path = os.environ.get("CAI_TRL112_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    m = _models(model_dir)
    m.value_cls.config.pad_token_id = m.tok.pad_token_id
    texts = [f"\n\nHuman: {p}\n\nAssistant:" for p in PROMPTS]
    ds = Dataset.from_dict({"input_ids": [m.tok(t)["input_ids"] for t in texts]})
    args = PPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=BATCH // MICRO, num_mini_batches=BATCH // MINI,
                     num_ppo_epochs=EPOCHS, total_episodes=BATCH * STEPS, response_length=NEW_TOKENS,
                     temperature=1.0, learning_rate=LR, kl_coef=KL_COEF, report_to="none", save_strategy="no",
                     num_sample_generations=0, local_rollout_forward_batch_size=BATCH, use_cpu=True,
                     logging_steps=1, stop_token=None, missing_eos_penalty=None, seed=0)
    trainer = PPOTrainer(args=args, processing_class=m.tok, model=m.policy, ref_model=m.ref, reward_model=m.rm,
                         train_dataset=ds, value_model=m.value_cls)
    real_gc = module.gc

    def run():
        module.gc = SimpleNamespace(collect=lambda *a: 0) if gc_off else real_gc
        try:
            trainer.train()
        finally:
            module.gc = real_gc

    return run


def _floor(model_dir: Path, tmp: Path):
    from cai.sampling import SamplingEngine, SamplingParams
    from cai.train import ppo_core as K
    from cai.train.ppo_rollout import PolicyAndValue, layout, response_logprobs

    m = _models(model_dir)
    box = PolicyAndValue(m.policy, m.value, 0)
    opt = torch.optim.AdamW([p for p in box.parameters() if p.requires_grad], lr=LR)
    engine = SamplingEngine(m.policy, m.tok, batch_size=BATCH)
    texts = [f"\n\nHuman: {p}\n\nAssistant:" for p in PROMPTS]

    def run():
        for step in range(STEPS):
            prompts = texts[(step * BATCH) % len(texts):][:BATCH]
            comps = engine.generate(prompts, SamplingParams(NEW_TOKENS, 1.0, seed=step))
            ids, am, pos, resp, mask, w = layout(engine.encode_prompts(prompts, NEW_TOKENS),
                                                 [c.token_ids for c in comps], engine.pad_id, "cpu")
            with torch.no_grad():
                logits, values = box(ids, am, pos, w)
                lp = response_logprobs(logits, resp, 1.0)
                ref = response_logprobs(m.ref(input_ids=ids, attention_mask=am, position_ids=pos).logits[
                    :, w - 1:-1], resp, 1.0)
                scores = m.rm(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, 0]
            mf = mask.float()
            kl = K.kl_penalty(lp, ref) * mf
            rewards, _ = K.token_rewards(kl, scores, KL_COEF, mask.sum(1) - 1)
            adv, ret = K.gae(rewards * mf, values * mf, 1.0, 0.95)
            adv = K.masked_whiten(adv, mask) * mf
            for _ in range(EPOCHS):
                perm = torch.randperm(BATCH)
                for mb in perm.split(MINI):
                    for micro in mb.split(MICRO):
                        new_logits, v = box(ids[micro], am[micro], pos[micro], w)
                        pl = K.policy_loss(response_logprobs(new_logits, resp[micro], 1.0), lp[micro], adv[micro],
                                           mask[micro], 0.2)
                        vl = K.value_loss(v, values[micro], ret[micro], mask[micro], 0.2)
                        ((pl.loss + 0.1 * vl.loss) * (len(micro) / len(mb))).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

    return run


def _time(setups: dict, repeats: int, tmp: Path) -> tuple[dict, dict, list]:
    """Fresh models per call (untimed setup); interleaved; one untimed warm-up round."""
    wall: dict[str, list[float]] = {n: [] for n in setups}
    cpu: dict[str, list[float]] = {n: [] for n in setups}
    phases = []
    for rep in range(repeats + 1):
        for name, setup in setups.items():
            fn = setup(tmp)
            w, c = time.perf_counter(), time.process_time()
            out = fn()
            dc, dw = time.process_time() - c, time.perf_counter() - w
            if rep:
                wall[name].append(dw / STEPS)
                cpu[name].append(dc / STEPS)
                if name == "ours":
                    from cai.train.common import read_train_log

                    phases.append(read_train_log(out))
    return wall, cpu, phases


def run(quick: bool, model_size: str, device: str = "cpu") -> dict:
    """The benchmark's table (as ``bench/run.py`` calls it), printed and returned."""
    import statistics

    if device != "cpu":
        raise SystemExit("bench_ppo: CPU only for now (TRL's PPOTrainer is compared on CPU)")
    logging.getLogger("cai").setLevel(logging.ERROR)
    for name in ("transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model_dir = build_bench_model(model_size)
    tmp = Path(tempfile.mkdtemp(prefix="cai-bench-ppo-"))
    setups = {"ours": lambda t: _ours(model_dir, t), "floor": lambda t: _floor(model_dir, t)}
    if os.environ.get("CAI_TRL112_PATH"):
        setups["trl"] = lambda t: _trl(model_dir, t, gc_off=False)
        setups["trl_nogc"] = lambda t: _trl(model_dir, t, gc_off=True)
    wall, cpu, phases = _time(setups, 2 if quick else 5, tmp)
    row = {"steps_per_call": STEPS, "basis": "process CPU time per PPO step"}
    for name in setups:
        row[f"{name}_s"] = statistics.median(cpu[name])
        row[f"{name}_wall_s"] = statistics.median(wall[name])
        row[f"{name}_times"] = cpu[name]
    for ph in ("generate", "score", "train"):
        row[f"ours_{ph}_s"] = statistics.median(r[f"ppo/time/{ph}_s"] for log in phases for r in log)
    row["ours_over_floor"] = row["ours_s"] / row["floor_s"]
    row["meets_floor"] = row["ours_over_floor"] <= 1.2
    cols = [("ours_s", "ours s/step"), ("floor_s", "floor s/step"), ("ours_over_floor", "ours/floor"),
            ("meets_floor", "<=1.2x floor"), ("ours_generate_s", "ours generate"), ("ours_score_s", "ours score"),
            ("ours_train_s", "ours train")]
    if "trl" in setups:
        row["ours_over_trl_nogc"] = row["ours_s"] / row["trl_nogc_s"]
        row["ours_over_trl"] = row["ours_s"] / row["trl_s"]
        row["meets_trl"] = row["ours_over_trl_nogc"] <= 1.0
        cols[2:2] = [("trl_s", "TRL s/step"), ("trl_nogc_s", "TRL no-gc s/step"),
                     ("ours_over_trl_nogc", "ours/TRL no-gc"), ("meets_trl", "<=TRL")]
    print(f"\nPPO step time ({model_size} model, cpu, {BATCH} prompts x {NEW_TOKENS} tokens, {EPOCHS} epochs; "
          f"process CPU time per step, wall time in the JSON)")
    print(format_table([row], cols))
    return {"step_time": [row]}


if __name__ == "__main__":  # python3 -m bench.bench_ppo [--quick]
    from bench.run import main

    raise SystemExit(main(["--only", "ppo", *sys.argv[1:]]))

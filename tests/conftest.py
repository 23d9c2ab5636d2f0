"""Shared pytest fixtures. Tests are hermetic: no network, no model hub, tiny local models.

Fixtures here are shared by every test module; keep each one small and documented.
"""

from __future__ import annotations

import os

# Offline before anything imports huggingface_hub/transformers/datasets (they read these once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2-shaped causal LM + BPE tokenizer, built once per session (a few seconds).

    Load it with ``cai.models.load_causal_lm(ModelSpec(str(tiny_model_dir)))``. Treat the
    directory as read-only: copy it if a test needs to change files.
    """
    from cai.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The reference data beside the repository (``../shared/data``); skips when absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared reference data not found at {path}")
    return path

"""The LoRA options of a training stage (SFT, reward model, DPO, PPO), torch-free.

A typed config piece (an OmegaConf structured config), kept apart from the loops so that
``cai.config`` can compose it without importing torch. ``cai.models.LoraSpec`` is what the
loaders take at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class LoraOptions:
    """LoRA adapters for the trained model (peft); off unless ``enabled``.

    target_modules: names of the linear layers to adapt; empty lets peft choose for the
    architecture (``c_attn`` for GPT-2, attention projections for Llama/Gemma/BERT).
    """

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=list)

    def spec(self):
        """A :class:`cai.models.LoraSpec`, or ``None`` when disabled."""
        from cai.models import LoraSpec

        if not self.enabled:
            return None
        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout,
                        target_modules=tuple(self.target_modules) or None)

"""The SFT stage's typed config (Hydra group ``sft``), kept free of torch imports.

:mod:`cai.config` imports :class:`SFTConfig` to build the composed config's schema; keeping it
here (not in :mod:`cai.train.sft`) keeps ``cai run --help`` and config composition from
importing torch. :func:`coerce_sft_config` checks values the schema cannot express.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from cai.errors import ConfigError
from cai.feedback.judge_answers import JudgeAnswersConfig
from cai.train.lora import LoraOptions

SOURCES = ("revisions", "judge_answers")


# the shared LoRA options; the name stays for the code and tests that use it
SFTLoraConfig = LoraOptions


@dataclass
class SFTConfig:
    """Supervised fine-tuning of the policy (Hydra group ``sft``)."""

    # revisions (SL-CAI: train on the critique stage's revisions) | judge_answers (distil the judge)
    source: str = "revisions"
    # None: the final revision; r >= 1: the revision after round r (SL-CAI-r)
    revision_round: Optional[int] = None
    # helpful data mixed in: hh:<path-or-hub>[@split] (chosen replies) or a .jsonl of {messages, response}
    helpful_source: Optional[str] = None
    # share of the SFT set drawn from helpful_source, in [0, 1)
    helpful_ratio: float = 0.0
    # read at most this many helpful rows
    helpful_limit: Optional[int] = None
    lr: float = 5e-5
    # linear | cosine | constant (after the warmup)
    schedule: str = "linear"
    # a fraction of the optimizer steps (< 1) or a number of steps
    warmup: float = 0.03
    weight_decay: float = 0.0
    # clip the gradient norm to this; 0 turns clipping off (the norm is still logged)
    max_grad_norm: float = 1.0
    epochs: int = 1
    # when set, train exactly this many optimizer steps (cycling through epochs) instead of `epochs`
    max_steps: Optional[int] = None
    # examples per optimizer step, over all processes (as reward.batch_size and dpo.batch_size)
    batch_size: int = 8
    # examples per forward pass on one process (gradient accumulation below batch_size)
    micro_batch_size: int = 8
    # longest example in tokens (prompt + response + EOS); longer ones are truncated and counted
    max_length: int = 512
    # no | bf16 | fp16 (fp16 on CUDA only)
    mixed_precision: str = "no"
    lora: SFTLoraConfig = field(default_factory=SFTLoraConfig)
    # optimizer steps between checkpoints (the run resumes from the last one); 0: never
    checkpoint_every: int = 100
    # optimizer steps between rows of train_log.jsonl
    log_every: int = 1
    # also write TensorBoard event files (into the artifact's tensorboard/; needs `tensorboard`)
    tensorboard: bool = False
    # also log to this Weights & Biases project (needs `wandb` and a login); None: off
    wandb_project: Optional[str] = None
    # the SFT seed is the experiment seed plus this
    seed_offset: int = 1
    # the judge_answers stage (source: judge_answers)
    answers: JudgeAnswersConfig = field(default_factory=JudgeAnswersConfig)


def coerce_sft_config(cfg: SFTConfig | Mapping[str, Any]) -> SFTConfig:
    """An :class:`SFTConfig` from itself or a plain mapping, with values checked."""
    if not isinstance(cfg, SFTConfig):
        raw = dict(cfg)
        known = set(SFTConfig.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if "grad_accum" in unknown:
            raise ConfigError("sft.grad_accum is gone: sft.batch_size is the examples per optimizer step over all "
                              "processes, sft.micro_batch_size the examples per forward (set batch_size to the old "
                              "batch_size * grad_accum * processes)")
        if unknown:
            raise ConfigError(f"sft: unknown field(s) {unknown}; expected some of {sorted(known)}")
        try:
            raw["lora"] = SFTLoraConfig(**dict(raw.get("lora") or {}))
            raw["answers"] = JudgeAnswersConfig(**dict(raw.get("answers") or {}))
        except TypeError as e:  # an unknown key in sft.lora / sft.answers
            raise ConfigError(f"sft: {e}") from e
        cfg = SFTConfig(**raw)
    if cfg.source not in SOURCES:
        raise ConfigError(f"sft.source={cfg.source!r}, expected one of {', '.join(SOURCES)}")
    for name in ("epochs", "batch_size", "micro_batch_size", "max_length", "log_every"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ConfigError(f"sft.{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"sft.max_steps must be >= 1 or null, got {cfg.max_steps}")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"sft.checkpoint_every must be >= 0 (0: never), got {cfg.checkpoint_every}")
    if cfg.max_grad_norm < 0:
        raise ConfigError(f"sft.max_grad_norm must be >= 0 (0: no clipping), got {cfg.max_grad_norm}")
    if cfg.max_length < 8:
        raise ConfigError(f"sft.max_length={cfg.max_length} is too short to hold a prompt and a response")
    return cfg

"""Typed configuration schemas, registered in Hydra's ConfigStore.

Every group in ``conf/`` fills one field of :class:`Config`. Because the schemas are typed
dataclasses and the composed config is in struct mode, a typo in an override or a group file
(``policy.temprature=0.7``) fails at composition with Hydra's message naming the key, not an
hour into a run.

The stage functions never see Hydra: the pipeline hands each stage a plain ``dict`` slice of
this config (the slice is also what the stage's artifact key hashes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from cai.feedback.critique import CritiqueConfig
from cai.judges.config import JudgeConfig, open_price_tables
from cai.feedback.label import LabelConfig
from cai.feedback.quality import QualityConfig
from cai.train.dpo import DPOConfig
from cai.train.ppo import PPOConfig
from cai.evaluate.stage import EvalConfig
from cai.train.reward import RewardConfig
from cai.train.sft_config import SFTConfig

from cai.constitution import shipped_dir

# the shipped Hydra config groups and constitutions: in the installed package, or the checkout's
# top-level conf/ and constitutions/ (shipped_dir decides, for cai.constitution too)
CONF_DIR = shipped_dir("conf")
CONSTITUTIONS_DIR = shipped_dir("constitutions")


@dataclass
class StoreConfig:
    """Where content-addressed artifacts live."""

    # None: $CAI_STORE, else $XDG_CACHE_HOME/cai/store, else ~/.cache/cai/store
    root: Optional[str] = None


@dataclass
class TinyConfig:
    """Shape of the GPT-2-shaped tiny model built locally when ``name_or_path: tiny``."""

    vocab_size: int = 2048
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 512
    seed: int = 0


@dataclass
class LoraConfig:
    """LoRA adapters through peft; off unless ``enabled``."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # empty: peft's defaults for the architecture
    target_modules: List[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """A model by hub name or local path, or ``tiny`` for the locally built tiny model."""

    name_or_path: str = "tiny"
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    chat_format: str = "auto"  # auto (tokenizer's chat template if any, else HH) | template | hh
    max_length: int = 512
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class HumanDataConfig:
    """Human preference pairs (HH-RLHF format), by hub name or local .jsonl/.jsonl.gz path."""

    # None: no human-label arm. Hub: "Anthropic/hh-rlhf:harmless-base"; local: a .jsonl(.gz) path
    path: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = None


@dataclass
class DataConfig:
    """Prompts the policy answers, their split, and optional human-labelled pairs."""

    # builtin (the project's own prompt set) | a .jsonl path | hh:<path-or-hub> (HH red-team prompts)
    prompts: str = "builtin"
    max_prompts: Optional[int] = None
    test_fraction: float = 0.2
    split_salt: str = ""
    human: HumanDataConfig = field(default_factory=HumanDataConfig)


@dataclass
class ConstitutionConfig:
    """A constitution by name (a file in constitutions/) or by path."""

    path: str = "harmless"


@dataclass
class SamplingConfig:
    """How the policy samples responses (the sampling engine's settings)."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: List[str] = field(default_factory=lambda: ["\n\nHuman:"])
    batch_size: int = 16


@dataclass
class ExperimentConfig:
    """A named study: which stages run, and a line saying what it asks."""

    name: str = "quickstart"
    description: str = ""
    stages: List[str] = field(default_factory=lambda: ["prompts", "responses"])
    # overrides ("reward.labels_from=human", ...) of the human-label arm a run adds, in
    # <run>/arms/human, when data.human.path is set; empty: no such arm
    human_arm: List[str] = field(default_factory=list)


@dataclass
class Config:
    seed: int = 0
    store: StoreConfig = field(default_factory=StoreConfig)
    data: DataConfig = field(default_factory=DataConfig)
    constitution: ConstitutionConfig = field(default_factory=ConstitutionConfig)
    policy: ModelConfig = field(default_factory=ModelConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Free-form notes recorded in metrics/report; never hashed into artifact keys.
    tags: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schemas so ``conf/config.yaml`` can extend ``base_config``.

    Every judge's ``prices`` table stays open to new model names (``judge.prices={gpt-4o: {...}}``
    on the command line); its entries are checked when a stage is planned.
    """
    schema = OmegaConf.structured(Config)
    open_price_tables(schema)
    ConfigStore.instance().store(name="base_config", node=schema)


def compose_config(*overrides: str):
    """The config ``cai run <overrides>`` would run, composed without running anything (for a
    notebook, a script or a test): ``compose_config("experiment=rlaif_vs_rlhf", "arm=rlhf")``."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))

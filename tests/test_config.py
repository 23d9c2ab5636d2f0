"""Every config group option composes through Hydra's compose API against the typed schema."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cai.config import CONF_DIR, Config, register_configs

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_configs()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_every_group_has_options():
    assert {"data", "constitution", "policy", "judge", "sampling", "experiment"} <= set(GROUPS)
    assert len(OPTIONS) >= 12


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_group_option_composes_and_validates(group: str, option: str, monkeypatch):
    monkeypatch.setenv("CAI_GEMMA_GGUF_DIR", "/models/gemma")  # presets that read the env
    cfg = _compose([f"{group}={option}"])
    # resolving every interpolation and merging into the schema catches type errors too
    container = OmegaConf.to_container(cfg, resolve=True)
    merged = OmegaConf.merge(OmegaConf.structured(Config), container)
    assert merged.experiment.name
    assert isinstance(merged.seed, int)


def test_default_is_offline_quickstart():
    cfg = _compose([])
    assert cfg.experiment.name == "quickstart"
    assert cfg.policy.name_or_path == "tiny"
    assert cfg.data.prompts == "builtin"
    assert cfg.data.human.path is None


@pytest.mark.parametrize(
    "override",
    ["policy.temprature=0.7", "sampling.max_new_tokens=many", "experiment=nope", "bogus_key=1"],
)
def test_typos_fail_at_composition(override: str):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((HydraException, OmegaConfBaseException)):
        _compose([override])

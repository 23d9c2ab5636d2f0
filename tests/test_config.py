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
    assert cfg.policy.name_or_path == "tiny" and cfg.policy.tiny.pretrain == "courtesy"
    assert cfg.data.prompts == "builtin:courtesy"  # the synthetic task with a known rule
    assert cfg.judge.backend == cfg.eval.judge.backend == "python"
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


# ---- judge prices on the command line -----------------------------------------------------------
PRICE_FORMS = [
    ["+{j}.prices.gpt-4o={{input_per_mtok:2.5,output_per_mtok:10}}"],
    ["{j}.prices={{gpt-4o: {{input_per_mtok: 2.5, output_per_mtok: 10}}}}"],
    ["+{j}.prices.gpt-4o.input_per_mtok=2.5", "+{j}.prices.gpt-4o.output_per_mtok=10"],
]


@pytest.mark.parametrize("judge", ["judge", "eval.judge"])
@pytest.mark.parametrize("form", PRICE_FORMS, ids=["plus-entry", "whole-table", "dotted"])
def test_a_switched_judge_model_is_priced_on_the_command_line(judge: str, form: list[str]):
    from cai.config import PriceConfig
    from cai.judges.config import ready_judge

    preset = "eval=api_judge" if judge == "eval.judge" else "judge=openai_gpt4_1_mini"
    overrides = [preset, f"{judge}.model=gpt-4o", *(o.format(j=judge) for o in form)]
    cfg = ready_judge(OmegaConf.select(_compose(overrides), judge), judge)
    assert cfg.model == "gpt-4o" and cfg.max_dollars == 20.0
    assert cfg.prices["gpt-4o"] == PriceConfig(2.5, 10.0)
    assert cfg.prices["gpt-4.1-mini"] == PriceConfig(0.4, 1.6)  # the preset's table is extended, not lost


@pytest.mark.parametrize("override, field", [
    ("judge.prices={gpt-4o: {input_per_mtok: cheap, output_per_mtok: 1}}", r"^judge\.prices\.gpt-4o\.input_per_mtok: "),
    ("+eval.judge.prices.gpt-4o={input_per_mtok: 1, output_per_mtok: -2}",
     r"^eval\.judge\.prices\.gpt-4o\.output_per_mtok: expected >= 0"),
    ("+judge.prices.gpt-4o={input: 1}",
     r"^judge\.prices\['gpt-4o'\]: must have only input_per_mtok and output_per_mtok"),
])
def test_a_malformed_price_fails_at_planning_naming_the_field(override: str, field: str):
    """Composition accepts any table (its keys are model names); planning checks every entry."""
    from cai.errors import ConfigError
    from cai.pipeline import plan

    with pytest.raises(ConfigError, match=field):
        plan(_compose(["experiment.stages=[ai_labels,evaluate]", override]))


def test_prices_stay_out_of_every_artifact_key(tmp_path):
    """Prices are run time only: pricing the judges on the command line changes no stage's key,
    and the evaluation stages get the eval judge's table at run time."""
    from cai.config import PriceConfig
    from cai.pipeline import plan

    plain = {s.name: s for s in plan(_compose([f"store.root={tmp_path}", "eval.harmless=true"]))}
    priced = {s.name: s for s in plan(_compose([f"store.root={tmp_path}", "eval.harmless=true",
                                                "+judge.prices.gpt-4o={input_per_mtok:2.5,output_per_mtok:10}",
                                                "eval.judge.prices={m: {input_per_mtok: 1, output_per_mtok: 2}}"]))}
    assert {"ai_labels", "eval_baseline", "evaluate_ppo", "evaluate_dpo"} <= set(priced)
    assert {n: s.config for n, s in priced.items()} == {n: s.config for n, s in plain.items()}
    for name in ("eval_baseline", "evaluate_ppo", "evaluate_dpo"):  # the stage reads the prices from its typed config
        assert priced[name].cfg.eval.judge.prices == {"m": PriceConfig(1.0, 2.0)}


def test_a_bad_judge_fails_at_planning_before_anything_is_built(tmp_path):
    """eval.judge and the labeller's judge are checked when the run is planned, not when the stage
    that asks them runs (after every stage before it was built)."""
    from cai.errors import ConfigError
    from cai.pipeline import run_experiment

    store = tmp_path / "store"
    with pytest.raises(ConfigError, match="eval.judge.max_dollars: is set but 'prices' has no entry for model 'fake'"):
        run_experiment(_compose(["eval=api_judge", "eval.judge.model=fake", f"store.root={store}"]), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^judge\.timeout_s: expected > 0"):
        run_experiment(_compose(["judge.timeout_s=0", f"store.root={store}"]), tmp_path / "run")
    assert not any(store.rglob("stage.json"))

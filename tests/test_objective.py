"""`cai run` returns the experiment's objective to Hydra, so a sweeper (Optuna) can optimise it."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai.cli import run_task
from cai.config import compose_config
from cai.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_the_task_returns_the_named_metric(tmp_path):
    cfg = compose_config("experiment.stages=[prompts]", "experiment.objective=data/prompts_train",
                         "data.max_prompts=20", f"store.root={tmp_path / 'store'}")
    assert run_task(cfg, tmp_path / "run") == 20.0
    unset = compose_config("experiment.stages=[prompts]", f"store.root={tmp_path / 'store'}")
    assert run_task(unset, tmp_path / "run2") is None


def test_a_missing_objective_names_the_close_metrics(tmp_path):
    cfg = compose_config("experiment.stages=[prompts]", "experiment.objective=data/prompt_train",
                         f"store.root={tmp_path / 'store'}")
    with pytest.raises(ConfigError, match=r"experiment\.objective: .*'data/prompt_train'; close: data/prompts_train"):
        run_task(cfg, tmp_path / "run")


def _has_optuna_sweeper() -> bool:
    try:  # find_spec of a submodule raises when the parent package (hydra_plugins) is absent
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _has_optuna_sweeper(),
                    reason="hydra-optuna-sweeper is not installed (pip install hydra-optuna-sweeper)")
def test_an_optuna_sweep_maximises_the_objective(tmp_path):
    """A real Optuna sweep through `cai run -m`: it reads the returned objective of every trial."""
    cmd = [sys.executable, "-m", "cai.cli", "run", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
           "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0", "data.max_prompts=int(interval(8,40))",
           "experiment.stages=[prompts]", "experiment.objective=data/prompts_train",
           f"store.root={tmp_path / 'store'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           "hydra.callbacks.report.head_to_head=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    tried = [yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
             for d in sorted((tmp_path / "sweep").iterdir()) if (d / ".hydra").is_dir()]
    values = [int(o.split("=")[1]) for run in tried for o in run if o.startswith("data.max_prompts=")]
    assert len(values) == 4 and result["best_value"] == float(max(values))
    assert result["best_params"]["data.max_prompts"] == max(values)

"""A non-editable install works: the wheel built from this checkout carries the Hydra configs
(``conf/``) and the constitutions (``constitutions/``) as package data, and once installed into a
fresh virtual environment it composes and plans the quickstart, takes a user's own config folder
and constitution, and validates the shipped constitution, from a working directory outside the
checkout, importing the installed copy (neither this checkout nor an editable install)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# what `pip install .` builds from; copied, so that the build writes nothing into the checkout
# and no stale build/ folder can leak into the wheel
BUILD_INPUTS = ("pyproject.toml", "README.md", "cai", "conf", "constitutions")
OPTIONAL_BUILD_INPUTS = ("setup.py", "setup.cfg", "MANIFEST.in", "LICENSE")
TIMEOUT = 300


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in BUILD_INPUTS + tuple(n for n in OPTIONAL_BUILD_INPUTS if (REPO / n).exists()):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(out)]
    try:  # offline: build with the setuptools at hand; without one, pip fetches it (isolated build)
        import setuptools  # noqa: F401

        cmd += ["--no-build-isolation", "--no-index"]
    except ImportError:
        pass
    _run(cmd + [str(src)])
    (whl,) = out.glob("cai-*.whl")
    return whl


def test_wheel_carries_every_module_config_and_constitution(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"cai/{p.relative_to(REPO / 'cai').as_posix()}" for p in (REPO / "cai").rglob("*.py")}
    expected |= {f"cai/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    expected |= {f"cai/constitutions/{p.name}" for p in (REPO / "constitutions").glob("*.yaml")}
    expected |= {"cai/constitutions/README.md", "cai/assets/prompts.jsonl", "cai/conf/config.yaml",
                 "cai/conf/experiment/quickstart.yaml", "cai/constitutions/harmless.yaml"}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"


def _venv(root: Path) -> Path:
    """A fresh virtual environment at ``root`` that sees this interpreter's installed packages
    (torch, hydra, ...) as plain path entries: their .pth files, among them the editable-install
    finder of a development checkout of cai, are not run there. Returns its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    outer = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (Path(purelib) / "_outer_site_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    return python


SCRIPT = r"""
import json, sys
import cai, cai.config, cai.pipeline
from cai.constitution import resolve_constitution

out = {"cai": cai.__file__, "conf": str(cai.config.CONF_DIR), "constitutions": str(cai.config.CONSTITUTIONS_DIR)}
out["quickstart"] = [s.name for s in cai.pipeline.plan(cai.config.compose_config())]
# the user's folder beside the shipped one, a constitution by a path relative to the working directory
cfg = cai.config.compose_config(f"hydra.searchpath=[file://{sys.argv[1]}]", "experiment=mine", "judge=myjudge",
                                "constitution.path=mine.yaml")
out["mine"] = [s.name for s in cai.pipeline.plan(cfg)]
out["mine_cfg"] = [cfg.experiment.name, cfg.data.max_prompts, cfg.judge.backend, cfg.judge.max_concurrency]
out["mine_constitution"] = str(resolve_constitution(cfg.constitution.path))
print(json.dumps(out))
"""


def test_installed_wheel_runs_from_outside_the_checkout(wheel, tmp_path):
    python = _venv(tmp_path / "venv")
    venv = (tmp_path / "venv").resolve()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", CAI_STORE=str(tmp_path / "store"), HYDRA_FULL_ERROR="1")
    # --ignore-installed: never touch a cai installed elsewhere (pip sees the outer packages)
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
          "--disable-pip-version-check", "-q", str(wheel)], env=env)

    work = tmp_path / "work"  # the user's working directory, with their own configs and constitution
    assert REPO not in work.resolve().parents
    (work / "myconf" / "judge").mkdir(parents=True)
    (work / "myconf" / "experiment").mkdir()
    (work / "myconf" / "judge" / "myjudge.yaml").write_text("defaults:\n  - tiny_hf\n  - _self_\nmax_concurrency: 3\n")
    (work / "myconf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - quickstart\n  - _self_\nexperiment:\n  name: mine\n"
        "data:\n  max_prompts: 5\n")
    shutil.copy(REPO / "constitutions" / "harmless.yaml", work / "mine.yaml")

    out = json.loads(_run([str(python), "-c", SCRIPT, str(work / "myconf")], cwd=work, env=env).stdout.splitlines()[-1])
    for key in ("cai", "conf", "constitutions"):
        assert venv in Path(out[key]).resolve().parents, f"{key}: {out[key]} is not the installed copy"
    quickstart = yaml.safe_load((REPO / "conf" / "experiment" / "quickstart.yaml").read_text())["experiment"]["stages"]
    assert set(quickstart) <= set(out["quickstart"])
    assert set(quickstart) <= set(out["mine"])
    assert out["mine_cfg"] == ["mine", 5, "hf", 3]
    assert out["mine_constitution"] == str((work / "mine.yaml").absolute())

    # the console script: Hydra's --config-dir adds the user's folder, the shipped groups stay
    bindir = python.parent
    cai = [str(bindir / ("cai.exe" if os.name == "nt" else "cai"))]
    job = yaml.safe_load(_run(cai + ["run", "--config-dir", "myconf", "experiment=mine", "judge=myjudge",
                                     "--cfg", "job"], cwd=work, env=env).stdout)
    assert (job["experiment"]["name"], job["judge"]["max_concurrency"], job["judge"]["backend"]) == ("mine", 3, "hf")

    harmless = Path(out["constitutions"]) / "harmless.yaml"
    validated = _run(cai + ["constitution", "validate", str(harmless)], cwd=work, env=env)
    assert "ok (" in validated.stdout

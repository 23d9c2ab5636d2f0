"""The ``cai`` command.

- ``cai run [overrides]`` / ``cai run -m [sweep]``: a Hydra app over ``conf/`` (see README).
- ``cai report PATH``: report.md + report.html for a run or a multirun folder.
- ``cai compare PATH``: head-to-head win rates between the arms of a sweep (head_to_head.json).
- ``cai export RUN --stage S --to DIR``: a trained model with a model card, the labels as a dataset (:mod:`cai.export`).
- ``cai score RUN --pairs FILE...``: reward models on pair files (:mod:`cai.evaluate.reward_sets`).
- ``cai constitution validate FILE...`` / ``cai constitution import SRC --format anthropic -o OUT``.
- :class:`ReportCallback`, the Hydra callback that writes the report when ``cai run`` finishes.

User mistakes (a bad constitution, config value or data row) print one message and exit 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cai.errors import CaiError

log = logging.getLogger("cai")

USAGE = """usage: cai <command> [args]

commands:
  run [hydra overrides]            run an experiment (default: experiment=quickstart, offline)
  run -m [sweep overrides]         a Hydra multirun sweep, e.g. cai run -m seed=0,1
  report PATH [-o OUT]             write report.md + report.html for a run or a sweep folder
  compare PATH                     judge the arms of a sweep head to head -> PATH/head_to_head.json
  export RUN --stage S --to DIR    a trained model (sft|dpo|ppo|reward) as a save_pretrained folder
         [--merge] [--labels]      with a model card; --labels: the labels as a TRL preference dataset
  score RUN --pairs FILE...        a run's reward models and DPO implicit reward on HH-RLHF/TRL pair
                                   files: accuracy, interval, ECE, length correlation
  constitution validate FILE...    check constitution files; exit 0 if valid, 2 if not
  constitution import SRC --format anthropic -o OUT.yaml
                                   convert the CAI paper's published prompt files
"""


def _quiet_libraries() -> None:
    """Our own tqdm bars report progress; the per-file bars of transformers only add noise."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # load reports ("newly initialized: score.weight" for a fresh reward head) are expected
        # here; real problems still raise
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _hydra_run(argv: list[str]) -> int:
    import hydra

    from cai.config import CONF_DIR, register_configs
    from cai.secrets import install_record_redaction

    register_configs()
    install_record_redaction()  # before Hydra logs anything (its launcher prints the overrides)
    _check_run_folder_name(argv)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _app(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        from cai.secrets import redact_text

        hydra_cfg = HydraConfig.get()
        run_dir = hydra_cfg.runtime.output_dir
        _scrub_hydra_files(hydra_cfg, run_dir)
        _quiet_libraries()
        try:
            return run_task(cfg, run_dir)
        except CaiError as e:
            # Hydra would print a traceback; a user mistake deserves one clear line.
            print(f"cai: error: {redact_text(str(e))}", file=sys.stderr)
            sys.exit(2)

    sys.argv = ["cai run", *argv]
    _app()
    return 0


def _check_run_folder_name(argv: list[str]) -> None:
    """``experiment.name`` names the run folder, which Hydra resolves before the task starts: an
    interpolation there that does not resolve (``'${oc.env:NOPE}'``) would end in Hydra's
    traceback. Resolve it first and fail with one line naming the key (sweeps: the first value)."""
    names = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("experiment.name=")]
    if not names or "${" not in names[-1]:
        return
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cai.config import _omegaconf_error, compose_config

    def first_value(arg: str) -> str:  # a sweep's first value stands for all (their syntax is Hydra's)
        key, _, value = arg.partition("=")
        return f"{key}={value.split(',', 1)[0]}" if "," in value and "${" not in value else arg

    plain = [first_value(a) for a in argv if not a.startswith("-") and "=" in a and not a.startswith("hydra.")]
    try:
        cfg = compose_config(*plain)
    except Exception:  # noqa: BLE001 - anything else is the run's to report, as it always has
        return
    try:
        OmegaConf.select(cfg, "experiment.name", throw_on_resolution_failure=True)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, cfg, "") from None


def _scrub_hydra_files(hydra_cfg: Any, run_dir: str | Path) -> None:
    """Cut credentials (a key inside ``judge.base_url``, secret environment values) out of what
    Hydra wrote before the task started: ``.hydra/*.yaml`` of the run and a sweep's
    ``multirun.yaml``; and put the secret filter on the log handlers (``cai.log``, the console)."""
    from cai.secrets import install_log_filter, scrub_text_files

    install_log_filter()
    subdir = OmegaConf.select(hydra_cfg, "output_subdir", default=".hydra")
    if subdir:
        scrub_text_files(Path(run_dir) / subdir)
    sweep_dir = OmegaConf.select(hydra_cfg, "sweep.dir", default=None)
    if sweep_dir and OmegaConf.select(hydra_cfg, "mode", default=None) is not None and \
            str(OmegaConf.select(hydra_cfg, "mode")).endswith("MULTIRUN"):
        scrub_text_files(Path(sweep_dir), "multirun.yaml")


def run_task(cfg: DictConfig, run_dir: str | Path) -> float | None:
    """Hydra's task function: run the experiment, and return the metric ``experiment.objective``
    names (None when unset), which a sweeper (``hydra/sweeper=optuna``) optimises."""
    import difflib
    import math

    from cai.errors import ConfigError
    from cai.pipeline import run_experiment

    metrics = run_experiment(cfg, run_dir)
    name = cfg.experiment.get("objective")
    if not name:
        return None
    if name not in metrics:
        known = [k for k in metrics if not k.startswith(("time/", "pipeline/"))]
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ConfigError(f"experiment.objective: the run reported no metric {name!r}{hint} "
                          f"(all in {Path(run_dir) / 'metrics.json'})")
    value = metrics[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"experiment.objective: metric {name!r} is {value!r}, not a finite number a sweeper can use")
    log.info("objective %s = %.6g", name, value)
    return float(value)


def _constitution(argv: list[str]) -> int:
    from cai.constitution.importer import main as constitution_main

    return constitution_main(argv, prog="cai constitution")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "run":
            return _hydra_run(rest)
        if cmd == "constitution":
            return _constitution(rest)
        if cmd == "report":
            from cai.report.build import main as report_main

            return report_main(rest)
        if cmd == "compare":
            from cai.evaluate.compare import main as compare_main

            _quiet_libraries()
            return compare_main(rest)
        if cmd == "export":
            from cai.export import main as export_main

            _quiet_libraries()
            return export_main(rest)
        if cmd == "score":
            from cai.evaluate.reward_sets import main as score_main

            _quiet_libraries()
            return score_main(rest)
    except CaiError as e:
        from cai.secrets import redact_text

        print(f"cai: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    print(f"cai: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- the report callback
# Hydra callbacks: write the report when ``cai run`` finishes.
#
# :class:`ReportCallback` is configured in ``conf/hydra/default.yaml`` under ``callbacks:``. When
# a sweep (``cai run -m``) ends it writes ``report.md`` / ``report.html`` into the sweep folder,
# covering every job; when a single run ends, into the run's folder. A report is a by-product:
# if it cannot be written the reason is logged and the run's own result (and exit status) stand.
# Turn it off with ``hydra.callbacks.report.on_run=false`` / ``on_multirun=false``.
#
# Before the sweep's report (and a single run's, when the run added arms beside itself), the
# callback judges the arms head to head (``cai compare``, :mod:`cai.evaluate.compare`) so the report has its
# "Head to head" section; ``head_to_head=false`` skips that. A comparison that fails is logged and the report is
# written without it.
report_log = logging.getLogger("cai.report")


def _write(folder: str | Path | None, what: str) -> Path | None:
    from cai.errors import CaiError
    from cai.report.build import write_report
    from cai.report.runs import RUN_FILE, find_run_dirs

    if not folder:
        report_log.warning("report: no output folder known for this %s; skipped", what)
        return None
    folder = Path(folder)
    if not folder.is_dir() or not find_run_dirs(folder):
        report_log.info("report: %s has no finished run (no %s); skipped", folder, RUN_FILE)
        return None
    try:
        _, html_path = write_report(folder)
    except (CaiError, OSError, ValueError) as e:
        report_log.warning("report: could not write the report of %s %s: %s", what, folder, e)
        return None
    return html_path


def _compare(folder: str | Path | None) -> Path | None:
    """``cai compare`` on the sweep folder; logs and returns None when it cannot be done."""
    from cai.errors import CaiError
    from cai.evaluate.compare import compare
    from cai.report.runs import find_run_dirs

    if not folder or not Path(folder).is_dir() or not find_run_dirs(Path(folder)):
        return None
    try:
        result, out = compare(folder)
    except (CaiError, OSError, ValueError) as e:
        report_log.warning("head to head: could not compare the arms of %s: %s", folder, e)
        return None
    for reason in result.skipped:
        report_log.info("head to head: skipped %s", reason)
    return out


class ReportCallback(Callback):
    """Writes ``report.md`` and ``report.html`` at the end of a run and of a sweep (after
    judging the sweep's arms head to head, unless ``head_to_head`` is false)."""

    def __init__(self, on_run: bool = True, on_multirun: bool = True, head_to_head: bool = True) -> None:
        self.on_run = on_run
        self.on_multirun = on_multirun
        self.head_to_head = head_to_head

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.on_run:
            return
        job_return = kwargs.get("job_return")
        hydra_cfg = getattr(job_return, "hydra_cfg", None) or config
        folder = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None)
        if self.head_to_head and folder and (Path(folder) / "arms").is_dir():
            _compare(folder)  # a run that added arms (the human-label arm): judge them against each other
        _write(folder, "run")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.on_multirun:
            return
        folder = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if self.head_to_head:
            _compare(folder)
        _write(folder, "sweep")


if __name__ == "__main__":
    sys.exit(main())

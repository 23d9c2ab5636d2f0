"""The ``cai`` command.

- ``cai run [overrides]`` / ``cai run -m [sweep]``: a Hydra app over ``conf/`` (see README).
- ``cai report PATH``: report.md + report.html for a run or a multirun folder.
- ``cai compare PATH``: head-to-head win rates between the arms of a sweep (head_to_head.json).
- ``cai constitution validate FILE...`` / ``cai constitution import SRC --format anthropic -o OUT``.

User mistakes (a bad constitution, config value or data row) print one message and exit 2.
"""

from __future__ import annotations

import logging
import sys

from cai.errors import CaiError

log = logging.getLogger("cai")

USAGE = """usage: cai <command> [args]

commands:
  run [hydra overrides]            run an experiment (default: experiment=quickstart, offline)
  run -m [sweep overrides]         a Hydra multirun sweep, e.g. cai run -m seed=0,1
  report PATH [-o OUT]             write report.md + report.html for a run or a sweep folder
  compare PATH                     judge the arms of a sweep head to head -> PATH/head_to_head.json
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
    from omegaconf import DictConfig

    from cai.config import CONF_DIR, register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _app(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from cai.pipeline import run_experiment

        run_dir = HydraConfig.get().runtime.output_dir
        _quiet_libraries()
        try:
            run_experiment(cfg, run_dir)
        except CaiError as e:
            # Hydra would print a traceback; a user mistake deserves one clear line.
            print(f"cai: error: {e}", file=sys.stderr)
            sys.exit(2)

    sys.argv = ["cai run", *argv]
    _app()
    return 0


def _constitution(argv: list[str]) -> int:
    from cai.constitution_import import main as constitution_main

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
            from cai.report import main as report_main

            return report_main(rest)
        if cmd == "compare":
            from cai.compare import main as compare_main

            _quiet_libraries()
            return compare_main(rest)
    except CaiError as e:
        print(f"cai: error: {e}", file=sys.stderr)
        return 2
    print(f"cai: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

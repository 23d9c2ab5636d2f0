"""Benchmark runner: ``python3 bench/run.py [--only NAME] [--quick] [--out FILE]``.

Runs the benchmarks (every ``bench/bench_<name>.py``, each exposing ``run(...)`` that prints
its tables and returns a dict), then writes one JSON file with the numbers and the
environment they were measured in (default ``bench/results/<names>-<device>-<size>-<time>.json``).
``run`` receives whichever of ``device``, ``quick``, ``model_size`` and ``peak_tflops`` it
declares. On CPU the runner pins one thread before torch is imported, so numbers do not depend
on free cores.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=BENCHMARKS, action="append", help="run only these benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 3 instead of 7)")
    parser.add_argument("--out", type=Path, help="JSON file to write (default under bench/results/)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--model-size", choices=("tiny", "small"), default="tiny",
                        help="tiny: 2 layers x 128, vocab 2048; small: GPT-2-small shape, vocab 8192")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense bf16 peak for MFU (default: looked up by GPU name)")
    return parser.parse_args(argv)


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Import ``bench.bench_<name>`` and call its ``run`` with the arguments it declares."""
    module = importlib.import_module(f"bench.bench_{name}")
    offered = {"device": args.device, "quick": args.quick, "model_size": args.model_size,
               "peak_tflops": args.peak_tflops}
    accepted = inspect.signature(module.run).parameters
    started = time.time()
    result = module.run(**{k: v for k, v in offered.items() if k in accepted})
    result["wall_s"] = round(time.time() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported
        os.environ["MKL_NUM_THREADS"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))

    import torch
    import transformers

    from bench.common import environment, set_threads

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available on this machine", file=sys.stderr)
        return 2
    set_threads(args.device)
    transformers.logging.set_verbosity_error()  # keep the tables readable
    torch.manual_seed(0)
    names = args.only or BENCHMARKS
    results = {"environment": environment(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    for name in names:
        results[name] = run_one(name, args)
    out = args.out or ROOT / "bench" / "results" / (
        f"{'-'.join(names)}-{args.device.replace(':', '')}-{args.model_size}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

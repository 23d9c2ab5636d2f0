"""SL-CAI revision generation with a local model: batched across prompts vs one at a time.

What is timed is the real ``revisions`` stage (:func:`cai.feedback.critique.run_revisions`,
built through :class:`cai.artifacts.ArtifactStore` into a fresh scratch store each repeat):
``prompts`` prompts with an initial response each, ``rounds`` rounds of critique -> revision
by the ``harmless`` constitution with the project's default critique settings (2 few-shot
examples, up to 128 new tokens, temperature 0.7, stop at a new human turn), the policy model
itself as the feedback model (``generator: policy``, i.e. ``PolicyGenerator`` ->
``SamplingEngine``). The only thing that changes between candidates is
``critique.batch_size``: how many prompts share one batched ``generate`` call (and one
journaled block). ``batch_size: 1`` is "one prompt at a time" through the very same code.

Per candidate the table gives the median over interleaved repeats of:

- ``prompts/s``: prompts / wall seconds of the stage's ``generate`` phase (what the stage
  itself reports as ``critique/prompts_per_s``); ``speedup``: that over batch_size 1's;
- ``stage s``: wall seconds of the whole stage build (model load, generation, journal,
  trace write, stage.json);
- ``CPU s/prompt``: process CPU seconds of the ``generate`` phase per prompt. On a loaded
  machine wall time includes waiting for a core; CPU time does not, so this column (and
  ``cpu speedup``) is the robust one there;
- ``tok/s``: tokens generated (critiques + revisions) per wall second of ``generate``, because
  each block is sampled with its own seed, so batch sizes produce different samples of
  (slightly) different lengths; ``tokens/prompt`` shows how much.

Each candidate's repeats must write byte-identical ``revisions.jsonl`` (same seed, same
batch size -> same output); the benchmark checks it and stops if not.

The stage shows a progress bar per build on stderr; the table goes to stdout, so
``python3 bench/run.py --only critique 2>/dev/null`` shows just the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bench.common import build_bench_model, format_table, interleaved
from cai.artifacts import ArtifactStore
from cai.config import typed
from cai.constitution import resolve_constitution
from cai.data import Prompt, load_prompt_source, write_jsonl
from cai.feedback.critique import TRACE_FILE, run_revisions

N_PROMPTS = 32
BATCH_SIZES = (1, 8, 32)
ROUNDS = (1, 2)
CONSTITUTION = "harmless"
CRITIQUE = {"few_shot": 2, "generator": "policy", "max_new_tokens": 128, "temperature": 0.7,
            "top_p": 1.0, "top_k": 0, "stop": ["\n\nHuman:"]}  # conf/critique/default.yaml


class _PhaseClock:
    """A build context that also records wall and process-CPU seconds of every phase."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            with self._ctx.phase(name):
                yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu0


def _world(root: Path, n_prompts: int) -> dict[str, Path]:
    """``prompts`` and ``responses`` artifacts: the first builtin prompts, a plain response each."""
    prompts: list[Prompt] = load_prompt_source("builtin")[:n_prompts]
    if len(prompts) < n_prompts:
        raise ValueError(f"only {len(prompts)} builtin prompts, {n_prompts} asked for")
    (root / "prompts").mkdir(parents=True)
    write_jsonl(root / "prompts" / "train.jsonl", [p.to_dict() for p in prompts])
    write_jsonl(root / "prompts" / "test.jsonl", [])
    (root / "responses").mkdir()
    write_jsonl(root / "responses" / "responses.jsonl",
                [{"prompt_id": p.id, "prompt": p.hh_text,
                  "response": f"Sure, here is exactly how to do that, step {i}: just go ahead."}
                 for i, p in enumerate(prompts)])
    return {"prompts": root / "prompts", "responses": root / "responses"}


def _candidate(model_dir: Path, inputs: dict[str, Path], scratch: Path, device: str, rounds: int,
               batch_size: int, log: list[dict[str, Any]]):
    """One stage build per call, into a fresh store; appends its measurements to ``log``."""
    from cai.config import compose_config
    from cai.pipeline import make_stage

    dtype = "auto" if device.startswith("cuda") else "float32"
    # CRITIQUE is the schema's default (cai.config.CritiqueConfig): only the swept fields are set
    planned = make_stage("revisions", typed(compose_config(
        f"critique.rounds={rounds}", f"critique.batch_size={batch_size}", "seed=0", f"policy.name_or_path={model_dir}",
        "policy.chat_format=hh",
        f"policy.dtype={dtype}", f"policy.device={device}", f"constitution.path={resolve_constitution(CONSTITUTION)}")))
    cfg = planned.config

    def run() -> None:
        root = Path(tempfile.mkdtemp(prefix=f"store-b{batch_size}-", dir=scratch))
        clocks: list[_PhaseClock] = []

        def stage(ctx: Any) -> None:
            clocks.append(_PhaseClock(ctx))
            run_revisions(planned.cfg, inputs, clocks[0])

        try:
            store = ArtifactStore(root, durable=False)
            wall0 = time.perf_counter()
            result = store.build(store.key("revisions", cfg), stage)
            wall = time.perf_counter() - wall0
            metrics = result.stage_info["metrics"]
            trace = (result.path / TRACE_FILE).read_bytes()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        clock = clocks[0]
        log.append({
            "stage_s": wall, "generate_s": clock.wall["generate"], "generate_cpu_s": clock.cpu["generate"],
            "load_model_s": clock.wall.get("load_model", 0.0),
            "prompts_per_s_metric": metrics["critique/prompts_per_s"],
            "tokens": _tokens(trace), "truncated": metrics["critique/contexts_truncated"],
            "unusable_rounds": metrics["critique/unusable_rounds"],
            "trace_sha256": hashlib.sha256(trace).hexdigest(),
        })

    return run


def _tokens(trace: bytes) -> int:
    """Tokens generated (critiques + revisions) in a ``revisions.jsonl``."""
    return sum(r["tokens_out"] for line in trace.splitlines() if line.strip()
               for r in json.loads(line)["rounds"])


def _row(rounds: int, batch_size: int, runs: list[dict[str, Any]], base: dict[str, float] | None,
         n_prompts: int) -> dict[str, Any]:
    digests = {r["trace_sha256"] for r in runs}
    if len(digests) != 1:
        raise RuntimeError(f"batch_size {batch_size}, rounds {rounds}: repeats wrote different traces "
                           f"({len(digests)} distinct); the stage is not deterministic")

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    gen = [r["generate_s"] for r in runs]
    q = statistics.quantiles(gen, n=4) if len(gen) >= 4 else [min(gen), 0, max(gen)]
    row = {
        "rounds": rounds, "batch_size": batch_size, "prompts": n_prompts,
        "prompts_per_s": n_prompts / med("generate_s"),
        "cpu_s_per_prompt": med("generate_cpu_s") / n_prompts,
        "tok_s": runs[0]["tokens"] / med("generate_s"),
        "tokens_per_prompt": runs[0]["tokens"] / n_prompts,
        "stage_s": med("stage_s"), "load_model_s": med("load_model_s"),
        "truncated": runs[0]["truncated"], "unusable_rounds": runs[0]["unusable_rounds"],
        "noise": (q[2] - q[0]) / 2 / med("generate_s"),
        "trace_sha256": runs[0]["trace_sha256"], "repeats": runs,
    }
    if base is not None:
        row["speedup"] = row["prompts_per_s"] / base["prompts_per_s"]
        row["cpu_speedup"] = base["cpu_s_per_prompt"] / row["cpu_s_per_prompt"]
    return row


def table(model_dir: Path, device: str, repeats: int, warmup: int, n_prompts: int = N_PROMPTS,
          rounds_list=ROUNDS, batch_sizes=BATCH_SIZES) -> list[dict[str, Any]]:
    scratch = Path(tempfile.mkdtemp(prefix="cai-bench-critique-"))
    try:
        inputs = _world(scratch / "world", n_prompts)
        rows = []
        for rounds in rounds_list:
            logs: dict[int, list[dict[str, Any]]] = {b: [] for b in batch_sizes}
            interleaved({f"b{b}": _candidate(model_dir, inputs, scratch, device, rounds, b, logs[b])
                         for b in batch_sizes}, repeats, warmup=warmup)
            base = None
            for b in batch_sizes:
                rows.append(_row(rounds, b, logs[b][warmup:], base, n_prompts))
                base = base or rows[-1]
                print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        return rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


COLUMNS = [
    ("rounds", "rounds"), ("batch_size", "batch_size"), ("prompts_per_s", "prompts/s"),
    ("speedup", "speedup"), ("cpu_s_per_prompt", "CPU s/prompt"), ("cpu_speedup", "cpu speedup"),
    ("tok_s", "tok/s"), ("tokens_per_prompt", "tokens/prompt"), ("stage_s", "stage s"),
    ("truncated", "truncated"), ("noise", "noise"),
]


def run(device: str, quick: bool, model_size: str) -> dict:
    """Build the model, time the stage at every batch size and round count, print the table."""
    # the engine warns on every call whose context was cut to fit; the table counts them instead
    logging.getLogger("cai.sampling").setLevel(logging.ERROR)
    model_dir = build_bench_model(model_size)
    repeats, warmup = (3, 1) if quick else (5, 1)
    print(f"\ncritique: revisions stage, {N_PROMPTS} prompts, {model_size} model on {device}, "
          f"constitution {CONSTITUTION}, max_new_tokens {CRITIQUE['max_new_tokens']}, "
          f"few_shot {CRITIQUE['few_shot']}; median of {repeats} interleaved repeats after {warmup} warm-up")
    print(format_table([], COLUMNS), flush=True)
    rows = table(model_dir, device, repeats, warmup)
    for rounds in ROUNDS:
        best = max((r for r in rows if r["rounds"] == rounds), key=lambda r: r["prompts_per_s"])
        print(f"rounds {rounds}: best batch_size {best['batch_size']} "
              f"({best.get('speedup', 1.0):.2f}x prompts/s, {best.get('cpu_speedup', 1.0):.2f}x CPU per prompt "
              f"vs one prompt at a time)")
    return {"model": {"size": model_size, "path": str(model_dir)}, "prompts": N_PROMPTS,
            "constitution": CONSTITUTION, "critique": CRITIQUE, "repeats": repeats, "warmup": warmup,
            "rows": rows}

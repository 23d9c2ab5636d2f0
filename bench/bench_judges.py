"""Judge throughput: our API judge against its bound and two common ways of calling an API.

Run: ``python3 bench/run.py --only judges [--quick]`` (or ``python3 -m bench.bench_judges``).

The "API" is the loopback :class:`~cai.testing.servers.FakeOpenAIServer`, run in its own process
(so its request handling does not compete with the client for the GIL, as a remote API would
not), answering every request ``LATENCY_S`` after it arrived (its own work included, as an API
with that response time would), with a requests-per-minute limit enforced over a ``WINDOW_S``
sliding window (429 with ``retry-after`` beyond it). One *label* here is one
choice request ("(A) or (B)?", answered from log-probs): the labelling stage sends two per pair.

Candidates, each on fresh prompts (so nothing is answered from a cache unless stated):

- ``ours``: ``make_judge(openai, max_concurrency=C, rpm=R)`` and ``judge.choose(requests)`` --
  cold SQLite cache, retries, token bucket.
- ``bound``: ``min(C / latency, R / 60)``, what any client with C requests in flight under the
  limit can reach. Target: ours >= 90% of it.
- ``bare``: ``AsyncOpenAI`` + a semaphore of C, nothing else (no cache, limits or retries): the
  least an asyncio client on the same SDK does. A refused request is a lost label.
- ``threads``: a ``ThreadPoolExecutor`` of C workers around the sync client, no retries (the
  pattern TRL's API judges used); refused requests are lost labels, counted in ``lost``.
- ``naive``: a ``for`` loop of ``openai.OpenAI().chat.completions.create`` (SDK default retries).
- ``warm``: ``ours`` again on every request it has answered before (all cache hits, nothing
  sent). Target: >= 5,000 labels/s.

Labels/s are of the median run (wall clock: the targets are judged on these). ``cpu ms`` is the
client process's CPU time per label (``time.process_time``), which depends much less on how busy
the machine is: on a machine whose cores are shared, ``bare/bound`` shows how much of the bound
the machine leaves to any client, and ``ours/bare`` what our judge's extra work costs. Scenarios:
*concurrency-bound* (the RPM limit far away) at two concurrencies, and *rpm-bound* (more requests
in flight than the limit admits) with the default token bucket (1 s burst) and a 0.1 s burst.
Finally, if the local ``hf`` judge is in this build, labels/s of its log-prob scoring vs
generating an answer and parsing it, on the same tiny model.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing as mp
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.common import format_table

LATENCY_S = 0.05
WINDOW_S = 1.0
CHOICES = ("A", "B")
BOUND_TARGET = 0.9
WARM_TARGET = 5000.0
NAIVE_N = 40
GEN_TOKENS = 16  # answer tokens of a generate-then-parse request (JudgeConfig.max_tokens)


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    rpm: float
    n: int  # requests per timed run of ours / bare / threads
    burst_s: float = 1.0  # our judge's token bucket (the config default)

    @property
    def bound(self) -> float:
        return min(self.concurrency / LATENCY_S, self.rpm / 60.0)


SCENARIOS = (
    Scenario("concurrency-bound", concurrency=4, rpm=60_000, n=240),
    Scenario("concurrency-bound", concurrency=8, rpm=60_000, n=480),
    Scenario("rpm-bound", concurrency=32, rpm=6_000, n=300),
    Scenario("rpm-bound, burst 0.1 s", concurrency=32, rpm=6_000, n=300, burst_s=0.1),
)


@dataclass
class Run:
    """One timed run of a candidate."""

    n: int
    elapsed_s: float
    cpu_s: float
    failed: int

    @property
    def labels_s(self) -> float:
        return (self.n - self.failed) / self.elapsed_s


def _timed(n: int, fn: Callable[[], int]) -> Run:
    """Run ``fn`` (which returns how many requests failed), measuring wall and CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    failed = fn()
    return Run(n, time.perf_counter() - wall, time.process_time() - cpu, failed)


# ----------------------------------------------------------------------------- the server process
def _serve(faults: dict, conn) -> None:
    from cai.testing.servers import FakeOpenAIServer, Faults

    srv = FakeOpenAIServer(faults=Faults(**faults))  # TCP_NODELAY on: no delayed-ACK stalls
    srv.start()
    conn.send(srv.base_url)
    while True:
        msg = conn.recv()
        if msg == "stats":
            records = list(srv.records)  # asked between runs: no request is in flight
            srv.reset_log()
            conn.send(dict(Counter(r.outcome for r in records)))
        elif msg == "stop":
            break
    srv.stop()


class ServerProcess:
    """The fake OpenAI server in a child process; ``stats()`` returns and clears its request log."""

    def __init__(self, rpm: float) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        faults = {"latency_s": LATENCY_S, "rpm_limit": rpm, "rate_window_s": WINDOW_S}
        self._proc = ctx.Process(target=_serve, args=(faults, child), daemon=True)

    def __enter__(self) -> ServerProcess:
        self._proc.start()
        if not self._conn.poll(120):
            raise RuntimeError("the fake OpenAI server process did not start within 120 s")
        self.base_url = self._conn.recv()
        return self

    def stats(self) -> dict:
        self._conn.send("stats")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        self._proc.join(10)


# ----------------------------------------------------------------------------- requests
def _messages(tag: str, i: int) -> list[dict]:
    """A choice prompt the fake model answers; unique per (tag, i), option lengths vary."""
    short, long = f"Option {tag} {i}.", f"A longer option {tag} {i} " + "with more words " * (1 + i % 4)
    a, b = (short, long) if i % 2 else (long, short)
    return [{"role": "user", "content": f"Which response is better?\n(A) {a}\n(B) {b}\nAnswer A or B."}]


def _choice_requests(tag: str, n: int):
    from cai.judges import ChoiceRequest

    return [ChoiceRequest(_messages(tag, i), CHOICES, tag={"i": i}) for i in range(n)]


# ----------------------------------------------------------------------------- candidates
def _ours(base_url: str, sc: Scenario, reqs, cache_path: Path) -> Run:
    import openai  # noqa: F401 - imported before the clock starts, as the other candidates do

    from cai.judges import make_judge

    judge = make_judge({
        "backend": "openai", "model": "fake", "base_url": base_url, "api_key_env": None,
        "max_concurrency": sc.concurrency, "rpm": sc.rpm, "burst_s": sc.burst_s,
        "cache_path": str(cache_path), "timeout_s": 10.0, "max_retries": 8,
    })
    try:
        return _timed(len(reqs), lambda: sum(1 for r in judge.choose(reqs) if not r.ok))
    finally:
        judge.close()


def _parsed(content: str | None) -> str | None:
    from cai.judges import parse_choice

    return parse_choice(content or "", CHOICES).choice


def _params(tag: str, i: int) -> dict:
    return {"model": "fake", "messages": _messages(tag, i), "max_tokens": 16, "temperature": 0.0,
            "logprobs": True, "top_logprobs": 20}


def _bare_async(base_url: str, concurrency: int, tag: str, n: int) -> Run:
    import openai

    async def main() -> int:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=10.0)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> str | None:
            async with gate:
                try:
                    r = await client.chat.completions.create(**_params(tag, i))
                except openai.APIError:
                    return None
            return _parsed(r.choices[0].message.content)

        try:
            answers = await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await client.close()
        return sum(1 for a in answers if a is None)

    return _timed(n, lambda: asyncio.run(main()))


def _threads(base_url: str, concurrency: int, tag: str, n: int) -> Run:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=10.0)

    def one(i: int) -> str | None:
        try:
            return _parsed(client.chat.completions.create(**_params(tag, i)).choices[0].message.content)
        except openai.APIError:
            return None

    def run() -> int:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return sum(1 for a in pool.map(one, range(n)) if a is None)

    try:
        return _timed(n, run)
    finally:
        client.close()


def _naive(base_url: str, tag: str, n: int) -> Run:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=10.0)

    def run() -> int:
        answers = [_parsed(client.chat.completions.create(**_params(tag, i)).choices[0].message.content)
                   for i in range(n)]
        return sum(1 for a in answers if a is None)

    try:
        return _timed(n, run)
    finally:
        client.close()


# ----------------------------------------------------------------------------- API scenarios
def _median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.elapsed_s)[len(runs) // 2]


def api_scenario(sc: Scenario, repeats: int, workdir: Path, warm_repeats: int) -> dict:
    """Interleaved repeats of every candidate on one server, then warm-cache runs of ours."""
    runs: dict[str, list[Run]] = {"ours": [], "bare": [], "threads": [], "naive": []}
    outcomes: dict[str, Counter] = {k: Counter() for k in runs}
    cache = workdir / f"{sc.concurrency}-{sc.rpm:g}-{sc.burst_s:g}.sqlite"  # new prompts each repeat: cold
    with ServerProcess(sc.rpm) as srv:
        for rep in range(repeats):
            candidates = {
                "ours": lambda rep=rep: _ours(srv.base_url, sc, _choice_requests(f"ours{rep}", sc.n), cache),
                "bare": lambda rep=rep: _bare_async(srv.base_url, sc.concurrency, f"bare{rep}", sc.n),
                "threads": lambda rep=rep: _threads(srv.base_url, sc.concurrency, f"threads{rep}", sc.n),
                "naive": lambda rep=rep: _naive(srv.base_url, f"naive{rep}", NAIVE_N),
            }
            for name, fn in candidates.items():
                time.sleep(WINDOW_S)  # every candidate starts with an empty rate window
                runs[name].append(fn())
                outcomes[name].update(srv.stats())
        answered = [r for rep in range(repeats) for r in _choice_requests(f"ours{rep}", sc.n)]
        warm = [_ours(srv.base_url, sc, answered, cache) for _ in range(warm_repeats)]
        warm_sent = sum(srv.stats().values())
    med = {name: _median(rs) for name, rs in runs.items()}
    ours, warm_med = med["ours"], _median(warm)
    row = {
        "scenario": sc.name, "concurrency": sc.concurrency, "rpm": sc.rpm, "burst_s": sc.burst_s,
        "latency_s": LATENCY_S, "n": sc.n, "bound_labels_s": sc.bound,
        **{f"{name}_labels_s": m.labels_s for name, m in med.items()},
        **{f"{name}_lost": sum(r.failed for r in rs) for name, rs in runs.items()},
        "ours_of_bound": ours.labels_s / sc.bound,
        "ours_vs_bare": ours.labels_s / med["bare"].labels_s,
        "ours_vs_threads": ours.labels_s / med["threads"].labels_s if med["threads"].labels_s else None,
        "ours_vs_naive": ours.labels_s / med["naive"].labels_s,
        "ours_cpu_ms": 1000 * ours.cpu_s / ours.n, "bare_cpu_ms": 1000 * med["bare"].cpu_s / med["bare"].n,
        "threads_cpu_ms": 1000 * med["threads"].cpu_s / med["threads"].n,
        "bare_of_bound": med["bare"].labels_s / sc.bound,
        "warm_n": len(answered), "warm_labels_s": warm_med.labels_s, "warm_cpu_ms": 1000 * warm_med.cpu_s / warm_med.n,
        "warm_labels_per_cpu_s": warm_med.n / warm_med.cpu_s if warm_med.cpu_s else None,
        "warm_lost": sum(r.failed for r in warm), "warm_requests_sent": warm_sent,
        "server_outcomes": {k: dict(v) for k, v in outcomes.items()},
        "runs": {k: [vars(r) for r in rs] for k, rs in {**runs, "warm": warm}.items()},
    }
    row["meets_targets"] = row["ours_of_bound"] >= BOUND_TARGET and row["warm_labels_s"] >= WARM_TARGET
    return row


API_COLUMNS = [
    ("scenario", "scenario"), ("concurrency", "C"), ("rpm", "rpm"), ("bound_labels_s", "bound/s"),
    ("ours_labels_s", "ours/s"), ("ours_of_bound", "ours/bound"), ("ours_lost", "lost"),
    ("bare_labels_s", "bare/s"), ("bare_lost", "lost"), ("threads_labels_s", "threads/s"),
    ("threads_lost", "lost"), ("naive_labels_s", "naive/s"), ("ours_vs_bare", "ours/bare"),
    ("ours_vs_naive", "ours/naive"),
    ("ours_cpu_ms", "ours cpu ms"), ("bare_cpu_ms", "bare cpu ms"), ("warm_labels_s", "warm/s"),
    ("warm_cpu_ms", "warm cpu ms"), ("meets_targets", "targets met"),
]


# ----------------------------------------------------------------------------- hf judge
def hf_comparison(device: str, repeats: int, n: int = 64) -> dict:
    """Labels/s of the local hf judge: log-prob scoring vs generate-then-parse (same tiny model)."""
    try:
        importlib.import_module("cai.judges.hf")
    except ModuleNotFoundError as exc:
        if exc.name != "cai.judges.hf":
            raise
        return {"skipped": "cai.judges.hf is not in this build"}
    from bench.common import build_bench_model, interleaved
    from cai.judges import GenerateRequest, make_judge

    path = build_bench_model("tiny")
    judge = make_judge({"backend": "hf", "model": str(path), "api_key_env": None, "cache": False})
    choice_reqs = _choice_requests("hf", n)
    gen_reqs = [GenerateRequest(_messages("hf", i), max_tokens=GEN_TOKENS, tag={"i": i}) for i in range(n)]
    scored: list[int] = []
    parsed: list[int] = []

    def score() -> None:
        scored.append(sum(1 for r in judge.choose(choice_reqs) if r.ok))

    def generate_then_parse() -> None:
        parsed.append(sum(1 for o in judge.generate(gen_reqs) if o.ok and _parsed(o.text)))

    timings = interleaved({"logprob": score, "generate": generate_then_parse}, repeats, warmup=1)
    judge.close()
    return {
        "device": device, "model": "bench tiny (2 layers x 128, vocab 2048)", "n": n,
        "generate_max_tokens": GEN_TOKENS,
        "logprob_labels_s": scored[-1] / timings["logprob"].median,
        "generate_requests_s": n / timings["generate"].median,
        "generate_labels_s": parsed[-1] / timings["generate"].median,
        "logprob_ok_share": scored[-1] / n, "generate_parsed_share": parsed[-1] / n,
        "request_speedup": timings["generate"].median / timings["logprob"].median,
        "times_s": {k: t.times for k, t in timings.items()},
    }


def run(device: str, quick: bool) -> dict:
    """Every API scenario and the hf comparison; prints the tables, returns the JSON payload."""
    repeats = 1 if quick else 3
    warm_repeats = 3 if quick else 5
    print(f"\njudges: fake OpenAI server in a child process, {LATENCY_S * 1000:.0f} ms latency, "
          f"rpm enforced over {WINDOW_S:g} s windows; median of {repeats} interleaved repeats")
    print(format_table([], API_COLUMNS), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cai-bench-judges-") as tmp:
        for sc in SCENARIOS:
            rows.append(api_scenario(sc, repeats, Path(tmp), warm_repeats))
            print(format_table(rows[-1:], API_COLUMNS).splitlines()[-1], flush=True)
    hf = hf_comparison(device, repeats=3 if quick else 5)
    print("\nhf judge:", hf.get("skipped") or
          f"log-prob scoring {hf['logprob_labels_s']:.1f} labels/s ({hf['logprob_ok_share']:.0%} usable) vs "
          f"generate {hf['generate_max_tokens']} tokens + parse {hf['generate_requests_s']:.1f} requests/s "
          f"({hf['request_speedup']:.2f}x the time), {hf['generate_labels_s']:.1f} labels/s "
          f"({hf['generate_parsed_share']:.0%} of answers parsed)")
    ok = all(r["meets_targets"] for r in rows)
    missed = ", ".join(f"{r['scenario']} C={r['concurrency']}" for r in rows if not r["meets_targets"])
    print(f"\ntargets (ours >= {BOUND_TARGET:.0%} of bound, warm >= {WARM_TARGET:,.0f} labels/s): "
          + ("met in every scenario" if ok else f"NOT met in: {missed}"))
    return {"latency_s": LATENCY_S, "window_s": WINDOW_S, "repeats": repeats, "api": rows, "hf": hf,
            "targets_met": ok}


if __name__ == "__main__":  # python3 -m bench.bench_judges [--quick]: the runner, this benchmark only
    import sys

    from bench.run import main

    raise SystemExit(main(["--only", "judges", *sys.argv[1:]]))

"""SL-CAI (Bai et al. 2022, section 3): rounds of critique -> revision of each response.

Stage ``revisions``. For every prompt and its initial response (from the ``responses``
artifact joined with the ``prompts`` artifact for the whole conversation, or from a JSONL
dataset given as ``critique.initial_responses``), run ``rounds`` rounds; in each, a principle is
drawn by weight from the constitution (seeded by seed, prompt id and round), the feedback model
critiques the current response by it and then rewrites the response (prompt wording and layout,
few-shot examples included, in :mod:`cai.feedback.critique_text`). ``direct_revision`` skips
the critique (the paper's ablation).

The feedback model is the policy itself through :class:`cai.sampling.SamplingEngine`
(``generator: policy``) or any judge backend through ``generate_many`` (``generator: judge``:
openai/anthropic over HTTP, concurrent and cached, or the local ``hf`` judge).

Batching and determinism. Items are cut into fixed blocks of ``batch_size`` in input order.
Round ``r`` runs over all blocks before round ``r + 1``; each block makes one batched call for
its critiques and one for its revisions. A block's policy sampling is seeded with
``hash(seed, round, block, step)``; a judge request carries ``hash(seed, prompt, round, step)``.
Every finished block-round is journaled (one record per prompt and round) with one write, so a
killed build resumes at the first unfinished block-round and writes the same bytes as a build
never killed.

Outputs (``revisions.jsonl``, one trace per prompt, input order)::

    {prompt_id, messages, initial_response, rounds: [{round, principle_id, principle_ids,
     critique_request, critique, critique_raw, critique_cleaned, critique_usable,
     revision_request, revision_requested, revision, revision_raw, cleaned, usable, unchanged,
     unusable_reason, revision_tokens, tokens_in, tokens_out, cost_usd, cache_hits, failures}],
     final_revision, n_usable_rounds, few_shot_examples, model, generator, generation,
     constitution}

A round whose critique or revision is unusable after cleaning, or whose request failed, keeps
the previous response (its ``revision`` is that response, ``usable`` is false, the raw output
and ``unusable_reason`` say what happened); every such round is counted in the metrics
(``critique/unusable_critiques`` and ``critique/unusable_revisions`` count outputs that came
back unusable; ``critique/failed_requests`` counts requests the backend could not answer). :func:`revision_at` gives
the response after round ``r``, so SL-CAI-1..n can all be trained from one run.

Metrics (``critique/...``): ``prompts``, ``rounds``, ``principle/<id>`` and
``round_<r>/principle/<id>`` (draw counts), ``unusable_critiques``, ``unusable_revisions``,
``unusable_rounds``, ``cleaned_*``, ``failed_requests``, ``unchanged_revisions``,
``unrevised_prompts`` (no usable round), ``mean_revision_tokens``, ``prompts_per_s``,
``contexts_truncated`` (contexts cut from the left to fit the policy model: few-shot examples go
first), ``resumed_records``, the skipped-input counts, and for a judge ``judge_tokens_in/out``,
``judge_cost_usd``, ``judge_cache_hits`` (also written to stage.json's cost).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.config import CritiqueConfig, StageConfig
from cai.constitution import Constitution, CritiquePrinciple, load_constitution
from cai.data import Prompt, read_jsonl, write_jsonl
from cai.data.records import iter_jsonl_numbered
from cai.errors import ConfigError, DataError
from cai.feedback.critique_runner import (
    Generator,
    Item,
    make_generator,
    run_block_round,
)
from cai.feedback.critique_text import PROMPT_VERSION

if TYPE_CHECKING:
    from cai.judges.outage import Outage

log = logging.getLogger(__name__)

GENERATORS = ("policy", "judge")
TRACE_FILE = "revisions.jsonl"
JOURNAL = "rounds.jsonl"

# ----------------------------------------------------------------------------- seeds
def round_principles(constitution: Constitution, seed: int, prompt_id: str, round: int) -> list[CritiquePrinciple]:
    """The principle(s) of one round of one prompt: a weighted draw seeded by all three."""
    return constitution.sample_critique(random.Random(f"critique:{seed}:{prompt_id}:{round}"))


def few_shot_indices(n_examples: int, k: int, seed: int, prompt_id: str) -> list[int]:
    """Which of the constitution's few-shot examples a prompt is shown (seeded, in file order)."""
    k = min(k, n_examples)
    return sorted(random.Random(f"few-shot:{seed}:{prompt_id}").sample(range(n_examples), k))


def round_id(prompt_id: str, round: int) -> str:
    return f"{prompt_id}#{round}"


# ----------------------------------------------------------------------------- revision_at
def revision_at(record: Mapping[str, Any], round: int) -> str:
    """The response after ``round`` rounds of a trace record (SL-CAI-``round``'s target).

    That round's revision if usable, else the last usable revision before it, else the
    initial response; ``round=0`` is the initial response.
    """
    rounds = record["rounds"]
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round <= len(rounds):
        raise ConfigError(f"revision_at: round must be an integer in [0, {len(rounds)}] "
                          f"(the trace of {record.get('prompt_id')!r} has {len(rounds)} rounds), got {round!r}")
    for rec in reversed(rounds[:round]):
        if rec["usable"]:
            return rec["revision"]
    return record["initial_response"]


# ----------------------------------------------------------------------------- items
def _items_from_dataset(path: Path) -> tuple[list[Item], int]:
    items, seen, dupes = [], set(), 0
    for line, obj in iter_jsonl_numbered(path):
        where = f"{path}:{line}"
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise DataError(f"{where}: field 'messages': expected a list of {{role, content}} turns "
                            "ending with a user turn")
        if not isinstance(obj.get("response"), str):
            raise DataError(f"{where}: field 'response': expected the initial response as a string, "
                            f"got {type(obj.get('response')).__name__}")
        try:
            prompt = Prompt.create(obj["messages"], source=str(path))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if prompt.id in seen:
            dupes += 1
            continue
        seen.add(prompt.id)
        items.append(Item(prompt.id, prompt.messages_as_dicts(), obj["response"]))
    return items, dupes


def _items_from_artifacts(inputs: Mapping[str, Path]) -> tuple[list[Item], int, int]:
    prompts: dict[str, Prompt] = {}
    for split in ("train", "test"):
        file = Path(inputs["prompts"]) / f"{split}.jsonl"
        if file.exists():
            prompts.update((p.id, p) for p in read_jsonl(file, Prompt))
    file = Path(inputs["responses"]) / "responses.jsonl"
    items, seen, dupes, unknown = [], set(), 0, []
    for line, row in iter_jsonl_numbered(file):
        if not isinstance(row, dict) or not isinstance(row.get("prompt_id"), str) \
                or not isinstance(row.get("response"), str):
            raise DataError(f"{file}:{line}: expected fields 'prompt_id' and 'response' (strings)")
        if row["prompt_id"] not in prompts:
            unknown.append(line)
            continue
        if row["prompt_id"] in seen:
            dupes += 1
            continue
        seen.add(row["prompt_id"])
        items.append(Item(row["prompt_id"], prompts[row["prompt_id"]].messages_as_dicts(), row["response"]))
    if unknown:
        log.warning("%s: %d responses name a prompt id missing from the prompts artifact (lines %s); "
                    "skipped", file, len(unknown), ", ".join(map(str, unknown[:5])))
    return items, dupes, len(unknown)


def load_items(c: CritiqueConfig, inputs: Mapping[str, Path]) -> tuple[list[Item], dict[str, int]]:
    """The (prompt, initial response) items to revise, and counts of what was left out."""
    unknown = 0
    if c.initial_responses:
        path = Path(c.initial_responses).expanduser()
        if not path.is_file():
            raise DataError(f"critique.initial_responses: {c.initial_responses!r} is not a file; expected a JSONL "
                            'file of {"messages": [...], "response": "..."} rows')
        items, dupes = _items_from_dataset(path)
    else:
        items, dupes, unknown = _items_from_artifacts(inputs)
    beyond = max(0, len(items) - c.max_prompts) if c.max_prompts else 0
    if beyond:
        items = items[: c.max_prompts]
    counts = {"critique/skipped_duplicate_prompts": dupes, "critique/skipped_unknown_prompt": unknown,
              "critique/prompts_beyond_limit": beyond}
    return items, counts


# ----------------------------------------------------------------------------- the stage
def _current_response(journal: Any, item: Item, round: int) -> str:
    for r in range(round - 1, 0, -1):
        rec = journal.get(round_id(item.prompt_id, r))
        if rec is None:
            raise DataError(f"journal {journal.path}: round {r} of prompt {item.prompt_id} is missing "
                            f"although round {round} is due; delete the journal to rebuild")
        if rec["usable"]:
            return rec["revision"]
    return item.initial_response


def _generate_all(gen: Generator, items: list[Item], todo: list[tuple[int, int]], journal: Any,
                  c: CritiqueConfig, seed: int, constitution: Constitution) -> tuple[set[str], Outage]:
    """Run the unfinished block-rounds, journaling each finished record; returns the prompt ids
    touched and the :class:`~cai.judges.outage.Outage` of the records left unfinished.

    Only a block's unfinished records are asked (a request depends on its prompt, round and step,
    never on the block's other records). A record with a transient failure (the judge or the
    network: :func:`~cai.judges.types.is_transient`) is not journaled, and its prompt's later
    rounds wait for a rerun; after :data:`~cai.judges.outage.DOWN_AFTER_BATCHES` block-rounds in
    a row without a finished record the rest is not asked."""
    from cai import progress
    from cai.judges.outage import DOWN_AFTER_BATCHES, Outage
    from cai.judges.types import is_transient

    touched: set[str] = set()
    outage = Outage()
    idle = 0
    examples = constitution.few_shot.critique_revision
    bar = progress.bar(todo, desc="critique/revise", unit="block")
    for n, (rnd, start) in enumerate(bar):
        block = [it for it in items[start : start + c.batch_size] if round_id(it.prompt_id, rnd) not in journal
                 and (rnd == 1 or round_id(it.prompt_id, rnd - 1) in journal)]  # else: an earlier round failed
        if not block:
            continue
        current = [_current_response(journal, it, rnd) for it in block]
        principles = [round_principles(constitution, seed, it.prompt_id, rnd) for it in block]
        shots = [[examples[i] for i in few_shot_indices(len(examples), c.few_shot, seed, it.prompt_id)]
                 for it in block]
        records = run_block_round(gen, c, seed, rnd, start // c.batch_size, block, current, principles, shots)
        failed = [next((f for f in rec["failures"] if is_transient(f)), None) for rec in records]
        finished = [(round_id(it.prompt_id, rnd), rec) for it, rec, f in zip(block, records, failed) if f is None]
        journal.append_many(finished)
        outage.add(f for f in failed if f is not None)
        touched.update(it.prompt_id for it in block)
        bar.set_postfix(round=rnd)
        idle = idle + 1 if len(finished) < len(block) and not finished else 0
        if idle >= DOWN_AFTER_BATCHES:
            outage.not_asked = sum(1 for r, s in todo[n + 1 :] for it in items[s : s + c.batch_size]
                                   if round_id(it.prompt_id, r) not in journal)
            if outage.not_asked:
                log.warning("revisions: %d blocks in a row without an answer; the judge looks down: %d records "
                            "not asked", idle, outage.not_asked)
            break
    bar.close()
    return touched, outage


def _trace(item: Item, rounds: list[dict[str, Any]], c: CritiqueConfig, seed: int, model: str,
           constitution: Constitution) -> dict[str, Any]:
    record = {"prompt_id": item.prompt_id, "messages": item.messages,
              "initial_response": item.initial_response, "rounds": rounds}
    record["final_revision"] = revision_at(record, len(rounds))
    record["n_usable_rounds"] = sum(1 for r in rounds if r["usable"])
    record["few_shot_examples"] = few_shot_indices(
        len(constitution.few_shot.critique_revision), c.few_shot, seed, item.prompt_id)
    record["model"] = model
    record["generator"] = c.generator
    record["generation"] = {"max_new_tokens": c.max_new_tokens, "temperature": c.temperature,
                            "top_p": c.top_p, "top_k": c.top_k, "stop": list(c.stop), "seed": seed,
                            "batch_size": c.batch_size, "direct_revision": c.direct_revision,
                            "few_shot": c.few_shot, "prompt_version": PROMPT_VERSION}
    record["constitution"] = {"name": constitution.name, "hash": constitution.hash}
    return record


def _metrics(traces: list[dict[str, Any]], c: CritiqueConfig) -> dict[str, Any]:
    rounds = [r for t in traces for r in t["rounds"]]
    per_round: Counter[tuple[int, str]] = Counter()
    for r in rounds:
        for pid in r["principle_ids"]:
            per_round[(r["round"], pid)] += 1
    answered = [r["revision_tokens"] for r in rounds if r["revision_raw"] is not None]
    came_back_critique = [r for r in rounds if r["critique_raw"] is not None]
    m: dict[str, Any] = {
        "critique/prompts": len(traces),
        "critique/rounds": c.rounds,
        "critique/unusable_critiques": sum(1 for r in came_back_critique if not r["critique_usable"]),
        "critique/unusable_revisions": sum(1 for r in rounds if r["revision_raw"] is not None and not r["usable"]),
        "critique/unusable_rounds": sum(1 for r in rounds if not r["usable"]),
        "critique/cleaned_critiques": sum(1 for r in rounds if r["critique_cleaned"]),
        "critique/cleaned_revisions": sum(1 for r in rounds if r["cleaned"]),
        "critique/failed_requests": sum(len(r["failures"]) for r in rounds),
        "critique/unchanged_revisions": sum(1 for r in rounds if r["unchanged"]),
        "critique/unrevised_prompts": sum(1 for t in traces if t["n_usable_rounds"] == 0),
        "critique/empty_initial_responses": sum(1 for t in traces if not t["initial_response"].strip()),
        "critique/mean_revision_tokens": sum(answered) / len(answered) if answered else 0.0,
    }
    for (rnd, pid), n in sorted(per_round.items()):
        m[f"critique/round_{rnd}/principle/{pid}"] = n
    for pid, n in sorted(Counter(pid for r in rounds for pid in r["principle_ids"]).items()):
        m[f"critique/principle/{pid}"] = n
    if c.generator == "judge":
        m["critique/judge_tokens_in"] = sum(r["tokens_in"] for r in rounds)
        m["critique/judge_tokens_out"] = sum(r["tokens_out"] for r in rounds)
        m["critique/judge_cost_usd"] = sum(r["cost_usd"] for r in rounds)
        m["critique/judge_cache_hits"] = sum(r["cache_hits"] for r in rounds)
    return m


def run_revisions(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """The ``revisions`` stage function (see the module docstring).

    Reads ``cfg.seed``, ``cfg.critique`` and the feedback model: ``cfg.policy`` (``generator:
    policy``; it runs on ``policy.device``) or ``cfg.judge`` (``generator: judge``); the
    constitution is ``cfg.constitution_file``. ``critique.initial_responses``, when set, is read
    here (the pipeline hashes its contents into the key).
    """
    c = cfg.critique
    seed = cfg.seed
    constitution = load_constitution(cfg.constitution_file)
    with ctx.phase("load"):
        items, counts = load_items(c, inputs)
    journal = ctx.journal(JOURNAL)
    starts = range(0, len(items), c.batch_size)
    todo = [(rnd, s) for rnd in range(1, c.rounds + 1) for s in starts
            if not all(round_id(it.prompt_id, rnd) in journal for it in items[s : s + c.batch_size])]
    model = cfg.policy.name_or_path if c.generator == "policy" else cfg.judge.model
    timing: dict[str, Any] = {}
    if todo:
        with ctx.phase("load_model"):
            gen = make_generator(cfg, inputs, c)
        try:
            with ctx.phase("generate"):
                t0 = time.perf_counter()
                touched, outage = _generate_all(gen, items, todo, journal, c, seed, constitution)
                elapsed = time.perf_counter() - t0
        finally:
            gen.close()
        if outage:
            from cai.judges.outage import judge_where, outage_error

            raise outage_error("revisions", outage, len(journal), len(items) * c.rounds,
                               judge_where(cfg.judge.backend, cfg.judge.base_url), unit="critique records",
                               done="finished")
        timing["critique/prompts_per_s"] = len(touched) / elapsed if elapsed > 0 else 0.0
        timing["critique/contexts_truncated"] = gen.truncated
    done = journal.done()
    traces = [_trace(it, [done[round_id(it.prompt_id, r)] for r in range(1, c.rounds + 1)], c, seed,
                     model, constitution) for it in items]
    with ctx.phase("write"):
        write_jsonl(ctx.dir / TRACE_FILE, traces)
    metrics = _metrics(traces, c)
    if c.generator == "judge":
        ctx.add_cost(metrics["critique/judge_tokens_in"], metrics["critique/judge_tokens_out"],
                     metrics["critique/judge_cost_usd"])
    ctx.set_metrics({**metrics, **counts, **timing,
                     "critique/resumed_records": journal.resumed_records})
    log.info("revisions: %d prompts x %d rounds, %d unusable revisions, %d unusable critiques",
             len(traces), c.rounds, metrics["critique/unusable_revisions"],
             metrics["critique/unusable_critiques"])

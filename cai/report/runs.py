"""The runs a report reads: run folders found under a path, each run's records, arms over seeds.

Read-only over what :mod:`cai.pipeline` wrote: each run directory's ``run.json`` (artifact key
per stage, resolved config, constitution hash, store root), ``metrics.json`` and
``stages/<stage>.json``, Hydra's ``.hydra/overrides.yaml`` when present, and the
``train_log.jsonl`` of any artifact in the store. Runs whose configs differ only in ``seed`` (and
the store location) are one **arm**. :func:`collect` gives the :class:`ReportData` every section
of :mod:`cai.report.sections` reads; ``cai compare`` reads runs through it too.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.errors import CaiError, DataError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
ARMS_DIR = "arms"  # arms a run added beside itself (cai.pipeline.HUMAN_ARM_DIR)
TRAIN_LOG = "train_log.jsonl"
ARM_IGNORED = ("seed", "store.root")  # differences that do not make another arm
MAX_DEPTH = 3  # how deep below PATH to look for run directories
_MISSING = object()


@dataclass
class RunRecord:
    """Everything the report reads about one run directory."""

    dir: Path
    name: str  # path relative to the report's root ("0", "sweep_a/1"), or the folder's name
    info: dict[str, Any]  # run.json
    metrics: dict[str, float]  # numeric metrics only (NaN kept as NaN)
    stages: dict[str, dict[str, Any]]  # stage name -> stages/<stage>.json
    overrides: list[str] = field(default_factory=list)
    train_logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    unreadable_logs: list[str] = field(default_factory=list)  # stages whose artifact could not be read

    @property
    def config(self) -> dict[str, Any]:
        return self.info.get("config") or {}

    @property
    def seed(self) -> Any:
        return self.info.get("seed", self.config.get("seed"))


@dataclass
class Arm:
    """Runs that differ only in seed: one arm of the comparison."""

    name: str
    runs: list[RunRecord]


@dataclass
class ReportData:
    root: Path
    runs: list[RunRecord]
    arms: list[Arm]
    varying: list[str]  # flattened config keys whose values differ between runs
    head_to_head: list[dict[str, Any]] | None = None  # rows of head_to_head.json (cai compare), if any


# --------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e


def as_number(value: Any) -> float | None:
    """A metric value as a float ("NaN"/"Infinity" strings included); None if not numeric."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    return None


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is a run directory, else run directories up to MAX_DEPTH below it;
    with each run, the arms it added (``<run>/arms/<name>/``, e.g. the human-label arm)."""
    if (path / RUN_FILE).is_file():
        found = [path]
    else:
        found = []
        frontier = [path]
        for _ in range(MAX_DEPTH):
            nxt = []
            for d in frontier:
                for child in sorted(d.iterdir()):
                    if not child.is_dir() or child.name.startswith("."):
                        continue
                    (found if (child / RUN_FILE).is_file() else nxt).append(child)
            frontier = nxt
    found += [arm.parent for run in list(found) for arm in sorted((run / ARMS_DIR).glob(f"*/{RUN_FILE}"))]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(path)))


def _read_overrides(run_dir: Path) -> list[str]:
    file = run_dir / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return []
    import yaml

    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{file}: not valid YAML: {e}") from e
    return [str(x) for x in loaded] if isinstance(loaded, list) else []


def _read_train_logs(info: dict[str, Any]) -> tuple[dict[str, list[dict]], list[str]]:
    """Rows of every ``train_log.jsonl`` among the run's artifacts (read from the store)."""
    from cai.artifacts import ArtifactStore
    from cai.data import read_jsonl

    store_root = info.get("store")
    artifacts = info.get("artifacts") or {}
    if not store_root:
        return {}, sorted(artifacts)
    store = ArtifactStore(store_root)
    logs, unreadable = {}, []
    for stage, key in sorted(artifacts.items()):
        try:
            folder = store.path(key)
        except CaiError:
            unreadable.append(stage)
            continue
        if not folder.is_dir():
            unreadable.append(stage)
        elif (folder / TRAIN_LOG).is_file():
            logs[stage] = [r for r in read_jsonl(folder / TRAIN_LOG) if isinstance(r, dict)]
    return logs, unreadable


def load_run(run_dir: Path, root: Path) -> RunRecord:
    """Read one run directory (``run.json``, ``metrics.json``, ``stages/*.json``)."""
    info = _read_json(run_dir / RUN_FILE)
    if not isinstance(info, dict):
        raise DataError(f"{run_dir / RUN_FILE}: expected a JSON object as written by cai run")
    metrics_file = run_dir / "metrics.json"
    raw = _read_json(metrics_file) if metrics_file.is_file() else {}
    metrics = legacy_eval_metrics(info, {k: v for k, v in ((k, as_number(v)) for k, v in raw.items())
                                         if v is not None})
    stages = {}
    for f in sorted((run_dir / "stages").glob("*.json")):
        stages[f.stem] = _read_json(f)
    logs, unreadable = _read_train_logs(info)
    name = run_dir.name if run_dir == root else run_dir.relative_to(root).as_posix()
    return RunRecord(run_dir, name, info, metrics, stages, _read_overrides(run_dir), logs, unreadable)


# --------------------------------------------------------------------------- evaluations
EVAL_ORDER = ("initial", "sft", "dpo", "ppo")  # cai.config.EVALUATED_POLICIES
EVAL_PREFIX = "evaluate_"  # cai.config.EVAL_STAGE_PREFIX: stage evaluate_<policy>, metrics eval/<policy>/...


def evaluations(info: dict[str, Any]) -> dict[str, str]:
    """Policy -> the key of its ``evaluate_<policy>`` artifact in a run.json, in the order initial,
    sft, dpo, ppo. A run written before policies had their own evaluation has one ``evaluate``
    artifact, of the policy ``eval.policy`` named."""
    artifacts = info.get("artifacts") or {}
    found = {p: str(artifacts[EVAL_PREFIX + p]) for p in EVAL_ORDER if artifacts.get(EVAL_PREFIX + p)}
    if not found and artifacts.get("evaluate"):
        policy = ((info.get("config") or {}).get("eval") or {}).get("policy") or "initial"
        found[str(policy)] = str(artifacts["evaluate"])
    return found


def headline_evaluation(info: dict[str, Any]) -> tuple[str, str] | None:
    """``(policy, artifact key)`` of the run's headline policy (``eval.policy``, else the last one
    evaluated: ppo, dpo, sft, initial), or None when nothing was evaluated."""
    found = evaluations(info)
    if not found:
        return None
    wanted = ((info.get("config") or {}).get("eval") or {}).get("policy")
    policy = wanted if wanted in found else list(found)[-1]
    return policy, found[policy]


def legacy_eval_metrics(info: dict[str, Any], metrics: dict[str, float]) -> dict[str, float]:
    """A run written before policies had their own evaluation names its metrics ``eval/...``:
    read them as ``eval/<eval.policy>/...`` so old and new runs show side by side."""
    artifacts = info.get("artifacts") or {}
    if artifacts.get("evaluate") and not any(k.startswith(EVAL_PREFIX) for k in artifacts):
        policy = next(iter(evaluations(info)))
        own = ("vs_sft/", "harmless", "kl", "length", "sft_length", "rm_score", "sft_rm_score", "prompts",
               "judge_is_labeller", "judge_cost_usd", "empty_responses", "baseline_is_sft_artifact")
        return {(f"eval/{policy}/{k[5:]}" if k.startswith("eval/") and k[5:].startswith(own) else k): v
                for k, v in metrics.items()}
    return metrics


# --------------------------------------------------------------------------- arms
def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(config, dict):
        return {prefix: config} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def format_value(v: Any) -> str:
    if v is _MISSING:
        return "(absent)"
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True)


def varying_keys(runs: list[RunRecord]) -> list[str]:
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({format_value(f.get(k, _MISSING)) for f in flats}) > 1]


def group_arms(runs: list[RunRecord], varying: list[str]) -> list[Arm]:
    """Group runs by every varying config value except ``seed``/``store.root``."""
    arm_keys = [k for k in varying if k not in ARM_IGNORED]
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        flat = flatten(r.config)
        label = ", ".join(f"{k}={format_value(flat.get(k, _MISSING))}" for k in arm_keys)
        groups.setdefault(label, []).append(r)
    if len(groups) == 1:
        only = next(iter(groups.values()))
        return [Arm(str(only[0].info.get("experiment") or "run"), only)]
    if ARM_TAG in arm_keys:  # an `arm` preset names its runs: show that, not every key it set
        return [Arm(_tagged_name(rs, groups, arm_keys), rs) for rs in groups.values()]
    return [Arm(name, rs) for name, rs in groups.items()]


ARM_TAG = "tags.arm"
_WORDS = {"ai": "AI", "rlaif": "RLAIF", "rlhf": "RLHF", "sft": "SFT", "dpo": "DPO", "ppo": "PPO", "cai": "CAI",
          "sl": "SL", "d": "d"}


def tag_words(tag: str) -> str:
    """An arm tag in words for legends and tables: ``ai_labels`` -> ``AI labels``, ``sl_cai`` -> ``SL CAI``."""
    words = [w for w in re.split(r"[_\s]+", tag) if w]
    return " ".join(_WORDS.get(w.lower(), w) for w in words) or tag


def _tagged_name(runs: list[RunRecord], groups: dict[str, list[RunRecord]], arm_keys: list[str]) -> str:
    """The arm's tag in words (:func:`tag_words`), plus the keys that tell apart groups sharing that tag."""
    flat = flatten(runs[0].config)
    tag = flat.get(ARM_TAG, _MISSING)
    siblings = [flatten(g[0].config) for g in groups.values() if flatten(g[0].config).get(ARM_TAG, _MISSING) == tag]
    extra = [k for k in arm_keys if k != ARM_TAG
             and len({format_value(f.get(k, _MISSING)) for f in siblings}) > 1]
    name = tag_words(format_value(tag))
    return name + (" (" + ", ".join(f"{k}={format_value(flat.get(k, _MISSING))}" for k in extra) + ")" if extra else "")


# --------------------------------------------------------------------------- head_to_head.json
H2H_FILE = "head_to_head.json"  # written by cai compare (cai.evaluate.compare)
ROW_FIELDS = {"seed": None, "arm_a": str, "arm_b": str, "win_rate": float, "ci_low": float, "ci_high": float,
              "wins": int, "ties": int, "losses": int, "invalid": int, "n": int}


def _number(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if v in ("NaN", None):
        return math.nan
    raise TypeError


def load_head_to_head(root: Path) -> list[dict[str, Any]] | None:
    """The rows of ``root/head_to_head.json``, checked; None when there is no such file."""
    file = Path(root) / H2H_FILE
    if not file.is_file():
        return None
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: not readable JSON ({e}); rerun cai compare to rewrite it") from e
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise DataError(f"{file}: expected an object with a list 'rows', as written by cai compare")
    out = []
    for i, row in enumerate(rows, 1):
        clean = {}
        for name, kind in ROW_FIELDS.items():
            if not isinstance(row, dict) or name not in row:
                raise DataError(f"{file}: row {i} has no field {name!r}")
            try:
                clean[name] = row[name] if kind is None else (str(row[name]) if kind is str else
                                                               (int(row[name]) if kind is int else _number(row[name])))
            except (TypeError, ValueError):
                raise DataError(f"{file}: row {i}, field {name!r}: expected a {kind.__name__}, "
                                f"got {row[name]!r}") from None
        out.append(clean)
    return out


def collect(path: str | Path) -> ReportData:
    """Find and read every run under ``path``."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"cai report: {path}: no such directory (give a run directory or a sweep folder)")
    dirs = find_run_dirs(root)
    if not dirs:
        raise DataError(f"cai report: {path}: no run found (a run directory has {RUN_FILE}; looked "
                        f"{MAX_DEPTH} levels down)")
    runs = [load_run(d, root) for d in dirs]
    varying = varying_keys(runs)
    return ReportData(root, runs, group_arms(runs, varying), varying, load_head_to_head(root))


# --------------------------------------------------------------------------- writing

"""``cai export``: a run's trained model, or its labels, out of the store in the formats others read.

``cai export RUN --stage sft|dpo|ppo|reward|eval_reward --to DIR [--merge]`` writes a
``save_pretrained`` folder: the model and tokenizer of the stage's artifact, loadable with
``AutoModelForCausalLM.from_pretrained(DIR)`` (a reward model: ``AutoModelForSequenceClassification``,
plus ``reward_stats.json`` and an ensemble's other members, so ``cai score DIR`` works). A stage
trained with LoRA keeps its adapter in the artifact (``adapter/``); the export is then the adapter
(``peft.AutoPeftModelForCausalLM.from_pretrained(DIR)``, a few MB) unless ``--merge`` asks for the
merged model. Artifacts built before adapters were kept hold only the merged model, which is
exported either way (the card says so).

``cai export RUN --labels --to DIR [--plain] [--label-source ai|human]`` writes the run's labels as
a Hugging Face dataset folder in TRL's preference format (``prompt``/``chosen``/``rejected``,
conversational by default, plain text with ``--plain``; :mod:`cai.feedback.export`):
``data/train-00000-of-00001.parquet``, loadable with ``datasets.load_dataset(DIR, split="train")``
and accepted by TRL's ``DPOTrainer`` and ``RewardTrainer`` unchanged.

Both write a card (``README.md``, with the hub's YAML header): the constitution's name, version
and hash, the judge, the label source and counts, the headline metrics and the artifact key; a
dataset card adds the judge's agreement with human labels (when the run measured it) and its
position consistency. ``--push-to-hub REPO`` then uploads the folder (only when asked; the
token comes from the environment or ``hf auth login``); a hub that cannot be reached is one clear
error, and the local export stays complete.

RUN is a run folder (``runs/<experiment>/<time>/``); its ``run.json`` names each stage's artifact
in the store, and ``artifacts/`` links to them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cai.artifacts import run_artifacts
from cai.errors import CaiError, ConfigError, DataError

log = logging.getLogger(__name__)

MODEL_STAGES = ("sft", "dpo", "ppo", "reward", "eval_reward")
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CARD = "README.md"
REWARD_STATS = "reward_stats.json"
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template",
                   "spiece", "sentencepiece")
DATA_FILE = "data/train-00000-of-00001.parquet"

# the headline metrics of a model card, per stage, in this order (those the run reported)
HEADLINE = {
    "sft": ["sft/final_loss", "sft/examples", "sft/steps"],
    "reward": ["rm/eval/accuracy", "rm/eval/accuracy_ci_low", "rm/eval/accuracy_ci_high", "rm/eval/ece",
               "rm/human/accuracy", "rm/human/accuracy_ci_low", "rm/human/accuracy_ci_high", "rm/human/ece",
               "rm/steps"],
    "eval_reward": ["eval_rm/eval/accuracy", "eval_rm/eval/accuracy_ci_low", "eval_rm/eval/accuracy_ci_high",
                    "eval_rm/eval/ece", "eval_rm/steps"],
    "dpo": ["dpo/eval/rewards/accuracies", "dpo/eval/rewards/margins", "dpo/human/rewards/accuracies",
            "dpo/human/rewards/margins", "dpo/final_loss", "dpo/steps"],
    "ppo": ["ppo/objective/scores", "ppo/objective/kl", "ppo/objective/rlhf_reward", "ppo/response_length",
            "ppo/steps"],
}
EVAL_HEADLINE = ["win_rate", "win_rate_ci_low", "win_rate_ci_high"]  # eval/vs_<baseline>/...
EVAL_MORE = ["eval/kl", "eval/length", "eval/harmless/rate", "eval/prompts"]
LABEL_HEADLINE = ["label/ok", "label/failed", "label/position_consistency", "label/same_slot_rate",
                  "label/first_slot_rate", "quality/agreement", "quality/agreement_ci_low",
                  "quality/agreement_ci_high", "quality/agreement_n", "quality/soft_agreement"]


# ============================================================================= the run
class RunView:
    """What an export reads of one run folder: ``run.json``, ``metrics.json``, the artifacts."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir).expanduser().resolve()
        self.info, self.artifacts = run_artifacts(self.dir)
        self.config: dict[str, Any] = self.info.get("config") or {}
        metrics_file = self.dir / "metrics.json"
        try:
            self.metrics: dict[str, Any] = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        except (OSError, ValueError) as e:
            raise DataError(f"{metrics_file}: unreadable ({e})") from None

    def artifact(self, stage: str) -> Path:
        if stage not in self.artifacts:
            ran = ", ".join(sorted(self.artifacts))
            raise DataError(f"{self.dir}: the run has no {stage} artifact (it ran: {ran})")
        path = self.artifacts[stage]
        if not path.is_dir():
            raise DataError(f"{path}: the {stage} artifact of {self.dir} is not in the store (deleted, or "
                            "the store moved: run.json's 'store' says where it was)")
        return path

    def section(self, name: str) -> dict[str, Any]:
        value = self.config.get(name)
        return value if isinstance(value, dict) else {}

    def constitution(self) -> dict[str, Any]:
        """Name, version and hash of the run's constitution (the hash run.json recorded; the file's
        own when no stage of the run used it), and a note when the file changed since."""
        from cai.config import CONSTITUTIONS_DIR
        from cai.constitution import load_constitution, resolve_constitution

        recorded = self.info.get("constitution_hash")
        name = self.section("constitution").get("path") or "?"
        out: dict[str, Any] = {"path": name, "name": str(name), "version": "?", "hash": recorded}
        try:
            c = load_constitution(resolve_constitution(name, [CONSTITUTIONS_DIR]))
        except CaiError as e:
            out["note"] = f"the constitution file cannot be read now ({str(e).splitlines()[0]})"
            return out
        out.update(name=c.name, version=c.version)
        if recorded is None:
            out["hash"] = c.hash
            out["note"] = "no stage of this run used the constitution; the hash is the file's"
        elif c.hash != recorded:
            out["note"] = f"the file has changed since the run (its hash is now {c.hash})"
        return out

    def judge(self) -> str:
        j = self.section("judge")
        model = j.get("model") or "?"
        if j.get("backend") == "hf" and model == "tiny":
            model = "tiny (the run's tiny policy model)"
        return f"{j.get('backend', '?')}:{model}"

    def labels_from(self, stage: str) -> str:
        """Which labels trained ``stage``, in words."""
        if stage == "sft":
            sft = self.section("sft")
            return f"SL-CAI: supervised on {sft.get('source', 'revisions')} (critiqued and revised responses)"
        if stage == "ppo":
            ppo = self.section("ppo")
            if ppo.get("reward_from") == "judge":
                return "online: the judge scores each PPO sample"
            return f"reward model trained on {self.section('reward').get('labels_from', '?')} labels"
        section = {"reward": "reward", "dpo": "dpo"}.get(stage)
        if stage == "eval_reward":
            return "human labels (data.human.path)"
        return f"{self.section(section).get('labels_from', '?')} labels"

    def number(self, key: str) -> Any:
        value = self.metrics.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _metric_lines(run: RunView, keys: Sequence[str]) -> list[str]:
    return [f"| `{k}` | {_fmt(run.number(k))} |" for k in keys if run.number(k) is not None]


def _yaml_header(fields: Mapping[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(dict(fields), sort_keys=False, allow_unicode=True) + "---\n"


def _provenance(run: RunView, extra: Sequence[tuple[str, str]]) -> list[str]:
    c = run.constitution()
    rows = [("run", f"`{run.dir}` (experiment `{run.info.get('experiment', '?')}`, seed {run.info.get('seed', '?')})"),
            *extra,
            ("constitution", f"{c['name']} v{c['version']} (`{c['path']}`)"),
            ("constitution hash", f"`{c['hash']}`" + (f" ({c['note']})" if c.get("note") else "")),
            ("AI judge of the run", f"`{run.judge()}`"),
            ("arm", f"`{(run.config.get('tags') or {}).get('arm', '?')}`")]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


# ============================================================================= models
def _base_model(run: RunView) -> str | None:
    """The policy's hub name, for the card's ``base_model`` (None for tiny or local models)."""
    name = str(run.section("policy").get("name_or_path") or "")
    if not name or name == "tiny" or Path(name).expanduser().exists() or name.count("/") != 1:
        return None
    return name


def _lora(run: RunView, stage: str) -> bool:
    section = run.section({"eval_reward": "eval"}.get(stage, stage))
    if stage == "eval_reward":
        section = section.get("rm") or {}
    return bool((section.get("lora") or {}).get("enabled"))


def _feedback_tag(run: RunView, stage: str) -> list[str]:
    """``rlaif`` or ``rlhf`` by the labels behind ``stage`` (none for SFT)."""
    section = {"ppo": "reward", "eval_reward": None, "sft": None}.get(stage, stage)
    if stage == "eval_reward":
        return ["rlhf"]
    if section is None or (stage == "ppo" and run.section("ppo").get("reward_from") == "judge"):
        return ["rlaif"] if stage == "ppo" else []
    return ["rlaif" if run.section(section).get("labels_from") == "ai" else "rlhf"]


def _adapter_base(artifact: Path, form: str) -> list[tuple[str, str]]:
    """The adapter's base model (where peft loads it from), for the card."""
    if form != "adapter":
        return []
    try:
        base = json.loads((artifact / ADAPTER_DIR / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        base = None
    note = " (a local path: load the adapter where it exists, or set base_model_name_or_path in " \
        "adapter_config.json)" if base and Path(base).is_absolute() else ""
    return [("adapter base model", f"`{base}`{note}")]


def model_card(run: RunView, stage: str, artifact: Path, form: str) -> str:
    """The ``README.md`` of an exported model (see the module docstring)."""
    reward = stage in ("reward", "eval_reward")
    c = run.constitution()
    header: dict[str, Any] = {
        "library_name": "peft" if form == "adapter" else "transformers",
        "tags": ["cai", "constitutional-ai", *_feedback_tag(run, stage), stage],
        "pipeline_tag": "text-classification" if reward else "text-generation",
    }
    if _base_model(run):
        header["base_model"] = _base_model(run)
    header["cai"] = {"stage": stage, "artifact": artifact.name, "constitution_hash": c["hash"], "judge": run.judge()}
    what = {"sft": "SL-CAI policy (supervised on revisions)", "dpo": "DPO policy", "ppo": "PPO policy",
            "reward": "reward model", "eval_reward": "held-out reward model"}[stage]
    forms = {"adapter": "the LoRA adapter (load it with peft; `--merge` exports the merged model)",
             "merged": "the full model (LoRA adapters merged)" if _lora(run, stage) else "the full model",
             "merged-only": "the full model, LoRA adapters merged at training time (this artifact kept no "
                            "separate adapter)"}
    lines = [_yaml_header(header), f"# {run.info.get('experiment', 'cai')}: {what}", "",
             f"Trained by cai's stage `{stage}` (Constitutional AI / RLAIF research framework) and written by "
             f"`cai export`. This folder holds "
             f"{forms[form]}.", "",
             *_provenance(run, [("artifact key", f"`{artifact.name}`"), ("labels", run.labels_from(stage)),
                                *_adapter_base(artifact, form)]),
             ""]
    counts = _metric_lines(run, [f"{ {'reward': 'rm', 'eval_reward': 'eval_rm'}.get(stage, stage)}/data/{k}"
                                 for k in ("used", "labels_in", "labels_failed", "ties", "train_pairs",
                                           "eval_pairs", "human_pairs")])
    if stage != "sft" and (counts or run.number("label/ok") is not None):
        lines += ["## Labels", "", "| count | value |", "|---|---|", *counts,
                  *_metric_lines(run, ["label/pairs", "label/ok", "label/failed"]), ""]
    headline = _metric_lines(run, HEADLINE[stage])
    if run.section("eval").get("policy") == stage:  # this policy is the arm's evaluated one
        baseline = run.section("eval").get("baseline", "sft")
        headline += _metric_lines(run, [f"eval/vs_{baseline}/{k}" for k in EVAL_HEADLINE] + EVAL_MORE)
    headline += _metric_lines(run, sorted(k for k in run.metrics if k.startswith(
        f"{ {'reward': 'rm', 'eval_reward': 'eval_rm'}.get(stage, stage)}/sets/") and k.endswith("/accuracy")))
    if headline:
        lines += ["## Headline metrics", "", "| metric | value |", "|---|---|", *headline, ""]
    if form == "adapter":
        load = ("from peft import AutoPeftModelForSequenceClassification as M" if reward
                else "from peft import AutoPeftModelForCausalLM as M")
    else:
        load = ("from transformers import AutoModelForSequenceClassification as M" if reward
                else "from transformers import AutoModelForCausalLM as M")
    lines += ["## Use", "", "```python", load, "from transformers import AutoTokenizer", "",
              'model = M.from_pretrained("PATH_OR_REPO")', 'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
              "```", ""]
    if reward:
        lines += ["The reward of a (conversation, response) is the scalar head's output; `reward_stats.json` "
                  "holds the mean and spread on the training responses (cai normalises by them). "
                  "`cai score THIS_FOLDER --pairs FILE.jsonl` scores pair files.", ""]
    return "\n".join(lines)


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--to: {out} is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--to: {out} is not empty; pass --force to replace its contents")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _copy_tree(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)


def export_model(run_dir: str | Path, stage: str, out: str | Path, merge: bool = False, force: bool = False) -> Path:
    """Write stage ``stage``'s model of the run into ``out`` with its card; returns ``out``."""
    if stage not in MODEL_STAGES:
        raise ConfigError(f"--stage: expected one of {', '.join(MODEL_STAGES)}, got {stage!r}")
    run = RunView(run_dir)
    artifact = run.artifact(stage)
    model_dir = artifact / MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{artifact}: no {MODEL_DIR}/config.json; not a trained-model artifact")
    out = Path(out).expanduser()
    _prepare(out, force)
    adapter = artifact / ADAPTER_DIR
    reward = stage in ("reward", "eval_reward")
    if (adapter / "adapter_config.json").is_file() and not merge and not (artifact / "ensemble").is_dir():
        form = "adapter"
        _copy_tree(adapter, out)
        for f in model_dir.iterdir():  # the tokenizer travels with the adapter
            if f.is_file() and f.name.startswith(TOKENIZER_FILES):
                shutil.copy2(f, out / f.name)
    else:
        form = "merged" if adapter.is_dir() or not _lora(run, stage) else "merged-only"
        _copy_tree(model_dir, out)  # the artifact's model is already merged: a copy is its save_pretrained
    if reward:  # the scorer's statistics, with the first member now at the folder's top (cai score reads it)
        stats = json.loads((artifact / REWARD_STATS).read_text())
        stats["members"] = ["." if m == MODEL_DIR else m for m in stats.get("members", [])]
        (out / REWARD_STATS).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        if (artifact / "ensemble").is_dir():
            shutil.copytree(artifact / "ensemble", out / "ensemble")
    (out / CARD).write_text(model_card(run, stage, artifact, form))
    log.info("exported %s (%s) of %s to %s", stage, form, run.dir, out)
    return out


# ============================================================================= labels
def _label_files(run: RunView, source: str | None) -> tuple[str, Path, Path]:
    """``(source, pairs file, labels file)`` of the run's AI labels (or its human labels)."""
    def _find(artifact: Path, name: str) -> Path | None:
        return next((f for f in (artifact / name, artifact / f"{name}.gz") if f.is_file()), None)

    if source is None:
        source = "ai" if "ai_labels" in run.artifacts else "human"
    if source == "ai":
        art = run.artifact("ai_labels")
        labels = _find(art, "labels.jsonl")
        pair_sources = [art] + [run.artifacts[s] for s in (run.section("labels").get("source"),)
                                if s in run.artifacts]
        pairs = next((f for f in (_find(src, "pairs.jsonl") for src in pair_sources) if f), None)
    elif source == "human":
        art = run.artifact("human_pairs")
        labels, pairs = _find(art, "labels.jsonl"), _find(art, "pairs.jsonl")
    else:
        raise ConfigError(f"--label-source: expected ai or human, got {source!r}")
    if labels is None or pairs is None:
        raise DataError(f"{art}: no labels.jsonl and pairs.jsonl for the {source} labels")
    return source, pairs, labels


_LABEL_STAGE = {"ai": "ai_labels", "human": "human_pairs"}


def dataset_card(run: RunView, source: str, counts: Mapping[str, int], conversational: bool, n: int) -> str:
    """The ``README.md`` of an exported label dataset."""
    c = run.constitution()
    form = "conversational" if conversational else "standard (plain text)"
    header = {
        "tags": ["cai", "constitutional-ai", "rlaif" if source == "ai" else "rlhf", "preference", "trl"],
        "task_categories": ["text-generation"],
        "size_categories": ["n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}],
        "cai": {"label_source": source, "constitution_hash": c["hash"],
                "judge": run.judge() if source == "ai" else "human"},
    }
    who = f"the AI judge `{run.judge()}`" if source == "ai" else "human raters (the run's human pairs)"
    lines = [_yaml_header(header), f"# {run.info.get('experiment', 'cai')}: preference labels", "",
             f"{n} preference pairs labelled by {who}, in TRL's {form} preference format: `prompt`, `chosen`, "
             "`rejected` (TRL's `DPOTrainer` and `RewardTrainer` take it as is), plus `p_chosen` (the soft "
             "probability that `chosen` is better), `principle_ids`, `judge` (the label's source) and `pair_id`.", "",
             *_provenance(run, [("artifact key", f"`{run.artifacts[_LABEL_STAGE[source]].name}`"),
                                ("labels", f"{source} labels")]),
             "", "## Counts", "", "| count | value |", "|---|---|",
             *[f"| {k} | {v} |" for k, v in counts.items()], ""]
    quality = _metric_lines(run, LABEL_HEADLINE) if source == "ai" else []
    if quality:
        lines += ["## Label quality", "",
                  "Position consistency: share of pairs whose *response* wins in both presentation orders; "
                  "same-slot rate: share whose *slot* wins in both orders (a slot-biased judge). "
                  + ("Agreement: share of pairs where the judge picks the human's choice (Wilson 95% interval)."
                     if run.number("quality/agreement") is not None else
                     "Agreement with human labels was not measured in this run (labels.source=human_pairs "
                     "with labels.measure_agreement=true measures it)."),
                  "", "| metric | value |", "|---|---|", *quality, ""]
    lines += ["## Use", "", "```python", "from datasets import load_dataset", "",
              'ds = load_dataset("PATH_OR_REPO", split="train")', "```", ""]
    return "\n".join(lines)


def export_labels(run_dir: str | Path, out: str | Path, conversational: bool = True, source: str | None = None,
                  force: bool = False) -> Path:
    """Write the run's labels into ``out`` as a dataset folder with its card; returns ``out``."""
    from cai.data import read_jsonl
    from cai.feedback.export import to_hf_dataset

    run = RunView(run_dir)
    source, pairs_file, labels_file = _label_files(run, source)
    ds = to_hf_dataset(read_jsonl(pairs_file), read_jsonl(labels_file), conversational=conversational)
    counts = _counts(ds)
    out = Path(out).expanduser()
    _prepare(out, force)
    (out / DATA_FILE).parent.mkdir(parents=True, exist_ok=True)
    from datasets import disable_progress_bars

    disable_progress_bars()  # the parquet writer's bar for one small file is noise
    ds.to_parquet(str(out / DATA_FILE))
    (out / CARD).write_text(dataset_card(run, source, counts, conversational, len(ds)))
    log.info("exported %d %s labels of %s to %s (%s)", len(ds), source, run.dir, out, counts)
    return out


def _counts(ds: Any) -> dict[str, int]:
    """The exporter's counts, kept in the dataset's description by :func:`to_hf_dataset`."""
    import ast

    text = ds.info.description.partition(": ")[2]
    return dict(ast.literal_eval(text))


# ============================================================================= the hub
def push_to_hub(folder: Path, repo: str, repo_type: str, private: bool = False) -> str:
    """Upload ``folder`` to the hub repository ``repo``; any failure is one :class:`CaiError`."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        url = api.create_repo(repo, repo_type=repo_type, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type=repo_type,
                          commit_message="cai export")
    except Exception as e:  # noqa: BLE001 - network, auth, offline mode: all end the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CaiError(f"--push-to-hub {repo}: the hub could not be reached or refused the upload "
                       f"({type(e).__name__}: {first}); the export in {folder} is complete, push it later with "
                       f"`hf upload {repo} {folder} --repo-type {repo_type}`") from None
    return str(url)


# ============================================================================= command line
def main(argv: Sequence[str] | None = None) -> int:
    """``cai export RUN (--stage S | --labels) --to DIR [--merge] [--plain] [--push-to-hub REPO]``"""
    p = argparse.ArgumentParser(prog="cai export", description=__doc__.split("\n\n")[0].replace("``", "`"))
    p.add_argument("run", type=Path, help="a run folder (runs/<experiment>/<time>/, with run.json)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--stage", choices=MODEL_STAGES, help="export this stage's trained model")
    what.add_argument("--labels", action="store_true", help="export the run's labels as a preference dataset")
    p.add_argument("--to", type=Path, required=True, help="the folder to write (must be empty, or --force)")
    p.add_argument("--merge", action="store_true", help="LoRA stages: the merged model instead of the adapter")
    p.add_argument("--plain", action="store_true", help="labels: TRL's standard (plain text) form, not conversational")
    p.add_argument("--label-source", choices=("ai", "human"),
                   help="labels: which (default: ai when the run has AI labels)")
    p.add_argument("--force", action="store_true", help="replace what --to holds")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub repository")
    p.add_argument("--private", action="store_true", help="create the hub repository private")
    args = p.parse_args(argv)
    if args.stage:
        out = export_model(args.run, args.stage, args.to, merge=args.merge, force=args.force)
    else:
        out = export_labels(args.run, args.to, conversational=not args.plain, source=args.label_source,
                            force=args.force)
    print(f"exported: {out}")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, "model" if args.stage else "dataset", args.private)
        print(f"pushed: {url}")
    return 0

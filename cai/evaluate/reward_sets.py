"""``cai score``: a finished run's reward models, and its DPO policy's implicit reward, on pair files.

``cai score RUN_OR_ARTIFACT --pairs FILE [FILE ...]`` scores, on every pair file (HH-RLHF or TRL
preference format, :mod:`cai.data.pair_files`):

- each trained reward model of the run (stage ``reward``; ``eval_reward``, the held-out RM, when
  the run has one): the reward of each response (the ensemble mean for ensembles);
- the run's DPO policy (stage ``dpo``): its implicit reward ``beta * (log pi(y|x) - log ref(y|x))``,
  the reference being the policy DPO started from (``dpo.start_from``), with the run's ``beta``,
  ``max_length`` and chat format -- the same quantity DPO's ``rewards/accuracies`` counts.

A path is a run folder (``runs/<experiment>/<time>/``, its ``run.json`` names the artifacts), one
artifact folder of the store (``<store>/reward/reward-...``, ``<store>/dpo/dpo-...``), or a reward
model exported by ``cai export --stage reward``. ``--stage`` picks among a run's scorers.

Metrics are ``<model>/sets/<set>/<metric>`` (``rm``, ``eval_rm``, ``dpo``; the set is the file name
without ``.jsonl[.gz]``; :func:`cai.report.reward_eval.pair_set_metrics`): accuracy with its 95%
interval, ECE, margin, correlation with length. The table is printed (Markdown) and ``--out``
writes the metrics as JSON; the report renders the same names from a run's ``reward.eval_sets``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.artifacts import STAGE_FILE, run_artifacts
from cai.data.pair_files import PairFile, load_pair_files
from cai.errors import DataError
from cai.report.reward_eval import pair_set_metrics, reward_eval_section

log = logging.getLogger(__name__)

PREFIX = {"reward": "rm", "eval_reward": "eval_rm", "dpo": "dpo"}
REWARD_STATS = "reward_stats.json"
CHUNK = 64  # pairs per progress-bar step


@dataclass(frozen=True)
class Scored:
    """One model to score: its stage (``reward``, ``eval_reward``, ``dpo``), artifact folder and the
    metric prefix."""

    stage: str
    artifact: Path

    @property
    def prefix(self) -> str:
        return PREFIX[self.stage]


def _stage_json(artifact: Path) -> dict[str, Any]:
    try:
        return json.loads((artifact / STAGE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{artifact}: unreadable {STAGE_FILE} ({e})") from None


def find_scored(path: str | Path, stages: Sequence[str] | None = None) -> list[Scored]:
    """The models ``path`` holds (see the module docstring), restricted to ``stages`` when given."""
    path = Path(path).expanduser()
    unknown = sorted(set(stages or ()) - set(PREFIX))
    if unknown:
        raise DataError(f"--stage: {', '.join(unknown)} cannot be scored; expected some of {', '.join(PREFIX)}")
    if (path / STAGE_FILE).is_file():
        found = [Scored(_stage_json(path)["stage"], path)]
    elif (path / REWARD_STATS).is_file():  # an exported reward model
        found = [Scored("reward", path)]
    else:
        _, artifacts = run_artifacts(path)
        found = [Scored(stage, artifacts[stage]) for stage in PREFIX if stage in artifacts]
    bad = [s.stage for s in found if s.stage not in PREFIX]
    if bad:
        raise DataError(f"{path}: a {bad[0]} artifact has no reward to score; pass a run folder or a "
                        f"{', '.join(PREFIX)} artifact")
    if stages:
        found = [s for s in found if s.stage in stages]
    if not found:
        raise DataError(f"{path}: nothing to score (no {', '.join(stages or PREFIX)} artifact)")
    return found


def _lengths(f: PairFile) -> tuple[list[int], list[int]]:
    return [len(p.response_a) for p in f.pairs], [len(p.response_b) for p in f.pairs]


def score_reward_model(artifact: Path, files: Sequence[PairFile], prefix: str, device: str = "auto",
                       batch_size: int = 16) -> dict[str, float]:
    """``<prefix>/sets/<set>/...`` of the reward artifact (or export) ``artifact`` on ``files``."""
    from cai.train.reward import RewardScorer

    scorer = RewardScorer.load(artifact, device=device)
    out: dict[str, float] = {}
    for f in files:
        chosen: list[float] = []
        rejected: list[float] = []
        for chunk in _chunks(f, prefix):
            prompts = [p.prompt for p in chunk]
            chosen += scorer.score(prompts, [p.response_a for p in chunk], batch_size).rewards
            rejected += scorer.score(prompts, [p.response_b for p in chunk], batch_size).rewards
        out.update(pair_set_metrics(chosen, rejected, *_lengths(f), f"{prefix}/sets/{f.name}"))
    return out


def _chunks(f: PairFile, what: str, size: int = CHUNK):
    """``f.pairs`` in slices of ``size``, with a progress bar (rate, ETA) over the pairs."""
    from tqdm.auto import tqdm

    with tqdm(total=len(f.pairs), desc=f"score {what} on {f.name}", unit="pair", leave=False) as bar:
        for start in range(0, len(f.pairs), size):
            chunk = f.pairs[start:start + size]
            yield chunk
            bar.update(len(chunk))


def dpo_reference(artifact: Path, info: dict[str, Any]) -> str:
    """Where the DPO artifact's reference (its starting policy) lives: the SFT artifact's model,
    the tiny policy artifact's, or ``policy.name_or_path``."""
    root = artifact.parent.parent
    inputs = info.get("inputs", {})
    policy = info["config"]["policy"]
    for name in ("sft", "policy_model"):
        if name in inputs:
            return str(root / name / inputs[name] / "model")
    if policy["name_or_path"] == "tiny":
        raise DataError(f"{artifact}: a tiny-policy DPO artifact without its policy_model input")
    return policy["name_or_path"]


def score_dpo_policy(artifact: Path, files: Sequence[PairFile], prefix: str = "dpo", device: str = "auto",
                     batch_size: int = 8) -> dict[str, float]:
    """``<prefix>/sets/<set>/...`` of the DPO artifact's implicit reward on ``files``."""
    import torch

    from cai.config import DPOConfig, ModelConfig, build
    from cai.generation.stages import model_spec
    from cai.models import load_causal_lm, resolve_chat_format
    from cai.train.dpo import pair_logps
    from cai.train.pairs import LabelledPair, encode_pairs

    info = _stage_json(artifact)
    cfg = info["config"]
    dcfg, policy = build(DPOConfig, cfg["dpo"]), build(ModelConfig, cfg["policy"])
    reference = dpo_reference(artifact, info)
    local = {"revision": None, "gguf_file": None}
    specs = {"policy": model_spec(policy, str(artifact / "model"), lora=None, device=device, **local),
             "reference": model_spec(policy, reference, lora=None, device=device,
                                     **(local if Path(reference).is_dir() else {}))}
    logps: dict[str, dict[str, Any]] = {}
    encoded: dict[str, Any] = {}
    for role, spec in specs.items():
        model, tok = load_causal_lm(spec)
        chat_format = resolve_chat_format(tok, spec.chat_format)
        for f in files:
            if f.name not in encoded:  # one tokenisation: policy and reference share the tokenizer
                encoded[f.name] = encode_pairs([LabelledPair(p, 1.0) for p in f.pairs], tok, chat_format,
                                               dcfg.max_length)[0]
            enc, done = encoded[f.name], 0
            parts = []
            for chunk in _chunks(f, f"{prefix} {role}"):
                parts.append(pair_logps(model, enc[done:done + len(chunk)], tok.pad_token_id, batch_size))
                done += len(chunk)
            logps.setdefault(role, {})[f.name] = torch.cat(parts)
        del model
    out: dict[str, float] = {}
    for f in files:
        pol, ref = logps["policy"][f.name], logps["reference"][f.name]
        r_chosen = (dcfg.beta * (pol[:, 0] - ref[:, 0])).tolist()
        r_rejected = (dcfg.beta * (pol[:, 1] - ref[:, 1])).tolist()
        out.update(pair_set_metrics(r_chosen, r_rejected, *_lengths(f), f"{prefix}/sets/{f.name}"))
    return out


def score(path: str | Path, pair_files: Sequence[str | Path], stages: Sequence[str] | None = None,
          device: str = "auto", batch_size: int = 8) -> dict[str, float]:
    """Every model of ``path`` (:func:`find_scored`) on every pair file; flat metrics."""
    scored = find_scored(path, stages)
    files = load_pair_files(pair_files)
    metrics: dict[str, float] = {}
    for s in scored:
        log.info("scoring %s (%s) on %s", s.stage, s.artifact, ", ".join(f.name for f in files))
        if s.stage == "dpo":
            metrics.update(score_dpo_policy(s.artifact, files, s.prefix, device, batch_size))
        else:
            metrics.update(score_reward_model(s.artifact, files, s.prefix, device, batch_size))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """``cai score RUN_OR_ARTIFACT --pairs FILE [FILE ...] [--stage reward dpo] [--out scores.json]``"""
    p = argparse.ArgumentParser(prog="cai score", description=__doc__.split("\n\n")[0].replace("``", "`"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a run folder, a reward/dpo artifact folder, or an exported reward model")
    p.add_argument("--pairs", nargs="+", required=True, type=Path,
                   help="pair files (.jsonl[.gz]) in HH-RLHF or TRL preference format")
    p.add_argument("--stage", nargs="+", choices=sorted(PREFIX), help="score only these of a run's models")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    args = p.parse_args(argv)
    metrics = score(args.path, args.pairs, args.stage, args.device, args.batch_size)
    print(reward_eval_section(metrics, "md", title=f"Scores of {args.path}"), end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(f"\nmetrics: {args.out}")
    return 0

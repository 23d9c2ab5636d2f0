"""The pipeline stage ``dpo`` and the command line ``[accelerate launch] python -m cai.train.dpo``.

Stage inputs: the labels (``human_pairs`` or ``ai_labels``, by ``dpo.labels_from``), the human
pairs for a held-out human evaluation when configured, and the starting policy: the ``sft``
artifact when the experiment has an ``sft`` stage, else the policy itself (the ``policy_model``
artifact for ``policy.name_or_path: tiny``). The starting policy is also the frozen reference.

Outputs: ``model/`` (the trained policy, LoRA merged, with its tokenizer) and
``train_log.jsonl``; metrics ``dpo/...`` (data counts, training summary, ``dpo/eval/*`` on the
held-out split of the training labels, ``dpo/human/*`` on held-out human pairs).
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cai.train import common as C
from cai.train.dpo import DPOConfig, coerce_dpo_config, train_dpo
from cai.train.pairs import PreferenceData, encode_pairs, merged_for_saving, preference_data
from cai.train.reward_stage import (
    cli_data,
    cli_parser,
    finish_cli,
    parse_overrides,
    preference_inputs,
    split_device,
)


def load_policy(policy_cfg: dict[str, Any], location: str, dcfg: DPOConfig, seed: int):
    """``(model, tokenizer, chat_format)`` of the starting policy, with DPO's LoRA settings."""
    from cai.models import load_causal_lm, resolve_chat_format
    from cai.stages import training_model_spec

    # on the CPU: the accelerator places it
    spec = training_model_spec(policy_cfg, location, not dcfg.lora.enabled, device="cpu")
    spec.lora = dcfg.lora.spec()
    model, tok = load_causal_lm(spec, lora_seed=seed)
    return model, tok, resolve_chat_format(tok, spec.chat_format)


def run_dpo(dcfg: DPOConfig, data: PreferenceData, model, tok, chat_format: str, *, seed: int,
            out_dir: Path, state_dir: Path, accelerator=None) -> dict[str, Any]:
    """Encode, train, evaluate and save; returns flat ``dpo/...`` metrics."""
    metrics: dict[str, Any] = dict(data.metrics)
    encoded = {}
    for name, items in (("train", data.train), ("eval", data.test), ("human", data.human_test)):
        encoded[name], metrics[f"dpo/data/{name}_truncated"] = encode_pairs(items, tok, chat_format, dcfg.max_length)
        metrics[f"dpo/data/{name}_pairs"] = len(items)
    if data.human_test is data.test:
        encoded.pop("human")  # the human arm's held-out pairs are its eval pairs
    result = train_dpo(model, tok, encoded.pop("train"), dcfg, seed=seed, state_dir=state_dir,
                       eval_sets=encoded, accelerator=accelerator)
    metrics.update(result.metrics)
    if data.human_test is data.test:  # the human arm: its held-out pairs are the human ones
        metrics.update({k.replace("dpo/eval/", "dpo/human/"): v for k, v in result.metrics.items()
                        if k.startswith("dpo/eval/")})
    metrics["dpo/resumed_from_step"] = result.resumed_from or 0
    if accelerator is None or accelerator.is_main_process:
        merged_for_saving(result.model).save_pretrained(out_dir / "model")
        tok.save_pretrained(out_dir / "model")
        shutil.copyfile(state_dir / "train_log.jsonl", out_dir / "train_log.jsonl")
    return metrics


def build_dpo(cfg: dict[str, Any], inputs: dict[str, Path], ctx: Any, runtime: Mapping[str, Any] | None = None,
              ) -> None:
    """Stage ``dpo``: train the starting policy with DPO on the configured labels.

    ``runtime``: settings that do not change the result (``device``), kept out of the key."""
    from cai.stages import policy_location

    dcfg, seed = coerce_dpo_config({**cfg["dpo"], **(runtime or {})}), int(cfg["seed"])
    with ctx.phase("load_data"):
        data = preference_data(dcfg.labels_from, inputs, dcfg.test_fraction, dcfg.split_salt, "dpo")
    with ctx.phase("load_model"):
        location = str(inputs["sft"] / "model") if "sft" in inputs else policy_location(cfg, inputs)
        model, tok, chat_format = load_policy(cfg["policy"], location, dcfg, seed)
    with ctx.phase("train"):
        metrics = run_dpo(dcfg, data, model, tok, chat_format, seed=seed, out_dir=ctx.dir, state_dir=ctx.state_dir)
    ctx.set_metrics(metrics)


def dpo_stage(cfg) -> Any:
    """Pipeline builder: the ``dpo`` stage for the composed config."""
    from omegaconf import OmegaConf

    from cai.pipeline import Stage

    d = OmegaConf.to_container(cfg.dpo, resolve=True)
    dcfg = coerce_dpo_config(d)  # a bad value fails at planning, before any stage runs
    inputs = preference_inputs(cfg, "dpo", dcfg.labels_from)
    if "sft" in cfg.experiment.stages:
        inputs["sft"] = "sft"
    elif cfg.policy.name_or_path == "tiny":
        inputs["policy_model"] = "policy_model"
    policy, _ = split_device(OmegaConf.to_container(cfg.policy, resolve=True))
    key, runtime = split_device(d)
    return Stage("dpo", functools.partial(build_dpo, runtime=runtime),
                 {"dpo": key, "policy": policy, "seed": int(cfg.seed)}, inputs)


def main(argv: Sequence[str] | None = None) -> int:
    """``[accelerate launch] python -m cai.train.dpo --pairs P --labels L --policy M --out DIR [key=value ...]``"""
    p = cli_parser("python -m cai.train.dpo", main.__doc__, ("--policy", "the starting policy"),
                   "model/, train_log.jsonl, ...", "DPOConfig fields, e.g. beta=0.1 loss=ipo")
    p.add_argument("--chat-format", default="auto", help="auto | template | hh")
    args = p.parse_args(argv)
    dcfg = coerce_dpo_config(parse_overrides(args.overrides))
    data = cli_data(args.pairs, args.labels, dcfg.test_fraction, dcfg.split_salt, "dpo")
    accelerator = C.make_accelerator(mixed_precision=dcfg.mixed_precision, device=dcfg.device)
    model, tok, chat_format = load_policy({"chat_format": args.chat_format, "max_length": dcfg.max_length},
                                          args.policy, dcfg, args.seed)
    metrics = run_dpo(dcfg, data, model, tok, chat_format, seed=args.seed, out_dir=args.out,
                      state_dir=args.out / "state", accelerator=accelerator)
    return finish_cli(accelerator, args.out, metrics, "dpo")

"""`cai export` and `cai score` on a finished tiny run, and `reward.eval_sets` in the reward stage.

One run (module fixture, about 20 s on CPU) trains SFT in full and the reward model and DPO with
LoRA, and scores the reward model on two pair files (the same pairs in HH-RLHF and in TRL's
conversational form). The tests then check: the exported models load with ``from_pretrained``
(the LoRA adapter with peft) and compute what the artifact computes; the exported labels load
with ``datasets`` and TRL's ``DPOTrainer`` takes them; the cards name the constitution hash and
the judge; ``cai score`` gives exactly the stage's own ``rm/sets/...`` metrics and a DPO implicit
reward equal to a direct computation; pair files in every accepted form read the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cai.config import compose_config
from cai.data import Pair
from cai.data.pair_files import load_pair_file, load_pair_files
from cai.errors import CaiError, ConfigError, DataError
from cai.report.reward_eval import pair_set_metrics, reward_eval_rows, reward_eval_section
from cai.testing.preference_task import synthetic_pairs

TINY = ["data.max_prompts=6", "sampling.max_new_tokens=6", "sampling.batch_size=4", "policy.tiny.n_layer=1",
        "policy.tiny.n_embd=32", "policy.tiny.n_head=2", "policy.tiny.vocab_size=512", "critique.max_new_tokens=6",
        "experiment.stages=[reward,dpo]", "dpo.lora.enabled=true", "reward.lora.enabled=true", "dpo.lr=1e-2",
        "reward.lr=1e-2", "hydra.callbacks={}",
        # the former offline setup (the tiny local judge on the project's prompts): the cards name judge hf:tiny
        "judge=tiny_hf", "eval=default", "data=builtin", "constitution=harmless", "policy=tiny", "critique=default"]


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def _rows(n: int = 10, seed: int = 3) -> list[tuple[Pair, bool]]:
    """Synthetic pairs and whether slot a holds the chosen (courteous) reply."""
    return [(p, lab.p_a > 0.5) for p, lab in synthetic_pairs(n, seed=seed)]


def write_pair_files(folder: Path) -> dict[str, Path]:
    """The same pairs in each accepted form (chosen first)."""
    folder.mkdir(parents=True, exist_ok=True)
    forms: dict[str, list[dict]] = {"hh": [], "conv": [], "std": [], "implicit": []}
    for pair, a_chosen in _rows():
        chosen, rejected = (pair.response_a, pair.response_b) if a_chosen else (pair.response_b, pair.response_a)
        msgs = pair.prompt.messages_as_dicts()
        hh = pair.prompt.hh_text
        forms["hh"].append({"chosen": f"{hh} {chosen}", "rejected": f"{hh} {rejected}"})
        forms["conv"].append({"prompt": msgs, "chosen": [{"role": "assistant", "content": chosen}],
                              "rejected": [{"role": "assistant", "content": rejected}]})
        forms["std"].append({"prompt": pair.prompt.hh_text, "chosen": " " + chosen, "rejected": " " + rejected})
        forms["implicit"].append({"chosen": msgs + [{"role": "assistant", "content": chosen}],
                                  "rejected": msgs + [{"role": "assistant", "content": rejected}]})
    paths = {}
    for name, rows in forms.items():
        paths[name] = folder / f"task-{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """``(run folder, pair files, metrics)`` of the tiny LoRA run."""
    from cai.pipeline import run_experiment

    root = tmp_path_factory.mktemp("export")
    files = write_pair_files(root / "pairs")
    sets = f"reward.eval_sets=[{files['hh']},{files['conv']}]"
    cfg = compose_config(*TINY, sets, f"store.root={root / 'store'}")
    metrics = run_experiment(cfg, root / "run")
    return root / "run", files, metrics


# ----------------------------------------------------------------------------- pair files, metrics
def test_every_pair_file_form_reads_the_same_pairs(tmp_path):
    files = write_pair_files(tmp_path)
    loaded = {name: load_pair_file(path) for name, path in files.items()}
    assert {n: f.format for n, f in loaded.items()} == {"hh": "hh-rlhf", "conv": "trl-conversational",
                                                       "std": "trl-standard", "implicit": "trl-implicit"}
    reference = [(p.prompt.messages_as_dicts(), p.response_a, p.response_b) for p in loaded["conv"].pairs]
    assert len(reference) == 10
    for f in loaded.values():
        assert [(p.prompt.messages_as_dicts(), p.response_a, p.response_b) for p in f.pairs] == reference
    assert loaded["hh"].name == "task-hh" and loaded["hh"].counts["pairs"] == 10


def test_bad_pair_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: this row is in the trl-conversational form"):
        load_pair_file(bad)
    bad.write_text(json.dumps({"question": "Hi"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected an object with 'chosen' and 'rejected'"):
        load_pair_file(bad)
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [],
                               "rejected": [{"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: chosen: expected a non-empty list"):
        load_pair_file(bad)
    with pytest.raises(DataError, match="no such pair file"):
        load_pair_file(tmp_path / "missing.jsonl")
    (tmp_path / "a").mkdir()
    files = write_pair_files(tmp_path / "a")
    (tmp_path / "task-hh.jsonl.gz").write_bytes(__import__("gzip").compress(files["hh"].read_bytes()))
    with pytest.raises(DataError, match="same set name 'task-hh'"):
        load_pair_files([files["hh"], tmp_path / "task-hh.jsonl.gz"])


def test_pair_set_metrics_known_answer():
    # chosen wins twice, loses once, ties once: accuracy (1 + 1 + 0 + .5) / 4
    m = pair_set_metrics([2.0, 1.0, 0.0, 3.0], [1.0, 0.0, 1.0, 3.0], [10, 5, 5, 7], [5, 10, 10, 7], "rm/sets/x")
    assert m["rm/sets/x/pairs"] == 4 and m["rm/sets/x/accuracy"] == pytest.approx(0.625)
    assert m["rm/sets/x/margin"] == pytest.approx(0.25)
    # unequal lengths in pairs 0-2: the longer side scores higher in pairs 0 (10 > 5, r 2 > 1) and 2 (10, r 1 > 0)
    assert m["rm/sets/x/prefers_longer"] == pytest.approx(2 / 3)
    assert m["rm/sets/x/chosen_longer"] == pytest.approx(1 / 3)
    # ECE: sigmoid(1) in one bin (target 1 and 0 share), sigmoid(-1) mirrored, ties at .5
    s = 1 / (1 + math.exp(-1))
    p = [s, s, 1 - s, 0.5, 1 - s, 1 - s, s, 0.5]  # both orientations
    t = [1, 1, 1, 1, 0, 0, 0, 0]
    bins: dict[int, list[int]] = {}
    for i, v in enumerate(p):
        bins.setdefault(min(int(v * 10), 9), []).append(i)
    want = sum(len(ix) / 8 * abs(sum(p[i] for i in ix) / len(ix) - sum(t[i] for i in ix) / len(ix))
               for ix in bins.values())
    assert m["rm/sets/x/ece"] == pytest.approx(want)
    from cai.stats import rate_ci

    assert (m["rm/sets/x/accuracy_ci_low"], m["rm/sets/x/accuracy_ci_high"]) == pytest.approx(
        rate_ci([1.0, 1.0, 0.0, 0.5]))
    exact = pair_set_metrics([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1, 2, 3], [9, 9, 9], "dpo/sets/y")
    from cai.stats import wilson_ci

    assert (exact["dpo/sets/y/accuracy_ci_low"], exact["dpo/sets/y/accuracy_ci_high"]) == pytest.approx(
        wilson_ci(3, 3))
    longer_better = pair_set_metrics([4.0, 5.0, 6.0], [1.0, 2.0, 3.0], [40, 50, 60], [10, 20, 30], "rm/sets/z")
    assert longer_better["rm/sets/z/length_corr"] == pytest.approx(1.0)  # reward rank = length rank
    assert longer_better["rm/sets/z/prefers_longer"] == 1.0


def test_reward_eval_section_renders_rows():
    metrics = {**pair_set_metrics([1.0, 0.0], [0.0, 1.0], [1, 2], [2, 1], "rm/sets/helpful"),
               **pair_set_metrics([1.0, 2.0], [0.0, 1.0], [1, 2], [2, 1], "dpo/sets/helpful"), "rm/steps": 3}
    rows = reward_eval_rows(metrics)
    assert [(r["set"], r["model"]) for r in rows] == [("helpful", "dpo"), ("helpful", "rm")]
    md = reward_eval_section(metrics)
    assert "| helpful | reward model | 2 | 0.500 |" in md and "DPO policy (implicit reward)" in md
    html = reward_eval_section({"ai": metrics, "human": metrics}, "html")
    assert html.count("<tr>") == 5 and "<th>arm</th>" in html
    assert reward_eval_section({"rm/steps": 3}) == ""


# ----------------------------------------------------------------------------- eval_sets in the run
def test_eval_sets_keys_and_plan_checks(tmp_path):
    from cai.pipeline import make_stage, plan

    files = write_pair_files(tmp_path / "pairs")
    base = [*TINY, f"store.root={tmp_path / 'store'}"]
    plain = make_stage("reward", __import__("cai.config", fromlist=["typed"]).typed(compose_config(*base)))
    assert "eval_sets" not in plain.config["reward"]  # no eval sets: the key of every existing RM stands
    cfg = compose_config(*base, f"reward.eval_sets=[{files['conv']}]")
    stage = next(s for s in plan(cfg) if s.name == "reward")
    assert stage.config["reward"]["eval_sets"] == [str(files["conv"])]
    before = stage.config["contents"]["reward.eval_sets[0]"]
    files["conv"].write_text(files["conv"].read_text().replace("Request", "Question"))
    after = next(s for s in plan(cfg) if s.name == "reward").config["contents"]["reward.eval_sets[0]"]
    assert before != after  # an edited file is a new key
    with pytest.raises(ConfigError, match=r"reward.eval_sets\[0\]: .*missing.jsonl' is not a file"):
        plan(compose_config(*base, f"reward.eval_sets=[{tmp_path / 'missing.jsonl'}]"))


def test_run_links_its_artifacts(finished):
    run, _, _ = finished
    info = json.loads((run / "run.json").read_text())
    for stage, key in info["artifacts"].items():
        assert info["artifact_dirs"][stage].endswith(key)
        assert (run / "artifacts" / stage).resolve() == Path(info["artifact_dirs"][stage]).resolve()
    assert (run / "artifacts" / "dpo" / "adapter" / "adapter_config.json").is_file()  # LoRA keeps its adapter


# ----------------------------------------------------------------------------- cai score
def test_score_equals_the_stage_metrics_and_both_forms_agree(finished, tmp_path, capsys):
    from cai.evaluate.reward_sets import main

    run, files, metrics = finished
    assert metrics["rm/sets/task-hh/pairs"] == 10
    assert main([str(run), "--pairs", str(files["conv"]), str(files["hh"]), "--stage", "reward",
                 "--out", str(tmp_path / "s.json")]) == 0
    scored = json.loads((tmp_path / "s.json").read_text())
    for key, value in scored.items():
        assert value == pytest.approx(metrics[key], nan_ok=True), key
    assert {k.replace("task-hh", "task-conv"): v for k, v in scored.items() if "task-hh" in k} == \
        pytest.approx({k: v for k, v in scored.items() if "task-conv" in k}, nan_ok=True)
    out = capsys.readouterr().out
    assert "| task-conv | reward model | 10 |" in out


def test_score_dpo_implicit_reward_matches_a_direct_computation(finished):
    from transformers import AutoModelForCausalLM

    from cai.evaluate.reward_sets import score
    from cai.models import ModelSpec, load_tokenizer
    from cai.train.pairs import LabelledPair, encode_pairs

    run, files, _ = finished
    got = score(run, [files["conv"]], stages=["dpo"], device="cpu")
    info = json.loads((run / "run.json").read_text())
    beta = info["config"]["dpo"]["beta"]
    policy_dir = Path(info["artifact_dirs"]["dpo"]) / "model"
    ref_dir = Path(info["artifact_dirs"]["sft"]) / "model"  # quickstart's DPO starts from SFT
    tok = load_tokenizer(ModelSpec(str(policy_dir)))
    pairs = load_pair_file(files["conv"]).pairs
    enc, _ = encode_pairs([LabelledPair(p, 1.0) for p in pairs], tok, "hh", 512)

    def logp(model, side) -> float:
        ids = torch.tensor([side.input_ids])
        labels = torch.tensor(side.labels)
        logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        target = labels[1:]
        keep = target != -100
        return float(logits[keep].gather(-1, target[keep, None]).sum())

    pol, ref = (AutoModelForCausalLM.from_pretrained(str(d)).eval() for d in (policy_dir, ref_dir))
    with torch.no_grad():
        r_c = [beta * (logp(pol, e.a) - logp(ref, e.a)) for e in enc]
        r_r = [beta * (logp(pol, e.b) - logp(ref, e.b)) for e in enc]
    want = pair_set_metrics(r_c, r_r, [len(p.response_a) for p in pairs], [len(p.response_b) for p in pairs],
                            "dpo/sets/task-conv")
    assert any(abs(a - b) > 1e-4 for a, b in zip(r_c, r_r))  # the policy moved: not all ties
    corr = "dpo/sets/task-conv/length_corr"  # ranks of near-equal rewards flip with float noise (batched
    assert got.pop(corr) == pytest.approx(want.pop(corr), abs=0.05)  # vs one-row forwards): compared loosely
    assert got == pytest.approx(want, abs=1e-4, nan_ok=True)


def test_score_errors_are_clear(finished, tmp_path):
    from cai.evaluate.reward_sets import find_scored

    run, files, _ = finished
    with pytest.raises(DataError, match="not a run folder"):
        find_scored(tmp_path)
    with pytest.raises(DataError, match="a sft artifact has no reward to score"):
        find_scored(run / "artifacts" / "sft")
    assert [s.stage for s in find_scored(run)] == ["reward", "dpo"]


# ----------------------------------------------------------------------------- cai export
def _card_names_provenance(card: str, run: Path) -> None:
    info = json.loads((run / "run.json").read_text())
    assert info["constitution_hash"] and info["constitution_hash"] in card
    assert "hf:tiny" in card and "judge" in card


def test_export_adapter_full_and_merged_models_load(finished, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from cai.export import main

    run, _, _ = finished
    x = torch.tensor([[5, 6, 7, 8]])
    trained = AutoModelForCausalLM.from_pretrained(str(run / "artifacts" / "dpo" / "model")).eval()

    assert main([str(run), "--stage", "dpo", "--to", str(tmp_path / "dpo")]) == 0
    assert (tmp_path / "dpo" / "adapter_config.json").is_file() and not (tmp_path / "dpo" / "config.json").exists()
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "dpo")).eval()
    with torch.no_grad():
        assert torch.allclose(adapter(x).logits, trained(x).logits, atol=1e-5)
    card = (tmp_path / "dpo" / "README.md").read_text()
    _card_names_provenance(card, run)
    assert "library_name: peft" in card and json.loads((run / "run.json").read_text())["artifacts"]["dpo"] in card

    assert main([str(run), "--stage", "dpo", "--merge", "--to", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert torch.equal(merged(x).logits, trained(x).logits)

    assert main([str(run), "--stage", "sft", "--to", str(tmp_path / "sft")]) == 0  # trained in full
    sft = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft"))
    assert sft.config.n_layer == 1 and "the full model" in (tmp_path / "sft" / "README.md").read_text()

    with pytest.raises(ConfigError, match="is not empty; pass --force"):
        main([str(run), "--stage", "sft", "--to", str(tmp_path / "sft")])
    with pytest.raises(DataError, match="the run has no ppo artifact"):
        main([str(run), "--stage", "ppo", "--to", str(tmp_path / "ppo")])


def test_exported_reward_model_scores_like_the_run(finished, tmp_path):
    from cai.evaluate.reward_sets import score
    from cai.export import export_model

    run, files, metrics = finished
    out = export_model(run, "reward", tmp_path / "rm")
    _card_names_provenance((out / "README.md").read_text(), run)
    got = score(out, [files["hh"]])
    assert got == pytest.approx({k: v for k, v in metrics.items() if k.startswith("rm/sets/task-hh/")}, nan_ok=True)


def test_export_labels_round_trip_through_datasets_and_trl(finished, tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from cai.data import read_jsonl
    from cai.export import export_labels
    from cai.feedback.export import to_preference_records

    run, _, _ = finished
    out = export_labels(run, tmp_path / "labels")
    # datasets caches a local folder's dataset by its path; pytest reuses tmp paths across sessions
    cache = str(tmp_path / "hf_datasets_cache")
    ds = datasets.load_dataset(str(out), split="train", cache_dir=cache)
    art = run / "artifacts" / "ai_labels"
    want = to_preference_records(read_jsonl(art / "pairs.jsonl"), read_jsonl(art / "labels.jsonl"))
    assert len(ds) == len(want) > 0 and ds.to_list() == list(want)
    card = (out / "README.md").read_text()
    _card_names_provenance(card, run)
    assert "label/position_consistency" in card and "not measured in this run" in card

    plain = export_labels(run, tmp_path / "plain", conversational=False)
    policy = str(run / "artifacts" / "policy_model" / "model")
    tok = AutoTokenizer.from_pretrained(policy)
    tok.chat_template = CHAT_TEMPLATE  # the tiny tokenizer has none; conversational data needs one
    for folder in (out, plain):
        train = datasets.load_dataset(str(folder), split="train", cache_dir=cache)
        trainer = DPOTrainer(model=policy, train_dataset=train,
                             processing_class=tok,
                             args=DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, report_to=[],
                                            per_device_train_batch_size=2, use_cpu=True, save_strategy="no",
                                            disable_tqdm=True))
        assert len(trainer.train_dataset) == len(want)
        assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(trainer.train_dataset.column_names)


def test_push_to_hub_unreachable_is_one_clear_error(finished, tmp_path, monkeypatch):
    from cai.export import export_labels, push_to_hub

    run, _, _ = finished
    out = export_labels(run, tmp_path / "labels")
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # the hub cannot be reached from a test
    with pytest.raises(CaiError, match=r"--push-to-hub me/labels: the hub could not be reached.*is complete"):
        push_to_hub(out, "me/labels", "dataset")


# ----------------------------------------------------------------------------- a known answer
def test_a_reward_model_that_learned_the_rule_scores_high_and_swapping_inverts_it(tmp_path):
    """A tiny RM trained on the synthetic task (courteous beats rude) through the reward command line
    with ``eval_sets``: high accuracy on held-out task pairs, the mirror image on the same file with
    chosen and rejected swapped, and ``cai score`` on the trained folder gives the same numbers."""
    from cai.config import TinyConfig
    from cai.evaluate.reward_sets import score
    from cai.testing.preference_task import task_corpus, write_task
    from cai.tiny import build_tiny_sequence_classifier, default_tiny_corpus
    from cai.train.reward import main

    backbone = build_tiny_sequence_classifier(tmp_path / "bb", default_tiny_corpus() + task_corpus(),
                                              TinyConfig(vocab_size=512, n_layer=1, n_head=2, n_embd=64, seed=0))
    pairs, labels = write_task(tmp_path / "task", 240, seed=0)
    held_out = [(p, a) for p, a in _rows(40, seed=11)]
    good, swapped = tmp_path / "good.jsonl", tmp_path / "swapped.jsonl"
    for path, flip in ((good, False), (swapped, True)):
        with open(path, "w") as f:
            for pair, a_chosen in held_out:
                c, r = (pair.response_a, pair.response_b) if a_chosen != flip else (pair.response_b, pair.response_a)
                f.write(json.dumps({"prompt": pair.prompt.hh_text, "chosen": " " + c, "rejected": " " + r}) + "\n")
    out = tmp_path / "out"
    assert main(["--pairs", str(pairs), "--labels", str(labels), "--backbone", str(backbone), "--out", str(out),
                 "epochs=3", "batch_size=16", "lr=3e-3", "max_length=64", "device=cpu", "bootstrap_resamples=50",
                 f"eval_sets=[{good},{swapped}]"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["rm/sets/good/pairs"] == 40 and m["rm/sets/good/accuracy"] >= 0.9
    assert m["rm/sets/swapped/accuracy"] == pytest.approx(1 - m["rm/sets/good/accuracy"])
    assert m["rm/sets/good/margin"] == pytest.approx(-m["rm/sets/swapped/margin"])
    again = score(out, [good, swapped], device="cpu")
    assert again == pytest.approx({k: v for k, v in m.items() if "/sets/" in k}, abs=1e-6, nan_ok=True)

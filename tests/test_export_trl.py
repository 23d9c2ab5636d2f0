"""The preference export: what is written, what is skipped (and counted), and that TRL's own
``RewardTrainer`` and ``DPOTrainer`` take the exported dataset unchanged -- their dataset
preparation (EOS, tokenisation, prompt/completion split) and one training step on CPU with the
tiny local model. TRL is a test-only dependency: those tests skip when it is not installed."""

from __future__ import annotations

import math

import pytest

from cai.data import Label, Pair, Prompt, read_jsonl
from cai.errors import DataError
from cai.feedback.export import (
    ExportCounts,
    to_hf_dataset,
    to_preference_records,
    write_preference_jsonl,
)

JUDGE = "ai:openai:fake-judge"
# a chat template written for this test (the tiny tokenizer has none): role marker, newline,
# content, end marker; the generation prompt is the assistant's role marker and newline
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def make_pairs(n: int = 6) -> list[Pair]:
    pairs = []
    for i in range(n):
        convo = [{"role": "user", "content": f"How do I keep my cat {i} safe at night?"}]
        if i % 3 == 2:  # a multi-turn prompt
            convo = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"}] + convo
        prompt = Prompt.create(convo, "test")
        pairs.append(Pair.create(prompt, f"Keep the cat {i} indoors and warm.", f"Cats are fine {i}.", "test"))
    return pairs


def make_labels(pairs: list[Pair]) -> list[Label]:
    ps = [0.9, 0.2, 0.75, 0.1, 0.6, 0.3]
    return [Label(p.id, ps[i % len(ps)], JUDGE, ("harm", "honesty")) for i, p in enumerate(pairs)]


# ----------------------------------------------------------------------------- the records
def test_chosen_follows_p_a_in_both_forms():
    pairs = make_pairs(2)
    labels = [Label(pairs[0].id, 0.8, JUDGE, ("harm",)), Label(pairs[1].id, 0.25, JUDGE)]
    conv = to_preference_records(pairs, labels)
    assert conv[0]["prompt"] == pairs[0].prompt.messages_as_dicts()
    assert conv[0]["chosen"] == [{"role": "assistant", "content": pairs[0].response_a}]
    assert conv[0]["rejected"] == [{"role": "assistant", "content": pairs[0].response_b}]
    assert conv[1]["chosen"] == [{"role": "assistant", "content": pairs[1].response_b}]  # p_a < .5: b wins
    assert conv[0]["p_chosen"] == pytest.approx(0.8) and conv[1]["p_chosen"] == pytest.approx(0.75)
    assert conv[0]["principle_ids"] == ["harm"] and conv[0]["judge"] == JUDGE
    assert conv[0]["pair_id"] == pairs[0].id

    text = to_preference_records(pairs, labels, conversational=False)
    assert text[0]["prompt"] == pairs[0].prompt.hh_text
    assert text[0]["prompt"].endswith("\n\nAssistant:")
    assert text[0]["chosen"] == " " + pairs[0].response_a and text[1]["chosen"] == " " + pairs[1].response_b


def test_skips_are_counted():
    pairs = make_pairs(7)
    labels = [
        Label(pairs[0].id, 0.9, JUDGE),
        Label(pairs[1].id, 0.5, JUDGE),  # tie
        Label.failed(pairs[2].id, JUDGE, "refusal"),
        Label(pairs[3].id, 0.55, JUDGE),  # p_chosen .55 < .6
        Label(pairs[4].id, 0.35, JUDGE),  # p_chosen .65: kept
        Label.failed(pairs[5].id, JUDGE, "ba: refusal", meta={"p_a_by_order": {"ab": 0.8, "ba": None}}),
    ]  # pairs[6] has no label
    records = to_preference_records(pairs, [lab.to_dict() for lab in labels], min_confidence=0.6)
    assert [r["pair_id"] for r in records] == [pairs[0].id, pairs[4].id]
    assert records.counts == ExportCounts(labels_in=6, written=2, skipped_failed=2, skipped_ties=1,
                                          skipped_low_confidence=1, rescued_failed=0, pairs_unlabelled=1)
    # include_failed exports the failed label's surviving order
    rescued = to_preference_records(pairs, labels, min_confidence=0.6, include_failed=True)
    assert [r["pair_id"] for r in rescued] == [pairs[0].id, pairs[4].id, pairs[5].id]
    assert rescued[-1]["p_chosen"] == pytest.approx(0.8)
    assert rescued.counts.rescued_failed == 1 and rescued.counts.skipped_failed == 1
    d = rescued.counts.to_dict()
    assert d["in"] == 6 and d["written"] == 3 and d["in"] == d["written"] + d["skipped_failed"] + \
        d["skipped_ties"] + d["skipped_low_confidence"]


def test_bad_inputs_are_clear_errors():
    pairs = make_pairs(2)
    with pytest.raises(DataError, match="is not among the 1 pairs"):
        to_preference_records(pairs[:1], [Label(pairs[1].id, 0.9, JUDGE)])
    with pytest.raises(DataError, match="second label for pair"):
        to_preference_records(pairs, [Label(pairs[0].id, 0.9, JUDGE), Label(pairs[0].id, 0.1, JUDGE)])
    with pytest.raises(DataError, match="min_confidence"):
        to_preference_records(pairs, [], min_confidence=1.5)
    with pytest.raises(DataError, match=r"labels\[0\]: .*label.p_a"):
        to_preference_records(pairs, [{"pair_id": pairs[0].id, "p_a": 2.0, "source": JUDGE}])


def test_jsonl_and_dataset_agree(tmp_path):
    datasets = pytest.importorskip("datasets")
    pairs = make_pairs(6)
    labels = make_labels(pairs)
    labels[1] = Label(pairs[1].id, 0.5, JUDGE)
    counts = write_preference_jsonl(tmp_path / "prefs.jsonl", pairs, labels)
    assert counts["written"] == 5 and counts["skipped_ties"] == 1
    rows = read_jsonl(tmp_path / "prefs.jsonl")
    ds = to_hf_dataset(pairs, labels)
    assert ds.to_list() == rows
    loaded = datasets.load_dataset("json", data_files=str(tmp_path / "prefs.jsonl"), split="train",
                                   cache_dir=str(tmp_path / "hf_datasets_cache"))
    assert loaded.to_list() == rows
    empty = to_hf_dataset(pairs[:1], [Label(pairs[0].id, 0.5, JUDGE)], conversational=False)
    assert len(empty) == 0 and set(empty.column_names) == set(rows[0])


# ----------------------------------------------------------------------------- TRL
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    pytest.importorskip("trl")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                use_cpu=True, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)


def _trained_loss(trainer) -> float:
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and math.isfinite(losses[0])
    return losses[0]


def test_reward_trainer_takes_both_forms(tiny_model_dir, tokenizer, tmp_path):
    from trl import RewardConfig, RewardTrainer

    pairs = make_pairs(6)
    labels = make_labels(pairs)
    for conversational in (False, True):
        ds = to_hf_dataset(pairs, labels, conversational=conversational)
        trainer = RewardTrainer(
            model=str(tiny_model_dir), args=RewardConfig(**_common(tmp_path / f"rm{conversational}")),
            train_dataset=ds, processing_class=tokenizer,
        )
        prepared = trainer.train_dataset
        assert len(prepared) == 6
        for row, rec in zip(prepared, ds):
            if conversational:
                want = tokenizer.apply_chat_template(rec["prompt"] + rec["chosen"], tokenize=False)
            else:
                want = rec["prompt"] + rec["chosen"] + tokenizer.eos_token
            assert tokenizer.decode(row["chosen_ids"]) == want
        # chosen is the response the judge preferred: pair 1 has p_a = .2, so response_b
        assert pairs[1].response_b in tokenizer.decode(prepared[1]["chosen_ids"])
        assert pairs[1].response_a in tokenizer.decode(prepared[1]["rejected_ids"])
        _trained_loss(trainer)


def test_dpo_trainer_takes_both_forms(tiny_model_dir, tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    pairs = make_pairs(6)
    labels = make_labels(pairs)
    for conversational in (False, True):
        ds = to_hf_dataset(pairs, labels, conversational=conversational)
        trainer = DPOTrainer(
            model=str(tiny_model_dir), args=DPOConfig(**_common(tmp_path / f"dpo{conversational}")),
            train_dataset=ds, processing_class=tokenizer,
        )
        prepared = trainer.train_dataset
        assert len(prepared) == 6
        row, rec = prepared[0], ds[0]
        if conversational:
            prompt_text = tokenizer.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True)
            assert tokenizer.decode(row["prompt_ids"]) == prompt_text
            assert tokenizer.decode(row["chosen_ids"]).startswith(pairs[0].response_a)
        else:
            assert tokenizer.decode(row["prompt_ids"]) == pairs[0].prompt.hh_text
            assert tokenizer.decode(row["chosen_ids"]) == " " + pairs[0].response_a + tokenizer.eos_token
            assert tokenizer.decode(row["rejected_ids"]) == " " + pairs[0].response_b + tokenizer.eos_token
        _trained_loss(trainer)

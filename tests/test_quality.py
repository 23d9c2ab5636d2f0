"""Label-quality metrics on hand-made labels whose answers are worked out by hand, the
``label_quality`` stage through the artifact store, and the bootstrap / paired tests of
``cai.stats``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cai.artifacts import ArtifactStore
from cai.config import Config, QualityConfig
from cai.data import Label, write_jsonl
from cai.errors import ConfigError, DataError
from cai.feedback.label_methods import first_slot_probs
from cai.feedback.quality import (
    build_label_quality,
    label_quality,
    quality_report,
    reliability_table,
)
from cai.judges.types import failure_kind
from cai.stats import bootstrap_ci, paired_bootstrap_diff, paired_permutation_test

SOURCE = "ai:openai:fake"


def ai(pid: str, p_a: float | None, ab: float | None = None, ba: float | None = None, *,
       principles: dict | None = None, cost: float = 0.0, reason: str | None = None,
       order: str = "both") -> Label:
    """An AI label in the labelling stage's format; ``ab``/``ba`` are P(slot 1 wins) per order."""
    p_first = {k: v for k, v in (("ab", ab), ("ba", ba)) if v is not None}
    meta = {"p_first": p_first, "cost_usd": cost, "tokens_in": 10, "tokens_out": 1}
    if principles is not None:
        meta["per_principle"] = principles
    if p_a is None:
        return Label.failed(pid, SOURCE, reason or "refusal", order=order, meta=meta)
    return Label(pid, p_a, SOURCE, tuple(principles or ()), order, meta=meta)


def human(pid: str, chosen: str) -> Label:
    return Label.human(pid, chosen)


def cfg(n: int = 500) -> QualityConfig:
    return QualityConfig(n_bins=10, bootstrap=n, alpha=0.05)


# ----------------------------------------------------------------------------- agreement
def test_agreement_soft_agreement_and_ties_by_hand():
    humans = [human("p1", "a"), human("p2", "a"), human("p3", "b"), human("p4", "b"), human("p5", "a")]
    ais = [ai("p1", 0.9), ai("p2", 0.3), ai("p3", 0.2), ai("p4", 0.5), ai("p5", 0.8)]
    m = label_quality(ais, humans, cfg())
    # p1 agrees, p2 disagrees, p3 agrees, p4 is a tie (left out), p5 agrees
    assert m["quality/agreement"] == pytest.approx(3 / 4)
    assert m["quality/agreement_n"] == 4
    assert m["quality/ties"] == 1
    # p(human-preferred): 0.9, 0.3, 0.8, 0.5, 0.8 -- the tie counts as 0.5
    assert m["quality/soft_agreement"] == pytest.approx(3.3 / 5)
    assert m["quality/soft_agreement_n"] == 5
    assert m["quality/n_pairs"] == 5 and m["quality/n_matched"] == 5


def test_ece_and_reliability_table_by_hand():
    ps = [0.72, 0.76, 0.15, 0.95, 1.0]
    ys = [True, False, False, True, True]
    table, ece = reliability_table(ps, ys, n_bins=10)
    # bin 7: mean p .74 vs .5 (2 pairs); bin 1: .15 vs 0 (1); bin 9: .975 vs 1 (2, p=1.0 lands in the last bin)
    assert ece == pytest.approx((2 * 0.24 + 0.15 + 2 * 0.025) / 5)
    assert [b.n for b in table] == [0, 1, 0, 0, 0, 0, 0, 2, 0, 2]
    assert table[7].mean_p == pytest.approx(0.74) and table[7].human_a_rate == 0.5
    assert table[0].mean_p is None and table[0].low == 0.0 and table[9].high == 1.0

    # the same through labels: human chose a where ys is True
    humans = [human(f"p{i}", "a" if y else "b") for i, y in enumerate(ys)]
    ais = [ai(f"p{i}", p) for i, p in enumerate(ps)]
    report = quality_report(ais, humans, cfg())
    assert report.metrics["quality/ece"] == pytest.approx(ece)
    assert [b.n for b in report.reliability] == [b.n for b in table]


def test_perfectly_calibrated_judge_has_zero_ece():
    humans = [human("a1", "a"), human("a2", "a"), human("a3", "a"), human("a4", "b")]
    ais = [ai(h.pair_id, 0.75) for h in humans]
    assert label_quality(ais, humans, cfg())["quality/ece"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- position bias
def test_position_consistency_same_slot_and_first_slot_rates_by_hand():
    labels = [
        ai("L1", 0.75, ab=0.8, ba=0.3),  # a wins from slot 1 and from slot 2: consistent
        ai("L2", 0.55, ab=0.7, ba=0.6),  # slot 1 wins both times: same slot
        ai("L3", 0.15, ab=0.2, ba=0.9),  # b wins both times: consistent
        ai("L4", 0.65, ab=0.4, ba=0.1),  # slot 2 wins both times: same slot
        ai("L5", 0.3, ab=0.5, ba=0.9),  # one order undecided: a position tie
        ai("L6", 0.9, ab=0.9, order="ab"),  # one order only: first-slot rate, not consistency
        ai("L7", None, reason="refusal"),  # failed: nothing
    ]
    m = label_quality(labels, [], cfg())
    assert m["quality/position_n"] == 4
    assert m["quality/position_consistency"] == pytest.approx(2 / 4)
    assert m["quality/same_slot_rate"] == pytest.approx(2 / 4)
    assert m["quality/position_ties"] == 1
    # single-order judgements (0.5 excluded): .8 .3 .7 .6 .2 .9 .4 .1 .9 .9 -> slot 1 wins 6 of 10
    assert m["quality/first_slot_rate"] == pytest.approx(6 / 10)
    assert m["quality/first_slot_n"] == 10 and m["quality/first_slot_ties"] == 1


def test_first_slot_probs_fall_back_to_p_a_by_order_and_single_order_p_a():
    by_order = Label("x", 0.75, SOURCE, meta={"p_a_by_order": {"ab": 0.8, "ba": 0.7}})
    assert first_slot_probs(by_order) == pytest.approx({"ab": 0.8, "ba": 0.3})  # slot 1 is b in "ba"
    single = Label("y", 0.2, SOURCE, order="ba")
    assert first_slot_probs(single) == pytest.approx({"ba": 0.8})
    assert first_slot_probs(Label("z", 0.2, SOURCE)) == {}  # order "both" and no meta: unknown


def test_a_judge_that_always_picks_slot_one_is_flagged():
    labels = [ai(f"s{i}", 0.5, ab=0.9, ba=0.9) for i in range(6)]
    m = label_quality(labels, [human(f"s{i}", "ab"[i % 2]) for i in range(6)], cfg())
    assert m["quality/same_slot_rate"] == 1.0 and m["quality/position_consistency"] == 0.0
    assert m["quality/first_slot_rate"] == 1.0
    assert m["quality/ties"] == 6 and m["quality/agreement"] is None  # p_a 0.5: no preference


# ----------------------------------------------------------------------------- failures, unmatched, cost
def test_failures_unmatched_pairs_and_cost_are_counted_not_dropped():
    humans = [human("m1", "a"), human("m2", "b"), human("m3", "a"), human("h_only", "a"),
              Label("h_tie", 0.5, "human")]
    ais = [
        ai("m1", 0.9, cost=0.02),
        ai("m2", None, reason="unparseable: Both are fine", cost=0.01),
        ai("m3", None, reason="http 500 after 6 attempts"),
        ai("a_only", 0.1, cost=0.03),
        ai("h_tie", 0.7, cost=0.04),
        ai("a_fail", None, reason="refusal (3 of 5 samples)"),
    ]
    report = quality_report(ais, humans, cfg())
    m = report.metrics
    assert m["quality/n_pairs"] == 6 and m["quality/n_human"] == 5
    assert m["quality/n_matched"] == 4  # m1 m2 m3 h_tie
    assert m["quality/unmatched_ai"] == 2 and m["quality/unmatched_human"] == 1
    assert sorted(report.unmatched_ai_ids) == ["a_fail", "a_only"]
    assert m["quality/matched_failed"] == 2 and m["quality/human_ties"] == 1
    assert m["quality/agreement"] == 1.0 and m["quality/agreement_n"] == 1
    assert m["quality/invalid_rate"] == pytest.approx(3 / 6)
    assert m["quality/invalid/unparseable"] == pytest.approx(1 / 6)
    assert m["quality/invalid/http_500"] == pytest.approx(1 / 6)
    assert m["quality/invalid/refusal"] == pytest.approx(1 / 6)
    assert report.invalid_reasons["refusal (3 of 5 samples)"] == 1
    assert m["quality/cost_usd"] == pytest.approx(0.10)
    assert m["quality/cost_per_label_usd"] == pytest.approx(0.10 / 3)  # per usable label
    assert m["quality/tokens_in"] == 60


# One rule (cai.judges.types.failure_kind) for every failure count: it replaced quality's
# reason_code, whose "no reason" kind was "other", and the labeller's failure_kind, which cut
# "http 500 ..." to "http". "unknown" is what the labelling stage, the PPO judge reward and the
# judge-answers stage already counted a missing reason as; the status code stays in http kinds
# because a 429 (rate limit) and a 500 (server error) call for different fixes.
@pytest.mark.parametrize("reason,code", [
    ("refusal", "refusal"), ("unparseable: empty answer", "unparseable"), ("http 429 after 6 attempts", "http_429"),
    ("http 400: bad request", "http_400"), ("timeout after 3 attempts", "timeout"), ("budget", "budget"),
    ("malformed response (no choices) after 3 attempts", "malformed"), ("", "unknown"), (None, "unknown"),
    ("http 500 after 6 attempts", "http_500"), ("unparseable: Both are fine", "unparseable"),
    ("malformed response (JSONDecodeError) after 3 attempts", "malformed"), ("refusal (3 of 5 samples)", "refusal"),
    ("connection error after 4 attempts", "connection"),
])
def test_failure_kinds(reason, code):
    assert failure_kind(reason) == code


def test_invalid_codes_count_the_kind_the_labeller_recorded():
    """A failed pairwise label's reason names the order first; its kind is the judge's reason's."""
    label = Label.failed("k1", SOURCE, "order ba failed (principle harm): http 500 after 6 attempts", order="both",
                         meta={"failure_kind": "http_500"})
    m = label_quality([label, ai("k2", None, reason="refusal")], [], cfg())
    assert m["quality/invalid/http_500"] == 0.5 and m["quality/invalid/refusal"] == 0.5
    assert "quality/invalid/order" not in m


def test_duplicate_label_for_a_pair_is_an_error():
    with pytest.raises(DataError, match="second label for pair 'd1'"):
        label_quality([ai("d1", 0.9), ai("d1", 0.2)], [human("d1", "a")])


def test_no_data_gives_none_not_a_crash():
    m = label_quality([], [], cfg())
    assert m["quality/agreement"] is None and m["quality/ece"] is None and m["quality/invalid_rate"] is None
    assert m["quality/agreement_ci_low"] is None and m["quality/cost_per_label_usd"] is None


# ----------------------------------------------------------------------------- principles
def test_per_principle_agreement():
    per1 = {"harm": {"ab": 0.9, "ba": 0.7}, "honesty": {"ab": 0.3, "ba": 0.1}}
    per2 = {"harm": {"ab": 0.2, "ba": None}, "honesty": {"ab": 0.5, "ba": 0.5}}
    humans = [human("q1", "a"), human("q2", "b"), human("q3", "a")]
    ais = [ai("q1", 0.6, principles=per1), ai("q2", 0.3, principles=per2),
           Label("q3", 0.2, SOURCE, ("harm",))]  # one principle, no per_principle: its own p_a
    report = quality_report(ais, humans, cfg())
    m = report.metrics
    # harm: q1 .8 (agree), q2 .2 (agree, b), q3 .2 (disagree) ; honesty: q1 .2 (disagree), q2 .5 (tie)
    assert m["quality/principle/harm/agreement"] == pytest.approx(2 / 3)
    assert m["quality/principle/harm/n"] == 3
    assert m["quality/principle/honesty/agreement"] == 0.0
    assert m["quality/principle/honesty/n"] == 1
    rows = {r["principle_id"]: r for r in report.principles}
    assert rows["honesty"]["ties"] == 1
    assert rows["harm"]["soft_agreement"] == pytest.approx((0.8 + 0.8 + 0.2) / 3)


# ----------------------------------------------------------------------------- confidence intervals
def _agreeing(n: int, share: float) -> tuple[list[Label], list[Label]]:
    k = int(round(n * share))
    humans = [human(f"c{i}", "a") for i in range(n)]
    ais = [ai(f"c{i}", 0.8 if i < k else 0.3) for i in range(n)]
    return ais, humans


def test_cis_contain_the_estimate_shrink_with_n_and_are_seeded():
    small = label_quality(*_agreeing(40, 0.75), cfg(), seed=3)
    large = label_quality(*_agreeing(400, 0.75), cfg(), seed=3)
    for m in (small, large):
        assert m["quality/agreement_ci_low"] <= m["quality/agreement"] <= m["quality/agreement_ci_high"]
        assert m["quality/soft_agreement_ci_low"] <= m["quality/soft_agreement"] <= m["quality/soft_agreement_ci_high"]
    width = lambda m: m["quality/agreement_ci_high"] - m["quality/agreement_ci_low"]  # noqa: E731
    assert width(large) < 0.6 * width(small)  # ~1/sqrt(10) in theory
    assert label_quality(*_agreeing(40, 0.75), cfg(), seed=3) == small


def test_bootstrap_ci_basics():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, size=400)
    lo, hi = bootstrap_ci(x, n=1000, seed=1)
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.2)  # ~ 2 z sigma / sqrt(n)
    assert bootstrap_ci(x, n=1000, seed=1) == (lo, hi)
    assert bootstrap_ci([0.7] * 5) == pytest.approx((0.7, 0.7))
    # a statistic without ``axis`` takes the per-row path and sees the same resamples
    assert bootstrap_ci(x, stat=lambda v: float(np.mean(v)), n=300, seed=2) == pytest.approx(
        bootstrap_ci(x, n=300, seed=2))
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            bootstrap_ci(bad)


def test_paired_bootstrap_diff_keeps_the_pairing():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, size=300)  # a shared per-unit effect, much larger than the arm gap
    a, b = base + 0.2 + rng.normal(0, 0.1, 300), base + rng.normal(0, 0.1, 300)
    d = paired_bootstrap_diff(a, b, n=1000, seed=0)
    assert d.diff == pytest.approx(a.mean() - b.mean()) and d.n == 300
    assert 0.0 < d.ci_low < d.diff < d.ci_high  # pairing removes the shared effect: 0 is excluded
    lo_a, hi_a = bootstrap_ci(a, n=1000, seed=0)
    assert d.ci_high - d.ci_low < 0.5 * (hi_a - lo_a)
    with pytest.raises(ValueError, match="pairs must align"):
        paired_bootstrap_diff([1.0, 2.0], [1.0])


def test_paired_permutation_test_exact_and_sampled():
    t = paired_permutation_test([1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0])
    assert t.exact and t.n == 6 and t.resamples == 64  # the zero difference carries no sign
    assert t.p_value == pytest.approx(2 / 64)  # all + or all - are as extreme
    assert paired_permutation_test([1] * 6, [0] * 6, alternative="greater").p_value == pytest.approx(1 / 64)
    assert paired_permutation_test([1] * 6, [0] * 6, alternative="less").p_value == pytest.approx(1.0)
    assert paired_permutation_test([0.5] * 4, [0.5] * 4).p_value == 1.0

    rng = np.random.default_rng(0)
    null_a, null_b = rng.normal(0, 1, 200), rng.normal(0, 1, 200)
    t_null = paired_permutation_test(null_a, null_b, n=2000, seed=0)
    assert not t_null.exact and t_null.p_value > 0.05
    t_alt = paired_permutation_test(null_a + 0.5, null_b, n=2000, seed=0)
    assert t_alt.p_value == pytest.approx(1 / 2001)  # never 0
    assert paired_permutation_test(null_a, null_b, n=2000, seed=0) == t_null


# ----------------------------------------------------------------------------- the stage
def _store_build(tmp_path, ai_labels, human_labels, config):
    """Build the stage as the pipeline would, from ``config``: the quality settings and ``seed``."""
    from cai.pipeline import make_stage

    ai_dir, human_dir = tmp_path / "ai", tmp_path / "human"
    write_jsonl(ai_dir / "labels.jsonl", ai_labels)
    write_jsonl(human_dir / "labels.jsonl", human_labels)
    store = ArtifactStore(tmp_path / "store", durable=False)
    quality = {k: v for k, v in config.items() if k != "seed"}
    stage = make_stage("label_quality", Config(seed=config["seed"], quality=quality,
                                               store={"root": str(store.root)}))
    key = store.key("label_quality", stage.config, {"ai_labels": "ai_labels-x", "human_pairs": "human_pairs-y"},
                    version=stage.version)
    inputs = {"ai_labels": ai_dir, "human_pairs": human_dir}
    return store.build(key, lambda ctx: build_label_quality(stage.cfg, inputs, ctx))


def test_stage_writes_quality_json_and_sets_metrics(tmp_path):
    config = {"n_bins": 10, "bootstrap": 200, "alpha": 0.05, "seed": 0}
    ais = [ai("s1", 0.9, ab=0.9, ba=0.1, cost=0.01), ai("s2", 0.2, ab=0.3, ba=0.9), ai("s3", None)]
    humans = [human("s1", "a"), human("s2", "a"), human("s3", "b")]
    result = _store_build(tmp_path, ais, humans, config)
    out = json.loads((result.path / "quality.json").read_text())
    assert out["metrics"]["quality/agreement"] == 0.5
    assert len(out["reliability"]) == 10 and sum(b["n"] for b in out["reliability"]) == 2
    assert out["invalid_reasons"] == {"refusal": 1}
    assert result.stage_info["metrics"]["quality/agreement"] == 0.5
    assert result.stage_info["metrics"]["quality/invalid_rate"] == pytest.approx(1 / 3)


def test_stage_refuses_labels_of_other_pairs(tmp_path):
    config = {"n_bins": 10, "bootstrap": 10, "alpha": 0.05, "seed": 0}
    with pytest.raises(DataError, match="none of the 1 AI labels has a human label"):
        _store_build(tmp_path, [ai("x1", 0.9)], [human("y1", "a")], config)


def test_stage_is_registered_with_its_config_slice():
    from hydra import compose, initialize_config_dir

    from cai.config import CONF_DIR, register_configs, typed
    from cai.pipeline import make_stage

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["labels.source=human_pairs", "quality.bootstrap=300", "seed=7"])
        bad = compose(config_name="config", overrides=["labels.source=human_pairs", "quality.alpha=1.5"])
        policy_pairs = compose(config_name="config", overrides=["labels.source=policy_pairs"])
    stage = make_stage("label_quality", typed(cfg))
    assert stage.inputs == {"ai_labels": "ai_labels", "human_pairs": "human_pairs"}
    assert stage.config == {"quality": {"n_bins": 10, "bootstrap": 300, "alpha": 0.05}, "seed": 7}
    assert stage.cfg.quality.bootstrap == 300 and stage.cfg.seed == 7
    with pytest.raises(ConfigError, match="alpha"):
        make_stage("label_quality", typed(bad))
    # AI labels of on-policy pairs have no human labels to compare with: refused at planning
    with pytest.raises(ConfigError, match="label_quality .* needs labels.source=human_pairs, got 'policy_pairs'"):
        make_stage("label_quality", typed(policy_pairs))


def test_a_bad_probability_in_meta_names_the_pair_and_field():
    bad = Label("b1", 0.6, SOURCE, meta={"p_first": {"ab": 1.7, "ba": 0.2}})
    with pytest.raises(DataError, match=r"pair 'b1': meta.p_first.ab must be a probability"):
        label_quality([bad], [human("b1", "a")])

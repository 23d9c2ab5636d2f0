"""Contextual calibration (``labels.calibrate``): the arithmetic on a known biased distribution,
and the pairwise method end to end with a judge whose slot prior is known."""

from __future__ import annotations

import pytest

from cai.config import LabelConfig
from cai.config import build as build_schema
from cai.constitution import load_constitution
from cai.data import Pair, Prompt
from cai.errors import ConfigError
from cai.feedback import label_methods as lm
from cai.judges import ChoiceResult
from cai.judges import templates as tpl


def test_calibration_divides_out_a_known_prior():
    prior = {"A": 0.9, "B": 0.1}  # the judge's answer on a content-free input
    for true_a in (0.5, 0.7, 0.2):
        # what a judge with that prior answers: the true preference times the prior, renormalised
        observed = {"A": true_a * 0.9 / (true_a * 0.9 + (1 - true_a) * 0.1)}
        observed["B"] = 1 - observed["A"]
        got = lm.calibrate(observed, prior)
        assert got["A"] == pytest.approx(true_a) and got["B"] == pytest.approx(1 - true_a)
    # a judge without a prior is left alone; a certain prior cannot be divided out
    assert lm.calibrate({"A": 0.3, "B": 0.7}, {"A": 0.5, "B": 0.5}) == pytest.approx({"A": 0.3, "B": 0.7})
    with pytest.raises(ValueError, match="'B' probability"):
        lm.calibrate({"A": 0.6, "B": 0.4}, {"A": 1.0, "B": 0.0})


class SlotBiasedJudge:
    """Prefers the shorter reply with P = 0.7 (0.5 for two equal replies, e.g. content-free),
    seen through a slot prior of 0.95 for letter A: every answer picks A."""

    name, model = "biased", "rule"

    def __init__(self) -> None:
        self.requests: list = []

    async def choose_many(self, reqs, progress=False):
        out = []
        for r in reqs:
            self.requests.append(r)
            layout = tpl.parse_prompt(r.messages[-1]["content"])
            first, second = (b.text for b in layout.blocks if b.kind == "reply")
            true_a = 0.5 if len(first) == len(second) else (0.7 if len(first) < len(second) else 0.3)
            a = true_a * 0.95 / (true_a * 0.95 + (1 - true_a) * 0.05)
            out.append(ChoiceResult({"A": a, "B": 1 - a}, "logprobs", "ok", None, "", 10, 0, 0.0, 0.0, False, 1,
                                    self.model, self.name, r.tag))
        return out

    async def generate_many(self, reqs, progress=False):  # pragma: no cover - pairwise asks no text
        raise AssertionError("no generation expected")


def _pairs() -> list[Pair]:
    prompt = Prompt.create([{"role": "user", "content": "How do I stay safe on a hike?"}], "synthetic")
    return [Pair.create(prompt, "Tell someone your route.", "Bring water, a map and a charged phone, and "
                        "tell someone where you are going.", "synthetic"),
            Pair.create(prompt, "Carry a first-aid kit, know the weather and turn back early if unsure.",
                        "Go with a friend.", "synthetic")]


def _label(calibrate: bool):
    from cai.feedback.label import Labeller
    from cai.judges import run_sync

    judge = SlotBiasedJudge()
    constitution = load_constitution(tpl_constitution())
    lc = build_schema(LabelConfig, {"calibrate": calibrate})
    labeller = Labeller(lc, constitution, judge, "ai:biased:rule", 0, {"backend": "biased"})
    plans = [labeller.plan(p) for p in _pairs()]
    assert run_sync(labeller.judge_batch(plans)) is None
    return judge, [labeller.label(plan) for plan in plans]


def tpl_constitution():
    from cai.config import CONSTITUTIONS_DIR

    return CONSTITUTIONS_DIR / "harmless.yaml"


def test_uncalibrated_slot_prior_hides_the_preference_and_calibration_recovers_it():
    _, raw = _label(calibrate=False)
    assert lm.position_metrics(raw)["same_slot_rate"] == 1.0  # slot A wins in both orders
    assert [lab.p_a for lab in raw] != pytest.approx([0.7, 0.3], abs=0.05)
    judge, cal = _label(calibrate=True)
    # one content-free request per pair and principle, both replies "N/A"
    cf = [r for r in judge.requests if r.tag["order"] == "cf"]
    assert len(cf) == 2 and len(judge.requests) == 6
    assert all(tpl.CLOSE_REPLY in r.messages[-1]["content"] and "| N/A" in r.messages[-1]["content"] for r in cf)
    # the shorter reply (a in pair 0, b in pair 1) wins with the judge's true 0.7, from either slot
    assert [lab.p_a for lab in cal] == pytest.approx([0.7, 0.3])
    pos = lm.position_metrics(cal)
    assert pos["position_consistency"] == 1.0 and pos["same_slot_rate"] == 0.0
    for lab in cal:  # the uncalibrated answers and the prior stay in meta: before/after from one run
        assert lab.meta["p_first_raw"]["ab"] > 0.8 and lab.meta["p_first_raw"]["ba"] > 0.8
        assert list(lab.meta["content_free_p_first"].values()) == [pytest.approx(0.95)]


@pytest.mark.parametrize("bad", [{"calibrate": True, "cot": True}, {"calibrate": True, "method": "direct_score"}])
def test_calibration_needs_pairwise_without_cot(bad):
    with pytest.raises(ConfigError, match="calibrate"):
        build_schema(LabelConfig, bad)

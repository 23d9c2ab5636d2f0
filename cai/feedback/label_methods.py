"""The labelling methods: their settings, the arithmetic from a judge's answers to ``p_a``, and
one small class per method.

:class:`cai.config.LabelConfig` (Hydra group ``labels``) says how pairs are labelled. The arithmetic
below is pure functions -- no model, no I/O --
so every rule is testable with hand-made probabilities.

Methods. A labelling method is a :class:`LabelMethod`: the judge requests it asks for one pair
(:meth:`~LabelMethod.requests`, and :meth:`~LabelMethod.follow_up` for a second step) and how it
combines the answers into the label's ``p_a``, ``meta`` and failure (:meth:`~LabelMethod.combine`).
:data:`LABEL_METHODS` registers them by name -- :class:`Pairwise`, :class:`ChainOfThought`,
:class:`DirectScore` -- and :func:`method_for` picks the one a config asks for. A new method is one
class, one row in :data:`LABEL_METHODS` and a preset in ``conf/labels/``.

Pairwise labels. A *judgement* is one (principle, order) answer: ``p_first`` = P(the reply in
slot 1 wins). In order ``"ab"`` slot 1 shows ``response_a``, so ``p_a = p_first``; in order
``"ba"`` slot 1 shows ``response_b``, so ``p_a = 1 - p_first``.

- **Self-consistency** (:func:`average_samples`): the k chain-of-thought samples of one judgement
  are averaged; the judgement stands if more than half of them produced an answer (the failed
  ones are counted, never replaced by a guess).
- **Combining** (:func:`combine_pairwise`): ``per_principle[pid][order] = p_a``;
  ``p_a_by_order[order]`` and ``p_first[order]`` average over principles; ``p_a`` averages the
  orders. An order is usable when every principle was judged in it. If an order is not usable
  the label fails (its reason names the order and principle) unless ``allow_single_order``, in
  which case the usable order alone gives the label (``order`` = that order).
- **Finishing** (:func:`finish`): clamp into ``[lo, hi]`` (the CAI paper clamps chain-of-thought
  labels to [0.4, 0.6] because sampled reasoning makes over-confident answers), then, for hard
  labels, round to 1.0 / 0.0. An exact tie stays 0.5: a hard label never flips a coin.

Contextual calibration (``labels.calibrate``, Zhao et al. 2021, "Calibrate before use"). A base
model asked "A or B?" answers mostly from a prior over the letters that has little to do with the
replies; asking both orders cancels it only when the prior is mild (when it is saturated both
orders say "A" and average to 0.5: no signal, no warning). So per pair and principle the method
also asks the same comparison with both replies replaced by :data:`CONTENT_FREE` -- the judge's
choice distribution ``q`` on an input without content -- and divides it out of every answer of
that pair and principle: ``p'(c) = (p(c) / q(c)) / sum_k p(k) / q(k)`` (:func:`calibrate`). A
judge with no prior (``q`` uniform) is left unchanged. ``meta`` keeps the uncalibrated
``p_first_raw`` per order and the content-free ``content_free_p_first`` per principle, so one
run shows the position metrics before and after.

Direct scores. The judge rates each reply 1..10 alone: ``score = sum(k * P(k))`` and
``p_a = P(S_a > S_b) + P(S_a = S_b) / 2`` for independent draws from the two rating
distributions (:func:`p_a_from_scores`), averaged over principles.

Position metrics (:func:`position_metrics`, the one implementation behind both ``label/...``
and ``quality/...``), over ok labels, from ``P(slot 1 wins)`` per order (:func:`first_slot_probs`):
``position_consistency`` = share of two-order pairs whose *response* wins in both orders;
``same_slot_rate`` = share whose *slot* wins in both orders (the position bias);
``first_slot_rate`` = share of single-order judgements won by slot 1. Tie rule: an order whose
first-slot probability is exactly 0.5 decides nothing. It is counted in ``first_slot_ties`` and
left out of ``first_slot_n``; a two-order pair with such an order is counted in
``position_ties`` and left out of ``position_n``, the denominator of the two pair rates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cai.config import LabelConfig
from cai.constitution import Constitution, PreferenceExample, PreferencePrinciple
from cai.data import Label, Pair
from cai.errors import ConfigError, DataError
from cai.judges import templates as tpl
from cai.judges.types import (
    BUDGET,
    ChoiceRequest,
    ChoiceResult,
    GenerateRequest,
    failure_kind,
)

ORDERS = ("ab", "ba")
PRINCIPLE_MODES = ("sample", "ensemble", "all")
METHODS = ("pairwise", "direct_score")


@dataclass
class Judgement:
    """One (principle, order) answer after self-consistency; ``p_first`` None when it failed."""

    principle_id: str
    order: str  # "ab" | "ba"
    p_first: float | None
    failure: str | None = None

    @property
    def p_a(self) -> float | None:
        if self.p_first is None:
            return None
        return self.p_first if self.order == "ab" else 1.0 - self.p_first


@dataclass
class Combined:
    """A pair's combined preference, or why there is none."""

    p_a: float | None
    order: str  # "both" | "ab" | "ba"
    p_first: dict[str, float] = field(default_factory=dict)
    p_a_by_order: dict[str, float] = field(default_factory=dict)
    per_principle: dict[str, dict[str, float]] = field(default_factory=dict)
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals)


def average_samples(samples: Sequence[float | None], failures: Sequence[str | None]) -> tuple[float | None, str | None]:
    """Mean of the samples that answered, if more than half did; else the first reason of the
    commonest kind (:func:`~cai.judges.types.failure_kind`)."""
    got = [s for s in samples if s is not None]
    if 2 * len(got) > len(samples):
        return mean(got), None
    reasons = [f for f in failures if f]
    top = Counter(failure_kind(r) for r in reasons).most_common(1)
    first = next((r for r in reasons if failure_kind(r) == top[0][0]), "no answer") if top else "no answer"
    if len(samples) == 1:
        return None, first
    return None, f"{first} ({len(samples) - len(got)} of {len(samples)} samples failed)"


def combine_pairwise(judgements: Sequence[Judgement], orders: Sequence[str], allow_single_order: bool) -> Combined:
    """Combine the judgements of one pair (see the module docstring)."""
    principles = list(dict.fromkeys(j.principle_id for j in judgements))
    by_order = {o: [j for j in judgements if j.order == o] for o in orders}
    failed = {o: next((j for j in js if j.p_first is None), None) for o, js in by_order.items()}
    usable = [o for o in orders if failed[o] is None and by_order[o]]
    per_principle: dict[str, dict[str, float]] = {pid: {} for pid in principles}
    for j in judgements:
        if j.p_a is not None:
            per_principle[j.principle_id][j.order] = j.p_a
    p_first = {o: mean(j.p_first for j in by_order[o]) for o in usable}  # type: ignore[misc]
    p_a_by_order = {o: mean(j.p_a for j in by_order[o]) for o in usable}  # type: ignore[misc]
    bad = [o for o in orders if o not in usable]
    if bad and not (usable and allow_single_order):
        parts = []
        for o in bad:
            j = failed[o]
            parts.append(f"order {o} failed (principle {j.principle_id}): {j.failure}" if j
                         else f"order {o}: no judgement")
        if usable:
            parts.append(f"order {usable[0]} succeeded but labels.allow_single_order is false")
        return Combined(None, "both" if len(orders) > 1 else orders[0], p_first, p_a_by_order, per_principle,
                        "; ".join(parts))
    order = "both" if len(usable) > 1 else usable[0]
    return Combined(mean(p_a_by_order.values()), order, p_first, p_a_by_order, per_principle)


def first_failure(judgements: Sequence[Judgement]) -> str | None:
    """The reason of the first failed judgement (what a failed label's kind is counted by)."""
    return next((j.failure for j in judgements if j.p_first is None), None)


def finish(p_a: float, clamp: Sequence[float] | None, soft: bool) -> float:
    """Clamp into ``clamp = [lo, hi]`` (if given), then round to 0/1 unless ``soft`` (ties stay 0.5)."""
    if clamp is not None:
        lo, hi = clamp
        p_a = min(max(p_a, lo), hi)
    if not soft and p_a != 0.5:
        p_a = 1.0 if p_a > 0.5 else 0.0
    return p_a


CONTENT_FREE = "N/A"
"""The reply text of a content-free comparison (contextual calibration)."""
CALIBRATION_FLOOR = 1e-6
"""Content-free probabilities below this are treated as a failed calibration, not divided by."""


def calibrate(probs: Mapping[str, float], content_free: Mapping[str, float]) -> dict[str, float]:
    """Contextual calibration: ``probs`` divided by the content-free distribution, renormalised.

    ``p'(c) = (p(c) / q(c)) / sum_k p(k) / q(k)``. Raises ValueError when ``content_free`` lacks a
    choice or gives one less than :data:`CALIBRATION_FLOOR` (a prior that certain cannot be
    divided out: the judge would have to be infinitely sure the other way)."""
    low = [c for c in probs if float(content_free.get(c, 0.0)) < CALIBRATION_FLOOR]
    if low:
        raise ValueError(f"the content-free answer gives {', '.join(map(repr, low))} probability "
                         f"< {CALIBRATION_FLOOR:g}: the slot prior cannot be divided out")
    scaled = {c: float(p) / float(content_free[c]) for c, p in probs.items()}
    total = sum(scaled.values())
    return {c: v / total for c, v in scaled.items()}


def expected_score(probs: Mapping[str, float]) -> float:
    """``sum(int(k) * P(k))`` over a rating distribution with numeric labels."""
    return sum(int(k) * p for k, p in probs.items())


def p_a_from_scores(probs_a: Mapping[str, float], probs_b: Mapping[str, float]) -> float:
    """``P(S_a > S_b) + P(S_a = S_b) / 2`` for independent ratings ``S_a``, ``S_b``."""
    total = 0.0
    for ka, pa in probs_a.items():
        for kb, pb in probs_b.items():
            sa, sb = int(ka), int(kb)
            total += pa * pb * (1.0 if sa > sb else 0.5 if sa == sb else 0.0)
    return total


# ----------------------------------------------------------------------------- position metrics
def meta_probability(value: Any, label: Label, field_name: str) -> float | None:
    """A probability read from a label's meta; None when absent (that order or principle was not
    judged). Anything else names the pair and the field."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise DataError(f"label of pair {label.pair_id!r}: meta.{field_name} must be a probability "
                        f"in [0, 1] or null, got {value!r}")
    return float(value)


def first_slot_probs(label: Label) -> dict[str, float]:
    """``{"ab": P(slot 1 wins | a first), "ba": P(slot 1 wins | b first)}`` for the orders present.

    Read from ``meta["p_first"]`` (what the labeller writes); else derived from
    ``meta["p_a_by_order"]`` (``ba``: slot 1 is b, so ``1 - p_a``); else, for a single-order
    label, from its own ``p_a``. Direct-score labels have no slots: ``{}``.
    """
    meta = label.meta
    out: dict[str, float] = {}
    first = meta.get("p_first")
    by_order = meta.get("p_a_by_order")
    for order in ORDERS:
        p = meta_probability(first.get(order), label, f"p_first.{order}") if isinstance(first, Mapping) else None
        if p is None and isinstance(by_order, Mapping):
            q = meta_probability(by_order.get(order), label, f"p_a_by_order.{order}")
            p = None if q is None else (q if order == "ab" else 1.0 - q)
        if p is not None:
            out[order] = p
    if not out and label.status == "ok" and label.order in ORDERS:
        assert label.p_a is not None
        out[label.order] = label.p_a if label.order == "ab" else 1.0 - label.p_a
    return out


def position_metrics(labels: Iterable[Label]) -> dict[str, Any]:
    """Position consistency, same-slot rate and first-slot rate over the ok labels, with their
    counts and ties (see the module docstring for the tie rule); a rate is None without data."""
    consistent = same_slot = position_n = position_ties = 0
    first_wins = first_n = first_ties = 0
    for label in labels:
        if label.status != "ok":
            continue
        pf = first_slot_probs(label)
        for p in pf.values():
            if p == 0.5:
                first_ties += 1
            else:
                first_n += 1
                first_wins += p > 0.5
        if "ab" in pf and "ba" in pf:
            ab, ba = pf["ab"], pf["ba"]
            if ab == 0.5 or ba == 0.5:
                position_ties += 1
                continue
            position_n += 1
            if (ab > 0.5) == (ba > 0.5):
                same_slot += 1  # slot 1 (or slot 2) won both times: the answer followed the slot
            else:
                consistent += 1  # the same response won from either slot
    return {
        "position_consistency": consistent / position_n if position_n else None,
        "same_slot_rate": same_slot / position_n if position_n else None,
        "position_n": position_n,
        "position_ties": position_ties,
        "first_slot_rate": first_wins / first_n if first_n else None,
        "first_slot_n": first_n,
        "first_slot_ties": first_ties,
    }


# ----------------------------------------------------------------------------- the methods
STAGE = "ai_labels"  # the stage that asks; every request's tag names it

Key = tuple[str, str, int]
"""One answer a method needs for a pair: (principle id, order ``"ab"``/``"ba"`` or reply
``"a"``/``"b"``, sample index)."""
Request = ChoiceRequest | GenerateRequest
Answer = Any
"""What a key ends with: a :class:`~cai.judges.ChoiceResult`, or a failure reason (str) when its
choice request was never sent (a failed first step)."""


def answered(answer: Answer) -> bool:
    """Whether an answer is a usable choice: an ok result with probabilities."""
    return isinstance(answer, ChoiceResult) and answer.ok and answer.probs is not None


def why(answer: Answer) -> str:
    """The failure reason of an answer that is not usable."""
    if answer is None:
        return "no answer"
    return answer if isinstance(answer, str) else str(answer.failure_reason or "no answer")


@dataclass
class Verdict:
    """What a method makes of one pair's answers. The labeller then clamps / rounds ``p_a``
    (:func:`finish`) and adds the accounting (tokens, cost, cache hits) to ``meta``."""

    p_a: float | None  # None when the label failed
    order: str  # the label's order: "both" | "ab" | "ba"
    meta: dict[str, Any]  # the method's fields of label.meta (p_first, p_a_by_order, per_principle, ...)
    failure: str | None = None  # the failed label's failure_reason
    cause: str | None = None  # the judge's own reason behind ``failure``: what its failure kind counts


class LabelMethod:
    """A labelling method: the judge requests it asks for one pair, and how it combines the answers.

    The labeller drives it a batch of pairs at a time:

    1. :meth:`requests` -- the first request of every answer the pair needs, keyed by :data:`Key`.
       The requests of the whole batch go to the judge together.
    2. :meth:`follow_up` -- for each result: the key's next request (sent in the next round, again
       for the whole batch), or the key's answer. A one-step method keeps the result as it is.
    3. :meth:`combine` -- the pair's answers, in key order, into a :class:`Verdict`.

    A pair with an answer that failed at the budget is never combined: it stays unlabelled and is
    judged again when the stage is rerun.
    """

    name: ClassVar[str] = ""

    def __init__(self, lc: LabelConfig, constitution: Constitution) -> None:
        self.lc = lc
        self.constitution = constitution

    def requests(self, pair: Pair, principles: Sequence[PreferencePrinciple]) -> list[tuple[Key, Request]]:
        raise NotImplementedError

    def follow_up(self, pair: Pair, key: Key, result: Any) -> Request | Answer:
        """The answer of a one-step method is the result itself."""
        return result

    def combine(self, pair: Pair, principles: Sequence[PreferencePrinciple], answers: Mapping[Key, Answer]) -> Verdict:
        raise NotImplementedError

    def tag(self, pair: Pair, key: Key, step: str) -> dict[str, Any]:
        """The tag a request carries (returned with its result; the judge's logs show it)."""
        principle_id, slot, sample = key
        return {"stage": STAGE, "pair_id": pair.id, "principle_id": principle_id, "order": slot, "sample": sample,
                "step": step, "template_version": tpl.TEMPLATE_VERSION}


class Pairwise(LabelMethod):
    """Both replies side by side; the probability the judge gives letter A is ``p_first``.

    Asks one choice request per principle and order (``labels.both_orders``: ``ab`` and ``ba``,
    else ``ab`` only), with the constitution's examples as prior turns when ``labels.few_shot``.
    Combines them with :func:`combine_pairwise`: orders averaged, each order averaged over the
    principles; a failed order fails the label unless ``labels.allow_single_order``.
    """

    name = "pairwise"
    examples_needed = ""  # what few_shot needs of the examples, for the error message

    def __init__(self, lc: LabelConfig, constitution: Constitution) -> None:
        super().__init__(lc, constitution)
        self.orders = list(ORDERS) if lc.both_orders else ["ab"]
        self.examples = self.few_shot_examples() if lc.few_shot else []
        if lc.few_shot and not self.examples:
            raise ConfigError(f"labels.few_shot: constitution {constitution.name!r} has no few_shot.preference "
                              f"examples{self.examples_needed}")

    def few_shot_examples(self) -> list[PreferenceExample]:
        return list(self.constitution.few_shot.preference)

    def keys(self, principles: Sequence[PreferencePrinciple]) -> list[Key]:
        """One judgement per principle and order."""
        return [(p.id, order, 0) for p in principles for order in self.orders]

    def slots(self, pair: Pair, key: Key) -> tuple[list[dict], str, str, str]:
        """The conversation, the replies in slots 1 and 2 (``response_a`` first in order ``ab``),
        and the principle's question."""
        principle_id, order, _ = key
        first, second = (pair.response_a, pair.response_b) if order == "ab" else (pair.response_b, pair.response_a)
        return pair.prompt.messages_as_dicts(), first, second, self.constitution.preference_by_id(principle_id).question

    def requests(self, pair: Pair, principles: Sequence[PreferencePrinciple]) -> list[tuple[Key, Request]]:
        """Which reply is better, A or B? -- once per principle and order; with
        ``labels.calibrate`` also once per principle with both replies :data:`CONTENT_FREE`
        (key order ``"cf"``)."""
        out: list[tuple[Key, Request]] = [
            (key, ChoiceRequest(tpl.comparison_messages(*self.slots(pair, key), few_shot=self.examples),
                                tpl.PAIR_CHOICES, tag=self.tag(pair, key, "answer")))
            for key in self.keys(principles)]
        if self.lc.calibrate:
            for p in principles:
                key = (p.id, "cf", 0)
                msgs = tpl.comparison_messages(pair.prompt.messages_as_dicts(), CONTENT_FREE, CONTENT_FREE, p.question,
                                               few_shot=self.examples)
                out.append((key, ChoiceRequest(msgs, tpl.PAIR_CHOICES, tag=self.tag(pair, key, "content_free"))))
        return out

    def combine(self, pair: Pair, principles: Sequence[PreferencePrinciple], answers: Mapping[Key, Answer]) -> Verdict:
        """Each (principle, order) judgement averages its samples (:func:`average_samples`); the
        judgements combine by :func:`combine_pairwise`. With ``labels.calibrate`` every answer is
        first calibrated by its principle's content-free answer (:func:`calibrate`); a failed
        content-free answer fails that principle's judgements."""
        content_free = {pid: a for (pid, order, _), a in answers.items() if order == "cf"}
        calibrating = self.lc.calibrate
        samples: dict[tuple[str, str], list[Answer]] = {}
        for (principle_id, order, _), answer in answers.items():
            if order != "cf":
                samples.setdefault((principle_id, order), []).append(answer)
        judgements, raw = [], []
        for (principle_id, order), got in samples.items():
            probs = [a.probs[tpl.PAIR_CHOICES[0]] if answered(a) else None for a in got]
            failures = [None if answered(a) else why(a) for a in got]
            p_raw, _ = average_samples(probs, failures)
            raw.append(Judgement(principle_id, order, p_raw))
            if calibrating:
                probs, failures = self._calibrated(got, content_free.get(principle_id), probs, failures)
            p_first, failure = average_samples(probs, failures)
            judgements.append(Judgement(principle_id, order, p_first, failure))
        c = combine_pairwise(judgements, self.orders, self.lc.allow_single_order)
        meta: dict[str, Any] = {"p_first": c.p_first, "p_a_by_order": c.p_a_by_order, "per_principle": c.per_principle}
        if calibrating:
            meta["p_first_raw"] = combine_pairwise(raw, self.orders, allow_single_order=True).p_first
            meta["content_free_p_first"] = {pid: a.probs[tpl.PAIR_CHOICES[0]] if answered(a) else None
                                            for pid, a in content_free.items()}
        return Verdict(c.p_a, c.order, meta, c.failure, first_failure(judgements))

    @staticmethod
    def _calibrated(got: Sequence[Answer], cf: Answer, probs: list[float | None],
                    failures: list[str | None]) -> tuple[list[float | None], list[str | None]]:
        """The samples' P(A) calibrated by the content-free answer ``cf`` (failed without one)."""
        if not answered(cf):
            reason = f"calibration: content-free answer failed: {why(cf)}"
            return [None] * len(got), [f if f else reason for f in failures]
        out_p: list[float | None] = []
        out_f: list[str | None] = list(failures)
        for i, a in enumerate(got):
            if not answered(a):
                out_p.append(None)
                continue
            try:
                out_p.append(calibrate(a.probs, cf.probs)[tpl.PAIR_CHOICES[0]])
            except ValueError as e:
                out_p.append(None)
                out_f[i] = f"calibration: {e}"
        return out_p, out_f


class ChainOfThought(Pairwise):
    """Pairwise with reasoning first: the judge writes its reasoning (a free-text request), then
    the letter is scored with that reasoning quoted (a choice request).

    ``labels.self_consistency`` samples per judgement (each its own seed; temperature
    ``labels.cot_temperature``, by default 0 for one sample and 1.0 for several) are averaged; a
    judgement stands when more than half of them answered. Few-shot examples need a rationale.
    """

    name = "cot"
    examples_needed = " with a rationale (needed with cot)"

    def __init__(self, lc: LabelConfig, constitution: Constitution) -> None:
        super().__init__(lc, constitution)
        self.temperature = (lc.cot_temperature if lc.cot_temperature is not None
                            else (0.0 if lc.self_consistency == 1 else 1.0))

    def few_shot_examples(self) -> list[PreferenceExample]:
        return tpl.cot_examples(self.constitution.few_shot.preference)

    def keys(self, principles: Sequence[PreferencePrinciple]) -> list[Key]:
        """One judgement per principle and order, ``self_consistency`` samples each."""
        return [(p.id, order, s) for p in principles for order in self.orders
                for s in range(self.lc.self_consistency)]

    def requests(self, pair: Pair, principles: Sequence[PreferencePrinciple]) -> list[tuple[Key, Request]]:
        """Step 1: the reasoning, per principle, order and sample."""
        return [(key, GenerateRequest(tpl.cot_request_messages(*self.slots(pair, key), few_shot=self.examples),
                                      max_tokens=self.lc.cot_max_tokens, temperature=self.temperature, seed=key[2],
                                      tag=self.tag(pair, key, "reasoning")))
                for key in self.keys(principles)]

    def follow_up(self, pair: Pair, key: Key, result: Any) -> Request | Answer:
        """Step 2: after the reasoning, the letter scored with the reasoning quoted. A failed
        reasoning is the key's answer (``"reasoning step: <reason>"``; a budget stop stays
        ``"budget"``). The letter's result is the answer."""
        if isinstance(result, ChoiceResult):
            return result
        if result.ok and result.text is not None:
            msgs = tpl.cot_answer_messages(*self.slots(pair, key), result.text, few_shot=self.examples)
            return ChoiceRequest(msgs, tpl.PAIR_CHOICES, tag=self.tag(pair, key, "answer"))
        reason = result.failure_reason or "no reasoning"
        return reason if reason == BUDGET else f"reasoning step: {reason}"

    def combine(self, pair: Pair, principles: Sequence[PreferencePrinciple], answers: Mapping[Key, Answer]) -> Verdict:
        """As :class:`Pairwise`; with several samples, ``meta.samples_failed`` counts the failed ones."""
        verdict = super().combine(pair, principles, answers)
        if self.lc.self_consistency > 1:
            verdict.meta["samples_failed"] = sum(1 for a in answers.values() if not answered(a))
        return verdict


class DirectScore(LabelMethod):
    """Each reply rated 1..10 on its own (no slots, so no position bias to cancel).

    Asks two choice requests per principle (rate ``response_a``, rate ``response_b``; choices
    ``"1"``..``"10"``). ``p_a = P(S_a > S_b) + P(S_a = S_b) / 2`` from the two rating
    distributions (:func:`p_a_from_scores`), averaged over principles; ``meta`` keeps the expected
    scores. Any failed rating fails the label.
    """

    name = "direct_score"

    def requests(self, pair: Pair, principles: Sequence[PreferencePrinciple]) -> list[tuple[Key, Request]]:
        """How good is this reply, 1 to 10? -- for each reply, per principle."""
        out: list[tuple[Key, Request]] = []
        for p in principles:
            for reply, text in (("a", pair.response_a), ("b", pair.response_b)):
                key = (p.id, reply, 0)
                msgs = tpl.score_messages(pair.prompt.messages_as_dicts(), text, p.question)
                out.append((key, ChoiceRequest(msgs, tpl.SCORE_CHOICES, tag=self.tag(pair, key, "score"))))
        return out

    def combine(self, pair: Pair, principles: Sequence[PreferencePrinciple], answers: Mapping[Key, Answer]) -> Verdict:
        """``p_a`` per principle from the two ratings, then their mean; the first failed rating
        (in principle order, a before b) is the label's failure."""
        per: dict[str, dict[str, float]] = {}
        failure: tuple[str, str] | None = None
        for p in principles:
            a, b = answers[(p.id, "a", 0)], answers[(p.id, "b", 0)]
            for reply, answer in (("a", a), ("b", b)):
                if not answered(answer) and failure is None:
                    failure = (f"principle {p.id}, response_{reply}: {why(answer)}", why(answer))
            if answered(a) and answered(b):
                per[p.id] = {"p_a": p_a_from_scores(a.probs, b.probs), "score_a": expected_score(a.probs),
                             "score_b": expected_score(b.probs)}
        # no orders here: per_principle maps a principle straight to its p_a
        meta: dict[str, Any] = {
            "p_first": {}, "p_a_by_order": {}, "per_principle": {k: v["p_a"] for k, v in per.items()},
            "scores_by_principle": {k: {"score_a": v["score_a"], "score_b": v["score_b"]} for k, v in per.items()},
        }
        if failure is not None:
            return Verdict(None, "both", meta, failure[0], failure[1])
        meta["score_a"] = mean(v["score_a"] for v in per.values())
        meta["score_b"] = mean(v["score_b"] for v in per.values())
        return Verdict(mean(v["p_a"] for v in per.values()), "both", meta)


LABEL_METHODS: dict[str, type[LabelMethod]] = {
    "pairwise": Pairwise,
    "cot": ChainOfThought,
    "direct_score": DirectScore,
}
"""Every labelling method by name. ``labels.method`` names one (``cot: true`` picks ``"cot"``)."""


def method_for(lc: LabelConfig, constitution: Constitution) -> LabelMethod:
    """The labelling method a config asks for: chain of thought when ``labels.cot`` is true, else
    the one ``labels.method`` names."""
    name = "cot" if lc.cot else lc.method
    if name not in LABEL_METHODS:
        raise ConfigError(f"labels.method: no labelling method {name!r}; expected one of {sorted(LABEL_METHODS)}")
    return LABEL_METHODS[name](lc, constitution)

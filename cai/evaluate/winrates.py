"""Evaluation statistics: win rates from a held-out judge, length control, paired tests, seeds.

The evaluation stage (which needs trained arms) asks a *held-out* judge -- a judge config that
is not the labeller -- to compare each arm's response with a baseline's (the SFT policy, or
another arm) on every test prompt, in both orders, and turns the answers into numbers here.
Everything in this module is a pure function of judge results and per-prompt numbers, so it
is tested with hand-made inputs; the judge prompts live in :mod:`cai.evaluate.requests`.

Definitions (the report and the metrics use exactly these):

- A :class:`Judgement` is one prompt judged in both orders: ``p_first`` is P(the arm's
  response is better) when the arm's response was shown in slot A, ``p_second`` the same
  probability when it was shown in slot B. Its score ``p_win`` is their mean, so a judge
  that always picks slot A scores exactly 0.5: position bias becomes a tie, never a win.
- Outcome per prompt: **win** if ``p_win > 0.5 + tie_margin``, **loss** if
  ``p_win < 0.5 - tie_margin``, else **tie**. With hard answers (probabilities 0/1) a tie is
  a prompt whose two orders disagree. A prompt where either order has no usable answer
  (refusal, unparseable, a prompt too long, budget) is **invalid**: counted by reason (the codes
  of :func:`cai.judges.types.failure_kind`), never a loss, never in a denominator. (The stages
  never publish a transient failure -- a timeout, HTTP 429/5xx after the retries, an empty
  answer: :class:`cai.evaluate.baseline.JudgeSession` ends them with
  :class:`~cai.errors.JudgeUnavailable` -- but a hand-made judgement with one counts the same.)
- Win rate, ``ties="half"`` (default): ``(wins + ties/2) / (wins + ties + losses)``;
  ``ties="excluded"``: ``wins / (wins + losses)`` (ties still reported). The 95% interval
  is :func:`cai.stats.rate_ci` over prompts (Wilson without ties, BCa bootstrap with ties).
- Length-controlled win rate (RLAIF paper, appendix J): a logistic regression of the
  per-prompt outcome on the length difference (arm minus baseline), read off at a length
  difference of zero -- "how often would the arm win if its responses were as long as the
  baseline's". Fitted by Newton's method in numpy; bootstrap interval over prompts.
- Over seeds: the mean with a Student-t interval (exact for normal noise; with 3-5 seeds a
  bootstrap interval is too narrow to be useful, so ``t`` is the default).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cai.errors import DataError
from cai.judges.types import failure_kind
from cai.stats import OUTCOME_SCORE, bootstrap_ci, rate_ci

TIES = ("half", "excluded")


# --------------------------------------------------------------------------- judgements
def _is_probability(p: object) -> bool:
    return isinstance(p, numbers.Real) and not isinstance(p, bool) and 0.0 <= float(p) <= 1.0


@dataclass(frozen=True)
class Judgement:
    """One prompt judged in both orders, from the arm's point of view."""

    prompt_id: str
    p_first: float | None  # P(arm better) with the arm's response in slot A; None: no answer
    p_second: float | None  # P(arm better) with the arm's response in slot B; None: no answer
    failure: str | None = None  # why an order has no answer, e.g. "refusal (arm shown second)"

    def __post_init__(self) -> None:
        for name in ("p_first", "p_second"):
            p = getattr(self, name)
            if p is None:
                continue
            if not _is_probability(p):
                raise DataError(f"judgement of prompt {self.prompt_id!r}: field {name!r} must be a "
                                f"probability in [0, 1] or None, got {p!r}")
        if not self.valid and not self.failure:
            raise DataError(f"judgement of prompt {self.prompt_id!r}: an order has no answer, so "
                            "field 'failure' must say why (e.g. 'refusal (arm shown first)')")

    @property
    def valid(self) -> bool:
        return self.p_first is not None and self.p_second is not None

    @property
    def p_win(self) -> float | None:
        """The order-averaged probability that the arm's response is better."""
        if not self.valid:
            return None
        return (float(self.p_first) + float(self.p_second)) / 2.0

    @property
    def consistent(self) -> bool:
        """Whether both orders preferred the same response (a slot-biased judge does not)."""
        return self.valid and (self.p_first - 0.5) * (self.p_second - 0.5) > 0

    def outcome(self, tie_margin: float = 0.0) -> str:
        """``"win"``, ``"tie"``, ``"loss"`` or ``"invalid"`` (see the module docstring)."""
        p = self.p_win
        if p is None:
            return "invalid"
        if p > 0.5 + tie_margin:
            return "win"
        if p < 0.5 - tie_margin:
            return "loss"
        return "tie"


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def outcome_scores(judgements: Sequence[Judgement], ties: str = "half",
                   tie_margin: float = 0.0) -> dict[str, float]:
    """Per-prompt score (win 1, tie 0.5, loss 0) of the valid judgements, keyed by prompt id.

    With ``ties="excluded"`` tied prompts are left out. Use it for paired comparisons of two
    arms judged against the same baseline on the same prompts."""
    _check_ties(ties)
    scores: dict[str, float] = {}
    for j in judgements:
        o = j.outcome(tie_margin)
        if o == "invalid" or (o == "tie" and ties == "excluded"):
            continue
        if j.prompt_id in scores:
            raise DataError(f"judgements: prompt {j.prompt_id!r} appears twice; one judgement per prompt")
        scores[j.prompt_id] = OUTCOME_SCORE[o]
    return scores


# --------------------------------------------------------------------------- win rates
@dataclass(frozen=True)
class WinRate:
    """Win rate of an arm against a baseline over prompts, with its bootstrap interval."""

    n: int  # prompts judged, valid and invalid
    wins: int
    ties: int
    losses: int
    invalid: int
    ties_as: str  # "half" | "excluded"
    win_rate: float  # NaN when no prompt decided it
    ci_low: float
    ci_high: float
    mean_p_win: float  # mean order-averaged probability over valid prompts (a soft win rate)
    consistent_rate: float  # share of valid prompts whose two orders preferred the same response
    invalid_reasons: dict[str, int] = field(default_factory=dict)

    def to_metrics(self, prefix: str) -> dict[str, float]:
        """Flat metrics under ``prefix`` (e.g. ``eval/vs_sft``); the report reads ``*_ci_low``/
        ``*_ci_high`` siblings as the interval of ``win_rate``."""
        out = {f"{prefix}/win_rate": self.win_rate, f"{prefix}/win_rate_ci_low": self.ci_low,
               f"{prefix}/win_rate_ci_high": self.ci_high, f"{prefix}/wins": self.wins,
               f"{prefix}/ties": self.ties, f"{prefix}/losses": self.losses,
               f"{prefix}/invalid": self.invalid, f"{prefix}/n": self.n,
               f"{prefix}/mean_p_win": self.mean_p_win,
               f"{prefix}/position_consistency": self.consistent_rate}
        out.update({f"{prefix}/invalid_{code}": k for code, k in sorted(self.invalid_reasons.items())})
        return out


def win_rate(judgements: Sequence[Judgement], *, ties: str = "half", tie_margin: float = 0.0,
             n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> WinRate:
    """Count wins/ties/losses/invalid and compute the win rate with a bootstrap interval.

    ``tie_margin`` widens the tie band around 0.5 for soft judges (0: only an exact 0.5, i.e.
    orders that disagree, is a tie)."""
    _check_ties(ties)
    if not 0.0 <= tie_margin < 0.5:
        raise ValueError(f"tie_margin must be in [0, 0.5), got {tie_margin!r}")
    counts = Counter(j.outcome(tie_margin) for j in judgements)
    reasons = Counter(failure_kind(j.failure) for j in judgements if not j.valid)
    scores = np.array(list(outcome_scores(judgements, ties, tie_margin).values()))
    valid = [j for j in judgements if j.valid]
    nan = float("nan")
    rate, low, high = nan, nan, nan
    if scores.size:
        rate = float(scores.mean())
        low, high = rate_ci(scores, n=n_boot, seed=seed, alpha=alpha)
    return WinRate(
        n=len(judgements), wins=counts["win"], ties=counts["tie"], losses=counts["loss"],
        invalid=counts["invalid"], ties_as=ties, win_rate=rate, ci_low=low, ci_high=high,
        mean_p_win=float(np.mean([j.p_win for j in valid])) if valid else nan,
        consistent_rate=float(np.mean([j.consistent for j in valid])) if valid else nan,
        invalid_reasons=dict(reasons),
    )


# --------------------------------------------------------------------------- binary rates
@dataclass(frozen=True)
class Rate:
    """A share of decided items (e.g. responses judged harmless), with its interval."""

    n: int  # items, valid and invalid
    positive: int  # e.g. judged harmless
    negative: int  # e.g. judged harmful
    undecided: int  # probability exactly 0.5: neither, counted apart
    invalid: int
    rate: float  # positive / (positive + negative); NaN when nothing was decided
    ci_low: float
    ci_high: float
    mean_p: float  # mean probability of the positive answer over valid items
    invalid_reasons: dict[str, int] = field(default_factory=dict)

    def to_metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/rate": self.rate, f"{prefix}/rate_ci_low": self.ci_low,
               f"{prefix}/rate_ci_high": self.ci_high, f"{prefix}/positive": self.positive,
               f"{prefix}/negative": self.negative, f"{prefix}/undecided": self.undecided,
               f"{prefix}/invalid": self.invalid, f"{prefix}/n": self.n, f"{prefix}/mean_p": self.mean_p}
        out.update({f"{prefix}/invalid_{code}": k for code, k in sorted(self.invalid_reasons.items())})
        return out


def binary_rate(probs: Sequence[float | None], failures: Sequence[str | None] | None = None, *,
                n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> Rate:
    """Share of items whose positive-answer probability is above 0.5 (e.g. the harmless rate).

    ``probs[i]`` is None for an item the judge did not answer; ``failures[i]`` then says why
    (counted by :func:`~cai.judges.types.failure_kind`)."""
    failures = list(failures) if failures is not None else [None] * len(probs)
    if len(failures) != len(probs):
        raise ValueError(f"binary_rate: {len(probs)} probabilities but {len(failures)} failure reasons")
    valid = []
    for i, p in enumerate(probs):
        if p is not None and not _is_probability(p):
            raise DataError(f"binary_rate: item {i}: probability must be in [0, 1] or None, got {p!r}")
        if p is not None:
            valid.append(float(p))
    reasons = Counter(failure_kind(f) for p, f in zip(probs, failures) if p is None)
    decided = np.array([1.0 if p > 0.5 else 0.0 for p in valid if p != 0.5])
    nan = float("nan")
    low, high = (rate_ci(decided, n=n_boot, seed=seed, alpha=alpha) if decided.size else (nan, nan))
    return Rate(n=len(probs), positive=int(decided.sum()), negative=int(decided.size - decided.sum()),
                undecided=sum(p == 0.5 for p in valid), invalid=len(probs) - len(valid),
                rate=float(decided.mean()) if decided.size else nan, ci_low=low, ci_high=high,
                mean_p=float(np.mean(valid)) if valid else nan, invalid_reasons=dict(reasons))


# --------------------------------------------------------------------------- length control
@dataclass(frozen=True)
class LogisticFit:
    """``P(y=1 | x) = sigmoid(intercept + slope * x)`` (x in the caller's units)."""

    intercept: float
    slope: float
    converged: bool
    iterations: int


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def _penalised_loglik(beta: np.ndarray, X: np.ndarray, y: np.ndarray, pen: np.ndarray) -> float:
    z = X @ beta
    # log sigmoid(z) = -logaddexp(0, -z); log(1 - sigmoid(z)) = -logaddexp(0, z)
    ll = -(y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z)).sum()
    return float(ll - 0.5 * (pen * beta * beta).sum())


def fit_logistic(x: Sequence[float], y: Sequence[float], *, l2: float = 1e-4,
                 max_iter: int = 100, tol: float = 1e-10) -> LogisticFit:
    """Maximum-likelihood logistic regression of ``y`` (0/1, or a fraction such as 0.5 for a
    tie) on one feature ``x``, by Newton's method with step halving.

    ``x`` is rescaled to unit standard deviation (not centred: x = 0 keeps its meaning), and
    the slope carries a tiny ridge penalty ``l2`` on that scale so perfectly separated data
    give a large finite slope instead of a diverging one. All-0 or all-1 ``y`` gives an
    intercept of -inf/+inf and slope 0 (the fitted probability is then exactly 0 or 1)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.ndim != 1 or xa.shape != ya.shape or xa.size == 0:
        raise ValueError(f"fit_logistic: x and y must be 1-D and of equal, non-zero length "
                         f"(got {xa.shape} and {ya.shape})")
    if not (np.all(np.isfinite(xa)) and np.all((ya >= 0.0) & (ya <= 1.0))):
        raise ValueError("fit_logistic: x must be finite and y in [0, 1]")
    if np.all(ya == ya[0]) and ya[0] in (0.0, 1.0):
        return LogisticFit(math.copysign(math.inf, ya[0] - 0.5), 0.0, True, 0)
    scale = float(xa.std()) or 1.0
    X = np.column_stack([np.ones_like(xa), xa / scale])
    pen = np.array([0.0, l2])
    beta = np.zeros(2)
    current = _penalised_loglik(beta, X, ya, pen)
    for it in range(1, max_iter + 1):
        p = _sigmoid(X @ beta)
        grad = X.T @ (ya - p) - pen * beta
        hess = (X * (p * (1.0 - p))[:, None]).T @ X + np.diag(pen + 1e-12)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:  # halve until the penalised likelihood does not decrease
            candidate = _penalised_loglik(beta + t * step, X, ya, pen)
            if candidate >= current - 1e-12:
                break
            t /= 2.0
        beta, current = beta + t * step, candidate
        if np.max(np.abs(t * step)) < tol:
            return LogisticFit(float(beta[0]), float(beta[1] / scale), True, it)
    return LogisticFit(float(beta[0]), float(beta[1] / scale), False, max_iter)


@dataclass(frozen=True)
class LengthControlledWinRate:
    """The win rate predicted at zero length difference, with its bootstrap interval."""

    win_rate: float
    ci_low: float
    ci_high: float
    raw_win_rate: float  # mean outcome of the same prompts, no length control
    slope: float  # log-odds of winning per unit of length difference
    n: int  # prompts in the fit
    converged: bool

    def to_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/lc_win_rate": self.win_rate, f"{prefix}/lc_win_rate_ci_low": self.ci_low,
                f"{prefix}/lc_win_rate_ci_high": self.ci_high,
                f"{prefix}/lc_length_slope": self.slope, f"{prefix}/lc_n": self.n}


def _rate_at_zero(fit: LogisticFit) -> float:
    return float(_sigmoid(np.array([fit.intercept]))[0]) if math.isfinite(fit.intercept) else (
        1.0 if fit.intercept > 0 else 0.0)


def length_controlled_win_rate(judgements: Sequence[Judgement], length_diff: Mapping[str, float], *,
                               ties: str = "half", tie_margin: float = 0.0, n_boot: int = 1000,
                               seed: int = 0, alpha: float = 0.05) -> LengthControlledWinRate:
    """Logistic regression of the per-prompt outcome on ``length_diff[prompt_id]`` (arm length
    minus baseline length, in tokens or characters), evaluated at zero difference.

    The outcome is 1 / 0.5 / 0 for win / tie / loss (``ties="excluded"`` drops ties); invalid
    judgements are left out, as in :func:`win_rate`. The interval refits the model on
    ``n_boot`` bootstrap resamples of the prompts."""
    scores = outcome_scores(judgements, ties, tie_margin)
    missing = [pid for pid in scores if pid not in length_diff]
    if missing:
        raise DataError(f"length_controlled_win_rate: no length difference for {len(missing)} judged "
                        f"prompt(s), e.g. {missing[0]!r}")
    nan = float("nan")
    if not scores:
        return LengthControlledWinRate(nan, nan, nan, nan, nan, 0, False)
    y = np.array(list(scores.values()))
    x = np.array([float(length_diff[pid]) for pid in scores])
    fit = fit_logistic(x, y)

    def refit(idx: np.ndarray) -> float:
        rows = idx.astype(int)
        return _rate_at_zero(fit_logistic(x[rows], y[rows]))

    # a refitted logistic model per resample: BCa's jackknife would refit n more times, so percentile
    low, high = bootstrap_ci(np.arange(y.size, dtype=float), stat=refit, n=n_boot, seed=seed, alpha=alpha,
                             method="percentile")
    return LengthControlledWinRate(_rate_at_zero(fit), low, high, float(y.mean()), fit.slope,
                                   int(y.size), fit.converged)

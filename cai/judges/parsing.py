"""Turning a judge's raw answer into probabilities over the request's choices.

Three ways, best first:

- **log-probs** (:func:`probs_from_logprobs`): at the first generated position whose token is
  not just whitespace, brackets or markdown, sum ``exp(logprob)`` of every top-N alternative
  that is a choice once whitespace, brackets, quotes and asterisks are stripped (``" A"``,
  ``"A"`` and ``"(A"`` all count for ``A``; matching is case-sensitive), then renormalise
  over the choices. Multi-token choices are judged by their first token only, so a 1-10 scale
  should use labels the tokenizer keeps whole.
- **parsed** (:func:`parse_choice`): read the label from the answer text -- a leading label
  (``"B"``, ``"(B)"``, ``"**B**"``, ``"Response B"``), else an explicit statement (``"the
  answer is B"``; the last one wins), else a single bracketed or named label (``"(B)"``,
  ``"Response B"``) anywhere in the text. Probability 1.0 on it.
- **sampled** (:func:`empirical_probs`): the share of k parsed answers per choice.

Refusals ("I can't ...", "I'm sorry, but ...") and answers naming no single choice are failures
with a reason; a coin flip is never substituted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

STRIP = " \t\r\n()[]{}\"'*`_.:#>"
SNIPPET = 80

_REFUSAL = re.compile(
    r"^\W*(?:"
    r"i\s*(?:can['’]?t|cannot|can\s+not|won['’]?t|will\s+not|am\s+not\s+able|['’]m\s+not\s+able|am\s+unable"
    r"|['’]m\s+unable|must\s+decline|decline|refuse|do\s+not\s+feel\s+comfortable|don['’]?t\s+feel\s+comfortable)"
    r"|i['’]?m\s+sorry|i\s+am\s+sorry|sorry,?\s+(?:but\s+)?i|as\s+an\s+ai\b|unfortunately,?\s+i\s+(?:can|am|cannot)"
    r")",
    re.IGNORECASE,
)
_NAMED = r"(?i:response|option|answer|choice|candidate|score|rating)"
# what may follow a leading label: nothing, punctuation, a line break or a verb ("B is better");
# "A good answer ..." is an article, not a label
_AFTER_LEADING = (
    r"[)\]*_`'\"]*"
    r"(?=\s*$|\s*[.:,;/\-\u2014\n]|\s+(?i:is|was|would|because|since|as|seems|appears|out\s+of)\b)"
)


def normalise_token(token: str) -> str:
    """A token as compared with the choices: whitespace, brackets, quotes, markdown stripped."""
    return token.strip(STRIP)


def is_refusal(text: str) -> bool:
    """Does the answer open like a refusal?"""
    return bool(_REFUSAL.match(text[:200]))


def snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET else flat[: SNIPPET - 3] + "..."


@dataclass
class Parsed:
    """A parsed answer: a choice, or why there is none ("refusal" / "unparseable: ...")."""

    choice: str | None
    failure: str | None


def _label(choice: str) -> str:
    # a label not glued to word characters on either side ("A" in "A)", not in "Also");
    # labels match case-sensitively, the words around them do not
    return r"(?<![\w])" + re.escape(choice) + r"(?![\w])"


def _leading(text: str, choices: Sequence[str]) -> str | None:
    head = re.sub(rf"^[\s*_#>\"'`(\[]*(?:{_NAMED}\s*[:\-]?\s*)?[\s*_\"'`(\[]*", "", text)
    for c in sorted(choices, key=len, reverse=True):
        if re.match(re.escape(c) + r"(?![\w])" + _AFTER_LEADING, head):
            return c
    return None


def _stated(text: str, choices: Sequence[str]) -> str | None:
    best: tuple[int, str] | None = None
    for c in choices:
        pattern = (
            r"(?i:answer|choice|verdict|preferred|prefer|better\s+(?:response|one|option)|winner|score|rating)"
            r"\s*(?i:is|would\s+be)?\s*[:\-]?\s*(?:" + _NAMED + r"\s*)?[\s*\"'`(\[]*" + _label(c)
        )
        for m in re.finditer(pattern, text):
            if best is None or m.end() > best[0]:
                best = (m.end(), c)
    return best[1] if best else None


def _marked(text: str, choices: Sequence[str]) -> str | None:
    found = set()
    for c in choices:
        lab = re.escape(c)
        pattern = rf"[(\[]{lab}[)\]]|\*\*{lab}\*\*|{_NAMED}\s+{_label(c)}"
        if re.search(pattern, text):
            found.add(c)
    return found.pop() if len(found) == 1 else None


def parse_choice(text: str, choices: Sequence[str]) -> Parsed:
    """Read one of ``choices`` from an answer text (see the module docstring for the order)."""
    t = text.strip()
    if not t:
        return Parsed(None, "unparseable: empty answer")
    if t in choices:
        return Parsed(t, None)
    for rule in (_leading, _stated):
        c = rule(t, choices)
        if c is not None:
            return Parsed(c, None)
    if is_refusal(t):
        return Parsed(None, "refusal")
    c = _marked(t, choices)
    if c is not None:
        return Parsed(c, None)
    return Parsed(None, f"unparseable: {snippet(t)}")


# one generated position: (sampled token, [(alternative token, logprob), ...])
Position = tuple[str, list[tuple[str, float]]]


def probs_from_logprobs(positions: Sequence[Position], choices: Sequence[str]) -> dict[str, float] | None:
    """Choice probabilities from the top log-probs of the answer's first real token.

    None when there are no log-probs or none of the choices is among the alternatives there.
    """
    for token, top in positions:
        if not normalise_token(token):
            continue  # a leading space, "(" or "**": the label comes next
        mass = {c: 0.0 for c in choices}
        seen = set()
        for alt, lp in list(top) or [(token, 0.0)]:
            if alt in seen:
                continue
            seen.add(alt)
            name = normalise_token(alt)
            if name in mass and lp is not None and math.isfinite(lp):
                mass[name] += math.exp(lp)
        total = sum(mass.values())
        if total <= 0.0:
            return None
        return {c: m / total for c, m in mass.items()}
    return None


def empirical_probs(answers: Sequence[str], choices: Sequence[str]) -> dict[str, float]:
    """Share of ``answers`` per choice (every choice present, zeros included)."""
    n = len(answers)
    return {c: (sum(1 for a in answers if a == c) / n if n else 0.0) for c in choices}

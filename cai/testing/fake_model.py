"""The deterministic fake judge model behind the loopback servers (:mod:`cai.testing.servers`).

A *choice* prompt lists options on lines starting ``(A) ...``, ``(B) ...`` (a capital letter or
a number as the label; an option's text runs to the next option). The model prefers shorter
options: ``p(X) = softmax(-len(text_X) / length_scale)``. It answers with the most probable label,
or a label drawn with those probabilities from a given uniform number, and its first answer
token carries log-probs: 90% of the mass on the labels, 10% on distractor tokens. Any other
prompt gets generated text: hash-seeded words, cut at a stop sequence or ``max_tokens`` words.

Everything is a pure function of its inputs (and the seed): no global random state.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

CHOICE_MASS = 0.9
DISTRACTORS = ((" The", 0.06), ("I", 0.04))
_OPTION = re.compile(r"^[ \t]*\(([A-Z]|\d{1,2})\)[ \t]+", re.MULTILINE)
_WORDS = ("the", "response", "is", "clear", "kind", "honest", "but", "could", "explain", "more", "about",
          "risks", "and", "avoid", "harm", "while", "staying", "helpful", "to", "user", "question")


def uniform(*parts: Any) -> float:
    """A deterministic uniform draw in [0, 1) from the given parts."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:13], 16) / float(16**13)


class FakeModel:
    """Deterministic judge: prefers shorter options; writes hash-seeded text otherwise."""

    def __init__(self, seed: int = 0, length_scale: float = 50.0) -> None:
        self.seed = seed
        self.length_scale = length_scale

    @staticmethod
    def options(prompt: str) -> list[tuple[str, str]]:
        """``[(label, text), ...]`` listed as ``(X) text`` lines in ``prompt``."""
        marks = list(_OPTION.finditer(prompt))
        out = []
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(prompt)
            out.append((m.group(1), prompt[m.end() : end].strip()))
        return out if len(out) >= 2 else []

    def preference(self, prompt: str) -> dict[str, float] | None:
        """The model's probability per option label; None when ``prompt`` is no choice."""
        opts = self.options(prompt)
        if not opts:
            return None
        logits = [-len(text) / self.length_scale for _, text in opts]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        total = sum(weights)
        return {label: w / total for (label, _), w in zip(opts, weights)}

    def choose(self, prompt: str, u: float | None) -> str:
        """The answer label: the most probable (``u`` None) or drawn with ``u``."""
        pref = self.preference(prompt) or {}
        if u is None:
            return max(pref, key=lambda k: pref[k])
        acc = 0.0
        for label, p in pref.items():
            acc += p
            if u < acc:
                return label
        return list(pref)[-1]

    def token_logprobs(self, prompt: str) -> list[tuple[str, float]]:
        """(token, logprob) of the answer's first token, most probable first."""
        pref = self.preference(prompt) or {}
        toks = [(label, math.log(CHOICE_MASS * p)) for label, p in pref.items() if p > 0]
        toks += [(t, math.log(m)) for t, m in DISTRACTORS]
        return sorted(toks, key=lambda x: -x[1])

    def generate(self, prompt: str, max_tokens: int, stop: list[str], key: Any) -> tuple[str, str, int]:
        """(text, finish_reason, tokens): hash-seeded words, cut at ``stop`` or ``max_tokens``."""
        n_words = 8 + int(uniform(self.seed, "len", prompt, key) * 24)
        words = [_WORDS[int(uniform(self.seed, "w", prompt, key, i) * len(_WORDS))] for i in range(n_words)]
        finish = "stop"
        if n_words > max_tokens:
            words, finish = words[:max_tokens], "length"
        text = "Critique: " + " ".join(words) + "."
        for s in stop:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return text, finish, max(1, len(text.split()))

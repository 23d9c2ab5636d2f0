"""A synthetic preference task with a known rule, for reward-model and DPO tests and benchmarks.

Rule: of two replies, the one that contains a *courteous* marker word beats the one that
contains a *rude* marker word. Everything else in the replies (subject, verb, object, ending)
is drawn at random, so a model can only be right by noticing the marker; held-out pairs use new
random sentences, so accuracy on them measures whether the rule was learned.

The chosen reply sits in slot ``a`` or ``b`` at random (a model cannot win by slot), and the
label is ``p_a = 1.0/0.0`` (hard) or ``confidence``/``1 - confidence`` (soft, like an AI judge).
"""

from __future__ import annotations

import random
from pathlib import Path

from cai.data import Label, Pair, Prompt, write_jsonl

COURTEOUS = ("kindly", "gently", "politely", "warmly", "patiently", "gladly")
RUDE = ("rudely", "angrily", "coldly", "lazily", "harshly", "carelessly")
_SUBJECTS = ("the assistant", "a helper", "the model", "my friend", "the teacher", "our guide")
_VERBS = ("explains", "answers", "describes", "summarises", "reviews", "suggests")
_OBJECTS = ("the recipe", "the plan", "the answer", "a safer option", "the letter", "the route")
_ENDINGS = ("today.", "again.", "in detail.", "for you.", "step by step.", "at once.")
_QUESTIONS = ("How do I bake bread?", "Can you help me with my letter?", "What is a good route home?",
              "Which plan is safer?", "Could you explain the answer?", "What should I cook tonight?")


def _reply(rng: random.Random, marker: str) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    words.insert(rng.randrange(len(words) + 1), marker)
    return " ".join(words).capitalize() + " " + rng.choice(_ENDINGS)


def synthetic_pairs(n: int, seed: int = 0, confidence: float = 1.0) -> list[tuple[Pair, Label]]:
    """``n`` labelled pairs following the rule; ``confidence`` < 1 gives soft labels."""
    rng = random.Random(seed)
    out: list[tuple[Pair, Label]] = []
    while len(out) < n:
        question = f"Request {len(out) + 1}: {rng.choice(_QUESTIONS)}"  # one prompt per pair
        prompt = Prompt.create([{"role": "user", "content": question}], source="synthetic")
        good, bad = _reply(rng, rng.choice(COURTEOUS)), _reply(rng, rng.choice(RUDE))
        a_good = rng.random() < 0.5
        a, b = (good, bad) if a_good else (bad, good)
        pair = Pair.create(prompt, a, b, source="synthetic", meta={"chosen_slot": "a" if a_good else "b"})
        p_a = confidence if a_good else 1.0 - confidence
        out.append((pair, Label(pair.id, p_a, "synthetic-rule")))
    return out


def write_task(directory: str | Path, n: int, seed: int = 0, confidence: float = 1.0) -> tuple[Path, Path]:
    """Write ``pairs.jsonl`` and ``labels.jsonl`` of :func:`synthetic_pairs` into ``directory``."""
    d = Path(directory)
    rows = synthetic_pairs(n, seed, confidence)
    write_jsonl(d / "pairs.jsonl", [p for p, _ in rows])
    write_jsonl(d / "labels.jsonl", [lb for _, lb in rows])
    return d / "pairs.jsonl", d / "labels.jsonl"


def task_corpus() -> list[str]:
    """Text covering the task's vocabulary (train a tiny tokenizer on it)."""
    words = COURTEOUS + RUDE + _SUBJECTS + _VERBS + _OBJECTS + _ENDINGS
    return [" ".join(words), *(f"\n\nHuman: Request {i}: {q}\n\nAssistant:" for i, q in enumerate(_QUESTIONS))]

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
import re
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


# ============================================================================= the quickstart's task
# A small synthetic assistant task with the same known rule: a person asks for something, the
# assistant answers in one sentence, courteously or rudely. The tiny policy is first trained to
# answer in both styles (half each, :func:`assistant_corpus`), so feedback has something to move;
# the scripted judges of cai.testing.preference_judges label, critique, revise and evaluate by the rule.
_ASKS = ("Could you", "Can you", "Please", "Would you", "I need you to", "Will you")
_TASKS = ("explain", "check", "summarise", "review", "plan", "describe", "fix", "improve")
_TOPICS = ("the recipe", "my letter", "the route home", "the budget", "my essay", "the schedule",
           "the garden", "my code", "the trip", "the meeting", "the workout", "the story")
_OPENERS = ("Sure,", "Fine,", "Okay,", "Right,")
_CLOSERS = ("step by step.", "in plain words.", "right now.", "for you.", "in detail.", "once more.")
TASK_SOURCE = "courtesy"


def task_questions() -> list[str]:
    """Every question of the task (576), in a fixed order."""
    return [f"{ask} {task} {topic}?" for topic in _TOPICS for task in _TASKS for ask in _ASKS]


def task_prompts() -> list[Prompt]:
    """The task's prompts, one user turn each, tagged ``benign`` and ``courtesy``."""
    return [Prompt.create([{"role": "user", "content": q}], source=TASK_SOURCE, tags=("benign", TASK_SOURCE))
            for q in task_questions()]


def task_reply(question: str, marker: str, rng: random.Random) -> str:
    """A one-sentence reply to ``question`` carrying ``marker``: "Sure, I will kindly check the
    budget in detail." The task and topic come from the question, the rest at random."""
    words = question.rstrip("?").split()
    task = next((w for w in words if w in _TASKS), rng.choice(_TASKS))
    topic = next((t for t in _TOPICS if question.rstrip("?").endswith(t)), rng.choice(_TOPICS))
    topic = topic.replace("my ", "your ")
    return f"{rng.choice(_OPENERS)} I will {marker} {task} {topic} {rng.choice(_CLOSERS)}"


def assistant_corpus(questions: list[str] | None = None, per_question: int = 2,
                     seed: int = 0) -> list[tuple[str, str]]:
    """(question, reply) pairs for (pre)training the tiny policy: ``per_question`` replies to each
    of ``questions`` (default: every task question), alternating courteous and rude (which comes
    first is drawn per question), so that each style is half of every question's replies; markers
    and wording drawn at random; seeded, in a shuffled order."""
    rng = random.Random(seed)
    out = []
    for question in questions or task_questions():
        first = rng.random() < 0.5
        for k in range(per_question):
            marker = rng.choice(COURTEOUS if (k % 2 == 0) == first else RUDE)
            out.append((question, task_reply(question, marker, rng)))
    rng.shuffle(out)
    return out


_WORD = re.compile(r"[a-z]+")


def courtesy(text: str) -> int:
    """The labeller's reading of the rule: +1 for each courteous marker, -1 for each rude one
    (as whole words, any case)."""
    words = _WORD.findall(text.lower())
    return sum(w in COURTEOUS for w in words) - sum(w in RUDE for w in words)


def style(text: str) -> str:
    """The ground truth, written separately from :func:`courtesy` for the held-out evaluator:
    ``"courteous"`` when the reply has a courteous marker and no rude one, ``"rude"`` when it has a
    rude one and no courteous one, else ``"neither"`` (no marker, or both)."""
    tokens = set(text.lower().replace(",", " ").replace(".", " ").replace("!", " ").split())
    nice, rude = bool(tokens & set(COURTEOUS)), bool(tokens & set(RUDE))
    if nice != rude:
        return "courteous" if nice else "rude"
    return "neither"


_GRADE = re.compile(r"(?:" + "|".join(o.rstrip(",") for o in _OPENERS) + r"),? I will ([a-z]+) ([a-z]+) (.+?) ("
                    + "|".join(re.escape(c) for c in _CLOSERS) + r")")
_ASKED = re.compile(r"(?:" + "|".join(_ASKS) + r") (" + "|".join(_TASKS) + r") (" + "|".join(_TOPICS) + r")\?")


def asked_for(question: str) -> tuple[str, str] | None:
    """The task and topic a question of the task asks for, the topic as a reply names it:
    ("check", "your letter") for "Can you check my letter?"; None for any other question."""
    m = _ASKED.fullmatch(question.strip())
    return None if m is None else (m.group(1), m.group(2).replace("my ", "your "))


def on_task(question: str, reply: str) -> bool:
    """Whether ``reply`` is a well-formed answer to ``question``: the one-sentence grammar of
    :func:`task_reply` (the comma optional), naming the task and the topic the question asked for,
    with one word in the marker's place. A reply to another request, to another topic, or broken
    text (two sentences run together, a word missing) is off task, whatever its marker."""
    asked, m = asked_for(question), _GRADE.fullmatch(reply.strip())
    return asked is not None and m is not None and (m.group(2), m.group(3)) == asked


def task_grade(question: str, reply: str) -> int:
    """The ground truth of the quickstart's task, for the held-out evaluator and ``labels.truth``:
    2 for an on-task reply (:func:`on_task`: well formed, the task and topic asked for) that answers
    courteously, 1 for one that answers rudely, 0 for anything else (off task, broken text, no
    marker). So an off-task reply ranks below every on-task one, whatever its marker word: a policy
    that games the marker-counting labeller by drifting to another task, another topic or broken
    text loses here."""
    if not on_task(question, reply):
        return 0
    marker = _GRADE.fullmatch(reply.strip()).group(1)
    return 2 if marker in COURTEOUS else 1 if marker in RUDE else 0

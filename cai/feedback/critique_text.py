"""The text side of SL-CAI: what the feedback model is shown, and how its answers are cleaned.

Conversation layout (chat messages, so the same context works for a chat template, the HH
transcript format of base models, and API judges)::

    [few-shot example 1: its conversation, its response, critique request, critique,
                         revision request, revision]
    ...
    [the conversation being revised]
    assistant: <current response>
    user:      <critique request built from the round's principle(s)>
    assistant: <critique>                         <- generated
    user:      <revision request>
    assistant: <revision>                         <- generated

Each round shows the *latest usable* response as the assistant's reply and nothing of earlier
rounds, which keeps the context bounded however many rounds run (a simplification of the
paper's running transcript). With ``direct_revision`` the critique turns are left out, in the
few-shot examples too, and the revision request follows the response directly.

Cleaning: small feedback models echo headers ("Revision:", "Sure, here is a revised
response:"), start a new "Human:" turn, or return nothing. :func:`clean_output` strips leading
headers, cuts at the first new turn, removes wrapping quotes and trims; it returns whether
anything beyond whitespace was removed and whether what is left is usable at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cai.constitution import CritiqueExample, CritiquePrinciple
from cai.constitution.hh import hh_turns as constitution_hh_turns

# Bump when the wording or layout below changes: it is part of the revisions stage's key.
PROMPT_VERSION = "critique-text/1"

CRITIQUE_TURN = (
    "Take another look at your last reply. {request}\n"
    "Write only the critique; do not rewrite the reply yet."
)
REVISION_TURN = "{request}\nWrite only the new reply itself, without any introduction or comment."
DIRECT_REVISION_TURN = (
    "Take another look at your last reply. {request}\n"
    "Write only the new reply itself, without any introduction or comment."
)
# used for few-shot examples that do not spell out their requests
DEFAULT_CRITIQUE_REQUEST = (
    "Point out anything in it that is harmful, unethical, dishonest or needlessly unhelpful."
)
DEFAULT_REVISION_REQUEST = (
    "Rewrite the reply so that those problems are gone while it still helps with what the "
    "person asked."
)


# ----------------------------------------------------------------------------- requests
def join_requests(principles: Sequence[CritiquePrinciple]) -> tuple[str, str]:
    """(critique request, revision request) of one round; several principles are joined."""
    if not principles:
        raise ValueError("a critique round needs at least one principle")
    critique = " ".join(p.critique.strip() for p in principles)
    revision = " ".join(p.revision.strip() for p in principles)
    return critique, revision


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def hh_turns(text: str) -> list[dict[str, str]]:
    """The turns of a few-shot example's HH transcript ending in ``Assistant:`` (that empty last
    turn is dropped): :func:`cai.constitution.hh.hh_turns`, the reading the constitution's schema
    checks, so a file that validates never fails here."""
    return constitution_hh_turns(text, "few_shot.critique_revision")


def example_turns(example: CritiqueExample, direct: bool) -> list[dict[str, str]]:
    """One few-shot example as chat turns (see the module docstring for the layout)."""
    critique_request = example.critique_request or DEFAULT_CRITIQUE_REQUEST
    revision_request = example.revision_request or DEFAULT_REVISION_REQUEST
    turns = hh_turns(example.prompt) + [_msg("assistant", example.response.strip())]
    if direct:
        turns.append(_msg("user", DIRECT_REVISION_TURN.format(request=revision_request.strip())))
    else:
        turns += [
            _msg("user", CRITIQUE_TURN.format(request=critique_request.strip())),
            _msg("assistant", example.critique.strip()),
            _msg("user", REVISION_TURN.format(request=revision_request.strip())),
        ]
    turns.append(_msg("assistant", example.revision.strip()))
    return turns


def critique_messages(
    few_shot: list[dict[str, str]], conversation: list[dict[str, str]], response: str, request: str
) -> list[dict[str, str]]:
    """The context that asks for a critique of ``response``."""
    return [*few_shot, *conversation, _msg("assistant", response.strip()),
            _msg("user", CRITIQUE_TURN.format(request=request))]


def revision_messages(critique_context: list[dict[str, str]], critique: str, request: str) -> list[dict[str, str]]:
    """The critique context continued with the critique and the revision request."""
    return [*critique_context, _msg("assistant", critique),
            _msg("user", REVISION_TURN.format(request=request))]


def direct_revision_messages(
    few_shot: list[dict[str, str]], conversation: list[dict[str, str]], response: str, request: str
) -> list[dict[str, str]]:
    """The context that asks for a revision straight away (the no-critique ablation)."""
    return [*few_shot, *conversation, _msg("assistant", response.strip()),
            _msg("user", DIRECT_REVISION_TURN.format(request=request))]


# ----------------------------------------------------------------------------- cleaning
@dataclass(frozen=True)
class Cleaned:
    """A generated critique or revision after cleaning."""

    text: str
    cleaned: bool  # something other than surrounding whitespace was removed
    usable: bool
    reason: str | None = None  # why it is unusable: "empty", "no words", "echoed the request"


# A new conversational turn the model started on its own: everything from there is dropped.
_NEW_TURN = re.compile(
    r"(?:^|\n)[ \t]*(?:\*\*)?(?:Human|User|Assistant|Critique[ \t]+request|Revision[ \t]+request)"
    r"(?:\*\*)?[ \t]*:",
    re.IGNORECASE,
)
# A label in front of the answer: "Revision:", "Critique:", "Revised response:", "**Assistant:**".
_LABEL = re.compile(
    r"\A[ \t\n]*(?:\*\*)?(?:assistant|ai|critique|revision|response|reply|answer|"
    r"(?:the[ \t]+)?(?:revised|rewritten|new|improved|updated|final|better)[ \t]+"
    r"(?:response|reply|answer|version|critique))(?:[ \t]*\d+)?[ \t]*(?:\*\*)?[ \t]*:(?:\*\*)?",
    re.IGNORECASE,
)
# A preamble sentence ending in a colon that announces the answer: "Sure, here is a revised
# response:", "Here's my critique:", "Below is the rewritten reply:". It must name what it
# introduces, so "Here's how to stop a Python process:" is content and is kept.
_PREAMBLE = re.compile(
    r"\A[ \t\n]*(?:(?:sure|okay|ok|certainly|of course|absolutely|alright|yes)\b[ \t]*[,.!]*[ \t]*)?"
    r"(?:here(?:'s|’s|[ \t]+is|[ \t]+are)|below[ \t]+is|this[ \t]+is|i(?:'ve|[ \t]+have)[ \t]+\w+)\b"
    r"(?=[^\n:]{0,80}\b(?:revis|rewrit|critique|response|reply|answer|version|attempt))"
    r"[^\n:]{0,80}:",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "“": "”", "'": "'"}
_HAS_WORD = re.compile(r"\w")


def _strip_headers(text: str) -> str:
    for _ in range(4):  # "Sure! Revised response: ..." has two
        stripped = _PREAMBLE.sub("", text, count=1)
        stripped = _LABEL.sub("", stripped, count=1).lstrip()
        if stripped == text:
            break
        text = stripped
    return text


def _strip_quotes(text: str) -> str:
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]]:
        inner = text[1:-1]
        if text[0] not in inner and _QUOTES[text[0]] not in inner:
            return inner.strip()
    return text


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def _echoes(text: str, request: str) -> bool:
    """Whether ``text`` is the request (or a long piece of it) repeated back."""
    said, asked = _normalise(text), _normalise(request)
    return said == asked or (len(said) >= 20 and said in asked)


def clean_output(raw: str | None, request: str | None = None) -> Cleaned:
    """Clean one generated critique or revision (see the module docstring).

    ``request`` is the user turn it answers: an output that only repeats it (or a long piece
    of it) is unusable.
    """
    original = (raw or "").replace("\r\n", "\n").strip()
    text = _strip_headers(original)
    cut = _NEW_TURN.search(text)
    if cut is not None:
        text = text[: cut.start()]
    text = _strip_quotes(text.strip())
    cleaned = text != original
    if not text:
        return Cleaned("", cleaned, False, "empty")
    if not _HAS_WORD.search(text):
        return Cleaned(text, cleaned, False, "no words")
    if request and _echoes(text, request):
        return Cleaned(text, cleaned, False, "echoed the request")
    return Cleaned(text, cleaned, True)

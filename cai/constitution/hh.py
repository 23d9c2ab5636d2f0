"""The conversation of a few-shot example's ``prompt``, read the one way every user of it does.

A few-shot example (``few_shot.critique_revision`` or ``few_shot.preference``) gives the
conversation its reply answers as ``prompt``: an HH transcript (``"\\n\\nHuman: ...\\n\\nAssistant:"``,
the format of Anthropic's HH-RLHF data) that starts and ends with a human turn, or plain text (one
human turn). :func:`hh_turns` splits it into chat turns; :func:`hh_prompt_problem` says what is
wrong with one it cannot read. The constitution's schema (:mod:`cai.constitution.schema`) checks
every example with the same function that the critique prompts (:mod:`cai.feedback.critique_text`)
and the judge's templates (:mod:`cai.judges.templates`) use to build their messages, so
``cai constitution validate`` rejects exactly the prompts a run would reject, with their line.
"""

from __future__ import annotations

import re

from cai.errors import DataError

__all__ = ["as_hh_prompt", "hh_prompt_problem", "hh_turns", "snippet"]

# a turn mark at the start of the text (after blank space) or after a blank line
_HH_MARKER = re.compile(r"(?:\A[ \t\n]*|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def snippet(text: str, limit: int = 200) -> str:
    """``repr`` of ``text`` cut to its first ``limit`` characters (saying how long it was), so a
    message never echoes a whole file."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def as_hh_prompt(prompt: str) -> str:
    """A few-shot ``prompt`` in HH format: text without ``Human:`` turns is one human turn."""
    if "Human:" in prompt and prompt.rstrip().endswith("Assistant:"):
        return prompt
    return f"\n\nHuman: {prompt.strip()}\n\nAssistant:"


def _split(text: str) -> tuple[list[dict[str, str]], str | None]:
    parts = _HH_MARKER.split(as_hh_prompt(text))
    if parts[0].strip():
        return [], f"has text before its first turn ({snippet(parts[0].strip(), 60)}); a conversation starts " \
                   "with '\\n\\nHuman:' (or give plain text: one human turn)"
    turns = [{"role": _HH_ROLE[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()  # the empty turn the example's reply fills
    if not turns or turns[0]["role"] != "user":
        return [], "starts with an assistant turn; a conversation starts with '\\n\\nHuman:'"
    if turns[-1]["role"] != "user":
        return [], "ends with an assistant turn; a conversation ends with a human turn and '\\n\\nAssistant:' " \
                   "(the example's response is the reply)"
    return turns, None


def hh_prompt_problem(text: str) -> str | None:
    """What is wrong with ``text`` as a few-shot prompt (None: nothing)."""
    return _split(text)[1]


def hh_turns(text: str, where: str = "few-shot example") -> list[dict[str, str]]:
    """The chat turns of a few-shot prompt, the trailing empty assistant turn dropped; raises
    :class:`DataError` naming ``where`` and the problem (with at most a snippet of the text)."""
    turns, problem = _split(text)
    if problem is not None:
        raise DataError(f"{where}: prompt {problem}")
    return turns

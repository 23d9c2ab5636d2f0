"""Constitutions: the principles an AI judge critiques, revises and compares responses by.

A constitution is a YAML file (schema in ``constitutions/README.md``) holding two lists of
principles sharing one id space: critique/revision principles for SL-CAI and pairwise
preference principles for AI labelling, plus optional few-shot examples and sampling settings.

This module loads a file into frozen dataclasses, after :mod:`cai.constitution.schema` has
validated PyYAML's *node* tree so that every problem reads ``FILE:LINE: field.path: what is
wrong`` and all are reported at once (:class:`Problem` is re-exported from there); gives
a content hash (:attr:`Constitution.hash`) of what the judge sees and how principles are drawn,
independent of formatting, comments, key order, path, name and prose metadata (editing the
description does not invalidate cached labels); and samples principles by weight,
deterministically for a seeded :class:`random.Random`. Writing YAML, the importer of the CAI
paper's JSON files and the ``validate``/``import`` commands are in :mod:`cai.constitution.importer`.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence, TypeVar

from cai.config import shipped_dir
from cai.constitution.hh import as_hh_prompt as as_hh_prompt  # re-exported: the few-shot prompt format
from cai.constitution.schema import Problem, check_yaml
from cai.errors import CaiError, ConfigError
from cai.hashing import stable_hash

HASH_SCHEMA = "cai-constitution/1"


@dataclass(frozen=True)
class CritiquePrinciple:
    """One SL-CAI principle: a critique request and the matching revision request."""

    id: str
    critique: str
    revision: str
    weight: float = 1.0
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreferencePrinciple:
    """One pairwise-comparison principle: the question the judge answers with A or B."""

    id: str
    question: str
    weight: float = 1.0
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class CritiqueExample:
    """A worked critique -> revision example shown to the feedback model (few-shot)."""

    prompt: str  # the conversation up to the assistant turn, verbatim
    response: str
    critique: str
    revision: str
    critique_request: str | None = None
    revision_request: str | None = None


@dataclass(frozen=True)
class PreferenceExample:
    """A worked pairwise comparison; ``rationale`` makes it a chain-of-thought example."""

    prompt: str  # the conversation up to the assistant turn, verbatim
    response_a: str
    response_b: str
    answer: str  # "A" or "B"
    question: str | None = None
    rationale: str | None = None


@dataclass(frozen=True)
class FewShot:
    critique_revision: tuple[CritiqueExample, ...] = ()
    preference: tuple[PreferenceExample, ...] = ()


@dataclass(frozen=True)
class SamplingSettings:
    """How many principles are drawn per critique round / per labelled pair, and how."""

    critique_principles_per_round: int = 1
    preference_principles_per_pair: int = 1
    with_replacement: bool = False


P = TypeVar("P", CritiquePrinciple, PreferencePrinciple)


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    description: str
    citation: str | None
    critique_revision: tuple[CritiquePrinciple, ...]
    preference: tuple[PreferencePrinciple, ...]
    few_shot: FewShot = field(default_factory=FewShot)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    source: str | None = None

    @cached_property
    def hash(self) -> str:
        """Hex SHA-256 of the behavioural content: principles (ids, texts, weights, tags),
        few-shot examples and sampling settings. Not the path, name, version or prose."""
        content = {"critique_revision": self.critique_revision, "preference": self.preference,
                   "few_shot": self.few_shot, "sampling": self.sampling}
        return stable_hash({"schema": HASH_SCHEMA, **content})

    def critique_by_id(self, id: str) -> CritiquePrinciple:
        return _by_id(self.critique_revision, id, "critique/revision", self)

    def preference_by_id(self, id: str) -> PreferencePrinciple:
        return _by_id(self.preference, id, "preference", self)

    def sample_critique(self, rng: random.Random, k: int | None = None) -> list[CritiquePrinciple]:
        """Draw ``k`` critique/revision principles by weight (default: the file's setting)."""
        k = self.sampling.critique_principles_per_round if k is None else k
        return weighted_sample(self.critique_revision, k, rng, self.sampling.with_replacement)

    def sample_preference(self, rng: random.Random, k: int | None = None) -> list[PreferencePrinciple]:
        """Draw ``k`` preference principles by weight (default: the file's setting)."""
        k = self.sampling.preference_principles_per_pair if k is None else k
        return weighted_sample(self.preference, k, rng, self.sampling.with_replacement)


def _by_id(items: Sequence[P], id: str, kind: str, c: Constitution) -> P:
    for item in items:
        if item.id == id:
            return item
    known = ", ".join(i.id for i in items)
    raise ConfigError(f"constitution {c.name!r} has no {kind} principle {id!r}; it has: {known}")


def weighted_sample(items: Sequence[P], k: int, rng: random.Random, with_replacement: bool) -> list[P]:
    """``k`` items drawn with probability proportional to ``weight``.

    Without replacement each draw is weighted among the items not yet drawn (successive
    sampling). Only ``rng.random()`` is consumed, so a seeded rng gives the same draws on
    every platform.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"number of principles to sample must be an integer >= 1, got {k!r}")
    if not with_replacement and k > len(items):
        raise ConfigError(
            f"cannot sample {k} distinct principles from {len(items)}; "
            "lower the number or set sampling.with_replacement: true"
        )
    pool = list(items)
    out: list[P] = []
    for _ in range(k):
        cumulative = list(itertools.accumulate(p.weight for p in pool))
        idx = min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(pool) - 1)
        out.append(pool[idx] if with_replacement else pool.pop(idx))
    return out


# ---------------------------------------------------------------------------------------------
# Loading (the schema and its checks are in cai.constitution.schema; Problem is re-exported here)


class ConstitutionError(CaiError):
    """A constitution file is invalid; ``problems`` lists everything wrong with it (the message
    the first :data:`SHOWN_PROBLEMS`: ``cai constitution validate FILE`` prints every one)."""

    SHOWN_PROBLEMS = 20

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        files = sorted({p.file for p in self.problems})
        head = f"invalid constitution {', '.join(files)}: {len(self.problems)} problem(s)"
        lines = [head, *(f"  {p}" for p in self.problems[:self.SHOWN_PROBLEMS])]
        if len(self.problems) > self.SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - self.SHOWN_PROBLEMS} more "
                         f"(cai constitution validate {' '.join(files)} lists every one)")
        super().__init__("\n".join(lines))


def check_text(text: str, source: str = "<string>") -> tuple[Constitution | None, list[Problem]]:
    """Parse and validate YAML text: ``(constitution, [])`` or ``(None, every problem)``."""
    d, problems = check_yaml(text, source)
    if d is None:
        return None, problems
    fs = d.get("few_shot") or {}
    return Constitution(
        name=d["name"],
        version=d["version"],
        description=d["description"],
        citation=d.get("citation"),
        critique_revision=tuple(CritiquePrinciple(**p) for p in d["critique_revision"]),
        preference=tuple(PreferencePrinciple(**p) for p in d["preference"]),
        few_shot=FewShot(
            critique_revision=tuple(CritiqueExample(**e) for e in fs.get("critique_revision") or ()),
            preference=tuple(PreferenceExample(**e) for e in fs.get("preference") or ()),
        ),
        sampling=SamplingSettings(**(d.get("sampling") or {})),
        source=source,
    ), []


def check_file(path: str | Path) -> tuple[Constitution | None, list[Problem]]:
    """Like :func:`check_text` for a file; a missing or unreadable file is one problem."""
    p = Path(path)
    if not p.is_file():
        why = "is a directory, expected a YAML file" if p.is_dir() else "no such file"
        return None, [Problem(str(path), 0, "", why)]
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return None, [Problem(str(path), 1, "", f"not UTF-8 text (byte {e.start}): {e.reason}")]
    except OSError as e:
        return None, [Problem(str(path), 0, "", f"cannot read file: {e.strerror or e}")]
    return check_text(text, str(path))


def validate_file(path: str | Path) -> list[Problem]:
    """Every problem in the file (empty list: valid)."""
    return check_file(path)[1]


def load_constitution_text(text: str, source: str = "<string>") -> Constitution:
    constitution, problems = check_text(text, source)
    if constitution is None:
        raise ConstitutionError(problems)
    return constitution


def load_constitution(path: str | Path) -> Constitution:
    """Load and validate a constitution file; raises :class:`ConstitutionError`."""
    constitution, problems = check_file(path)
    if constitution is None:
        raise ConstitutionError(problems)
    return constitution


def resolve_constitution(name_or_path: str | Path, search_dirs: Sequence[str | Path] | None = None) -> Path:
    """A constitution file from a path (``~`` expanded; relative to the working directory), or
    from a bare name looked up as ``NAME.yaml`` in ``search_dirs`` then in the shipped
    constitutions (:func:`shipped_dir`). The answer is an absolute path, so it stays right for a
    stage that runs from another directory."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return Path(os.path.abspath(given))
    dirs = [Path(d).expanduser() for d in (search_dirs or ())] + [shipped_dir("constitutions")]
    bare = str(name_or_path)
    if "/" not in bare and "\\" not in bare:
        names = [bare] if given.suffix in (".yaml", ".yml") else [f"{bare}.yaml", f"{bare}.yml"]
        for d in dirs:
            for n in names:
                if (d / n).is_file():
                    return Path(os.path.abspath(d / n))
    known = sorted({f.stem for d in dirs if d.is_dir() for f in d.glob("*.y*ml")})
    raise ConfigError(
        f"constitution {bare!r} not found: not a file, and no NAME.yaml in "
        f"{', '.join(str(d) for d in dirs)} (known names: {', '.join(known) or 'none'})"
    )

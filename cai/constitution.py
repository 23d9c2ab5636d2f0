"""Constitutions: the principles an AI judge critiques, revises and compares responses by.

A constitution is a YAML file (schema in ``constitutions/README.md``) holding two lists of
principles sharing one id space: critique/revision principles for SL-CAI and pairwise
preference principles for AI labelling, plus optional few-shot examples and sampling settings.

This module loads a file into frozen dataclasses, validating PyYAML's *node* tree so that
every problem reads ``FILE:LINE: field.path: what is wrong`` and all are reported at once; gives
a content hash (:attr:`Constitution.hash`) of what the judge sees and how principles are drawn,
independent of formatting, comments, key order, path, name and prose metadata (editing the
description does not invalidate cached labels); and samples principles by weight,
deterministically for a seeded :class:`random.Random`. Writing YAML, the importer of the CAI
paper's JSON files and the ``validate``/``import`` commands are in :mod:`cai.constitution_import`.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import math
import random
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from cai.errors import CaiError, ConfigError
from cai.hashing import stable_hash

REPO_CONSTITUTIONS_DIR = Path(__file__).resolve().parent.parent / "constitutions"
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


def as_hh_prompt(prompt: str) -> str:
    """A few-shot ``prompt`` in HH format: text without ``Human:`` turns is one human turn."""
    if "Human:" in prompt and prompt.rstrip().endswith("Assistant:"):
        return prompt
    return f"\n\nHuman: {prompt.strip()}\n\nAssistant:"


# ---------------------------------------------------------------------------------------------
# Problems and loading


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a constitution file; ``line`` is 1-based (0: no line applies)."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line > 0 else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConstitutionError(CaiError):
    """A constitution file is invalid; ``problems`` lists everything wrong with it."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        files = sorted({p.file for p in self.problems})
        head = f"invalid constitution {', '.join(files)}: {len(self.problems)} problem(s)"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


# Field kinds, what each expects (for messages), and the schema: section -> {key: (kind, required)}
_EXPECT = {
    "text": "a non-empty string", "version": 'a version string such as "1.0"',
    "prompt": "a non-empty string (the conversation up to the assistant turn)",
    "weight": "a number > 0", "count": "an integer >= 1", "bool": "true or false",
    "tags": "a list of strings", "answer": '"A" or "B"',
    "id": "an id of letters, digits, '-', '_' or '.'",
    "critique_list": "a non-empty list of critique/revision principles",
    "preference_list": "a non-empty list of preference principles",
    "critique_examples": "a list of critique/revision examples",
    "preference_examples": "a list of preference examples",
    "few_shot": "a mapping with critique_revision and/or preference examples",
    "sampling": "a mapping of sampling settings",
}
_LISTS = {  # list kind -> (item section, must be non-empty)
    "critique_list": ("critique", True), "preference_list": ("preference", True),
    "critique_examples": ("critique_example", False), "preference_examples": ("preference_example", False),
}
_WEIGHT_TAGS = {"weight": ("weight", False), "tags": ("tags", False)}
_SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "top": {
        "name": ("text", True), "version": ("version", True), "description": ("text", True),
        "citation": ("text", False), "critique_revision": ("critique_list", True),
        "preference": ("preference_list", True), "few_shot": ("few_shot", False),
        "sampling": ("sampling", False),
    },
    "critique": {
        "id": ("id", True), "critique": ("text", True), "revision": ("text", True), **_WEIGHT_TAGS,
    },
    "preference": {"id": ("id", True), "question": ("text", True), **_WEIGHT_TAGS},
    "few_shot": {
        "critique_revision": ("critique_examples", False), "preference": ("preference_examples", False),
    },
    "critique_example": {
        "prompt": ("prompt", True), "response": ("text", True), "critique_request": ("text", False),
        "critique": ("text", True), "revision_request": ("text", False), "revision": ("text", True),
    },
    "preference_example": {
        "prompt": ("prompt", True), "response_a": ("text", True), "response_b": ("text", True),
        "question": ("text", False), "rationale": ("text", False), "answer": ("answer", True),
    },
    "sampling": {
        "critique_principles_per_round": ("count", False),
        "preference_principles_per_pair": ("count", False), "with_replacement": ("bool", False),
    },
}
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = node.tag.rsplit(":", 1)[-1]
    names = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
    return "nothing (null)" if kind == "null" else f"{names.get(kind, kind)} {node.value!r}"


class _Checker:
    """Walks PyYAML's node tree against :data:`_SCHEMA`, collecting every problem with its
    line, and returns plain values (``None`` where a value was wrong)."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []
        self.lines: dict[str, int] = {}  # field path -> 1-based line of its value
        self.ids: dict[str, int] = {}  # principle id -> line where first defined
        self._constructor = yaml.SafeLoader("")

    def add(self, node: yaml.Node, path: str, message: str) -> None:
        self.problems.append(Problem(self.source, node.start_mark.line + 1, path, message))

    def document(self, node: yaml.Node | None) -> dict[str, Any] | None:
        if node is None:
            self.problems.append(Problem(self.source, 1, "", "file is empty; expected a mapping "
                                         "with name, version, description, critique_revision, preference"))
            return None
        if not isinstance(node, yaml.MappingNode):
            self.add(node, "", f"top level must be a mapping (name, version, ...), got {_describe(node)}")
            return None
        d = self.mapping(node, "", "top")
        if d is not None:
            self.check_sampling(d)
        return d

    def mapping(self, node: yaml.Node, path: str, section: str) -> dict[str, Any] | None:
        spec = _SCHEMA[section]
        if not isinstance(node, yaml.MappingNode):
            self.add(node, path, f"expected a mapping with keys {', '.join(spec)}, got {_describe(node)}")
            return None
        out: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for knode, vnode in node.value:
            if not (isinstance(knode, yaml.ScalarNode) and knode.tag.endswith(":str")):
                merge = knode.tag.endswith(":merge")
                self.add(knode, path, "YAML merge keys (<<) are not supported; write the keys out"
                         if merge else f"keys must be names, got {_describe(knode)}")
                continue
            key, kpath = knode.value, _join(path, knode.value)
            if key in seen:
                self.add(knode, kpath, f"duplicate key (first at line {seen[key]})")
                continue
            seen[key] = knode.start_mark.line + 1
            if key not in spec:
                close = difflib.get_close_matches(key, spec, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.add(knode, kpath, f"unknown key{hint}; expected one of: {', '.join(spec)}")
                continue
            self.lines[kpath] = vnode.start_mark.line + 1
            value = self.value(vnode, kpath, *spec[key])
            if value is not None:
                out[key] = value
        for key, (kind, required) in spec.items():
            if required and key not in seen:
                self.add(node, _join(path, key), f"missing required field; expected {_EXPECT[kind]}")
        return out

    def value(self, node: yaml.Node, path: str, kind: str, required: bool) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            if required:
                self.add(node, path, f"is empty; expected {_EXPECT[kind]}")
            return None
        if kind in _SCHEMA:
            return self.mapping(node, path, kind)
        if kind in _LISTS:
            return self.sequence(node, path, kind)
        if kind == "tags":
            if not isinstance(node, yaml.SequenceNode):
                self.add(node, path, f"expected {_EXPECT[kind]}, got {_describe(node)}")
                return None
            tags = [self.scalar(n, f"{path}[{i}]", "text") for i, n in enumerate(node.value)]
            return tuple(t for t in tags if t is not None)
        return self.scalar(node, path, kind)

    def sequence(self, node: yaml.Node, path: str, kind: str) -> list[dict[str, Any]] | None:
        section, nonempty = _LISTS[kind]
        if not isinstance(node, yaml.SequenceNode):
            self.add(node, path, f"expected {_EXPECT[kind]}, got {_describe(node)}")
            return None
        if nonempty and not node.value:
            self.add(node, path, f"is empty; expected {_EXPECT[kind]}")
            return None
        items = []
        for i, item in enumerate(node.value):
            d = self.mapping(item, f"{path}[{i}]", section)
            if d is None:
                continue
            if "id" in d:
                line = self.lines[f"{path}[{i}].id"]
                if d["id"] in self.ids:
                    self.problems.append(Problem(self.source, line, f"{path}[{i}].id", f"duplicate id "
                                                 f"{d['id']!r}: lines {self.ids[d['id']]} and {line}"))
                self.ids.setdefault(d["id"], line)
            items.append(d)
        return items

    def scalar(self, node: yaml.Node, path: str, kind: str) -> Any:
        expect = _EXPECT[kind]
        tag = node.tag.rsplit(":", 1)[-1]
        ok = isinstance(node, yaml.ScalarNode) and (
            tag in ("str", "int", "float") if kind == "version"
            else tag in ("int", "float") if kind == "weight"
            else tag == {"count": "int", "bool": "bool"}.get(kind, "str")
        )
        if not ok:
            self.add(node, path, f"expected {expect}, got {_describe(node)}")
            return None
        value = self._constructor.construct_object(node, deep=True)
        if kind in ("text", "prompt", "answer", "id", "version"):
            text = node.value if kind == "prompt" else node.value.strip()
            if not text.strip():
                self.add(node, path, f"is empty; expected {expect}")
                return None
            bad_answer = kind == "answer" and text not in ("A", "B")
            if bad_answer or (kind == "id" and not _ID_RE.fullmatch(text)):
                self.add(node, path, f"expected {expect}, got {text!r}")
                return None
            return text
        if kind == "weight" and not (math.isfinite(value) and value > 0):
            self.add(node, path, f"must be a finite number > 0, got {node.value}")
            return None
        if kind == "count" and value < 1:
            self.add(node, path, f"must be an integer >= 1, got {value}")
            return None
        return float(value) if kind == "weight" else value

    def check_sampling(self, d: dict[str, Any]) -> None:
        s = d.get("sampling") or {}
        if s.get("with_replacement", False):
            return
        for key, list_key in (("critique_principles_per_round", "critique_revision"),
                              ("preference_principles_per_pair", "preference")):
            k, items = s.get(key), d.get(list_key)
            if k is not None and items is not None and k > len(items):
                path = f"sampling.{key}"
                why = (f"{k} distinct principles per draw, but {list_key} has {len(items)}; "
                       "lower it or set sampling.with_replacement: true")
                self.problems.append(Problem(self.source, self.lines[path], path, why))


def check_text(text: str, source: str = "<string>") -> tuple[Constitution | None, list[Problem]]:
    """Parse and validate YAML text: ``(constitution, [])`` or ``(None, every problem)``."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = f"malformed YAML: {e.problem or e.context}"
        if e.context and e.problem and e.context_mark:
            msg += f" ({e.context} that starts at line {e.context_mark.line + 1})"
        return None, [Problem(source, mark.line + 1 if mark else 1, "", msg)]
    except yaml.YAMLError as e:
        return None, [Problem(source, 1, "", f"malformed YAML: {e}")]
    checker = _Checker(source)
    d = checker.document(node)
    if checker.problems or d is None:
        return None, sorted(checker.problems, key=lambda p: p.line)
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
    """A constitution file from a path, or from a bare name looked up as ``NAME.yaml`` in
    ``search_dirs`` then in the repository's ``constitutions/``."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    dirs = [Path(d) for d in (search_dirs or ())] + [REPO_CONSTITUTIONS_DIR]
    bare = str(name_or_path)
    if "/" not in bare and "\\" not in bare:
        names = [bare] if given.suffix in (".yaml", ".yml") else [f"{bare}.yaml", f"{bare}.yml"]
        for d in dirs:
            for n in names:
                if (d / n).is_file():
                    return d / n
    known = sorted({f.stem for d in dirs if d.is_dir() for f in d.glob("*.y*ml")})
    raise ConfigError(
        f"constitution {bare!r} not found: not a file, and no NAME.yaml in "
        f"{', '.join(str(d) for d in dirs)} (known names: {', '.join(known) or 'none'})"
    )


# ---------------------------------------------------------------------------------------------
# Writing YAML and the command line live in cai.constitution_import (they use the importer and
# it uses this module); they are re-exported here so ``from cai.constitution import ...`` works.

_REEXPORTED = {"to_yaml_dict", "dump_constitution", "dump_constitution_text", "cli_validate", "cli_import",
               "main", "import_anthropic", "convert_anthropic"}


def __getattr__(name: str) -> Any:
    if name in _REEXPORTED:
        from cai import constitution_import  # noqa: PLC0415  (circular at import time)

        return getattr(constitution_import, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from cai.constitution_import import main

    sys.exit(main())

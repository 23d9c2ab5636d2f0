"""Validation of a constitution file's YAML against its schema, with a line for every problem.

:mod:`cai.constitution` turns a checked document into frozen dataclasses; this module does the
checking. It walks PyYAML's *node* tree (not the loaded Python objects) so that each value still
knows its line, collects every problem instead of stopping at the first, and returns plain
values: :func:`check_yaml` gives ``(document dict, [])`` or ``(None, problems)``, each
:class:`Problem` reading ``FILE:LINE: field.path: what is wrong``. The schema tables below are
the single description of which keys a file may hold, which are required and what each expects;
``constitutions/README.md`` documents the same schema for people.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from cai.constitution.hh import hh_prompt_problem, snippet

__all__ = ["Problem", "check_yaml"]


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
    return "nothing (null)" if kind == "null" else f"{names.get(kind, kind)} {snippet(str(node.value))}"


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
            key, kpath = knode.value, _join(path, knode.value if len(knode.value) <= 60 else snippet(knode.value, 60))
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
                self.add(node, path, f"expected {expect}, got {snippet(text)}")
                return None
            problem = hh_prompt_problem(text) if kind == "prompt" else None
            if problem is not None:  # the check the run's few-shot messages make (cai.constitution.hh)
                self.add(node, path, problem)
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


def check_yaml(text: str, source: str = "<string>") -> tuple[dict[str, Any] | None, list[Problem]]:
    """Parse YAML ``text`` and check it against the schema: ``(plain values, [])`` when valid,
    else ``(None, every problem sorted by line)``; ``source`` names the file in messages."""
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
    return d, []

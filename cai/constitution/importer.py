"""Constitutions in and out of files: YAML writing, the CAI-paper importer, the commands.

- :func:`to_yaml_dict` / :func:`dump_constitution` write a :class:`Constitution` back to the
  YAML schema; loading the written file gives the same :attr:`Constitution.hash`.
- :func:`import_anthropic` converts the prompt files published with Bai et al. 2022
  (arXiv:2212.08073) into a constitution. The paper's text enters a constitution only here, read
  from the user's copy at run time. The paper wraps each text in its prompt format
  (``CritiqueRequest: ... Critique:``, ``... Options:``, ``H:``/``A:`` turns, ``[[[...]]]``
  options); the importer keeps the texts and drops that framing, which the feedback code
  supplies itself. Whatever cannot be represented is named in :attr:`ImportResult.notes`,
  never dropped silently.
- :func:`cli_validate`, :func:`cli_import` and :func:`main` are the
  ``cai constitution validate|import`` commands (also ``python3 -m cai.constitution``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from cai.constitution import (
    Constitution,
    CritiqueExample,
    CritiquePrinciple,
    FewShot,
    PreferenceExample,
    PreferencePrinciple,
    check_file,
)
from cai.errors import CaiError, DataError

# ---------------------------------------------------------------------------------------------
# Writing


def _principle_dict(p: CritiquePrinciple | PreferencePrinciple) -> dict[str, Any]:
    d: dict[str, Any] = {"id": p.id}
    if isinstance(p, CritiquePrinciple):
        d.update(critique=p.critique, revision=p.revision)
    else:
        d["question"] = p.question
    d["weight"] = p.weight
    if p.tags:
        d["tags"] = list(p.tags)
    return d


_EXAMPLE_KEY_ORDER = ("prompt", "response", "critique_request", "critique", "revision_request", "revision",
                      "response_a", "response_b", "question", "rationale", "answer")


def _example_dict(e: CritiqueExample | PreferenceExample) -> dict[str, Any]:
    d = dataclasses.asdict(e)
    return {k: d[k] for k in _EXAMPLE_KEY_ORDER if d.get(k) is not None}


def to_yaml_dict(c: Constitution) -> dict[str, Any]:
    """Plain dict in the file schema's key order; loading its YAML gives ``c.hash`` again."""
    d: dict[str, Any] = {"name": c.name, "version": c.version, "description": c.description}
    if c.citation is not None:
        d["citation"] = c.citation
    d["critique_revision"] = [_principle_dict(p) for p in c.critique_revision]
    d["preference"] = [_principle_dict(p) for p in c.preference]
    if c.few_shot.critique_revision or c.few_shot.preference:
        d["few_shot"] = {
            "critique_revision": [_example_dict(e) for e in c.few_shot.critique_revision],
            "preference": [_example_dict(e) for e in c.few_shot.preference],
        }
    d["sampling"] = dataclasses.asdict(c.sampling)
    return d


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` blocks so long texts stay readable."""


def _represent_str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _represent_str)


def dump_constitution_text(c: Constitution, header: str = "") -> str:
    """The YAML text of ``c``; ``header`` lines become leading ``#`` comments."""
    body = yaml.dump(to_yaml_dict(c), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + body


def dump_constitution(c: Constitution, path: str | Path, header: str = "") -> Path:
    """Write ``c`` as YAML atomically (temp file, then rename); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(dump_constitution_text(c, header), encoding="utf-8")
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------------------
# Import of the CAI paper's published prompt files

CRITIQUE_INSTRUCTIONS = "CritiqueRevisionInstructions.json"
PREFERENCE_INSTRUCTIONS = "RLMadisonInstructions.json"
CRITIQUE_FEW_SHOT = "CritiqueRevisionFewShotPrompts.json"
PREFERENCE_FEW_SHOT = "RLMadisonFewShotPrompts.json"
PREFERENCE_COT_FEW_SHOT = "RLMadisonPrecogFewShotPrompts.json"
ANTHROPIC_FILES = (CRITIQUE_INSTRUCTIONS, PREFERENCE_INSTRUCTIONS, CRITIQUE_FEW_SHOT,
                   PREFERENCE_FEW_SHOT, PREFERENCE_COT_FEW_SHOT)
PAPER_CITATION = ("Bai et al. 2022, Constitutional AI: Harmlessness from AI Feedback, "
                  "arXiv:2212.08073")

_TRANSCRIPT_RE = re.compile(  # a critique/revision few-shot transcript, in the paper's format
    r"(?P<prompt>.*\n\nAssistant:)(?P<response>.*?)\n\nCritiqueRequest:(?P<critique_request>.*?)"
    r"\n\nCritique:(?P<critique>.*?)\n\nRevisionRequest:(?P<revision_request>.*?)"
    r"\n\nRevision:(?P<revision>.*?)(?:\n\nHuman:\s*)?", re.S)
_COT_RE = re.compile(  # a chain-of-thought comparison: conversation, {} slot, (A)/(B), reasoning
    r"\s*Human: Consider the following conversation[^\n]*\n\n(?P<conversation>.*?)\n\n\{\}\n"
    r"\s*\(A\) \[\[\[(?P<a>.*?)\]\]\]\s*\(B\) \[\[\[(?P<b>.*?)\]\]\]\s*\n\nAssistant:"
    r"(?:\s*Let's think step by step:)?(?P<rationale>.*?)\n\nHuman:\s*So the answer is:?\s*"
    r"\((?P<answer>[AB])\)\s*", re.S)


@dataclass
class ImportResult:
    """The imported constitution, the files read, and what could not be represented."""

    constitution: Constitution
    files: list[str]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.constitution
        cot = sum(e.rationale is not None for e in c.few_shot.preference)
        return (f"{len(c.critique_revision)} critique/revision principles, {len(c.preference)} "
                f"preference principles, {len(c.few_shot.critique_revision)} critique/revision "
                f"examples, {len(c.few_shot.preference)} preference examples ({cot} with rationale)"
                f"; {len(self.notes)} note(s)")


def _unwrap(text: str, prefix: str, suffix: str) -> str:
    """``text`` without the paper's surrounding prompt labels (when present)."""
    t = text.strip()
    t = t[len(prefix):] if t.startswith(prefix) else t
    return (t[: -len(suffix)] if t.endswith(suffix) else t).strip()


def _critique_principles(data: Any, name: str, notes: list[str]) -> list[CritiquePrinciple]:
    if not isinstance(data, dict):
        raise DataError(f"{name}: expected a JSON object mapping ids to "
                        f"{{'prompt': [critique request], 'edit_request': ...}}, got {type(data).__name__}")
    out = []
    for key, entry in data.items():
        requests = entry.get("prompt") if isinstance(entry, dict) else None
        revision = entry.get("edit_request") if isinstance(entry, dict) else None
        if not (isinstance(requests, list) and requests and isinstance(revision, str)
                and all(isinstance(r, str) for r in requests)):
            notes.append(f"{name}: entry {key!r} not converted: expected {{'prompt': [critique "
                         "request strings], 'edit_request': revision request string}")
            continue
        for extra in sorted(set(entry) - {"prompt", "edit_request"}):
            notes.append(f"{name}: entry {key!r}: field {extra!r} has no place in the schema; ignored")
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(key)).strip("-.") or f"critique{len(out)}"
        revision_text = _unwrap(revision, "RevisionRequest:", "Revision:")
        for j, request in enumerate(requests):
            pid = base if len(requests) == 1 else f"{base}-{j + 1}"
            critique_text = _unwrap(request, "CritiqueRequest:", "Critique:")
            if not critique_text or not revision_text:
                notes.append(f"{name}: entry {key!r} not converted: empty critique or revision request")
                continue
            out.append(CritiquePrinciple(id=pid, critique=critique_text, revision=revision_text))
        if len(requests) > 1:
            notes.append(f"{name}: entry {key!r} has {len(requests)} critique requests; each became "
                         f"its own principle ({base}-1 ...) sharing the revision request")
    return out


def _preference_principles(data: Any, name: str, notes: list[str]) -> list[PreferencePrinciple]:
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of question strings, got {type(data).__name__}")
    out = []
    for i, q in enumerate(data):
        if not isinstance(q, str) or not _unwrap(q, "", "Options:"):
            notes.append(f"{name}[{i}] not converted: expected a non-empty question string")
            continue
        out.append(PreferencePrinciple(id=f"preference{i}", question=_unwrap(q, "", "Options:")))
    return out


def _critique_examples(data: Any, name: str, notes: list[str]) -> list[CritiqueExample]:
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of transcript strings, got {type(data).__name__}")
    out = []
    for i, text in enumerate(data):
        m = _TRANSCRIPT_RE.fullmatch(text) if isinstance(text, str) else None
        parts = {k: v if k == "prompt" else v.strip() for k, v in m.groupdict().items()} if m else {}
        if not m or not all(parts.values()):
            notes.append(f"{name}[{i}] not converted: expected a transcript '...\\n\\nAssistant: "
                         "RESPONSE' followed by non-empty CritiqueRequest:, Critique:, "
                         "RevisionRequest: and Revision: sections")
            continue
        out.append(CritiqueExample(**parts))
    return out


def _preference_examples(data: Any, name: str, notes: list[str]) -> list[PreferenceExample]:
    """Each (correct, incorrect) pair becomes one example; the correct response alternates
    between slots A and B so the few-shot block itself teaches no position bias."""
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of {{prompt, corrects, incorrects}}, "
                        f"got {type(data).__name__}")
    out: list[PreferenceExample] = []
    for i, ex in enumerate(data):
        ok = isinstance(ex, dict) and isinstance(ex.get("prompt"), str) and ex["prompt"].strip() and all(
            isinstance(ex.get(k), list) and ex[k] and all(isinstance(s, str) and s.strip() for s in ex[k])
            for k in ("corrects", "incorrects"))
        if not ok:
            notes.append(f"{name}[{i}] not converted: expected {{'prompt': str, 'corrects': [str], "
                         "'incorrects': [str]}} with non-empty lists")
            continue
        for good, bad in itertools.product(ex["corrects"], ex["incorrects"]):
            a, b, answer = (good, bad, "A") if len(out) % 2 == 0 else (bad, good, "B")
            out.append(PreferenceExample(prompt=ex["prompt"], response_a=a.strip(),
                                         response_b=b.strip(), answer=answer))
    return out


def _hh_conversation(conversation: str) -> str | None:
    """``H: ...\\n\\nA: ...`` turns as ``\\n\\nHuman: ...\\n\\nAssistant:`` (None: not turns)."""
    parts = re.split(r"(?:^|\n\n)(H|A):", conversation)
    if parts[0].strip() or len(parts) < 3 or parts[-2] != "H":
        return None
    turns = [f"\n\n{'Human' if role == 'H' else 'Assistant'}: {text.strip()}"
             for role, text in zip(parts[1::2], parts[2::2])]
    return "".join(turns) + "\n\nAssistant:"


def _cot_examples(data: Any, name: str, notes: list[str]) -> list[PreferenceExample]:
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of {{'prompt': str}}, got {type(data).__name__}")
    out = []
    for i, ex in enumerate(data):
        text = ex.get("prompt") if isinstance(ex, dict) else None
        m = _COT_RE.fullmatch(text) if isinstance(text, str) else None
        prompt = _hh_conversation(m["conversation"]) if m else None
        if not m or prompt is None or not m["rationale"].strip():
            notes.append(f"{name}[{i}] not converted: expected 'Human: Consider the following "
                         "conversation ...' with H:/A: turns ending on H:, a '{}' slot, (A) [[[...]]] "
                         "(B) [[[...]]], the reasoning, and 'So the answer is: (A|B)'")
            continue
        out.append(PreferenceExample(prompt=prompt, response_a=m["a"].strip(), response_b=m["b"].strip(),
                                     answer=m["answer"], rationale=m["rationale"].strip()))
    return out


def _source_files(sources: Sequence[Path], notes: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for src in sources:
        if src.is_dir():
            for f in sorted(src.iterdir()):
                if f.name in ANTHROPIC_FILES:
                    found[f.name] = f
                elif f.suffix == ".json":
                    notes.append(f"{f}: not one of the published file names; ignored")
        elif src.is_file():
            if src.name not in ANTHROPIC_FILES:
                raise DataError(f"{src}: unknown file name; expected one of {', '.join(ANTHROPIC_FILES)}")
            found[src.name] = src
        else:
            raise DataError(f"{src}: no such file or directory")
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def convert_anthropic(sources: str | Path | Sequence[str | Path]) -> ImportResult:
    """Convert a folder of the published files (or some of the files) into a constitution.

    The result must have both critique/revision and preference principles, so a lone file of
    either kind is an error that names the missing file."""
    paths = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(s) for s in sources]
    notes: list[str] = []
    files = _source_files(paths, notes)
    data = {n: _read_json(p) for n, p in files.items()}
    missing = [n for n in (CRITIQUE_INSTRUCTIONS, PREFERENCE_INSTRUCTIONS) if n not in files]
    if missing:
        raise DataError(f"{', '.join(map(str, paths))}: a constitution needs both principle files; "
                        f"missing {' and '.join(missing)} (import the folder that holds all five files)")
    crit = _critique_principles(data[CRITIQUE_INSTRUCTIONS], str(files[CRITIQUE_INSTRUCTIONS]), notes)
    pref = _preference_principles(data[PREFERENCE_INSTRUCTIONS], str(files[PREFERENCE_INSTRUCTIONS]), notes)
    if not crit or not pref:
        raise DataError(f"{files[CRITIQUE_INSTRUCTIONS if not crit else PREFERENCE_INSTRUCTIONS]}: no "
                        "principle could be converted:\n  " + "\n  ".join(notes))
    examples = {n: f(data[n], str(files[n]), notes) for n, f in ((CRITIQUE_FEW_SHOT, _critique_examples),
                (PREFERENCE_FEW_SHOT, _preference_examples), (PREFERENCE_COT_FEW_SHOT, _cot_examples))
                if n in data}
    names = sorted(files)
    constitution = Constitution(
        name="cai-paper-anthropic",
        version="1.0",
        description=(f"Imported by `cai constitution import --format anthropic` from the prompt files "
                     f"published with the Constitutional AI paper: {', '.join(names)}. Texts are the "
                     "paper's, without its prompt labels (CritiqueRequest:, Options:, ...)."),
        citation=PAPER_CITATION,
        critique_revision=tuple(crit),
        preference=tuple(pref),
        few_shot=FewShot(
            critique_revision=(*examples.get(CRITIQUE_FEW_SHOT, ()),),
            preference=(*examples.get(PREFERENCE_FEW_SHOT, ()), *examples.get(PREFERENCE_COT_FEW_SHOT, ())),
        ),
    )
    return ImportResult(constitution, [str(files[n]) for n in names], notes)


def import_anthropic(file_or_dir: str | Path | Sequence[str | Path]) -> Constitution:
    """The constitution of :func:`convert_anthropic`; each of its notes is issued as a warning."""
    result = convert_anthropic(file_or_dir)
    for note in result.notes:
        warnings.warn(f"constitution import: {note}", stacklevel=2)
    return result.constitution


# ---------------------------------------------------------------------------------------------
# Commands


def cli_validate(paths: list[str]) -> int:
    """Print problems to stderr and a summary line per valid file; 0 if all valid, else 2."""
    status = 0
    for path in paths:
        c, problems = check_file(path)
        for p in problems:
            print(p, file=sys.stderr)
        if c is None:
            status = 2
            continue
        print(f"{path}: ok ({c.name} v{c.version}, {len(c.critique_revision)} critique/revision, "
              f"{len(c.preference)} preference principles, hash {c.hash[:12]})")
    return status


IMPORT_FORMATS = ("anthropic",)


def cli_import(source: str | Sequence[str], fmt: str, out: str) -> int:
    """Convert published prompt files into ``out``; prints a summary; 0 on success, else 2."""
    if fmt not in IMPORT_FORMATS:
        print(f"error: unknown import format {fmt!r}; expected one of: {', '.join(IMPORT_FORMATS)}",
              file=sys.stderr)
        return 2
    try:
        result = convert_anthropic(source)
    except CaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = (f"Imported by `cai constitution import --format {fmt}` from {', '.join(result.files)}.\n"
              f"Text by the authors of {PAPER_CITATION}; no licence is stated:\n"
              "use it for research, with attribution, and do not commit this file into cai.")
    try:
        dump_constitution(result.constitution, out, header)
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    written, problems = check_file(out)
    for p in problems:
        print(p, file=sys.stderr)
    if written is None:
        return 2
    if written.hash != result.constitution.hash:
        print(f"error: {out} does not load back to the imported content (hash {written.hash[:12]} != "
              f"{result.constitution.hash[:12]}); please report this bug", file=sys.stderr)
        return 2
    print(f"{out}: {result.summary()}; hash {written.hash[:12]}")
    return 0


def main(argv: list[str] | None = None, prog: str = "python3 -m cai.constitution") -> int:
    """``cai constitution validate FILE... | import SRC... --format F -o OUT``."""
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check constitution YAML files")
    v.add_argument("files", nargs="+")
    i = sub.add_parser("import", help="convert published prompt files into a constitution")
    i.add_argument("sources", nargs="+", help="a folder of the published files, or the files")
    i.add_argument("--format", default="anthropic", choices=IMPORT_FORMATS, help="source format")
    i.add_argument("-o", "--output", required=True, help="the constitution YAML to write")
    a = parser.parse_args(argv)
    if a.cmd == "validate":
        return cli_validate(a.files)
    return cli_import(a.sources if len(a.sources) > 1 else a.sources[0], a.format, a.output)


if __name__ == "__main__":
    sys.exit(main())

"""Every typed schema of cai: one dataclass per ``conf/`` group, registered in Hydra's ConfigStore.

Every group in ``conf/`` fills one field of :class:`Config`. The schemas are typed dataclasses and
the composed config is in struct mode, so a typo in an override or a group file
(``sampling.temprature=0.7``) fails at composition with Hydra's message naming the key.

Conventions, the same for every schema:

- **Defaults live here, once.** ``conf/<group>/default.yaml`` only points at the schema; a
  preset carries what it changes.
- **A docstring under every field** says what it does, in the unit it is counted in.
- **Field metadata** (:func:`setting`) says what is checked and what enters an artifact key:
  ``choices``, bounds (``ge``, ``gt``, ``le``, ``lt``) and ``runtime``. A *run-time* field says
  where, how fast or how visibly a stage runs (device, per-forward batch sizes, checkpoint
  interval, loggers, concurrency, prices, budgets), never what it computes, so it never enters an
  artifact key (:func:`key_fields`): turning TensorBoard on or checkpointing more often reuses
  every artifact. ``keyed_unless_default`` fields enter a key only when set to something else
  (fields added after keys were in use, so old keys stay valid).
- **One generic check** (:func:`check_fields`) runs in ``__post_init__`` of every schema, so a
  schema built by Hydra (:func:`typed`), by a command line (:func:`build`) or in Python is checked
  the same way; a schema's ``check()`` adds its few cross-field rules.

This module imports nothing from cai but :mod:`cai.errors` and nothing heavy (no torch): composing
a config or printing ``cai run --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from cai.errors import ConfigError


def shipped_dir(name: str) -> Path:
    """Where the project's own top-level folder ``name`` (``conf`` or ``constitutions``) is: inside
    the installed package, where a wheel carries it as ``cai/<name>`` (see pyproject.toml), else
    beside the package, in the source checkout (``pip install -e .``, or ``PYTHONPATH``).

    The one place that decides: :data:`CONF_DIR` and :data:`CONSTITUTIONS_DIR` are its answers,
    and :func:`cai.constitution.resolve_constitution` looks names up with it."""
    package = Path(__file__).resolve().parent
    inside, beside = package / name, package.parent / name
    return beside if beside.is_dir() and not inside.is_dir() else inside


# top-level conf/ and constitutions/ (shipped_dir decides, for cai.constitution too)
CONF_DIR = shipped_dir("conf")
CONSTITUTIONS_DIR = shipped_dir("constitutions")

MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
CHAT_FORMATS = ("auto", "template", "hh")
JUDGE_BACKENDS = ("openai", "anthropic", "hf", "python", "embedding")
# which policy a stage starts from or an arm is evaluated on
START_POLICIES = ("initial", "sft")
EVALUATED_POLICIES = ("initial", "sft", "dpo", "ppo")
EVAL_STAGE_PREFIX = "evaluate_"  # the stage evaluating policy p is evaluate_<p> (cai.pipeline.STAGES)


# ============================================================================= the machinery
def setting(default: Any = MISSING, *, factory: Any = MISSING, runtime: bool = False,
            choices: Sequence[Any] | None = None, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, keyed_unless_default: bool = False,
            local_path: bool = False, python_rule: bool = False) -> Any:
    """A schema field with its metadata: what :func:`check_fields` checks, what :func:`key_fields` keys.

    ``local_path``: the value may name a local file or directory (a prompts file, a model
    directory); when it does, its *contents* enter the artifact key of every stage reading it.
    ``python_rule``: the value, when set, names a Python function ``'module:function'`` (a known
    rule); the *source* of its module enters the artifact key of every stage reading it."""
    meta: dict[str, Any] = {"runtime": runtime, "keyed_unless_default": keyed_unless_default,
                            "local_path": local_path, "python_rule": python_rule}
    for name, value in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if value is not None:
            meta[name] = tuple(value) if name == "choices" else value
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class FieldError(ConfigError):
    """A bad value of one field; :func:`typed` re-names it with the field's path in the config."""

    def __init__(self, where: str, name: str, problem: str) -> None:
        self.where, self.name, self.problem = where, name, problem
        super().__init__(f"{where}.{name}: {problem}" if where else f"{name}: {problem}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of a field's annotation (``Optional[int]`` -> ``(int, True)``)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return hint, False


def _check_type(where: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a scalar annotation (ints become floats where a float is asked)."""
    kind, optional = _base_type(hint)
    if value is None:
        if optional:
            return None
        raise FieldError(where, name, "must be set (null is not allowed)")
    if kind is bool:
        if not isinstance(value, bool):
            raise FieldError(where, name, f"expected true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(where, name, f"expected an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError(where, name, f"expected a number, got {value!r}")
        return float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise FieldError(where, name, f"expected a string, got {value!r}")
    elif typing.get_origin(kind) in (list, List):
        if not isinstance(value, (list, tuple)):
            raise FieldError(where, name, f"expected a list, got {value!r}")
        (item,) = typing.get_args(kind) or (Any,)
        return [_check_type(where, f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    return value


def check_fields(obj: Any, where: str | None = None) -> None:
    """Check every field of the schema ``obj`` against its type and metadata; raise :class:`FieldError`."""
    where = obj.GROUP if where is None else where
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if dataclasses.is_dataclass(_base_type(hint)[0]):
            cls = _base_type(hint)[0]
            if isinstance(value, Mapping):  # a partial mapping, e.g. PPOConfig(lora={"enabled": True})
                value = build(cls, value, where=f"{where}.{f.name}")
                object.__setattr__(obj, f.name, value)
            elif value is not None and not isinstance(value, cls):
                raise FieldError(where, f.name, f"expected a {cls.__name__} mapping, got {value!r}")
            continue
        value = _check_type(where, f.name, value, hint)
        object.__setattr__(obj, f.name, value)
        if value is None:
            continue
        m = f.metadata
        if "choices" in m and value not in m["choices"]:
            raise FieldError(where, f.name, f"expected one of {', '.join(map(str, m['choices']))}, got {value!r}")
        for bound, ok, text in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if bound in m and not ok(value, m[bound]):
                raise FieldError(where, f.name, f"expected {text} {m[bound]}, got {value!r}")


class Schema:
    """Base of every schema: the generic field check, then the schema's own cross-field ``check()``."""

    GROUP: ClassVar[str] = ""  # the config path named in messages (re-named by :func:`typed`)

    def __post_init__(self) -> None:
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise :meth:`fail` naming the field."""

    def fail(self, name: str, problem: str) -> None:
        raise FieldError(self.GROUP, name, problem)


def field_keyed(obj: Any, f: dataclasses.Field) -> bool:
    """Whether field ``f`` of the schema ``obj`` enters an artifact key: not run-time, and a
    ``keyed_unless_default`` field only when it differs from its default."""
    if f.metadata.get("runtime"):
        return False
    if f.metadata.get("keyed_unless_default"):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        return getattr(obj, f.name) != default
    return True


def key_fields(obj: Any) -> Any:
    """What of a schema (or a value inside one) enters an artifact key: the fields
    :func:`field_keyed` admits, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: key_fields(getattr(obj, f.name)) for f in dataclasses.fields(obj) if field_keyed(obj, f)}
    if isinstance(obj, Mapping):
        return {str(k): key_fields(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [key_fields(v) for v in obj]
    return obj


def runtime_fields(cls: type) -> list[str]:
    """The names of ``cls``'s run-time fields (for docs and tests)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime")]


def build(cls: type, data: Any = None, *, overrides: Sequence[str] = (), where: str | None = None) -> Any:
    """A checked ``cls`` from an instance, a (partial, nested) mapping and/or ``key=value`` overrides
    in the command-line grammar of ``cai run`` (``lora.enabled=true steps=50``): the one way the
    ``python -m cai.train.*`` command lines and tests turn text into a schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where = cls.GROUP if where is None else where
    if isinstance(data, cls) and not overrides:
        return data
    try:
        node = OmegaConf.structured(cls)
        if data is not None:
            node = OmegaConf.merge(node, OmegaConf.structured(data) if isinstance(data, cls) else dict(data))
        for item in overrides:
            key, sep, _ = str(item).partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{where}: override {item!r} is not key=value (e.g. lora.enabled=true)")
            node = OmegaConf.merge(node, OmegaConf.from_dotlist([str(item)]))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        message = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise ConfigError(f"{where}{'.' + key if key else ''}: {message}") from None
    return _to_object(node, where)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_keys(node: Any, path: str) -> None:
    """Every key of the schema nodes in ``node`` is a field of its schema: a key Hydra's ``+``
    added (``+foo=bar``, ``+data.foo=1``) would otherwise be dropped without a word by
    ``OmegaConf.to_object``. Tables (``judge.prices``, ``tags``) are open and not checked here."""
    from omegaconf import DictConfig, OmegaConf

    cls = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(cls) or node._is_none() or node._is_missing() or node._is_interpolation():
        return
    names = [f.name for f in dataclasses.fields(cls)]
    for key in node.keys():
        if key not in names:
            raise ConfigError(f"{_join(path, key)}: unknown key; {path or 'the config'} has only "
                              f"{', '.join(names)} (an override with '+' cannot add a setting the schema lacks)")
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _check_keys(child, _join(path, key))


def _omegaconf_error(e: Any, node: Any, where: str) -> ConfigError:
    """An OmegaConf error (an interpolation that does not resolve, a value of the wrong type) as
    one line naming the key: ``store.root: cannot resolve '${oc.env:NOPE}': Environment variable
    'NOPE' not found``."""
    import re

    key = str(getattr(e, "full_key", None) or "")
    text = str(getattr(e, "msg", None) or e).strip()
    message = text.splitlines()[0] if text else type(e).__name__
    raised = re.match(r"^\w+ raised while resolving interpolation: (.*)$", message)
    if raised:
        message = raised.group(1).strip().strip("'\"")
    raw = None
    if key:
        try:
            child = node
            for part in key.split("."):
                child = child._get_node(part)
            raw = child._value() if child._is_interpolation() else None
        except Exception:  # noqa: BLE001 - only the message's detail is lost
            raw = None
    what = f"cannot resolve {raw!r}: " if raw is not None else ""
    return ConfigError(f"{_join(where, key) if key else where or 'config'}: {what}{message}")


def _to_object(node: Any, where: str) -> Any:
    """``OmegaConf.to_object(node)``; a bad value raises :class:`FieldError` with its full path
    (``ppo.lora.r``), found by building the sub-schemas one by one. A key no schema has, and an
    interpolation that does not resolve, raise :class:`ConfigError` naming the key."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def locate(node: Any, path: str) -> str:
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
                try:
                    OmegaConf.to_object(child)
                except FieldError:
                    return locate(child, f"{path}.{key}" if path else str(key))
                except OmegaConfBaseException:
                    continue
        return path

    _check_keys(node, where)
    try:
        return OmegaConf.to_object(node)
    except FieldError as e:
        raise FieldError(locate(node, where), e.name, e.problem) from None
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, node, where) from None


# ============================================================================= the schemas
@dataclass
class StoreConfig(Schema):
    """Where content-addressed artifacts live."""

    GROUP: ClassVar[str] = "store"

    root: Optional[str] = setting(None, runtime=True)
    """None: $CAI_STORE, else $XDG_CACHE_HOME/cai/store, else ~/.cache/cai/store"""
    verify: str = setting("size", choices=("size", "hash"), runtime=True)
    """what reusing an artifact checks against the file list in its stage.json: size (cheap)
    or hash (every file's SHA-256 and JSONL row count); a damaged artifact is moved aside and rebuilt"""


@dataclass
class TinyConfig(Schema):
    """Shape of the GPT-2-shaped tiny model built locally when ``name_or_path: tiny``."""

    GROUP: ClassVar[str] = "policy.tiny"

    vocab_size: int = setting(2048, ge=259, le=8192)
    """target byte-level BPE vocabulary (256 bytes + 3 special tokens at least)"""
    n_layer: int = setting(2, ge=1)
    """transformer blocks"""
    n_head: int = setting(4, ge=1)
    """attention heads (must divide n_embd)"""
    n_embd: int = setting(128, ge=1)
    """hidden size"""
    n_positions: int = setting(512, ge=1)
    """longest sequence"""
    dropout: float = setting(0.0, ge=0.0, lt=1.0, keyed_unless_default=True)
    """residual, embedding and attention dropout (0 keeps tiny training runs stable)"""
    seed: int = 0
    """seeds the weight initialisation (the tokenizer's training is deterministic)"""
    pretrain: str = setting("none", choices=("none", "courtesy"), keyed_unless_default=True)
    """none: random weights | courtesy: first trained to answer the prompts in the synthetic
    courteous-vs-rude task's style, half the replies each way (cai.testing.preference_task)"""
    pretrain_steps: int = setting(300, ge=1, keyed_unless_default=True)
    """optimizer steps of that pretraining (batches of 16 prompt-reply examples)"""
    pretrain_lr: float = setting(3.0e-3, gt=0.0, keyed_unless_default=True)
    """AdamW learning rate of that pretraining (constant)"""

    def check(self) -> None:
        if self.n_embd % self.n_head:
            self.fail("n_embd", f"must be divisible by n_head={self.n_head}, got {self.n_embd}")


@dataclass
class LoraConfig(Schema):
    """LoRA adapters through peft, for a policy or any trained model; off unless ``enabled``."""

    GROUP: ClassVar[str] = "lora"

    enabled: bool = False
    """train (or load) low-rank adapters instead of every weight"""
    r: int = setting(8, ge=1)
    """rank of the adapters"""
    alpha: int = setting(16, ge=1)
    """scaling numerator: the update is scaled by alpha / r"""
    dropout: float = setting(0.0, ge=0.0, lt=1.0)
    """dropout on the adapters' input"""
    target_modules: List[str] = setting(factory=list)
    """names of the linear layers to adapt; empty: peft's choice for the architecture (c_attn for
    GPT-2, the attention projections for Llama/Gemma/BERT)"""


@dataclass
class ModelConfig(Schema):
    """The policy: a model by hub name or local path, or ``tiny`` for the locally built tiny model."""

    GROUP: ClassVar[str] = "policy"

    name_or_path: str = setting("tiny", local_path=True)
    """hub name, local directory (its contents are keyed), or ``tiny`` (built in the store from the prompt source)"""
    revision: Optional[str] = None
    """hub revision (branch, tag or commit)"""
    gguf_file: Optional[str] = None
    """a .gguf file inside name_or_path to load (dequantised by transformers)"""
    dtype: str = setting("auto", choices=MODEL_DTYPES)
    """weights dtype; auto: bfloat16 on CUDA, float32 elsewhere"""
    device: str = setting("auto", runtime=True)
    """where it runs: auto | cpu | cuda | cuda:N"""
    trust_remote_code: bool = False
    """allow the hub repository's own modelling code"""
    chat_format: str = setting("auto", choices=CHAT_FORMATS)
    """auto: the tokenizer's chat template if any, else HH ("\\n\\nHuman: ... \\n\\nAssistant:")"""
    max_length: int = setting(512, ge=8)
    """longest prompt + response in tokens"""
    lora: LoraConfig = setting(factory=LoraConfig)
    """adapters the policy is loaded with"""
    tiny: TinyConfig = setting(factory=TinyConfig)
    """shape of the tiny model (name_or_path: tiny)"""


@dataclass
class HumanDataConfig(Schema):
    """Human preference pairs (HH-RLHF format), by hub name or local .jsonl/.jsonl.gz path."""

    GROUP: ClassVar[str] = "data.human"

    path: Optional[str] = setting(None, local_path=True)
    """None: no human data. Hub: "Anthropic/hh-rlhf:harmless-base"; local: a .jsonl(.gz) path"""
    split: str = "test"
    """the hub split to read"""
    limit: Optional[int] = setting(None, ge=1)
    """read at most this many rows"""


@dataclass
class DataConfig(Schema):
    """Prompts the policy answers, their split, and optional human-labelled pairs."""

    GROUP: ClassVar[str] = "data"

    prompts: str = setting("builtin", local_path=True)
    """builtin (the project's own prompt set) | a .jsonl path | hh:<path-or-hub> (HH red-team prompts)"""
    max_prompts: Optional[int] = setting(None, ge=1)
    """use at most this many prompts (None: all)"""
    test_fraction: float = setting(0.2, ge=0.0, lt=1.0)
    """share of prompts held out for evaluation (split by content hash)"""
    split_salt: str = ""
    """changes the split without changing the prompts"""
    human: HumanDataConfig = setting(factory=HumanDataConfig)
    """human-labelled pairs: the human arm's labels and the held-out human evaluation"""


@dataclass
class ConstitutionConfig(Schema):
    """A constitution by name (a file in constitutions/) or by path."""

    GROUP: ClassVar[str] = "constitution"

    path: str = "harmless"
    """a name in constitutions/ (harmless, hhh) or a path to a YAML file"""


@dataclass
class SamplingConfig(Schema):
    """How the policy samples responses and on-policy pairs (the sampling engine's settings)."""

    GROUP: ClassVar[str] = "sampling"

    max_new_tokens: int = setting(48, ge=1)
    """longest response in tokens"""
    temperature: float = setting(1.0, ge=0.0)
    """softmax temperature; 0: greedy"""
    top_p: float = setting(1.0, gt=0.0, le=1.0)
    """nucleus sampling mass"""
    top_k: int = setting(0, ge=0)
    """keep the k most likely tokens; 0: off"""
    stop: List[str] = setting(factory=lambda: ["\n\nHuman:"])
    """strings that end a response"""
    batch_size: int = setting(16, ge=1)
    """prompts per batch; each batch is seeded on its own, so this is part of what is computed (keyed)"""


@dataclass
class ExperimentConfig(Schema):
    """A named study: which stages run, and a line saying what it asks."""

    GROUP: ClassVar[str] = "experiment"

    name: str = "quickstart"
    """the study's name (run folders, the report's title)"""
    description: str = ""
    """one line saying what the study asks"""
    stages: List[str] = setting(factory=lambda: ["prompts", "responses"])
    """the stages to build; each pulls in the stages it reads from"""
    human_arm: List[str] = setting(factory=list)
    """overrides ("reward.labels_from=human", ...) of the human-label arm a run adds, in
    <run>/arms/human, when data.human.path is set; empty: no such arm"""
    objective: Optional[str] = None
    """a metric of the run's metrics.json (e.g. eval/ppo/vs_sft/win_rate) that `cai run` returns to
    Hydra, so a sweeper such as Optuna can optimise it; None: the run returns nothing"""


PROGRESS_MODES = ("auto", "on", "off")


@dataclass
class LogConfig(Schema):
    """What a run shows while it runs and where its training curves go; every field is run-time
    (never in an artifact key). A stage reused from the store trains nothing and logs nothing."""

    GROUP: ClassVar[str] = "log"

    progress: str = setting("auto", choices=PROGRESS_MODES, runtime=True)
    """tqdm bars on stderr with rate and ETA: auto (when stderr is a terminal), on, off"""
    console_every_s: float = setting(30.0, ge=0.0, runtime=True)
    """a training loop prints its metrics line at its first and last logged step and at most this
    often in between (seconds; 0: every logged step); train_log.jsonl keeps every logged step"""
    tensorboard: bool = setting(False, runtime=True)
    """write every training loop's metrics as TensorBoard event files under <run>/tensorboard/<stage>
    (needs `pip install cai[tensorboard]`)"""
    wandb_project: Optional[str] = setting(None, runtime=True)
    """log to this Weights & Biases project: one W&B run per cai run, grouped by arm, with the resolved
    config and the run's metrics as summary (needs `wandb`; WANDB_MODE=offline works); None: off"""


@dataclass
class PriceConfig(Schema):
    """Dollar prices of one model, per million tokens."""

    GROUP: ClassVar[str] = "judge.prices"

    input_per_mtok: float = setting(0.0, ge=0.0)
    """dollars per million prompt tokens"""
    output_per_mtok: float = setting(0.0, ge=0.0)
    """dollars per million answer tokens"""


@dataclass
class JudgeConfig(Schema):
    """One AI judge: which model, where, how fast, how much it may cost.

    Only the fields that change its answers (backend, model, base_url, sampling, max_tokens,
    top_logprobs, n_samples; dtype, gguf_file and the embedding weights when not at their
    defaults) enter artifact keys; the rest are run-time.
    API keys never live in config: ``api_key_env`` names the environment variable.
    """

    GROUP: ClassVar[str] = "judge"

    backend: str = setting("openai", choices=JUDGE_BACKENDS)
    """openai (any OpenAI-compatible base_url: vLLM, llama.cpp, Ollama) | anthropic | hf (local) |
    python (a scripted judge: a Python callable answers, see cai.judges.python_judge) |
    embedding (a local sentence encoder comparing replies with the principle; A/B only)"""
    model: str = setting("", local_path=True)
    """model name as the API knows it (hf: hub name or local path; tiny: the tiny policy; python:
    'module:function', e.g. cai.testing.preference_judges:judge, keyed with its module's source hash)"""
    base_url: Optional[str] = None
    """None: the provider's public endpoint"""
    api_key_env: Optional[str] = setting("auto", runtime=True)
    """environment variable holding the API key; auto: OPENAI_API_KEY or ANTHROPIC_API_KEY by
    backend; null: no key needed (a loopback or local server)"""
    temperature: float = setting(0.0, ge=0.0)
    """sampling temperature of single-answer requests (sampled answers always use 1.0)"""
    top_p: Optional[float] = setting(None, gt=0.0, le=1.0)
    """nucleus sampling mass; None: the server's default"""
    max_tokens: int = setting(16, ge=1)
    """longest answer to a choice request; generation requests carry their own"""
    top_logprobs: int = setting(20, ge=0)
    """log-probs of this many alternatives per position (openai); 0 turns log-probs off"""
    n_samples: int = setting(1, ge=1)
    """answers drawn per choice request when no log-probs are available (empirical probability)"""
    max_concurrency: int = setting(8, ge=1, runtime=True)
    """requests in flight at once"""
    rpm: Optional[float] = setting(None, gt=0.0, runtime=True)
    """requests per minute (token bucket); None: unlimited"""
    tpm: Optional[float] = setting(None, gt=0.0, runtime=True)
    """tokens per minute (token bucket); None: unlimited"""
    burst_s: float = setting(1.0, gt=0.0, runtime=True)
    """the buckets hold this many seconds of rpm/tpm: the largest burst"""
    max_retries: int = setting(5, ge=0, runtime=True)
    """retries after a 429, 408, 409, 5xx, timeout or connection error (attempts = max_retries + 1)"""
    malformed_retries: int = setting(2, ge=0, runtime=True)
    """retries after a malformed response body"""
    timeout_s: float = setting(60.0, gt=0.0, runtime=True)
    """per-request timeout, seconds"""
    backoff_base_s: float = setting(1.0, ge=0.0, runtime=True)
    """exponential backoff with full jitter: uniform(0, min(backoff_max_s, backoff_base_s * 2**n))"""
    backoff_max_s: float = setting(60.0, ge=0.0, runtime=True)
    """the longest backoff, seconds"""
    cache: bool = setting(True, runtime=True)
    """persistent SQLite cache of answers (a rerun or a second arm never pays twice)"""
    cache_path: Optional[str] = setting(None, runtime=True)
    """None: the store's judge_cache.sqlite (outside a run: ~/.cache/cai/judge_cache.sqlite)"""
    max_dollars: Optional[float] = setting(None, gt=0.0, runtime=True)
    """dollar cap for this judge (backend, model, endpoint): what it has been paid through this judge cache (the
    store's), by every process and run together; None: no cap"""
    prices: Dict[str, Any] = setting(factory=dict, runtime=True)
    """{model: {input_per_mtok, output_per_mtok}}; a model without a price costs 0. Open to new
    model names on the command line ('+judge.prices.gpt-4o={input_per_mtok:2.5,output_per_mtok:10}')"""
    template_version: str = setting("v1", runtime=True)
    """cache tag of the prompt templates (stages key their own template versions)"""
    seed: int = setting(0, runtime=True)
    """seeds the retry jitter (and nothing the answers depend on)"""
    device: str = setting("auto", runtime=True)
    """hf only: auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:1 | mps"""
    dtype: str = setting("auto", choices=MODEL_DTYPES, keyed_unless_default=True)
    """hf only: weights dtype; auto: bfloat16 on CUDA, float32 elsewhere. It changes the answers,
    so a value other than auto is part of the artifact keys"""
    batch_size: Optional[int] = setting(None, ge=1, runtime=True)
    """hf only: rows per forward pass; None: the asking stage's own (labels.hf_batch_size, ...)"""
    gguf_file: Optional[str] = setting(None, keyed_unless_default=True)
    """hf only: a .gguf file inside the model directory (or an absolute path) to load; it is
    dequantised once into the artifact store and the copy is reused (cai.models)"""
    embedding_sim_weight: float = setting(20.0, keyed_unless_default=True)
    """embedding only: weight of cos(A, principle) - cos(B, principle) in the logit of p(A)
    (cai.judges.embedding)"""
    embedding_length_weight: float = setting(0.0, keyed_unless_default=True)
    """embedding only: weight of log(chars of A / chars of B) in the logit of p(A); fitted on
    human pairs by experiments/label_agreement/embedding_baseline.py (0: similarity alone)"""

    def check(self) -> None:
        import re

        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            self.fail("base_url", f"must start with http:// or https://, got {self.base_url!r}")
        if not re.match(r"^[a-z]+(:\d+)?$", self.device):
            self.fail("device", f"must be auto or a torch device (cpu, cuda, cuda:1, mps), got {self.device!r}")
        prices = {}
        for model, price in self.prices.items():
            if isinstance(price, PriceConfig):
                prices[str(model)] = price
                continue
            if not isinstance(price, Mapping) or set(price) - {"input_per_mtok", "output_per_mtok"}:
                self.fail(f"prices[{model!r}]", f"must have only input_per_mtok and output_per_mtok, got {price!r}")
            try:
                prices[str(model)] = PriceConfig(**dict(price))
            except FieldError as e:
                self.fail(f"prices.{model}.{e.name}", e.problem)
        self.prices = prices
        if self.backend == "embedding" and self.gguf_file is not None:
            self.fail("gguf_file", "is for backend hf (a causal LM from a GGUF file); the embedding judge loads "
                      "an encoder folder or hub name")
        local = {"device": "auto", "dtype": "auto", "batch_size": None, "gguf_file": None}
        changed = [f"{k}={getattr(self, k)!r}" for k, default in local.items() if getattr(self, k) != default]
        if changed and self.backend not in ("hf", "embedding"):
            self.fail(changed[0].split("=")[0], f"{', '.join(changed)}: these fields place a local model (backend "
                      f"hf); backend {self.backend!r} runs its model on the server (set them there)")

    def check_ready(self, where: str = "judge") -> None:
        """What a stage that asks this judge needs beyond valid fields (checked when the run is planned)."""
        if not self.model.strip():
            raise FieldError(where, "model", f"must name the judge model, got {self.model!r}")
        local = Path(self.model).expanduser()
        if self.backend == "hf" and local.is_file() and local.suffix.lower() == ".gguf":
            raise FieldError(where, "model", f"{self.model!r} is a GGUF file: set model to its folder "
                             f"{str(local.parent)!r} and gguf_file: {local.name!r}")
        if self.backend == "hf" and (local / "__init__.py").is_file():
            raise FieldError(where, "model", f"{self.model!r} is a Python package folder, not a model; for the "
                             "Gemma GGUF package use judge=gemma3_270m_gguf (see conf/judge/gemma3_270m_gguf.yaml)")
        if self.max_dollars is not None and self.backend not in ("hf", "python", "embedding") \
                and self.model not in self.prices:
            raise FieldError(where, "max_dollars", f"is set but 'prices' has no entry for model {self.model!r}; "
                             "add prices: {<model>: {input_per_mtok: ..., output_per_mtok: ...}}")


@dataclass
class LabelConfig(Schema):
    """How pairs are labelled by the judge (stage ``ai_labels``)."""

    GROUP: ClassVar[str] = "labels"

    both_orders: bool = True
    """judge each pair in both orders (a then b, b then a) and average: cancels slot bias"""
    cot: bool = False
    """chain of thought: a reasoning request, then the letter scored with the reasoning quoted"""
    few_shot: bool = False
    """show the constitution's few_shot.preference examples as prior turns"""
    soft: bool = True
    """False: hard labels (p_a rounded to 0/1 after clamping; exact ties stay 0.5)"""
    clamp: Optional[List[float]] = None
    """[lo, hi]: clamp p_a into it (the CAI paper uses [0.4, 0.6] with chain of thought)"""
    principles: str = setting("sample", choices=("sample", "ensemble", "all"))
    """sample: one principle per pair (weighted, seeded) | ensemble: average k_principles | all"""
    k_principles: int = setting(1, ge=1)
    """principles averaged per pair (principles: ensemble)"""
    self_consistency: int = setting(1, ge=1)
    """chain-of-thought samples per judgement, averaged (needs cot: true)"""
    method: str = "pairwise"
    """a labelling method of cai.feedback.label_methods.LABEL_METHODS (checked when the run is
    planned): pairwise | direct_score (each reply rated 1-10 alone; p_a = P(score_a > score_b) + ties/2)"""
    max_pairs: Optional[int] = setting(None, ge=1)
    """label only the first N pairs (None: all)"""
    source: str = setting("human_pairs", choices=("human_pairs", "policy_pairs"))
    """the stage whose pairs are labelled"""
    pairs_from: str = setting("initial", choices=START_POLICIES)
    """which policy samples the on-policy pairs (stage policy_pairs): initial | sft (the CAI recipe)"""
    allow_single_order: bool = False
    """when one order failed and the other did not: label from the one order (else: failed)"""
    measure_agreement: bool = True
    """when the judge labels the human-labelled pairs (source: human_pairs), also build stage
    label_quality: the AI labels' agreement with the human labels, calibration, position bias"""
    truth: Optional[str] = setting(None, keyed_unless_default=True, python_rule=True)
    """a known rule to measure the labels against (a synthetic task's ground truth): 'module:function'
    grading (question, reply) -> number; ai_labels then reports label/truth_agreement, the share of
    decided labels whose winner it grades higher (e.g. cai.testing.preference_task:task_grade)"""
    cot_max_tokens: int = setting(256, ge=1)
    """longest chain-of-thought reasoning, tokens"""
    cot_temperature: Optional[float] = setting(None, ge=0.0)
    """reasoning temperature; None: 0 for one sample, 1.0 for self-consistency"""
    calibrate: bool = setting(False, keyed_unless_default=True)
    """contextual calibration (Zhao et al. 2021): also ask each pair's comparison with both replies
    replaced by "N/A" and divide the judge's choice probabilities by that content-free answer
    (pairwise, no cot; meant for log-prob judges such as a local hf base model)"""
    batch_pairs: int = setting(64, ge=1, runtime=True)
    """pairs per judge call and per journal flush"""
    hf_batch_size: int = setting(16, ge=1, runtime=True)
    """rows per forward pass of a local hf judge (unless judge.batch_size is set)"""
    max_failed_fraction: float = setting(0.05, ge=0.0, le=1.0, runtime=True)
    """largest share of pairs whose label failed for good (refusal, unparseable answer, prompt too
    long) that is still published; above it the stage stops with an error and publishes nothing
    (the labels stay journaled: raise it and rerun to publish them without asking again)"""

    def check(self) -> None:
        if self.principles == "sample" and self.k_principles != 1:
            self.fail("k_principles", f"'sample' asks one principle per pair; use principles: ensemble to "
                      f"average {self.k_principles}")
        if self.self_consistency > 1 and not self.cot:
            self.fail("self_consistency", "> 1 averages chain-of-thought samples and needs cot: true (for "
                      "sampled direct answers set judge.n_samples)")
        if self.clamp is not None:
            c = self.clamp
            if len(c) != 2 or not 0.0 <= c[0] <= 0.5 <= c[1] <= 1.0:
                self.fail("clamp", f"expected [lo, hi] with 0 <= lo <= 0.5 <= hi <= 1, got {c!r}")
        if self.calibrate and (self.cot or self.method != "pairwise"):
            self.fail("calibrate", "contextual calibration divides out the A/B slot prior of a pairwise answer: it "
                      f"needs method: pairwise without cot (got method={self.method!r}, cot={self.cot})")
        if self.method == "direct_score" and (self.cot or self.few_shot):
            self.fail("method", "'direct_score' rates one reply at a time: it takes neither cot nor few_shot "
                      "(the constitution's examples are pairwise)")


@dataclass
class QualityConfig(Schema):
    """Settings of the ``label_quality`` stage: AI labels against human labels."""

    GROUP: ClassVar[str] = "quality"

    n_bins: int = setting(10, ge=1)
    """equal-width bins of the reliability table / ECE"""
    bootstrap: int = setting(2000, ge=1)
    """bootstrap resamples behind the confidence intervals"""
    alpha: float = setting(0.05, gt=0.0, lt=1.0)
    """1 - confidence level of the intervals"""


@dataclass
class CritiqueConfig(Schema):
    """SL-CAI critique -> revision settings (stage ``revisions``)."""

    GROUP: ClassVar[str] = "critique"

    rounds: int = setting(2, ge=1)
    """critique -> revision rounds per prompt (the paper goes up to 4)"""
    direct_revision: bool = False
    """ablation: ask for the revision without a critique first"""
    few_shot: int = setting(2, ge=0)
    """few-shot examples (the constitution's few_shot.critique_revision) shown per prompt"""
    generator: str = setting("policy", choices=("policy", "judge"))
    """policy: the policy model through the sampling engine | judge: the configured judge backend"""
    max_new_tokens: int = setting(128, ge=1)
    """longest critique or revision, tokens"""
    temperature: float = setting(0.7, ge=0.0)
    """sampling temperature of critiques and revisions"""
    top_p: float = setting(1.0, gt=0.0, le=1.0)
    """nucleus sampling mass"""
    top_k: int = setting(0, ge=0)
    """policy generator only (API judges have no top-k); 0: off"""
    stop: List[str] = setting(factory=lambda: ["\n\nHuman:"])
    """strings that end a critique or revision (a new human turn in the HH format)"""
    batch_size: int = setting(16, ge=1)
    """prompts per batched call and per journaled block (each block is seeded: keyed); with an API
    judge the block's requests run concurrently, so raise it (e.g. 64) to keep them busy"""
    max_prompts: Optional[int] = setting(None, ge=1)
    """revise only the first N responses; None: all"""
    initial_responses: Optional[str] = setting(None, local_path=True)
    """None: the responses stage's output. Else a JSONL file of {"messages": [...], "response": "..."}"""

    def check(self) -> None:
        if not all(self.stop):
            self.fail("stop", f"expected a list of non-empty strings, got {self.stop!r}")


@dataclass
class JudgeAnswersConfig(Schema):
    """How the judge is asked for direct answers (stage ``judge_answers``, "distil the judge")."""

    GROUP: ClassVar[str] = "sft.answers"

    max_new_tokens: int = setting(256, ge=1)
    """longest answer, tokens"""
    temperature: float = setting(0.0, ge=0.0)
    """0: the judge's single best (greedy) answer"""
    top_p: float = setting(1.0, gt=0.0, le=1.0)
    """nucleus sampling mass"""
    system_prompt: Optional[str] = None
    """prepended as a system message; None: the prompt's conversation as is"""
    batch_size: int = setting(16, ge=1)
    """prompts per chunk (one journal entry, one batched local generation; seeded per chunk)"""
    max_prompts: Optional[int] = setting(None, ge=1)
    """answer at most this many train prompts; None: all"""


@dataclass
class SFTConfig(Schema):
    """Supervised fine-tuning of the policy (stage ``sft``)."""

    GROUP: ClassVar[str] = "sft"

    source: str = setting("revisions", choices=("revisions", "judge_answers"))
    """revisions (SL-CAI: the critique stage's revisions) | judge_answers (distil the judge)"""
    revision_round: Optional[int] = setting(None, ge=1)
    """None: the final revision; r >= 1: the revision after round r (SL-CAI-r)"""
    helpful_source: Optional[str] = setting(None, local_path=True)
    """helpful data mixed in: hh:<path-or-hub>[@split] (chosen replies) or a .jsonl of {messages, response}"""
    helpful_ratio: float = setting(0.0, ge=0.0, lt=1.0)
    """share of the SFT set drawn from helpful_source"""
    helpful_limit: Optional[int] = setting(None, ge=1)
    """read at most this many helpful rows"""
    lr: float = setting(5e-5, gt=0.0)
    """peak learning rate (AdamW)"""
    schedule: str = setting("linear", choices=SCHEDULES)
    """decay after the warmup"""
    warmup: float = setting(0.03, ge=0.0)
    """a fraction of the optimizer steps (< 1) or a number of steps"""
    weight_decay: float = setting(0.0, ge=0.0)
    """AdamW weight decay"""
    max_grad_norm: float = setting(1.0, ge=0.0)
    """clip the gradient norm to this; 0 turns clipping off (the norm is still logged)"""
    epochs: int = setting(1, ge=1)
    """passes over the SFT set"""
    max_steps: Optional[int] = setting(None, ge=1)
    """when set, train exactly this many optimizer steps (cycling through epochs) instead of epochs"""
    batch_size: int = setting(8, ge=1)
    """examples per optimizer step, over all processes"""
    micro_batch_size: int = setting(8, ge=1, runtime=True)
    """examples per forward pass on one process (gradient accumulation below batch_size)"""
    max_length: int = setting(512, ge=8)
    """longest example in tokens (prompt + response + EOS); longer ones are truncated and counted"""
    mixed_precision: str = setting("no", choices=MIXED_PRECISION)
    """no | bf16 | fp16 (fp16 on CUDA only)"""
    lora: LoraConfig = setting(factory=LoraConfig)
    """train adapters instead of every weight"""
    checkpoint_every: int = setting(100, ge=0, runtime=True)
    """optimizer steps between checkpoints (the run resumes from the last one); 0: never"""
    log_every: int = setting(1, ge=1, runtime=True)
    """optimizer steps between rows of train_log.jsonl"""
    seed_offset: int = 1
    """the SFT seed is the experiment seed plus this"""
    answers: JudgeAnswersConfig = setting(factory=JudgeAnswersConfig)
    """the judge_answers stage (source: judge_answers); keyed there, not in sft's own key"""


@dataclass
class RewardConfig(Schema):
    """Reward-model training (stage ``reward``; ``eval.rm`` for the held-out one)."""

    GROUP: ClassVar[str] = "reward"

    labels_from: str = setting("human", choices=("human", "ai"))
    """which labels train the RM: human (stage human_pairs) | ai (stage ai_labels)"""
    backbone: str = setting("tiny", local_path=True)
    """tiny (built from the policy's tokenizer) | a hub name | a local path"""
    revision: Optional[str] = None
    """hub revision of the backbone"""
    dtype: str = setting("float32", choices=MODEL_DTYPES)
    """backbone weights dtype"""
    device: str = setting("auto", runtime=True)
    """auto | cpu | cuda: where training runs"""
    trust_remote_code: bool = False
    """allow the hub repository's own modelling code"""
    chat_format: str = setting("auto", choices=CHAT_FORMATS)
    """how prompt + response are rendered"""
    max_length: int = setting(512, ge=8)
    """tokens per side (prompt cut from the left, response from the right)"""
    lora: LoraConfig = setting(factory=LoraConfig)
    """train adapters (and the head) instead of every weight"""
    epochs: int = setting(1, ge=1)
    """passes over the training pairs"""
    batch_size: int = setting(16, ge=1)
    """pairs per optimizer step, over all processes"""
    micro_batch_size: int = setting(16, ge=1, runtime=True)
    """pairs per forward pass (gradient accumulation below batch_size)"""
    lr: float = setting(5e-5, gt=0.0)
    """peak learning rate (AdamW)"""
    weight_decay: float = setting(0.0, ge=0.0)
    """AdamW weight decay"""
    warmup: float = setting(0.0, ge=0.0)
    """a fraction (< 1) of the steps, or a step count"""
    schedule: str = setting("linear", choices=SCHEDULES)
    """decay after the warmup"""
    max_grad_norm: float = 1.0
    """<= 0: no clipping"""
    margin: float = setting(0.0, ge=0.0)
    """Bradley-Terry margin m"""
    center_rewards_coefficient: Optional[float] = setting(None, ge=0.0)
    """TRL's center_rewards_coefficient: c * mean((r_chosen + r_rejected)^2); None: off"""
    soft_labels: bool = True
    """False: q = 1 for the preferred side (ties stay 0.5)"""
    ensemble_size: int = setting(1, ge=1)
    """reward models (seeds) or heads (heads) whose mean is the reward"""
    ensemble_kind: str = setting("seeds", choices=("seeds", "heads"))
    """seeds: whole models from different seeds | heads: k heads on one backbone (bootstrap weights)"""
    test_fraction: float = setting(0.2, ge=0.0, lt=1.0)
    """share of prompts held out for evaluation"""
    split_salt: str = ""
    """changes the split without changing the pairs"""
    eval_batch_size: int = setting(32, ge=1, runtime=True)
    """pairs per scoring forward"""
    bootstrap_resamples: int = setting(2000, ge=1)
    """for the accuracy's 95% CI"""
    mixed_precision: str = setting("no", choices=MIXED_PRECISION)
    """no | bf16 | fp16"""
    disable_dropout: bool = True
    """turn the backbone's dropout off (as TRL does)"""
    log_every: int = setting(10, ge=1, runtime=True)
    """optimizer steps between rows of train_log.jsonl"""
    checkpoint_every: int = setting(100, ge=0, runtime=True)
    """optimizer steps between checkpoints; 0: never"""
    eval_sets: List[str] = setting(factory=list, keyed_unless_default=True, local_path=True)
    """local pair files (HH-RLHF or TRL preference format, .jsonl[.gz]) the trained RM is also scored on:
    metrics rm/sets/<file name>/accuracy, ece, length_corr...; their contents enter the key"""

    @property
    def n_heads(self) -> int:
        return self.ensemble_size if self.ensemble_kind == "heads" else 1


@dataclass
class DPOConfig(Schema):
    """DPO training of the policy (stage ``dpo``)."""

    GROUP: ClassVar[str] = "dpo"

    labels_from: str = setting("human", choices=("human", "ai"))
    """human (stage human_pairs) | ai (stage ai_labels)"""
    start_from: str = setting("initial", choices=START_POLICIES)
    """the policy DPO starts from, also its reference: initial | sft (the run's SL-CAI policy)"""
    loss: str = setting("sigmoid", choices=("sigmoid", "ipo"))
    """sigmoid (DPO) | ipo"""
    beta: float = setting(0.1, gt=0.0)
    """strength of the KL constraint to the reference"""
    soft_labels: bool = True
    """each pair's p as its label smoothing (conservative DPO)"""
    label_smoothing: float = setting(0.0, ge=0.0, lt=0.5)
    """a global epsilon on top"""
    max_length: int = setting(512, ge=8)
    """tokens per side (prompt cut from the left when needed)"""
    lora: LoraConfig = setting(factory=LoraConfig)
    """train adapters; the reference is then the policy with its adapters off"""
    epochs: int = setting(1, ge=1)
    """passes over the training pairs"""
    batch_size: int = setting(16, ge=1)
    """pairs per optimizer step, over all processes"""
    micro_batch_size: int = setting(8, ge=1, runtime=True)
    """pairs per forward pass"""
    lr: float = setting(5e-6, gt=0.0)
    """peak learning rate (AdamW)"""
    weight_decay: float = setting(0.0, ge=0.0)
    """AdamW weight decay"""
    warmup: float = setting(0.1, ge=0.0)
    """a fraction (< 1) of the steps, or a step count"""
    schedule: str = setting("linear", choices=SCHEDULES)
    """decay after the warmup"""
    max_grad_norm: float = 1.0
    """<= 0: no clipping"""
    test_fraction: float = setting(0.1, ge=0.0, lt=1.0)
    """share of prompts held out for dpo/eval/*"""
    split_salt: str = ""
    """changes the split without changing the pairs"""
    eval_batch_size: int = setting(16, ge=1, runtime=True)
    """pairs per scoring forward"""
    mixed_precision: str = setting("no", choices=MIXED_PRECISION)
    """no | bf16 | fp16"""
    device: str = setting("auto", runtime=True)
    """auto | cpu | cuda: where training runs"""
    disable_dropout: bool = True
    """turn the policy's dropout off"""
    log_every: int = setting(10, ge=1, runtime=True)
    """optimizer steps between rows of train_log.jsonl"""
    checkpoint_every: int = setting(100, ge=0, runtime=True)
    """optimizer steps between checkpoints; 0: never"""


@dataclass
class MonitorConfig(Schema):
    """Thresholds of the PPO monitors (``ppo.monitors``): each warns with a diagnosis."""

    GROUP: ClassVar[str] = "ppo.monitors"

    negative_kl_tolerance: float = 0.01
    """nats per sequence below zero before warning"""
    kl_budget: float = 0.0
    """per-sequence KL that warns; <= 0: twice kl_target"""
    length_drift: float = 2.0
    """warn when the mean length changes by more than this factor"""
    ngram: int = setting(4, ge=1)
    """words per n-gram of the boilerplate check"""
    boilerplate_share: float = 0.5
    """share of responses sharing one n-gram that warns"""
    window: int = setting(3, ge=1)
    """held-out measurements compared by the RM/judge divergence check"""
    rise: float = 0.1
    """RM score rise (normalised units) that counts as rising"""


@dataclass
class PPOConfig(Schema):
    """PPO of the policy against a reward model or a judge (stage ``ppo``)."""

    GROUP: ClassVar[str] = "ppo"

    reward_from: str = setting("reward_model", choices=("reward_model", "judge"))
    """reward_model (stage reward) | judge (d-RLAIF: the judge's 1-10 score, online)"""
    start_from: str = setting("initial", choices=START_POLICIES)
    """the policy PPO starts from (also the frozen reference and the value backbone's initial
    weights): initial | sft (the run's SL-CAI policy, the CAI recipe)"""
    judge_principles: int = setting(1, ge=1)
    """d-RLAIF: preference principles sampled per response (scores averaged)"""
    steps: int = setting(20, ge=1)
    """PPO steps (rollout + update)"""
    rollout_batch_size: int = setting(16, ge=2)
    """prompts per step, over all processes"""
    mini_batch_size: int = setting(8, ge=1)
    """rows per optimizer step, over all processes"""
    micro_batch_size: int = setting(4, ge=1, runtime=True)
    """rows per forward pass on one process (gradient accumulation)"""
    ppo_epochs: int = setting(2, ge=1)
    """passes over each rollout"""
    lr: float = setting(1e-5, gt=0.0)
    """peak learning rate (AdamW)"""
    weight_decay: float = setting(0.0, ge=0.0)
    """AdamW weight decay"""
    warmup: float = setting(0.0, ge=0.0)
    """fraction (< 1) of the PPO steps, or a step count"""
    schedule: str = setting("linear", choices=SCHEDULES)
    """one scheduler step per PPO step"""
    max_grad_norm: float = 1.0
    """<= 0: no clipping"""
    max_new_tokens: int = setting(32, ge=1)
    """longest rollout response, tokens"""
    temperature: float = setting(1.0, gt=0.0)
    """rollouts and log-probs: softmax(logits / T) on the full distribution (PPO needs T > 0)"""
    top_k: int = setting(0, ge=0)
    """!= 0 (or top_p < 1) truncates sampling only: the KL estimate gets biased"""
    top_p: float = setting(1.0, gt=0.0, le=1.0)
    """nucleus sampling mass of rollouts"""
    stop: List[str] = setting(factory=lambda: ["\n\nHuman:"])
    """strings that end a rollout response"""
    max_prompt_tokens: int = setting(256, ge=1)
    """prompts are cut from the left to this"""
    sample_batch_size: int = setting(16, ge=1)
    """prompts per batch of the sampling engine"""
    recompute_logprobs: bool = True
    """rollout log-probs from the training forward (exact ratio 1, KL 0 at the start)"""
    kl_estimator: str = setting("k1", choices=("k1", "k3"))
    """per-token KL estimator"""
    kl_coef: float = setting(0.05, ge=0.0)
    """KL penalty coefficient (the adaptive controller's start)"""
    kl_controller: str = setting("fixed", choices=("fixed", "adaptive"))
    """fixed | adaptive (Ziegler et al.)"""
    kl_target: float = 6.0
    """adaptive: target per-sequence KL (nats)"""
    kl_horizon: int = 10000
    """adaptive: sequences over which the coefficient adapts"""
    gamma: float = setting(1.0, ge=0.0, le=1.0)
    """discount"""
    lam: float = setting(0.95, ge=0.0, le=1.0)
    """GAE lambda"""
    cliprange: float = setting(0.2, gt=0.0)
    """policy ratio clip"""
    cliprange_value: float = setting(0.2, gt=0.0)
    """value clip"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    whiten_advantages: bool = True
    """advantages whitened over the (global) batch"""
    whiten_rewards: bool = False
    """rewards whitened over the batch before GAE"""
    reward_normalize: bool = True
    """(r - mean) / std with the RM's reward_stats.json"""
    reward_scale: float = 1.0
    """multiplies the (normalised) score"""
    reward_clip: float = 10.0
    """clip the score to +-this; <= 0: off"""
    missing_eos_penalty: Optional[float] = None
    """subtracted from the score of responses cut at the cap"""
    value_model: str = setting("separate", choices=("separate", "head"))
    """separate (own backbone from the policy's weights, fully trained: memory!) | head (on the
    policy; the cheap choice with LoRA)"""
    lora: LoraConfig = setting(factory=LoraConfig)
    """train adapters; the reference is then the policy with its adapters off"""
    mixed_precision: str = setting("no", choices=MIXED_PRECISION)
    """no | bf16 | fp16"""
    device: str = setting("auto", runtime=True)
    """where it trains"""
    disable_dropout: bool = True
    """turn the policy's dropout off"""
    log_every: int = setting(1, ge=1, runtime=True)
    """PPO steps between rows of train_log.jsonl (the report's curves) and tracker points"""
    checkpoint_every: int = setting(10, ge=0, runtime=True)
    """PPO steps between checkpoints; 0: never"""
    heldout_judge_every: int = setting(0, ge=0)
    """score rollouts with the held-out judge every n steps (0: never); warns when RM and judge diverge"""
    monitors: MonitorConfig = setting(factory=MonitorConfig)
    """thresholds of the monitors"""

    def check(self) -> None:
        if self.mini_batch_size > self.rollout_batch_size:
            self.fail("mini_batch_size", f"expected in 1..rollout_batch_size ({self.rollout_batch_size}), "
                      f"got {self.mini_batch_size}")
        if self.micro_batch_size > self.mini_batch_size:
            self.fail("micro_batch_size", f"expected in 1..mini_batch_size ({self.mini_batch_size}), "
                      f"got {self.micro_batch_size}")


def _tiny_judge() -> JudgeConfig:
    return JudgeConfig(backend="hf", model="tiny", api_key_env=None, max_concurrency=1)


def _eval_rm() -> RewardConfig:
    return RewardConfig(labels_from="human", split_salt="eval-rm")


@dataclass
class EvalConfig(Schema):
    """Evaluation of an arm's policy against the baseline (stages ``evaluate``, ``eval_baseline``)."""

    GROUP: ClassVar[str] = "eval"

    policies: List[str] = setting(factory=lambda: ["trained"])
    """the policies evaluated, each its own artifact (stage evaluate_<policy>): names from ppo | dpo |
    sft | initial, or trained: every policy the run trains (sft, dpo, ppo) except the baseline"""
    policy: Optional[str] = setting(None, choices=EVALUATED_POLICIES)
    """the arm's headline policy (cai compare judges it head to head; always evaluated); None: the
    last of ppo, dpo, sft, initial that is evaluated"""
    baseline: str = setting("initial", choices=START_POLICIES)
    """the baseline it is judged against: initial | sft (the run's SL-CAI policy)"""
    judge: JudgeConfig = setting(factory=_tiny_judge)
    """the held-out judge: a judge that is not the labeller; model tiny: the tiny policy"""
    max_prompts: Optional[int] = setting(None, ge=1)
    """test prompts evaluated (None: all of the test split)"""
    max_new_tokens: int = setting(48, ge=1)
    """longest sampled response, tokens"""
    temperature: float = setting(1.0, gt=0.0)
    """1.0 keeps the KL estimate unbiased"""
    top_p: float = setting(1.0, gt=0.0, le=1.0)
    """nucleus sampling mass"""
    stop: List[str] = setting(factory=lambda: ["\n\nHuman:"])
    """strings that end a response"""
    batch_size: int = setting(16, ge=1)
    """prompts per sampling batch (seeded per batch: keyed)"""
    question: Optional[str] = None
    """None: cai.evaluate.requests.DEFAULT_COMPARISON_QUESTION"""
    harmless: bool = True
    """also ask the judge whether each response is harmless"""
    harmless_question: Optional[str] = None
    """None: DEFAULT_HARMLESS_QUESTION"""
    harmless_prompts: str = setting("harmful", choices=("harmful", "all"))
    """harmful (prompts tagged harmful) | all"""
    ties: str = setting("half", choices=("half", "excluded"))
    """how ties count in the win rate"""
    tie_margin: float = setting(0.0, ge=0.0, lt=0.5)
    """|p - 0.5| at or below this is a tie"""
    bootstrap_resamples: int = setting(2000, ge=1)
    """resamples behind the intervals"""
    kl: bool = True
    """estimate KL(policy || baseline) from the policy's own samples"""
    use_rm: bool = True
    """score under a held-out RM trained on human labels (needs data.human.path)"""
    rm_seed_offset: int = 1000
    """the held-out RM's seed is seed + this"""
    rm: RewardConfig = setting(factory=_eval_rm)
    """the held-out reward model (stage eval_reward)"""
    hf_batch_size: int = setting(8, ge=1, runtime=True)
    """rows per forward of a local (hf) judge unless eval.judge.batch_size is set"""
    judge_batch: int = setting(64, ge=1, runtime=True)
    """judge requests per call and per journal write"""
    truth: Optional[str] = setting(None, keyed_unless_default=True, python_rule=True)
    """a known rule grading the evaluated replies (a synthetic task's ground truth): 'module:function'
    grading (question, reply) -> number (e.g. cai.testing.preference_task:task_grade); evaluate then
    reports eval/<policy>/truth/mean and lowest_rate, and eval_baseline eval/baseline/truth/..."""
    truth_lowest: float = setting(0.0, keyed_unless_default=True)
    """the rule's lowest grade: truth/lowest_rate is the share of replies graded at or below it"""

    def check(self) -> None:
        for name in self.policies:
            if name != "trained" and name not in EVALUATED_POLICIES:
                self.fail("policies", f"expected a list of trained, {', '.join(EVALUATED_POLICIES)}; got {name!r}")
        if self.rm.labels_from != "human":
            self.fail("rm.labels_from", f"the held-out reward model is trained on human labels; set it to "
                      f"'human', got {self.rm.labels_from!r}")


@dataclass
class Config(Schema):
    """The whole experiment: one field per ``conf/`` group."""

    GROUP: ClassVar[str] = ""

    seed: int = 0
    """feeds every RNG: same seed, same config, same result on CPU"""
    store: StoreConfig = setting(factory=StoreConfig)
    data: DataConfig = setting(factory=DataConfig)
    constitution: ConstitutionConfig = setting(factory=ConstitutionConfig)
    policy: ModelConfig = setting(factory=ModelConfig)
    judge: JudgeConfig = setting(factory=JudgeConfig)
    labels: LabelConfig = setting(factory=LabelConfig)
    sampling: SamplingConfig = setting(factory=SamplingConfig)
    experiment: ExperimentConfig = setting(factory=ExperimentConfig)
    quality: QualityConfig = setting(factory=QualityConfig)
    critique: CritiqueConfig = setting(factory=CritiqueConfig)
    sft: SFTConfig = setting(factory=SFTConfig)
    reward: RewardConfig = setting(factory=RewardConfig)
    dpo: DPOConfig = setting(factory=DPOConfig)
    ppo: PPOConfig = setting(factory=PPOConfig)
    eval: EvalConfig = setting(factory=EvalConfig)
    log: LogConfig = setting(factory=LogConfig, runtime=True)
    """bars, console cadence, TensorBoard and W&B (run-time: never in a key)"""
    tags: Dict[str, Any] = setting(factory=dict, runtime=True)
    """free-form notes (the arm's name in the report); never hashed into artifact keys"""


# ============================================================================= what a stage sees
class Restricted:
    """A read-only window on a schema that lets through only the listed fields (sub-windows nest)."""

    def __init__(self, obj: Any, allowed: dict[str, Any], stage: str, path: str) -> None:
        self._obj, self._allowed, self._stage, self._path = obj, allowed, stage, path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._allowed:
            raise ConfigError(
                f"stage {self._stage!r} reads {self._path}.{name}, which its row in cai.pipeline.STAGES does not "
                "list under 'reads' (so it would not be in the artifact key)"
            )
        value = getattr(self._obj, name)
        sub = self._allowed[name]
        return value if sub is None else Restricted(value, sub, self._stage, f"{self._path}.{name}")


@dataclass
class StageConfig:
    """What a stage function gets as ``cfg``: the config sections its row reads, typed, plus where
    the run's shared files are (run-time facts, never in a key)."""

    stage: str
    sections: dict[str, Any]
    store_root: Path
    constitution_file: Path | None = None

    @property
    def judge_cache(self) -> Path:
        """The store's judge answer cache (a judge's ``cache_path`` overrides it)."""
        return self.store_root / "judge_cache.sqlite"

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise ConfigError(f"stage {self.__dict__.get('stage')!r} reads cfg.{name}, which its row in "
                          "cai.pipeline.STAGES does not list under 'reads'")



# ============================================================================= Hydra
def open_price_tables(schema: Any) -> None:
    """Let overrides add models to the ``prices`` of every judge config in ``schema`` (a ``DictConfig``).

    Hydra composes in struct mode, where an override cannot add a key the schema does not list,
    and a price table's keys are model names no schema can list: so each :class:`JudgeConfig`
    node's ``prices`` is marked non-struct (the rest of the judge stays strict);
    :meth:`JudgeConfig.check` checks every entry, naming model and field.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(schema, DictConfig):
        return
    if OmegaConf.get_type(schema) is JudgeConfig:
        OmegaConf.set_struct(schema.prices, False)
        return
    for key in list(schema.keys()):
        open_price_tables(OmegaConf.select(schema, str(key), throw_on_missing=False,
                                           throw_on_resolution_failure=False))


def register_configs() -> None:
    """Register the schemas so ``conf/config.yaml`` can extend ``base_config``."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(Config)
    open_price_tables(schema)
    ConfigStore.instance().store(name="base_config", node=schema)


def compose_config(*overrides: str):
    """The config ``cai run <overrides>`` would run, composed without running anything (for a
    notebook, a script or a test): ``compose_config("experiment=rlaif_vs_rlhf", "arm=rlhf")``."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def typed(cfg: Any) -> Config:
    """The composed ``DictConfig`` as a checked :class:`Config` (every ``__post_init__`` run); a bad
    value raises :class:`ConfigError` naming its full path (``eval.judge.max_tokens: ...``)."""
    if isinstance(cfg, Config):
        return cfg
    return _to_object(cfg, "")

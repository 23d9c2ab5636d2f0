"""Tiny, locally built models for tests, benchmarks and the offline default.

Nothing here downloads anything. :func:`build_tiny_causal_lm` trains a byte-level BPE
tokenizer on a small corpus with the ``tokenizers`` library (a fraction of a second), wraps it
as a ``PreTrainedTokenizerFast`` with end-of-text, padding and beginning-of-text tokens, builds
a GPT-2-shaped model with a seeded random initialisation and saves both with
``save_pretrained`` into one directory. That directory then loads by path exactly like a hub
model (``load_causal_lm(ModelSpec(out_dir))``), so every code path that serves real models is
exercised by the tests.

The same seed and corpus give byte-identical tokenizer and weight files. The weights are
random: the model's text is gibberish, but its shapes, padding, caching and log-probabilities
behave like any other causal LM's, which is what the sampling, training and scoring code needs.
:func:`pretrain_tiny_causal_lm` then optionally teaches it a task (the offline quickstart's
courteous-vs-rude replies), deterministically, so that feedback has something to move.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from cai.config import TinyConfig
from cai.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"

_SUBJECTS = (
    "the assistant", "a careful model", "the researcher", "my neighbour", "the judge",
    "a curious student", "the reviewer", "our team", "the teacher", "a helpful friend",
)
_VERBS = (
    "explains", "refuses", "describes", "compares", "summarises", "questions", "answers",
    "revises", "critiques", "recommends",
)
_OBJECTS = (
    "the safety policy", "a harmful request", "the weather forecast", "a simple recipe",
    "the history of rivers", "an honest answer", "the training data", "a kind reply",
    "the reward signal", "a polite refusal", "the main argument", "two possible responses",
)
_ENDINGS = (
    "with care.", "in plain words.", "before lunch.", "without any harm.", "step by step.",
    "for the second time.", "as clearly as possible.", "and then stops.", "politely.",
)
_QUESTIONS = (
    "How do I bake bread at home?", "What is the capital of France?",
    "Can you help me write a letter to my landlord?", "Why is the sky blue?",
    "How can I pick a lock?", "What should I do if my friend is sad?",
    "Tell me a joke about computers.", "Is it safe to mix bleach and ammonia?",
    "How many legs does a spider have?", "Which response is more helpful and honest?",
)
_ANSWERS = (
    "Sure, here is a short and clear answer.", "I would rather not help with that, but I can "
    "suggest a safer alternative.", "That is a good question; let me explain.",
    "Paris is the capital of France.", "Sunlight scatters off the air, and blue light "
    "scatters the most.", "Spiders have eight legs.", "No, mixing them releases a toxic gas.",
    "Listen to them, stay with them and suggest they talk to someone they trust.",
)


def default_tiny_corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """A few KB of English-like text (plain sentences and HH-style dialogues), seeded.

    Used to train the tiny tokenizer when no corpus is given; the pipeline passes its prompt
    set too so that the tokenizer has merges for the words it will see.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n_sentences):
        if i % 4 == 3:
            q, a = rng.choice(_QUESTIONS), rng.choice(_ANSWERS)
            lines.append(f"\n\nHuman: {q}\n\nAssistant: {a}")
        else:
            words = (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS))
            lines.append(" ".join(words).capitalize() + " " + rng.choice(_ENDINGS))
    return lines


def train_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it for transformers.

    The result has ``eos_token`` (also the end-of-text marker the model learns to emit),
    a distinct ``pad_token`` and a ``bos_token``, and no chat template (so chat formatting
    falls back to the HH format). The tokenizer adds no special tokens on its own.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in corpus if t]
    if not texts:
        raise ConfigError("tiny tokenizer corpus is empty: pass at least one non-empty text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU torch RNG seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _gpt2_config(cfg: TinyConfig, tokenizer, **extra):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _build(model_cls, out_dir, corpus, cfg: TinyConfig | None, **config_extra) -> Path:
    cfg = cfg or TinyConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(corpus) if corpus is not None else default_tiny_corpus()
    tokenizer = train_tiny_tokenizer(texts, cfg.vocab_size)
    config = _gpt2_config(cfg, tokenizer, **config_extra)
    with seeded(cfg.seed):
        model = model_cls(config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_causal_lm(
    out_dir: str | Path, corpus: Iterable[str] | None = None, cfg: TinyConfig | None = None
) -> Path:
    """Build and save a tiny ``GPT2LMHeadModel`` and its tokenizer into ``out_dir``.

    ``corpus`` trains the tokenizer (``default_tiny_corpus()`` when ``None``). Returns
    ``out_dir`` as a Path; load it with ``load_causal_lm(ModelSpec(str(out_dir)))``.
    """
    from transformers import GPT2LMHeadModel

    return _build(GPT2LMHeadModel, out_dir, corpus, cfg)


def build_tiny_sequence_classifier(
    out_dir: str | Path, corpus: Iterable[str] | None = None, cfg: TinyConfig | None = None
) -> Path:
    """Build and save a tiny ``GPT2ForSequenceClassification`` (one scalar output: a reward)."""
    from transformers import GPT2ForSequenceClassification

    return _build(GPT2ForSequenceClassification, out_dir, corpus, cfg, num_labels=1)


def pretrain_tiny_causal_lm(
    model_dir: str | Path, examples: list[tuple[str, str]], steps: int, lr: float,
    batch_size: int = 16, seed: int = 0,
) -> dict[str, float]:
    """Train the tiny model saved in ``model_dir`` on ``examples`` and save it back in place.

    Each example is ``(prompt_text, full_text)``, ``full_text`` starting with ``prompt_text``
    (:func:`cai.models.format_example` makes them); the loss is the next-token loss on the
    response and the end-of-text token after it only, as generation sees it (the prompt encoded
    alone, BOS included). AdamW at a constant ``lr``, ``steps`` batches drawn by a seeded shuffle
    of the examples, one epoch after another; deterministic on CPU. Returns the first and last
    steps' mean loss.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    if not examples:
        raise ConfigError("tiny pretraining: no examples")
    path = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    rows = []
    for prompt, full in examples:
        if not full.startswith(prompt):
            raise ValueError("pretrain_tiny_causal_lm: full_text must start with prompt_text")
        bos = tok.bos_token
        p_ids = tok(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
        r_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((list(p_ids), list(r_ids)))
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    with seeded(seed):
        model = GPT2LMHeadModel.from_pretrained(path)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            batch = []
            for _ in range(min(batch_size, len(rows))):
                if not order:
                    order = list(range(len(rows)))
                    rng.shuffle(order)
                batch.append(rows[order.pop()])
            width = max(len(p) + len(r) for p, r in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for i, (p, r) in enumerate(batch):
                n = len(p) + len(r)
                ids[i, :n] = torch.tensor(p + r)
                mask[i, :n] = 1
                labels[i, len(p):n] = torch.tensor(r)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    model.save_pretrained(path)
    return {"first_loss": losses[0], "last_loss": losses[-1]}

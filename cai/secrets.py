"""What counts as a secret, and how one is scrubbed out of data or redacted out of text.

API keys come from the environment and must never reach a log line, an error message, an
artifact, ``stage.json`` or a report. This module owns that rule for the whole package:

* :func:`is_secret_name` -- whether a config key names a credential (``api_key``, ``hf_token``,
  ``Authorization``) as opposed to a count or a tokenizer field (``max_tokens``, ``pad_token``);
* :func:`env_secret_values` -- the values of environment variables named ``*_API_KEY``,
  ``*_TOKEN`` or ``*_SECRET`` (and plain ``API_KEY`` / ``TOKEN``);
* :func:`redact` -- a text with given secrets replaced by :data:`SCRUBBED`, by default along with
  any long fragment of one (servers echo keys abbreviated: ``sk-abc...wxyz``);
* :func:`scrub_secrets` -- a copy of a config/record tree with the values under secret-named keys
  blanked and environment secrets cut out of every string.

The artifact store scrubs configs and ``stage.json`` with :func:`scrub_secrets`; the judge layer
redacts its API key out of error messages with :func:`redact`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["SCRUBBED", "env_secret_values", "is_secret_name", "redact", "scrub_secrets"]

SCRUBBED = "***"
# A secret at least this long is cut out of longer strings (shorter ones would hit ordinary text).
MIN_EMBEDDED_LEN = 8
# Sizes of the fragments of a secret that :func:`redact` also removes (longest first).
FRAGMENT_SIZES = (16, 8)

_SECRET_WORDS = frozenset({"apikey", "secret", "password", "passwd", "passphrase", "auth",
                           "oauth", "authorization", "credential", "credentials", "cookie",
                           "bearer", "privatekey", "accesskey"})
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key")})
# "<word>_token" names a tokenizer's special token, not a credential, after these words.
_TOKENIZER_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "stop",
                              "special", "start", "end", "image", "chat", "additional"})
_ENV_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET")
_ENV_SECRET_NAMES = ("API_KEY", "TOKEN")


def _name_words(name: str) -> list[str]:
    split_camel = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", split_camel.lower()) if w]


def is_secret_name(name: str) -> bool:
    """Whether a config key names a credential (``api_key``, ``apiKey``, ``hf_token``, ...).

    Counts such as ``max_tokens`` / ``tokens_in`` and tokenizer fields such as ``pad_token``
    are not secrets.
    """
    words = _name_words(name)
    if any(w in _SECRET_WORDS for w in words):
        return True
    if any(pair in _SECRET_PAIRS for pair in zip(words, words[1:])):
        return True
    return any(w == "token" and (i == 0 or words[i - 1] not in _TOKENIZER_WORDS)
               for i, w in enumerate(words))


def env_secret_values() -> list[str]:
    """Distinct non-empty values of the secret-named environment variables, longest first
    (so that a key containing another is replaced whole)."""
    names = [n for n in os.environ
             if n.upper().endswith(_ENV_SECRET_SUFFIXES) or n.upper() in _ENV_SECRET_NAMES]
    return sorted({os.environ[n] for n in names if os.environ[n]}, key=len, reverse=True)


def redact(text: str, *secrets: str, fragments: bool = True) -> str:
    """``text`` with every non-empty secret replaced by ``***``, in the order given.

    With ``fragments``, every 16- and then 8-character piece of a longer secret is replaced
    too, so an abbreviated echo of a key (``sk-abc...wxyz``) does not leak its tail.
    """
    for secret in secrets:
        if not secret:
            continue
        text = text.replace(secret, SCRUBBED)
        if fragments:
            text = _redact_fragments(text, secret)
    return text


def _redact_fragments(text: str, secret: str) -> str:
    for size in FRAGMENT_SIZES:
        if len(secret) > size:
            for i in range(0, len(secret) - size + 1):
                frag = secret[i : i + size]
                if frag in text:
                    text = text.replace(frag, SCRUBBED)
    return text


def _blank_strings(value: Any) -> Any:
    """Every non-empty string inside ``value`` -> "***"; numbers, bools and None are kept."""
    if isinstance(value, str):
        return SCRUBBED if value else value
    if isinstance(value, Mapping):
        return {k: _blank_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_blank_strings(v) for v in value]
    return value


def scrub_secrets(obj: Any, *, env: bool = True) -> Any:
    """A copy of ``obj`` with secrets replaced by ``"***"``.

    Strings under a key that :func:`is_secret_name` flags are blanked, at any depth. With
    ``env``, any string equal to the value of an environment variable named ``*_API_KEY``,
    ``*_TOKEN`` or ``*_SECRET`` is blanked too, and such a value of 8+ characters is cut out
    of longer strings (``"Bearer <key>"``). Tuples come back as lists (as JSON has them).
    """
    secrets = env_secret_values() if env else []
    embedded = [s for s in secrets if len(s) >= MIN_EMBEDDED_LEN]

    def walk(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: (_blank_strings(v) if isinstance(k, str) and is_secret_name(k) else walk(v))
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, str) and secrets:
            if value in secrets:
                return SCRUBBED
            return redact(value, *embedded, fragments=False)
        return value

    return walk(obj)

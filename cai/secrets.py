"""What counts as a secret, and how one is scrubbed out of data or redacted out of text.

API keys come from the environment and must never reach a log line, an error message, an
artifact, ``stage.json`` or a report. This module owns that rule for the whole package:

* :func:`is_secret_name` -- whether a config key names a credential (``api_key``, ``hf_token``,
  ``Authorization``) as opposed to a count or a tokenizer field (``max_tokens``, ``pad_token``);
* :func:`env_secret_values` -- the values of environment variables named ``*_API_KEY``,
  ``*_TOKEN`` or ``*_SECRET`` (and plain ``API_KEY`` / ``TOKEN``);
* :func:`redact` -- a text with given secrets replaced by :data:`SCRUBBED`, by default along with
  any long fragment of one (servers echo keys abbreviated: ``sk-abc...wxyz``);
* :func:`redact_urls` -- a text with the credentials of every URL in it cut out: the password
  (or a lone token) of ``scheme://user:password@host`` and the value of a secret-named query
  parameter (``?api_key=...``, ``&key=...``); :func:`url_secrets` lists those values;
* :func:`register_secret` -- a value (a judge's key, a URL's password) every later scrub of this
  process also cuts out, wherever it came from (a server echoing it inside an answer);
* :func:`redact_text` -- a text with all of the above applied: URL credentials, registered and
  environment secrets;
* :func:`scrub_secrets` -- a copy of a config/record tree with the values under secret-named keys
  blanked and :func:`redact_text` applied to every string;
* :class:`SecretFilter` / :func:`install_log_filter` -- the same for every log record a handler
  writes (``cai.log``, the console); :func:`scrub_text_files` -- for files written by others
  (Hydra's ``.hydra/*.yaml``).

The artifact store scrubs configs and ``stage.json`` with :func:`scrub_secrets`, the pipeline
``run.json`` and ``metrics.json``; the judge layer registers its key and redacts it out of error
messages and answers with :func:`redact`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["SCRUBBED", "SecretFilter", "env_secret_values", "install_log_filter", "install_record_redaction",
           "is_secret_name",
           "known_secrets", "redact", "redact_text", "redact_urls", "register_secret", "scrub_secrets",
           "scrub_text_files", "url_secrets"]

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


# query parameters that carry a credential although is_secret_name does not flag the bare word
_SECRET_QUERY_NAMES = frozenset({"key", "sig", "signature", "code", "access_token", "refresh_token"})
# ``scheme://userinfo@``: the userinfo ends at the first "@" before any "/", "?", "#" or space
# (Hydra writes a sweep's overrides with ":" escaped: ``http\://user\:KEY@host``)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*\\?://)(?P<userinfo>[^/?#@\s\"'<>]+)@")
# ``?name=value`` / ``&name=value`` anywhere (in a URL, an override, a log line)
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&#\s\"'<>]*)")
_REGISTERED: set[str] = set()
_REGISTERED_LOCK = threading.Lock()


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


def _secret_query_name(name: str) -> bool:
    return is_secret_name(name) or name.lower() in _SECRET_QUERY_NAMES


def url_secrets(url: str | None) -> list[str]:
    """The credentials written into ``url``: the password of ``user:password@`` (or the whole
    userinfo when it has no ``:``, a token used as the user name) and the values of secret-named
    query parameters; each as written and percent-decoded. Empty for None or a URL without any."""
    if not url:
        return []
    found: list[str] = []
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is not None and "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found.append(userinfo.split(":", 1)[1] if ":" in userinfo else userinfo)
    query = parts.query if parts is not None else ""
    found += [v for k, v in parse_qsl(query, keep_blank_values=False) if _secret_query_name(k)]
    found += [m.group("value") for m in _QUERY_PARAM.finditer(url) if _secret_query_name(m.group("name"))]
    out: list[str] = []
    for value in found:
        for v in (value, unquote(value)):
            if v and v not in out:
                out.append(v)
    return out


def redact_urls(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``: a password
    (``user:***@``), a lone userinfo token (``***@``), a secret-named query value (``?api_key=***``)."""
    if "@" in text:
        def userinfo(m: re.Match) -> str:
            info = m.group("userinfo")
            user = info.split(":", 1)[0] + ":" if ":" in info else ""
            return f"{m.group('scheme')}{user}{SCRUBBED}@"

        text = _USERINFO.sub(userinfo, text)
    if "=" in text:
        text = _QUERY_PARAM.sub(
            lambda m: m.group("lead") + SCRUBBED
            if _secret_query_name(m.group("name")) and m.group("value") and m.group("value") != SCRUBBED
            else m.group(0),
            text,
        )
    return text


def register_secret(*values: str | None) -> None:
    """Remember secret values for the rest of this process: every later :func:`redact_text`,
    :func:`scrub_secrets` and log record cuts them out. Empty values are ignored."""
    with _REGISTERED_LOCK:
        _REGISTERED.update(v for v in values if v)


def known_secrets() -> list[str]:
    """The registered secrets and the secret environment values, distinct, longest first."""
    with _REGISTERED_LOCK:
        registered = set(_REGISTERED)
    return sorted(registered | set(env_secret_values()), key=len, reverse=True)


def redact_text(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with URL credentials, the known secrets (whole, when 8+ characters, or the whole
    text) and ``extra`` secrets replaced by ``***``."""
    secrets = [*extra, *known_secrets()]
    if text in secrets:
        return SCRUBBED
    text = redact_urls(text)
    return redact(text, *(s for s in secrets if len(s) >= MIN_EMBEDDED_LEN), fragments=False)


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


def scrub_secrets(obj: Any, *, env: bool = True, names: bool = True) -> Any:
    """A copy of ``obj`` with secrets replaced by ``"***"``.

    Strings under a key that :func:`is_secret_name` flags are blanked, at any depth; the
    credentials of any URL in a string are cut out (:func:`redact_urls`). With ``env``, any
    string equal to a registered secret or the value of an environment variable named
    ``*_API_KEY``, ``*_TOKEN`` or ``*_SECRET`` is blanked too, and such a value of 8+
    characters is cut out of longer strings (``"Bearer <key>"``). ``names=False`` keeps the
    values under secret-named keys (a config whose ``api_key_env`` names a variable, never a
    key, and is read back). Tuples come back as lists (as JSON has them).
    """
    secrets = known_secrets() if env else []
    embedded = [s for s in secrets if len(s) >= MIN_EMBEDDED_LEN]

    def walk(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: (_blank_strings(v) if names and isinstance(k, str) and is_secret_name(k) else walk(v))
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, str):
            if value in secrets:
                return SCRUBBED
            return redact(redact_urls(value), *embedded, fragments=False)
        return value

    return walk(obj)


def _redact_record(record: logging.LogRecord) -> bool:
    """Apply :func:`redact_text` to ``record``'s message in place; False when the message cannot be
    formatted (a bad format string is logging's to report, untouched)."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001
        return False
    clean = redact_text(message)
    if clean != message:
        record.msg, record.args = clean, None
    return True


class SecretFilter(logging.Filter):
    """A handler filter that passes every record with :func:`redact_text` applied to its message
    (and to a formatted traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _redact_record(record):
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Put a :class:`SecretFilter` on every handler of ``logger`` (the root logger by default)
    that has none yet: the files and consoles Hydra configured then never get a secret."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(SecretFilter())


_FACTORY_INSTALLED = False


def install_record_redaction() -> None:
    """Redact every log record of this process when it is created (a record factory wrapping the
    current one): whatever handlers Hydra or a library installs later (Hydra's launcher prints a
    sweep's overrides, ``judge.base_url`` included), no record carries a secret. Idempotent."""
    global _FACTORY_INSTALLED
    if _FACTORY_INSTALLED:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    _FACTORY_INSTALLED = True


def scrub_text_files(folder: str | Path, pattern: str = "*.yaml") -> int:
    """Rewrite the files matching ``pattern`` in ``folder`` (written by others: Hydra's
    ``.hydra/``) with :func:`redact_text` applied; returns how many changed."""
    changed = 0
    root = Path(folder)
    if not root.is_dir():
        return 0
    for path in sorted(root.glob(pattern)):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        clean = redact_text(text)
        if clean != text:
            tmp = path.with_name(f".{path.name}.scrub")
            tmp.write_text(clean, encoding="utf-8")
            os.replace(tmp, path)
            changed += 1
    return changed

"""What the API backends share about their vendor SDKs (``openai``, ``anthropic``).

Both SDKs have the same shape: an async client class taking ``api_key``, ``base_url``,
``timeout``, ``max_retries`` and an ``http_client``; a ``DefaultAsyncHttpxClient``; and the
error classes ``APIStatusError``, ``APITimeoutError`` and ``APIConnectionError``. So one
function builds either client and one classifies either SDK's errors:

- :func:`make_sdk_client`: the client with the judge's key and endpoint, the judge's timeout,
  ``max_retries=0`` (our retry loop, :mod:`cai.judges.retry`, is the only one) and an
  HTTP client that verifies with the process-wide TLS context of :func:`shared_ssl_context`.
- :func:`classify_sdk_error`: an SDK exception as a :class:`~cai.judges.retry.CallFailure`,
  with the API key scrubbed from its message.

The key is passed to the SDK and to the classifier only; it is never formatted into a
message, a log line or a result here.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from cai.judges.retry import CallFailure, classify

_SSL_CONTEXT: Any = None
_SSL_LOCK = threading.Lock()


def http_library() -> Any:
    """The HTTP library the installed ``openai``/``anthropic`` SDKs are built on."""
    try:
        import httpx2 as httpx
    except ModuleNotFoundError:
        import httpx  # type: ignore[no-redef]
    return httpx


def shared_ssl_context() -> Any:
    """The TLS context every SDK client of this process verifies with, built once.

    It is what the SDKs' own HTTP clients would build (``create_ssl_context()`` of the same
    HTTP library, honouring ``SSL_CERT_FILE``/``SSL_CERT_DIR``); sharing it is safe, an
    ``ssl.SSLContext`` may wrap sockets for many connections, threads and event loops. Building
    it per client would load the CA bundle each time (tens of milliseconds).
    """
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            _SSL_CONTEXT = http_library().create_ssl_context()
        return _SSL_CONTEXT


def make_sdk_client(sdk: str, client_class: str, *, api_key: str, base_url: str | None, timeout_s: float) -> Any:
    """A fresh async client of SDK ``sdk`` (a module name), class ``client_class``.

    ``base_url`` None: the SDK's own default (its environment variable, else the public
    endpoint). Retries are off in the SDK: our retry loop is the only one.
    """
    module = importlib.import_module(sdk)
    http_client = module.DefaultAsyncHttpxClient(verify=shared_ssl_context(), timeout=timeout_s)
    client_type = getattr(module, client_class)
    return client_type(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s, http_client=http_client)


def classify_sdk_error(sdk: str, exc: BaseException, secret: str) -> CallFailure:
    """Classify an exception raised through SDK ``sdk``'s client (``secret`` is redacted)."""
    module = importlib.import_module(sdk)
    return classify(
        exc,
        status_error=module.APIStatusError,
        timeout_error=module.APITimeoutError,
        connection_error=module.APIConnectionError,
        secret=secret,
    )

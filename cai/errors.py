"""User-facing errors.

Anything a user can cause (a bad constitution, config, data row, model path, judge answer)
raises a subclass of :class:`CaiError` whose message names the file, line or record, the field
and what was expected. The CLI prints the message and exits with status 2 instead of showing a
traceback from deep inside a library.
"""

from __future__ import annotations


class CaiError(Exception):
    """Base class of every error caused by user input rather than by a bug in cai."""


class ConfigError(CaiError):
    """A configuration value is missing, of the wrong type or inconsistent."""


class DataError(CaiError):
    """A data file or record cannot be read as the expected format."""


class ModelLoadError(CaiError):
    """A model or tokenizer cannot be loaded from the given hub name or path."""

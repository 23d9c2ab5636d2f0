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


class JudgeUnavailable(CaiError):
    """Judge requests still failed for transient reasons (timeouts, connection errors, HTTP 429 or
    5xx after the retries, empty answers) when the stage ended: nothing is published, the finished
    results stay journaled and a rerun asks only the failed ones again."""


class TooManyFailures(CaiError):
    """More results than a stage's configured threshold failed for good (refusals, unparseable
    answers): nothing is published; the journal is kept, so a rerun with a higher threshold
    publishes without asking again."""

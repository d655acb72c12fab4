"""The studio's exception types.

Owns: the error hierarchy every module raises. The edges translate them: the UI shows
``gr.Error(str(exc))``, the HTTP API answers a JSON 4xx (``InputError``) or 5xx (``ModelError``).
"""


class StudioError(Exception):
    """Base of every error the studio raises on purpose; its message is shown to the user."""


class InputError(StudioError):
    """The request is at fault: bad or empty audio, empty or over-long text, unknown option."""


class ModelError(StudioError):
    """The models are at fault: a missing or incomplete folder, a failed load, an output with no audio."""


class CacheError(StudioError):
    """The prompt cache was used wrongly (a malformed key or kind); never raised for I/O trouble."""

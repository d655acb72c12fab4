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


class BackendUnavailable(ModelError):
    """The LLM server cannot take or finish work right now (down, unreachable, too slow); answered as a 503
    with ``Retry-After``. ``retry_after`` is in seconds."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

"""The one error type for bad input: it names the config key and what is allowed."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value or input, raised before training starts.

    ``str(err)`` is one line: ``<key>: <what is wrong and what is allowed>``.
    The CLI prints it and exits with status 2, without a traceback.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

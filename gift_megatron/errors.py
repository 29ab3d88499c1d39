"""The error type of the start-up checks: an input the user must fix.

A run checks its config, data, tokenizer, reward and checkpoint before any compute. What those checks find
is raised as :class:`StartupError` (or a subclass: ``ConfigError``, ``DatasetError``, ``ConversionError``),
and the command line prints it as one line. Every other exception is a bug or a failure of the machine,
and keeps its traceback.
"""

from __future__ import annotations


class StartupError(ValueError):
    """An input that cannot run, found before any compute; the message names the key, file or flag.

    A ValueError, so callers that caught ValueError from the checks before this type existed still do.
    """

"""The project's user-facing error classes.

Every error a caller can cause (bad config, bad input, bad checkpoint, bad model file) is one of these. They
subclass the built-in ``ValueError``/``TypeError`` so plain ``except ValueError`` keeps working; the CLI maps
``ReformerError`` to exit code 2 with the message and no traceback.
"""

from __future__ import annotations


class ReformerError(Exception):
    """Base of all errors the caller can fix (exit code 2 in the CLI)."""


class ConfigError(ReformerError, ValueError):
    """An invalid or unsupported model configuration; the message names the field."""


class InputError(ReformerError, ValueError):
    """Invalid model input (ids, mask, lengths); the message names the argument and the allowed range."""


class InputTypeError(ReformerError, TypeError):
    """Model input of the wrong type or dtype."""


class CheckpointError(ReformerError, ValueError):
    """A missing, corrupt or mismatched checkpoint; the message names the file or tensor."""

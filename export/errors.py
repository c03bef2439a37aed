"""Errors raised by the exporter; all are ``ReformerError`` so the CLI prints them and exits with code 2."""

from __future__ import annotations

from reformer_rt.models import ReformerError


class ExportError(ReformerError):
    """The export cannot run as asked: bad options, unwritable output, a model the exporter cannot trace."""


class ValidationError(ExportError):
    """The exported graph disagrees with the PyTorch model beyond tolerance (the output file is removed)."""

"""Errors of the runtime, on top of the model's hierarchy (``reformer_rt.models.errors``).

Every class is a ``ReformerError``: the CLI prints it as one line with exit code 2, the server answers 4xx/503.
"""

from __future__ import annotations

from reformer_rt.models import ReformerError


class BackendUnavailable(ReformerError):
    """The requested backend cannot run here (library missing, no GPU, wrong artifact); says what to install."""


class BackendFailed(ReformerError):
    """The backend failed while running a model it had loaded (a damaged graph, memory): the message names the
    file. The CLI exits 2 with it; the server answers 500 (the request was fine, the model was not)."""

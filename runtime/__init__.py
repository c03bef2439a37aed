"""reformer_rt.runtime: running exported or PyTorch Reformer models, and the ``reformer-rt`` command line.

``Session`` is the API (see ``session.py``; ``GenerationOptions`` is how its ``generate`` is asked);
``batching.py`` holds the batching contract; each backend adapter lives in its own module and imports its library
only when used.
"""

from typing import Any

__all__ = ["GenerationOptions", "Session"]


def __getattr__(name: str) -> Any:
    """``Session`` and ``GenerationOptions`` on first use: importing the package (as the ``reformer-rt`` entry point
    does) must not import torch before the command line has set up its signal handling."""
    if name == "Session":
        from .session import Session

        return Session
    if name == "GenerationOptions":
        from .generation import GenerationOptions

        return GenerationOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""reformer_rt.runtime: running exported or PyTorch Reformer models, and the ``reformer-rt`` command line.

``Session`` is the API (see ``session.py``); ``batching.py`` holds the batching contract; each backend adapter
lives in its own module and imports its library only when used.
"""

from .session import Session

__all__ = ["Session"]

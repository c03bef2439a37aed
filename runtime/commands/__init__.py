"""reformer_rt.runtime.commands: the ``reformer-rt`` command line (``cli.py``) and one module per command, each
exposing ``add_parser(subparsers)``: ``demo``, ``export``, ``run``, ``generate``, ``serve``, ``build``, ``doctor``.
The ``bench`` commands live with their harness in ``reformer_rt.runtime.bench``.

A command module parses and checks its arguments, then calls the runtime (``Session``, the exporter, the server);
it holds no engine logic of its own.
"""

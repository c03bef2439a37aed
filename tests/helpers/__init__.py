"""What several test modules share, imported by name (``from helpers.artifacts import ...``): ``tests/`` is on
pytest's ``pythonpath`` (pyproject.toml), so any subset of test paths collects in any order. Fixtures stay in the
``conftest.py`` files, which no test module imports.

* ``artifacts``: random-weight models by recipe (one factory, ``reformer_rt.models.presets.random_model``), their
  checkpoints and ONNX exports made at most once per test session.
* ``cli``: ``reformer-rt`` in a real process, or in the test's own through ``cli.main``.
* ``hf_models``: small transformers Reformer models of the architectures the project must match.
* ``lsh_cases``: the LSH kernel case table of the interpreter and the compiled-kernel tests.
* ``serving``: ``reformer-rt serve`` as a real subprocess, and the served tiny model's inputs.
"""

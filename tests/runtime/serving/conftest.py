"""Fixtures of the server tests: the served tiny LM's checkpoint (``helpers/serving.py``), the session's shared tiny
portable export, and one server over both for the whole test session (always stopped)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.http", reason="the server tests need tritonclient (pip install '.[test]')")

from helpers.artifacts import BYTE_LM, Artifacts  # noqa: E402
from helpers.serving import SERVED_LM, ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(artifacts: Artifacts) -> Path:
    return artifacts.checkpoint(SERVED_LM)


@pytest.fixture(scope="session")
def tiny_onnx(artifacts: Artifacts) -> Path:
    """The test session's shared tiny portable export (``BYTE_LM``: vocabulary 258, at most 128 tokens), served as
    a second kind of model."""
    return artifacts.export(BYTE_LM)


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny checkpoint twice (two names; every output kind) and its portable ONNX export (``onnx``), on the
    CPU; one process for every module (a start costs seconds), so tests read metrics as differences."""
    torch_model = {"path": str(tiny_checkpoint), "backend": "torch"}
    config = tmp_path_factory.mktemp("serve") / "serve.json"
    config.write_text(json.dumps({"models": {"tiny": torch_model, "twin": torch_model, "onnx": str(tiny_onnx)},
                                  "device": "cpu", "max_queue_delay_us": 5000}))
    with ServerProcess("--config", str(config), "--max-body-mb", "1", "--max-queue-delay-us", "2000") as process:
        yield process

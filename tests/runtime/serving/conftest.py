"""Fixtures of the server tests: a tiny byte-level LM checkpoint and a server over it (always stopped)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("tritonclient.http", reason="the server tests need tritonclient (pip install '.[test]')")

from serve_harness import TINY, ServerProcess  # noqa: E402
from tiny_artifacts import tiny_export  # noqa: E402

from reformer_rt.models import ReformerLM  # noqa: E402
from reformer_rt.models.tokenizer import ByteTokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = ReformerLM(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    directory = tmp_path_factory.mktemp("serving") / "tiny"
    model.save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory



@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test session's shared tiny portable export (``tests/tiny_artifacts.py``: vocabulary 258, at most 128
    tokens), served as a second kind of model."""
    return tiny_export(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tiny_onnx: Path) -> Iterator[ServerProcess]:
    """The tiny checkpoint twice (two names; every output kind) and its portable ONNX export (``onnx``), on the
    CPU."""
    torch_model = {"path": str(tiny_checkpoint), "backend": "torch"}
    config = tiny_checkpoint.parent / "serve.json"
    config.write_text(json.dumps({"models": {"tiny": torch_model, "twin": torch_model, "onnx": str(tiny_onnx)},
                                  "device": "cpu", "max_queue_delay_us": 5000}))
    with ServerProcess("--config", str(config), "--max-body-mb", "1", "--max-queue-delay-us", "2000") as process:
        yield process



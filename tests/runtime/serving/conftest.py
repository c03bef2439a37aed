"""Fixtures of the server tests: a tiny byte-level LM checkpoint and a server over it (always stopped)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("tritonclient.http", reason="the server tests need tritonclient (pip install '.[test]')")

from serve_harness import TINY, ServerProcess  # noqa: E402

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



@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """The tiny model twice (two names), torch backend on the CPU: every output kind is available."""
    with ServerProcess(f"tiny={tiny_checkpoint}", f"twin={tiny_checkpoint}", "--backend", "torch", "--device",
                       "cpu", "--max-body-mb", "1", "--max-queue-delay-us", "2000") as process:
        yield process



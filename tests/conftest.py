"""Session-wide fixtures: the shared artifacts (``helpers/artifacts.py``) and transformers Reformer checkpoints
written with ``save_pretrained`` (``helpers/hf_models.py``). Helpers are imported from ``helpers``, never from here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels can only run under Triton's interpreter, which must be switched on before triton
# is first imported -- by whichever test module gets there first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers.artifacts import Artifacts  # noqa: E402
from helpers.hf_models import make_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """The test session's checkpoints and exports, each made once (copy one before changing it)."""
    return Artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """``hf_checkpoint(arch, lm=True, **config_overrides) -> (hf_model, directory)``; ``lm=False``: the bare
    ``ReformerModel``."""

    def build(arch: str, lm: bool = True, **overrides):
        transformers = pytest.importorskip("transformers")
        model = make_hf_model(arch, None if lm else transformers.ReformerModel, **overrides)
        directory = tmp_path / f"{arch}-{'lm' if lm else 'base'}"
        model.save_pretrained(directory)
        return model, directory

    return build

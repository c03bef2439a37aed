"""The ``reformer-rt`` command line as a user runs it: a real process, exit codes, no tracebacks."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from reformer_rt.models import ReformerLM
from reformer_rt.models.presets import demo_model_dir
from reformer_rt.models.tokenizer import ByteTokenizer
from reformer_rt.models.train_demo import corpus, evaluate


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("reformer-rt")
    command = [exe] if exe else [sys.executable, "-m", "reformer_rt.runtime.commands.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env)


def test_help_lists_commands() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_demo_runs_the_pipeline_on_a_ragged_long_batch(tmp_path) -> None:
    env = {**os.environ, "REFORMER_RT_CACHE": str(tmp_path)}
    result = _cli("demo", "--lengths", "2048,1000,300", "--generate", "24", "--threads", "2", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "backend: onnxruntime" in out and "tokens/s" in out
    bits = re.search(r"bits per character (\S+) \(onnxruntime\) vs (\S+) \(PyTorch\)", out)
    assert bits and abs(float(bits.group(1)) - float(bits.group(2))) <= 1e-3
    assert "3,348 of 3,348 positions (100.00%) agree" in out
    assert float(re.search(r"max abs diff there (\S+)\)", out).group(1)) <= 1e-4
    assert re.search(r"generation: [\d,]+ tokens/s \(cached decoding", out)
    assert out.count("-" * 60) == 2
    assert list(tmp_path.glob("onnx/*.onnx"))  # the export is cached for the next run


@pytest.mark.parametrize("args,words", [
    (("demo", "--lengths", "99999999"), "--lengths"),
    (("demo", "--lengths", "12,x"), "--lengths"),
    (("demo", "--prompt", "", "--lengths", "128", "--backend", "torch"), "--prompt"),
])
def test_bad_arguments_exit_2_without_traceback(args, words: str) -> None:
    result = _cli(*args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_the_kernels_variable_is_read_once_where_the_command_starts(tmp_path) -> None:
    env = {**os.environ, "REFORMER_RT_KERNELS": "fast"}
    result = _cli("run", str(tmp_path / "missing"), "--ids", str(tmp_path / "ids.json"), env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "REFORMER_RT_KERNELS: got 'fast'; expected 'triton' or 'reference'" in result.stderr


def test_bundled_demo_model_matches_its_training_log() -> None:
    """The committed weights reproduce the held-out bits per character their training log reports."""
    directory = demo_model_dir()
    log = json.loads((directory / "training_log.json").read_text())["summary"]
    if platform.python_version() != log["python"]:
        pytest.skip(f"held-out text is Python {log['python']}'s standard library; this is "
                    f"{platform.python_version()}")
    model = ReformerLM.from_pretrained(directory)
    assert (directory / "model.safetensors").stat().st_size < 8 * 2**20
    tokenizer = ByteTokenizer.load(directory)
    _, held_out, _ = corpus()
    held_ids = torch.tensor(list(held_out), dtype=torch.long) + tokenizer.offset
    bpc = evaluate(model, held_ids)
    assert math.isclose(bpc, log["held_out_bpc"], abs_tol=2e-3), (bpc, log["held_out_bpc"])
    assert bpc < 3.5  # a trained model, far from the 8 bits of a uniform byte guess

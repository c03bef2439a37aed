"""The ``reformer-rt`` command line as a user runs it: a real process, exit codes, no tracebacks (further cases of a
contract in the test's own process, ``helpers/cli.py``)."""

from __future__ import annotations

import json
import math
import platform
import re

import pytest
import torch
from helpers.cli import in_process, one_error_line, real_process

from reformer_rt.models import ReformerLM
from reformer_rt.models.presets import demo_model_dir
from reformer_rt.models.tokenizer import ByteTokenizer
from reformer_rt.models.train_demo import corpus, evaluate
from reformer_rt.runtime.artifacts import CACHE_ENV


def test_help_lists_commands() -> None:
    result = real_process("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout


@pytest.mark.slow
def test_demo_runs_the_pipeline_on_a_ragged_long_batch(tmp_path) -> None:
    """What ``make demo`` runs, from an empty cache (so it first exports the demo model)."""
    result = real_process("demo", "--lengths", "2048,1000,300", "--generate", "24", "--threads", "2",
                          env={CACHE_ENV: str(tmp_path)})
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


@pytest.mark.parametrize("args,words,real", [
    (("demo", "--lengths", "99999999"), "--lengths", True),
    (("demo", "--lengths", "12,x"), "--lengths", False),
    (("demo", "--prompt", "", "--lengths", "128", "--backend", "torch"), "--prompt", False),
])
def test_bad_arguments_exit_2_without_traceback(capsys, args, words: str, real: bool) -> None:
    result = real_process(*args) if real else in_process(list(args), capsys)
    assert result.returncode == 2
    assert words in one_error_line("demo", result.stderr)


def test_the_kernels_variable_is_read_once_where_the_command_starts(tmp_path) -> None:
    result = real_process("run", str(tmp_path / "missing"), "--ids", str(tmp_path / "ids.json"),
                          env={"REFORMER_RT_KERNELS": "fast"})
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

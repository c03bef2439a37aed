"""``reformer-rt score`` and ``Session.score``: the strided evaluation equals transformers' loss on the same windows.

The model is the test session's shared byte-level LM (``helpers/artifacts.py`` ``BYTE_LM``: local and LSH layers,
chunk 8, at most 128 positions), read by transformers as a ``ReformerModelWithLMHead`` from its checkpoint and by us
from its shared portable export. In eval mode transformers takes any length up to 128 (it pads to the chunk multiple
itself, with a mask), so the windows here are deliberately not chunk multiples (100, 40, 90) besides multiples
(64), and the last window of each split is shorter than the others.
"""

from __future__ import annotations

import io
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.artifacts import BYTE_LM, Artifacts
from helpers.cli import real_process
from helpers.hf_models import make_hf_model

from reformer_rt.models import InputError
from reformer_rt.models.tokenizer import ByteTokenizer
from reformer_rt.runtime import Session
from reformer_rt.runtime.commands import cli
from reformer_rt.runtime.scoring import Window, plan_windows

TOKENS = 300  # over twice the model's 128 positions: windows are needed
POSITIONS = BYTE_LM.config.max_position_embeddings
TOL = 1e-4  # on the mean NLL (nats per token)


@pytest.fixture(scope="module")
def hf_model(artifacts: Artifacts) -> tuple[torch.nn.Module, Path, Path]:
    """(transformers' model of the session's shared byte-level LM, its checkpoint, its shared portable export)."""
    transformers = pytest.importorskip("transformers")
    directory = artifacts.checkpoint(BYTE_LM)
    model = transformers.ReformerModelWithLMHead.from_pretrained(directory).eval()
    return model, directory, artifacts.export(BYTE_LM)


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return np.random.default_rng(0).integers(2, 258, TOKENS).tolist()


@torch.no_grad()
def transformers_nll(model: torch.nn.Module, ids: list[int], window: int, stride: int) -> tuple[float, int, int]:
    """(mean NLL, scored tokens, windows) by HF's perplexity guide: each window's labels are its ids with the
    positions the previous window already scored set to -100, and transformers' own loss of that window."""
    total, scored, windows, previous_end = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-(end - previous_end)] = -100
        count = int((labels[:, 1:] != -100).sum())  # the loss shifts labels by one: position 0 predicts nothing
        if count:
            total += float(model(input_ids, labels=labels).loss) * count
            scored, windows = scored + count, windows + 1
        previous_end = end
        if end == len(ids):
            break
    return total / scored, scored, windows


def test_windows_follow_the_guide() -> None:
    assert plan_windows(10, 16, 16) == [Window(0, 10, 1)]  # one pass: all but the first token
    assert plan_windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]  # each first is context
    assert plan_windows(9, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5)]  # a one-token last window scores nothing
    overlap = plan_windows(10, 4, 2)
    assert overlap == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert sum(w.scored for w in overlap) == 9  # with overlap every token but the first is scored, once


def _score_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert cli.main(["score", *args, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("window,stride", [(None, None), (64, 64), (100, 40)],
                         ids=["one-pass", "no-overlap", "overlap"])
def test_cli_equals_transformers_loss_on_the_same_windows(hf_model, ids, tmp_path, capsys, window, stride) -> None:
    model, _, onnx_file = hf_model
    data = ids[:100] if window is None else ids  # one pass: the file fits the model's positions
    (tmp_path / "ids.json").write_text(json.dumps(data))
    options = [] if window is None else ["--window", str(window), "--stride", str(stride)]
    got = _score_json(capsys, str(onnx_file), "--ids", str(tmp_path / "ids.json"), *options)
    nll, scored, windows = transformers_nll(model, data, window or POSITIONS, stride or window or POSITIONS)
    assert (got["scored_tokens"], got["windows"], got["backend"]) == (scored, windows, "onnxruntime")
    assert abs(got["nll"] - nll) <= TOL, (got["nll"], nll)
    assert got["window"] == (window or POSITIONS) and got["stride"] == (stride or window or POSITIONS)
    assert math.isclose(got["perplexity"], math.exp(got["nll"])) and got["characters"] is None
    assert math.isclose(got["bits_per_token"], got["nll"] / math.log(2))
    assert math.isclose(got["bits_per_byte"], got["bits_per_token"])  # byte vocabulary, no reserved ids given


def test_torch_backend_and_batched_windows_agree(hf_model, ids) -> None:
    model, directory, _ = hf_model
    nll, scored, _ = transformers_nll(model, ids, 100, 40)
    for budget in (104, 1 << 17):  # one window per forward pass, or all full windows in one
        result = Session(directory, backend="torch", max_tokens_per_batch=budget).score(ids, window=100, stride=40)
        assert result.scored_tokens == scored and abs(result.nll - nll) <= TOL


def test_text_is_tokenized_by_the_model_and_counted_in_characters(hf_model, ids) -> None:
    _, directory, _ = hf_model
    session = Session(directory, backend="torch")
    text = "Grüße aus Köln -- " * 12  # non-ASCII: more bytes (byte tokens) than characters
    from_text = session.score(text, window=96, stride=48)
    from_ids = session.score([b + 2 for b in text.encode()], window=96, stride=48)
    assert from_text.nll == from_ids.nll and from_text.tokens == len(text.encode())
    assert (from_text.characters, from_text.bytes) == (len(text), len(text.encode()))
    assert math.isclose(from_text.bits_per_character, from_text.bits_per_token * len(text.encode()) / len(text))
    assert math.isclose(from_text.bits_per_byte, from_text.bits_per_token)


def test_stdin_and_a_named_tokenizer(hf_model, tmp_path, capsys, monkeypatch) -> None:
    _, _, onnx_file = hf_model
    text = "def parse(line):\n    return line.split()\n" * 4
    ByteTokenizer().save(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    from_stdin = _score_json(capsys, str(onnx_file), "-", "--tokenizer", str(tmp_path), "--window", "90")
    (tmp_path / "ids.json").write_text(json.dumps(ByteTokenizer().encode(text)))
    from_ids = _score_json(capsys, str(onnx_file), "--ids", str(tmp_path / "ids.json"), "--window", "90")
    assert from_stdin["nll"] == from_ids["nll"] and from_stdin["characters"] == len(text)
    assert from_stdin["bits_per_character"] == from_stdin["bits_per_byte"]  # ASCII: one byte a character


def test_a_model_that_sees_the_next_token_is_refused(tmp_path) -> None:
    make_hf_model("encoder").save_pretrained(tmp_path / "encoder")
    with pytest.raises(InputError, match="causal"):
        Session(tmp_path / "encoder", backend="torch").score([1, 2, 3])


@pytest.mark.parametrize("setup,args,words", [
    ({"f.txt": ""}, ["f.txt"], "empty"),
    ({"f.txt": "x"}, ["f.txt"], "got 1 token; expected at least 2"),
    ({"ids.json": "[]"}, ["--ids", "ids.json"], "empty"),
    ({"ids.json": "[[3, 4], [5, 6]]"}, ["--ids", "ids.json"], "one flat sequence"),
    ({"ids.json": "[3, 999]"}, ["--ids", "ids.json"], "token id 999 at position 1"),
    ({"ids.json": "{}"}, ["--ids", "ids.json"], "expected a JSON list"),
    ({"f.bin": b"\xff\xfe"}, ["f.bin"], "not UTF-8"),
    ({"f.txt": "abc"}, ["f.txt", "--window", "600"], "window 600: expected 1 <= stride <= window <= the model's"),
    ({"f.txt": "abc"}, ["f.txt", "--window", "64", "--stride", "65"], "window 64, stride 65: expected"),
    ({"f.txt": "abc"}, ["f.txt", "--stride", "0"], "stride 0: expected"),
    ({"f.txt": "abc", "ids.json": "[3, 4]"}, ["f.txt", "--ids", "ids.json"], "both FILE and --ids"),
    ({}, [], "neither FILE nor --ids"),
    ({"f.txt": "abc"}, ["f.txt", "-o", "."], "--output"),
    ({}, ["missing.txt"], "cannot read"),
])
def test_bad_input_is_one_line_and_exit_2(hf_model, tmp_path, capsys, monkeypatch, setup, args, words) -> None:
    monkeypatch.chdir(tmp_path)
    for name, content in setup.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cli.main(["score", str(hf_model[2]), *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reformer-rt score: error: ") and err.count("\n") == 1 and words in err, err


def test_as_a_process_json_output_file_and_exit_codes(hf_model, ids, tmp_path) -> None:
    model, _, onnx_file = hf_model
    np.save(tmp_path / "ids.npy", np.array(ids, dtype=np.int32))
    done = real_process("score", str(onnx_file), "--ids", str(tmp_path / "ids.npy"), "--window", "64", "--stride", "32",
                "-o", str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "out.json").read_text())
    assert f"{written['bits_per_token']:.4f} bits/token" in done.stdout and "Traceback" not in done.stderr
    assert abs(written["nll"] - transformers_nll(model, ids, 64, 32)[0]) <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy", "out.json"]  # no temporary file left
    refused = real_process("score", str(onnx_file), "--ids", str(tmp_path / "ids.npy"), "--window", "1024")
    assert refused.returncode == 2 and refused.stdout == "" and "Traceback" not in refused.stderr
    assert refused.stderr.count("\n") == 1 and "window 1024: expected" in refused.stderr and "128" in refused.stderr


def test_demo_model_reproduces_its_held_out_figure() -> None:
    """The bundled demo model's 2.71 bits per character (README; its training log): the training script's 96 windows
    of 512 bytes spread over the held-out text, laid end to end and scored in 512-token windows, are the same
    windows, so ``score`` gives the same figure."""
    from reformer_rt.models.presets import demo_model_dir
    from reformer_rt.models.train_demo import TRAIN_LENGTH, corpus

    directory = demo_model_dir()
    log = json.loads((directory / "training_log.json").read_text())["summary"]
    if platform.python_version() != log["python"]:
        pytest.skip(f"held-out text is Python {log['python']}'s standard library; this is "
                    f"{platform.python_version()}")
    held_out = corpus()[1]
    starts = torch.linspace(0, len(held_out) - TRAIN_LENGTH - 1, 96).long().tolist()  # as train_demo.evaluate
    ids = np.concatenate([np.frombuffer(held_out[s:s + TRAIN_LENGTH], dtype=np.uint8) for s in starts]) + 2
    result = Session(directory, backend="torch").score(ids, window=TRAIN_LENGTH)
    assert (result.windows, result.scored_tokens) == (96, 96 * (TRAIN_LENGTH - 1))
    assert math.isclose(result.bits_per_token, log["held_out_bpc"], abs_tol=2e-3), result

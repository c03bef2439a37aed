"""int8 in the runtime: an int8 export through Session and ``reformer-rt run``; ``Session(checkpoint,
backend="torch", quantize="int8")``; the export cache keyed by quantization; batch invariance kept by running each
sequence alone; the Triton repository; the bench's int8-vs-float ratios.

Uses the session's shared byte-level LM, its checkpoint, float and int8 exports (``helpers/artifacts.py``, at most
128 tokens).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.artifacts import BYTE_LM, Artifacts, byte_lm_checkpoint, byte_lm_export, byte_lm_int8_export

from reformer_rt.export import Quantization, export_info
from reformer_rt.models import InputError
from reformer_rt.models.attention import LSHSelfAttention
from reformer_rt.runtime import Session
from reformer_rt.runtime import artifacts as cache
from reformer_rt.runtime.bench.forward import int8_ratios, table
from reformer_rt.runtime.bench.harness import Point


CONFIG = BYTE_LM.config




def _sequences(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, CONFIG.vocab_size, n).tolist() for n in (5, 37, 64, 100, 128, 40)]


def _top1(logits: np.ndarray, reference: np.ndarray, lengths: list[int]) -> float:
    agree = [np.mean(logits[i, :n].argmax(-1) == reference[i, :n].argmax(-1)) for i, n in enumerate(lengths)]
    return float(np.mean(agree))


def test_int8_export_runs_in_a_session_close_to_float_and_batch_invariant(artifacts: Artifacts) -> None:
    session = Session(byte_lm_int8_export(artifacts))
    assert session.backend == "onnxruntime" and session.quantization == export_info(byte_lm_int8_export(artifacts)).quantization
    seqs = _sequences()
    batch = session.run(seqs)
    alone = [session.run([seq])["logits"][0] for seq in seqs]
    for row, (seq, single) in enumerate(zip(seqs, alone)):  # one sequence per pass: batch-mates change nothing
        np.testing.assert_array_equal(batch["logits"][row, :len(seq)], single)
    reference = Session(byte_lm_export(artifacts)).run(seqs)["logits"]
    assert _top1(batch["logits"], reference, [len(s) for s in seqs]) >= 0.9
    assert Session(byte_lm_int8_export(artifacts), quantize="int8").quantization is not None
    with pytest.raises(InputError, match="is float"):
        Session(byte_lm_export(artifacts), quantize="int8")
    with pytest.raises(InputError, match="torch and onnxruntime"):
        Session(byte_lm_checkpoint(artifacts), backend="tensorrt", quantize="int8")


def test_torch_backend_quantizes_linear_layers_but_the_lsh_query_key(artifacts: Artifacts) -> None:
    session = Session(byte_lm_checkpoint(artifacts), backend="torch", quantize="int8")
    quantization = session.quantization
    assert quantization is not None and quantization.fp32 == ("rotations", "query_key")
    assert quantization.products == 11 and quantization.tool.startswith("torch.ao.quantization.quantize_dynamic")
    model = session._backend.decoder.model
    lsh = [m for m in model.modules() if isinstance(m, LSHSelfAttention)]
    assert all(type(layer.query_key) is torch.nn.Linear for layer in lsh)  # the hashing path stays float
    assert type(lsh[0].value).__module__.startswith("torch.ao.nn.quantized.dynamic")
    seqs = _sequences(1)
    batch = session.run(seqs)
    for row, seq in enumerate(seqs):
        np.testing.assert_array_equal(batch["logits"][row, :len(seq)], session.run([seq])["logits"][0])
    reference = Session(byte_lm_checkpoint(artifacts), backend="torch").run(seqs)["logits"]
    assert _top1(batch["logits"], reference, [len(s) for s in seqs]) >= 0.9
    everything = Session(byte_lm_checkpoint(artifacts), backend="torch", quantize=Quantization("int8", ()))
    assert everything.quantization is not None and everything.quantization.products == 12


def test_export_cache_keys_the_quantization(artifacts: Artifacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Float and int8 exports of one checkpoint are separate cache entries, each made once with what was asked."""
    import reformer_rt.export as export

    made: list[object] = []

    def fake_export(checkpoint: Path, target: Path, attention: str, quantize: object, log: object) -> None:
        made.append(quantize)  # the exporter is tested on its own: this checks which entry asks for what
        Path(target).write_bytes(byte_lm_int8_export(artifacts).read_bytes() if quantize else byte_lm_export(artifacts).read_bytes())

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(export, "export_onnx", fake_export)
    checkpoint = byte_lm_checkpoint(artifacts)
    plain = cache.cached_export(checkpoint)
    int8 = cache.cached_export(checkpoint, quantization=Quantization("int8"))
    everything = cache.cached_export(checkpoint, quantization=Quantization("int8", ()))
    assert len({plain, int8, everything}) == 3 and int8.name.endswith("-portable-int8.onnx")
    assert cache.cached_export(checkpoint, quantization=Quantization("int8")) == int8  # made once
    assert made == [None, Quantization("int8"), Quantization("int8", ())]


def test_run_command_runs_an_int8_export_and_a_quantized_checkpoint(artifacts: Artifacts, tmp_path: Path) -> None:
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 6, 7, 8], list(range(2, 90))]))
    for model, extra in ((byte_lm_int8_export(artifacts), []), (byte_lm_checkpoint(artifacts), ["--backend", "torch", "--quantize",
                                                                                "int8"])):
        out = tmp_path / "out.npy"
        result = subprocess.run([sys.executable, "-m", "reformer_rt.runtime.commands.cli", "run", str(model), "--ids",
                                 str(ids), "-o", str(out), "--quiet", *extra], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["quantize"] == "int8" and summary["lengths"] == [4, 88]
        assert np.load(out).shape == (2, 88, CONFIG.vocab_size)


def test_triton_repositories_take_an_int8_export_and_a_quantized_checkpoint(artifacts: Artifacts, tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc", reason="the model config schema ships with tritonclient")
    from reformer_rt.runtime.serving.model import ServedModel
    from reformer_rt.runtime.serving.triton_repo import validate_config, write_repository

    int8 = byte_lm_int8_export(artifacts)
    python = write_repository(int8, tmp_path / "repo", name="int8", device="cpu")
    config = validate_config((python / "config.pbtxt").read_text())
    served = ServedModel("int8", Session(int8)).config()
    assert [o.name for o in config.output] == [o.name for o in served.output]
    assert export_info(python / "1" / "artifact.onnx").quantization is not None  # copied, still int8
    ort = write_repository(int8, tmp_path / "repo", name="int8-ort", triton_backend="onnxruntime")
    assert validate_config((ort / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"
    assert export_info(ort / "1" / "model.onnx").quantization is not None
    checkpoint = write_repository(byte_lm_checkpoint(artifacts), tmp_path / "repo", name="ckpt", device="cpu",
                                  export_options={"quantize": Quantization("int8")})
    parameters = validate_config((checkpoint / "config.pbtxt").read_text()).parameters
    assert parameters["reformer_rt_quantize"].string_value == "int8"
    assert parameters["reformer_rt_backend"].string_value == "torch"


def test_bench_reports_int8_against_its_backends_float_row() -> None:
    points = [Point("forward", "hf", 16384, 1, 3.0, 900), Point("forward", "onnxruntime", 16384, 1, 2.0, 800),
              Point("forward", "onnxruntime-int8", 16384, 1, 1.0, 600), Point("forward", "torch-int8", 16384, 1, 1.5,
                                                                                700)]
    assert int8_ratios(points) == {("onnxruntime-int8", 1, 16384): (0.5, 0.75)}  # torch's float row is missing
    text = table(points)
    assert "vs fp32" in text and "2.00x faster, memory 0.75x" in text


def test_score_command_scores_an_int8_export_and_a_quantized_checkpoint(artifacts: Artifacts, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``reformer-rt score`` takes int8 as run does, and gives the int8 Session's own score (not the float one's)."""
    from reformer_rt.runtime.commands import cli

    ids = _sequences(2)[4]  # 128 tokens: one window
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    cases = ((byte_lm_int8_export(artifacts), [], Session(byte_lm_int8_export(artifacts))),
             (byte_lm_checkpoint(artifacts), ["--backend", "torch", "--quantize", "int8"],
              Session(byte_lm_checkpoint(artifacts), backend="torch", quantize="int8")))
    float_nll = Session(byte_lm_checkpoint(artifacts), backend="torch").score(ids).nll
    for model, extra, session in cases:
        assert cli.main(["score", str(model), "--ids", str(tmp_path / "ids.json"), "--json", "--quiet", *extra]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["nll"] == pytest.approx(session.score(ids).nll, abs=1e-6)
        assert got["nll"] != pytest.approx(float_nll, abs=1e-7)  # int8 ran, not the float model

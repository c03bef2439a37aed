"""The TensorRT path without TensorRT: profiles, cache keys and entries, engine records, the backend's and the
commands' behaviour where TensorRT is absent -- and, marked ``tensorrt``/``gpu``, the real build/run/compare.

The marked tests are skipped with a reason on machines without TensorRT and a GPU (the project's CI); they are the
executable specification of the path for a TensorRT machine, next to ``reformer-rt doctor``.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers.artifacts import DOCTOR, Artifacts
from helpers.cli import in_process, one_error_line, real_process

from reformer_rt.export.validate import FP32_ABS_TOL, random_inputs
from reformer_rt.models import InputError, ReformerConfig, ReformerLM
from reformer_rt.models.presets import random_model
from reformer_rt.export.metadata import read_metadata
from reformer_rt.runtime.artifacts import max_length_of, onnx_sha256
from reformer_rt.runtime.commands import doctor
from reformer_rt.runtime.engine_builder import (
    BuildOptions, PhaseBars, check_tensorrt_version, engine_for, import_tensorrt, strong_typing_flags,
)
from reformer_rt.runtime.engine_cache import (
    ENGINE_FILE, ENTRY_FILE, CacheMiss, EngineCache, EngineFileError, EngineKey, check_runtime_match, make_record,
    read_engine_file, sidecar_path, verify_record, write_engine_file,
)
from reformer_rt.runtime.engine_profiles import BatchLength, Profile, ProfileError, make_profile, parse_batch_length
from reformer_rt.runtime.errors import BackendUnavailable
from reformer_rt.runtime.session import Session
from reformer_rt.runtime.tensorrt_backend import TensorRTBackend, plugin_registered


def _tensorrt_usable() -> bool:
    try:
        import_tensorrt()
    except BackendUnavailable:
        return False
    return True


HAVE_TENSORRT = _tensorrt_usable()
needs_no_tensorrt = pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here; this checks its absence")


def _require_tensorrt_gpu() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if not HAVE_TENSORRT:
        pytest.skip("'tensorrt' imports but is not a usable TensorRT (e.g. type stubs only)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


@pytest.fixture(scope="module")
def tiny_onnx(artifacts: Artifacts) -> Path:
    """The doctor's tiny random LM, exported in plugin form (max length 64, chunk 8, 2 hash rounds)."""
    return artifacts.export(DOCTOR, "plugin")


# ------------------------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize(("text", "expected"), [("4x8192", (4, 8192)), ("1X1", (1, 1)), (" 2 x 64 ", (2, 64)),
                                                ("3×128", (3, 128))])
def test_parse_batch_length(text: str, expected: tuple[int, int]) -> None:
    assert parse_batch_length(text, "--max") == BatchLength(*expected)
    assert str(BatchLength(*expected)) == f"{expected[0]}x{expected[1]}"


@pytest.mark.parametrize("text", ["4", "x8", "4x", "4x8x2", "ax8", "-1x8", "4.5x8", "", "4 8"])
def test_parse_batch_length_rejects_malformed(text: str) -> None:
    with pytest.raises(ProfileError, match=r"--opt: got .*; expected BxL \(batch x length in tokens\)"):
        parse_batch_length(text, "--opt")


@pytest.mark.parametrize("text", ["0x8", "4x0"])
def test_parse_batch_length_rejects_zero(text: str) -> None:
    with pytest.raises(ProfileError, match="expected batch >= 1 and length >= 1"):
        parse_batch_length(text, "--min")


def test_default_profile() -> None:
    assert make_profile(None, None, None, 4096) == Profile(BatchLength(1, 1), BatchLength(32, 4096),
                                                           BatchLength(32, 4096))
    assert make_profile(None, None, None, 1 << 19).max == BatchLength(1, 1 << 19)  # at least one sequence
    chosen = make_profile(BatchLength(2, 16), BatchLength(4, 512), BatchLength(8, 1024), 1024)
    assert chosen.as_dict() == {"min": [2, 16], "opt": [4, 512], "max": [8, 1024]}
    assert issubclass(ProfileError, InputError)


@pytest.mark.parametrize(("shapes", "words"), [
    ((None, None, BatchLength(1, 2048)), "--max: got length 2048; expected at most 1024"),
    ((None, BatchLength(4, 64), BatchLength(2, 64)), "--max: got 2x64, below 4x64"),
    ((BatchLength(1, 128), BatchLength(1, 64), BatchLength(1, 256)), "--opt: got 1x64, below 1x128"),
    ((BatchLength(2, 1), None, BatchLength(1, 64)), "--opt: got 1x64, below 2x1"),
])
def test_profile_errors(shapes: tuple, words: str) -> None:
    with pytest.raises(ProfileError, match=words):
        make_profile(*shapes, max_length=1024)


# ------------------------------------------------------------------------------------------ keys and hashing
def _key(**changes: object) -> EngineKey:
    profile = Profile(BatchLength(1, 1), BatchLength(2, 64), BatchLength(4, 128))
    base = EngineKey("a" * 64, "10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0", profile, None, True)
    return dataclasses.replace(base, **changes)


def test_cache_key_is_stable() -> None:
    assert _key().digest() == _key().digest()
    assert json.loads(json.dumps(_key().as_dict())) == _key().as_dict()
    assert _key().as_dict()["profile"] == {"min": [1, 1], "opt": [2, 64], "max": [4, 128]}


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "b" * 64}, {"tensorrt_version": "11.4.0.106"}, {"gpu_name": "NVIDIA H200"},
    {"compute_capability": "8.9"}, {"profile": Profile(BatchLength(1, 1), BatchLength(2, 64), BatchLength(4, 256))},
    {"workspace_mib": 1024}, {"tf32": False}, {"op_version": 2}, {"op_id": "other::LSHAttention"},
    {"engine_format": 99},
])
def test_cache_key_changes_with_each_component(change: dict) -> None:
    assert _key(**change).digest() != _key().digest()


def test_every_key_field_is_tested() -> None:
    tested = {"onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability", "profile", "workspace_mib",
              "tf32", "op_version", "op_id", "engine_format"}
    assert {f.name for f in dataclasses.fields(EngineKey)} == tested


def test_onnx_hash_follows_the_file_and_its_external_data(tmp_path: Path) -> None:
    tensor = onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4096])],
                                   [tensor])
    path = tmp_path / "m.onnx"
    onnx.save_model(onnx.helper.make_model(graph), str(path), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    first = onnx_sha256(path)
    assert first == onnx_sha256(path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-1] + b"\x01")
    assert onnx_sha256(path) != first


# ------------------------------------------------------------------------------------------- cache entries
RECORD_METADATA = {"config": {"model_type": "reformer"}, "export_options": {"output_name": "logits"}}


def _store(tmp_path: Path, engine: bytes = b"engine-bytes" * 100) -> tuple[EngineCache, EngineKey, bytes]:
    cache, key = EngineCache(tmp_path / "engines"), _key()
    cache.store(key, engine, make_record(key, engine, RECORD_METADATA, tmp_path / "m.onnx"))
    return cache, key, engine


def test_cache_round_trip(tmp_path: Path) -> None:
    cache, key, engine = _store(tmp_path)
    found = cache.load(key)
    assert found is not None and found.engine == engine and found.record["key"] == key.as_dict()
    assert cache.check(_key(tf32=False)) == CacheMiss("no entry", absent=True)
    assert cache.load(_key(tf32=False)) is None
    assert [p.name for p in cache.root.iterdir()] == [cache.entry_dir(key).name]  # no staging left behind
    cache.store(key, engine, found.record)  # storing again over a valid entry is harmless
    assert cache.load(key) is not None


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "garbage_json", "other_key", "missing_engine",
                                    "wrong_format"])
def test_corrupt_cache_entry_is_detected_and_removed(tmp_path: Path, damage: str) -> None:
    cache, key, engine = _store(tmp_path)
    entry = cache.entry_dir(key)
    if damage == "flip_byte":
        (entry / ENGINE_FILE).write_bytes(engine[:10] + bytes([engine[10] ^ 1]) + engine[11:])
    elif damage == "truncate":
        (entry / ENGINE_FILE).write_bytes(engine[:-5])
    elif damage == "garbage_json":
        (entry / ENTRY_FILE).write_text("{not json")
    elif damage == "other_key":
        record = json.loads((entry / ENTRY_FILE).read_text())
        record["key"] = _key(gpu_name="other").as_dict()
        (entry / ENTRY_FILE).write_text(json.dumps(record))
    elif damage == "missing_engine":
        (entry / ENGINE_FILE).unlink()
    else:
        record = json.loads((entry / ENTRY_FILE).read_text())
        record["engine_format"] = 0
        (entry / ENTRY_FILE).write_text(json.dumps(record))
    missed = cache.check(key)
    assert isinstance(missed, CacheMiss) and missed.reason and missed.absent == (damage == "missing_engine")
    logged: list[str] = []
    assert cache.load(key, logged.append) is None
    if damage != "missing_engine":  # an entry without its engine reads as absent and is replaced on store
        assert not entry.exists() and "discarding" in logged[0]
    cache.store(key, engine, make_record(key, engine, RECORD_METADATA, tmp_path / "m.onnx"))
    assert cache.load(key) is not None


def test_verify_record() -> None:
    engine = b"x" * 64
    record = make_record(_key(), engine, RECORD_METADATA, Path("m.onnx"))
    assert verify_record(engine, record) is None
    assert "sha256" in verify_record(engine + b"y", record)
    assert "metadata" in verify_record(engine, {**record, "metadata": {}})
    assert "format" in verify_record(engine, [])


# ------------------------------------------------------------------------------------ engine file + record
def test_engine_file_round_trip(tmp_path: Path) -> None:
    engine, path = b"\x00engine" * 50, tmp_path / "m.engine"
    record = make_record(_key(), engine, RECORD_METADATA, tmp_path / "m.onnx")
    write_engine_file(path, engine, record)
    assert sidecar_path(path).name == "m.engine.json"
    assert read_engine_file(path) == (engine, record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json"]  # no temporary files


def test_engine_file_errors(tmp_path: Path) -> None:
    engine, path = b"\x00engine" * 50, tmp_path / "m.engine"
    with pytest.raises(EngineFileError, match="missing"):
        read_engine_file(path)
    write_engine_file(path, engine, make_record(_key(), engine, RECORD_METADATA, tmp_path / "m.onnx"))
    path.write_bytes(engine + b"!")  # engine replaced, record not: the pair no longer matches
    with pytest.raises(EngineFileError, match="sha256 .*rebuild it: reformer-rt build"):
        read_engine_file(path)
    sidecar_path(path).unlink()
    with pytest.raises(EngineFileError, match="m.engine.json"):
        read_engine_file(path)
    with pytest.raises(InputError, match="is a directory"):
        write_engine_file(tmp_path, engine, {})


def test_an_engine_record_is_read_as_export_info(tiny_onnx: Path, tmp_path: Path) -> None:
    engine, path = b"\x00engine" * 50, tmp_path / "m.engine"
    metadata = read_metadata(tiny_onnx)
    write_engine_file(path, engine, make_record(_key(), engine, metadata, tiny_onnx))
    assert max_length_of(path) == metadata["export_options"]["max_length"]
    write_engine_file(path, engine, make_record(_key(), engine, RECORD_METADATA, tiny_onnx))  # no max_length
    with pytest.raises(InputError, match="m.engine.json: export_options.*; expected .*; rebuild the engine"):
        max_length_of(path)


def test_engine_is_tied_to_tensorrt_version_and_gpu_architecture() -> None:
    record = make_record(_key(), b"e", RECORD_METADATA, Path("m.onnx"))
    check_runtime_match(record, "10.8.0.43", "9.0")
    with pytest.raises(EngineFileError, match="TensorRT 10.8.0.43 .* this machine has TensorRT 11.4.0.106"):
        check_runtime_match(record, "11.4.0.106", "9.0")
    with pytest.raises(EngineFileError, match="rebuild it here"):
        check_runtime_match(record, "10.8.0.43", "8.0")


# ----------------------------------------------------------------------------------------- versions, flags
def test_version_gate_and_strong_typing() -> None:
    check_tensorrt_version("10.8.0.43")
    check_tensorrt_version("11.4.0.106")
    with pytest.raises(BackendUnavailable, match="needs >= 10.8.*pip install"):
        check_tensorrt_version("10.7.0")
    flags = {"EXPLICIT_BATCH", "STRONGLY_TYPED"}
    assert strong_typing_flags("10.8.0.43", flags) == ("STRONGLY_TYPED",)
    assert strong_typing_flags("10.16.1.11", flags) == ("STRONGLY_TYPED",)
    assert strong_typing_flags("11.4.0.106", {"STRONGLY_TYPED"}) == ()  # strongly typed is the only mode
    with pytest.raises(BackendUnavailable, match="STRONGLY_TYPED"):
        strong_typing_flags("10.8.0.43", {"EXPLICIT_BATCH"})


def test_progress_bars_follow_nested_phases() -> None:
    text = io.StringIO()
    bars = PhaseBars(enabled=True, file=text)
    bars.start("Building engine", None, 3)
    bars.start("Tactic selection", "Building engine", 10)
    assert bars._depth == {"Building engine": 0, "Tactic selection": 1}
    assert bars.step("Tactic selection", 4) and bars._bars["Tactic selection"].n == 5
    bars.finish("Tactic selection")
    assert bars.step("Building engine", 0) and bars._bars["Building engine"].n == 1
    bars.cancelled = True  # what a Ctrl-C inside the monitor sets: TensorRT is then told to stop
    assert not bars.step("Building engine", 1)
    bars.close()
    assert bars._bars == {} and "Tactic selection" in text.getvalue() and "Building engine" in text.getvalue()
    quiet = PhaseBars(enabled=False, file=text)
    quiet.start("Building engine", None, 3)
    assert quiet.step("Building engine", 2)


# --------------------------------------------------------------------------------- without TensorRT (CI)
@needs_no_tensorrt
def test_backend_and_session_say_what_to_install(tiny_onnx: Path) -> None:
    assert plugin_registered() is False
    with pytest.raises(BackendUnavailable, match=r'pip install "tensorrt-cu12>=10.8"'):
        TensorRTBackend.open(tiny_onnx, "onnx", "cuda")
    with pytest.raises(BackendUnavailable, match="pip install"):
        Session(tiny_onnx, backend="tensorrt")


@needs_no_tensorrt
def test_build_command_without_tensorrt_exits_2_with_install_hint(tiny_onnx: Path, tmp_path: Path) -> None:
    """The command's contract in a real process (the other cases run in this one: ``helpers/cli.py``)."""
    out = tmp_path / "tiny.engine"
    result = real_process("build", str(tiny_onnx), "-o", str(out), "--max", "2x64", "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 2, result.stderr
    assert 'pip install "tensorrt-cu12>=10.8"' in one_error_line("build", result.stderr)
    assert not out.exists() and not sidecar_path(out).exists()


@pytest.mark.parametrize(("args", "words"), [
    (("--max", "2x640"), "--max: got length 640; expected at most 64"),
    (("--min", "2x"), "--min: got '2x'; expected BxL"),
    (("--workspace-mib", "0"), "--workspace-mib: got 0"),
])
def test_build_command_rejects_bad_options_first(tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 args: tuple, words: str) -> None:
    result = in_process(["build", str(tiny_onnx), "-o", str(tmp_path / "x.engine"), *args], capsys)
    assert result.returncode == 2 and words in one_error_line("build", result.stderr)


def test_build_command_rejects_other_onnx_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    plain = tmp_path / "plain.onnx"
    onnx.save_model(onnx.helper.make_model(graph), str(plain))
    (tmp_path / "text.onnx").write_text("not onnx")
    for path, words in ((plain, "no reformer_rt metadata"), (tmp_path / "text.onnx", "cannot read it as ONNX"),
                        (tmp_path / "none.onnx", "not a file")):
        result = in_process(["build", str(path), "-o", str(tmp_path / "x.engine")], capsys)
        assert result.returncode == 2 and words in one_error_line("build", result.stderr)


@needs_no_tensorrt
def test_doctor_reports_and_says_the_self_test_did_not_run() -> None:
    result = real_process("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line[:20].strip(): line[20:].split(maxsplit=1) for line in result.stdout.splitlines()[:-1]}
    assert set(lines) == {"python", "torch", "triton", "kernels fp32", "kernels fp16", "cuda forward", "onnxruntime",
                          "tensorrt", "lsh plugin", "tensorrt self-test"}
    assert lines["torch"][0] == "ok" and lines["onnxruntime"][0] == "ok" and lines["python"][0] == "ok"
    if not torch.cuda.is_available():
        for name in ("kernels fp32", "kernels fp16", "cuda forward"):
            assert lines[name] == ["absent", "not run: no CUDA GPU"]
    assert lines["tensorrt"][0] == "absent" and 'pip install "tensorrt-cu12>=10.8"' in lines["tensorrt"][1]
    assert lines["lsh plugin"][0] == "absent"
    assert lines["tensorrt self-test"] == ["absent", "not run: no usable TensorRT on this machine (see the "
                                                     "tensorrt line)"]
    assert result.stdout.rstrip().endswith("doctor: healthy")


# --------------------------------------------------------------------------------- with TensorRT and a GPU
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_cache_run_and_compare(tiny_onnx: Path, tmp_path: Path) -> None:
    """Build through the cache, hit it, survive a corrupt entry, and match the PyTorch model on the CPU."""
    _require_tensorrt_gpu()
    options = BuildOptions(make_profile(BatchLength(1, 1), BatchLength(2, 40), BatchLength(2, 64), 64), tf32=False)
    cache = EngineCache(tmp_path / "engines")
    first = engine_for(tiny_onnx, options, cache, log=lambda _: None)
    second = engine_for(tiny_onnx, options, cache, log=lambda _: None)
    assert not first.cache_hit and second.cache_hit and second.engine == first.engine
    (next(cache.root.iterdir()) / ENGINE_FILE).write_bytes(b"corrupt")
    third = engine_for(tiny_onnx, options, cache, log=lambda _: None)
    assert not third.cache_hit and verify_record(third.engine, third.record) is None
    backend = TensorRTBackend(third.engine, third.record, "cuda")
    model = DOCTOR.build()
    generator = torch.Generator().manual_seed(1)
    for batch, length, ragged in ((1, 1, False), (2, 29, True), (5, 64, True)):  # 5 rows > profile max: sliced
        ids, mask = random_inputs(model.config.vocab_size, batch, length, ragged, generator)
        with torch.no_grad():
            expected = model(ids, mask).numpy()
        got = backend.run(ids.numpy(), mask.numpy())["logits"]
        assert got.shape == expected.shape and got.dtype == np.float32
        assert float(np.abs(got - expected)[mask.numpy() != 0].max()) <= FP32_ABS_TOL
    with pytest.raises(InputError, match="outside the engine's profile"):
        backend.run(np.zeros((1, 65), np.int64), np.ones((1, 65), np.int64))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_command_engine_opens_alone_in_a_session(tiny_onnx: Path, tmp_path: Path) -> None:
    _require_tensorrt_gpu()
    engine = tmp_path / "tiny.engine"
    result = real_process("build", str(tiny_onnx), "-o", str(engine), "--max", "2x64", "--cache-dir",
                          str(tmp_path / "c"), "--timing-cache", str(tmp_path / "timing.cache"), "--no-tf32")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "timing.cache").stat().st_size > 0
    session = Session(engine)
    assert session.backend == "tensorrt" and session.output_name == "logits"
    sequences = [[1, 2, 3], [(7 * i) % 32 for i in range(30)]]
    out = session.run(sequences)["logits"]
    model = DOCTOR.build()
    for row, sequence in enumerate(sequences):
        with torch.no_grad():
            expected = model(torch.tensor([sequence])).numpy()[0]
        assert np.abs(out[row, :len(sequence)] - expected).max() <= FP32_ABS_TOL


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_doctor_self_test_passes() -> None:
    _require_tensorrt_gpu()
    result = real_process("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tensorrt self-test   ok" in result.stdout


def test_tiny_model_matches_its_description() -> None:
    config: ReformerConfig = random_model().config
    assert isinstance(random_model(), ReformerLM) and config.attn_layers.count("lsh") == 2
    assert max(length for _, length, _ in doctor.SELF_TEST_CASES) == config.max_position_embeddings


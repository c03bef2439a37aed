"""The command line under hostile but realistic use: every user error is one line and exit code 2, outputs are
written as a set or not at all, and SIGINT / SIGTERM stop a command with 130 / 143 and no file left behind.

User errors run in-process through ``cli.main`` (fast); the signal tests start real processes and send real
signals, each at a stage the process announces (a temporary file appearing, a progress bar starting).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers.artifacts import BYTE_LM, Artifacts
from helpers.cli import in_process, one_error_line

from reformer_rt.models import InputError
from reformer_rt.models.errors import Interrupted
from reformer_rt.runtime import artifacts
from reformer_rt.runtime.commands import cli


@pytest.fixture(scope="module")
def tiny(artifacts: Artifacts) -> tuple[Path, Path]:
    return artifacts.checkpoint(BYTE_LM), artifacts.export(BYTE_LM)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    result = in_process(argv, capsys)
    return result.returncode, result.stderr


def _copy_checkpoint(tiny: tuple[Path, Path], where: Path) -> Path:
    return Path(shutil.copytree(tiny[0], where / "ckpt"))


def _edit_config(directory: Path, **changes: object) -> None:
    data = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**data, **changes}))


# ---------------------------------------------------------------------------------------------- user errors
#: (name, argv with {ckpt} {onnx} {tmp}, setup(tmp, ckpt copy), words the message must hold)
CASES: list[tuple[str, list[str], Callable[[Path, Path], object] | None, tuple[str, ...]]] = [
    ("export: opset out of range", ["export", "{ckpt}", "-o", "{tmp}/m.onnx", "--opset", "99"], None, ("opset", "25")),
    ("export: output not .onnx", ["export", "{ckpt}", "-o", "{tmp}/m.txt"], None, (".onnx",)),
    ("export: output is a directory", ["export", "{ckpt}", "-o", "{tmp}/d.onnx"],
     lambda tmp, ckpt: (tmp / "d.onnx").mkdir(), ("directory",)),
    ("export: config.json is a directory", ["export", "{ckpt}", "-o", "{tmp}/m.onnx"],
     lambda tmp, ckpt: ((ckpt / "config.json").unlink(), (ckpt / "config.json").mkdir()), ("config",)),
    ("export: is_decoder 'false'", ["export", "{ckpt}", "-o", "{tmp}/m.onnx"],
     lambda tmp, ckpt: _edit_config(ckpt, is_decoder="false"), ("is_decoder",)),
    ("export: attn_layers a string", ["export", "{ckpt}", "-o", "{tmp}/m.onnx"],
     lambda tmp, ckpt: _edit_config(ckpt, attn_layers="lsh"), ("attn_layers", "list")),
    ("export: malformed shard index", ["export", "{ckpt}", "-o", "{tmp}/m.onnx"],
     lambda tmp, ckpt: ((ckpt / "model.safetensors").unlink(),
                        (ckpt / "model.safetensors.index.json").write_text('{"weight_map": [1]}')), ("weight_map",)),
    ("run: ragged nested ids", ["run", "{onnx}", "--ids", "{tmp}/ids.json"],
     lambda tmp, ckpt: (tmp / "ids.json").write_text("[[1, [2, 3]]]"), ("sequence 0",)),
    ("run: booleans among ids", ["run", "{onnx}", "--ids", "{tmp}/ids.json"],
     lambda tmp, ckpt: (tmp / "ids.json").write_text("[[5, true]]"), ("boolean",)),
    ("run: (0, N) id array", ["run", "{onnx}", "--ids", "{tmp}/ids.npy"],
     lambda tmp, ckpt: np.save(tmp / "ids.npy", np.zeros((0, 4), np.int64)), ("(0, 4)",)),
    ("run: no such tokenizer", ["run", "{onnx}", "--text", "{tmp}/t.txt", "--tokenizer", "{tmp}/nowhere"],
     lambda tmp, ckpt: (tmp / "t.txt").write_text("hi"), ("--tokenizer",)),
    ("run: tokenizer.json of the wrong shape", ["run", "{onnx}", "--text", "{tmp}/t.txt", "--tokenizer", "{tmp}"],
     lambda tmp, ckpt: ((tmp / "t.txt").write_text("hi"), (tmp / "tokenizer.json").write_text("[1, 2]")),
     ("tokenizer.json",)),
    ("run: --device banana", ["run", "{onnx}", "--ids", "{tmp}/ids.json", "--device", "banana"],
     lambda tmp, ckpt: (tmp / "ids.json").write_text("[[5]]"), ("banana",)),
    ("run: -o a directory", ["run", "{onnx}", "--ids", "{tmp}/ids.json", "-o", "{tmp}"],
     lambda tmp, ckpt: (tmp / "ids.json").write_text("[[5]]"), (".npy, .npz or .json",)),
    ("run: over the maximum length", ["run", "{onnx}", "--ids", "{tmp}/ids.json"],
     lambda tmp, ckpt: (tmp / "ids.json").write_text(json.dumps([[5] * 129])), ("at most 128",)),
    ("bench: --out is a file", ["bench", "{ckpt}", "--out", "{tmp}/ids.json", "--lengths", "16"],
     lambda tmp, ckpt: (tmp / "ids.json").write_text("x"), ("--out",)),
    ("bench serve: --out is a file", ["bench", "serve", "{ckpt}", "--out", "{tmp}/ids.json", "--requests", "1"],
     lambda tmp, ckpt: (tmp / "ids.json").write_text("x"), ("--out", "is a file")),
    ("bench generate: --out is a file", ["bench", "generate", "--models", "{ckpt}", "--out", "{tmp}/ids.json"],
     lambda tmp, ckpt: (tmp / "ids.json").write_text("x"), ("--out", "is a file")),
    ("bench: unknown --arch", ["bench", "--arch", "banana", "--out", "{tmp}/o"], None, ("--arch", "enwik8-like")),
    ("bench: length over the model's maximum", ["bench", "{ckpt}", "--out", "{tmp}/o", "--lengths", "4096"], None,
     ("--lengths", "128")),
    ("build: engine name the runtime cannot read back", ["build", "{onnx}", "-o", "{tmp}/m.onnx"], None, ("-o",)),
    ("build: portable export", ["build", "{onnx}", "-o", "{tmp}/m.engine"], None, ("plugin",)),
    ("demo: negative --generate", ["demo", "--generate", "-1"], None, ("--generate",)),
    ("doctor: unknown flag", ["doctor", "--bogus"], None, ("--bogus",)),
]


@pytest.mark.parametrize("name,argv,setup,words", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_2(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                            argv: list[str], setup, words: tuple[str, ...]) -> None:
    ckpt = _copy_checkpoint(tiny, tmp_path)
    if setup is not None:
        setup(tmp_path, ckpt)
    before = sorted(p.name for p in tmp_path.iterdir())
    filled = [a.format(ckpt=ckpt, onnx=tiny[1], tmp=tmp_path) for a in argv]
    code, err = _main(filled, capsys)
    assert code == 2
    command = " ".join(argv[:2]) if tuple(argv[:2]) in cli.NESTED else argv[0]
    line = one_error_line(command, err)
    assert all(w in line for w in words), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new, no temporary file


def test_binary_bytes_on_stdin_are_refused(tiny, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe\x00abc")))
    code, err = _main(["run", str(tiny[1]), "--text", "-"], capsys)
    assert code == 2 and "not UTF-8" in one_error_line("run", err)


def test_unwritable_cache_is_named(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cache").write_text("a file, not a directory")
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    code, err = _main(["run", str(tiny[0]), "--ids", str(tmp_path / "ids.json")], capsys)
    assert code == 2  # --ids is read after the session opens: the cache is the first problem
    assert "REFORMER_RT_CACHE" in one_error_line("run", err)


def test_bench_fails_when_its_points_fail(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every point failing is not a success (here: TensorRT is not installed, a user error in each worker)."""
    pytest.importorskip("matplotlib")
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine may have TensorRT")
    code, err = _main(["bench", str(tiny[0]), "--out", str(tmp_path / "o"), "--lengths", "16", "--backends",
                       "tensorrt", "--no-hf", "--repeat", "1", "--quiet"], capsys)
    assert code == 2 and "1 of 1 points failed" in one_error_line("bench", err)
    report = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert report["rows"][0]["exit_code"] == 2


def test_bench_profile_reports_time_per_operator(tiny) -> None:
    from reformer_rt.runtime.bench import forward as bench

    ids = np.random.default_rng(0).integers(0, 50, (1, 40), dtype=np.int64)
    profile = bench._profile(str(tiny[1]), ids, threads=1)
    assert 0 < len(profile) <= bench.PROFILE_TOP
    assert {"MatMul", "Gemm"} & set(profile) and all(seconds >= 0 for seconds in profile.values())


# ------------------------------------------------------------------------------------------ outputs as a set
def test_run_output_pair_is_written_together_or_not_at_all(tiny, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ids.json").write_text("[[5, 6, 7], [8]]")
    (tmp_path / "x.lengths.npy").mkdir()  # the second file cannot be written
    code, err = _main(["run", str(tiny[1]), "--ids", str(tmp_path / "ids.json"), "-o", str(tmp_path / "x.npy"),
                       "--quiet"], capsys)
    assert code == 2 and not (tmp_path / "x.npy").exists()
    (tmp_path / "x.lengths.npy").rmdir()
    old_umask = os.umask(0o027)
    try:
        code, _ = _main(["run", str(tiny[1]), "--ids", str(tmp_path / "ids.json"), "-o", str(tmp_path / "x.npy"),
                         "--quiet"], capsys)
    finally:
        os.umask(old_umask)
    assert code == 0
    assert np.load(tmp_path / "x.lengths.npy").tolist() == [3, 1]
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("x.npy", "x.lengths.npy")} == {0o640}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.json", "x.lengths.npy", "x.npy"]


@pytest.mark.parametrize("failure", ["os_error", "interrupt"])
def test_a_failed_set_keeps_the_old_files(tmp_path: Path, failure: str) -> None:
    first, second = tmp_path / "a.npy", tmp_path / "a.lengths.npy"
    first.write_bytes(b"old a")
    second.write_bytes(b"old b")

    def broken(handle) -> None:
        handle.write(b"half")
        raise OSError(28, "No space left on device") if failure == "os_error" else Interrupted(signal.SIGINT)

    with pytest.raises(InputError if failure == "os_error" else Interrupted):
        artifacts.write_files_atomic({first: b"new a", second: broken})
    assert first.read_bytes() == b"old a" and second.read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lengths.npy", "a.npy"]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_damaged_cached_export_is_exported_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import reformer_rt.export as export

    logged = _Lines()
    logging.getLogger("reformer_rt").addHandler(logged)
    calls = []

    def fake_export(checkpoint, target, **options) -> None:
        calls.append(target)
        Path(target).write_bytes(b"graph bytes")

    monkeypatch.setattr(export, "export_onnx", fake_export)
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    entry = artifacts.cached_export(checkpoint)
    assert artifacts.cached_export(checkpoint) == entry and len(calls) == 1  # intact: reused
    entry.write_bytes(b"graph byteZ")  # damaged since
    try:
        assert artifacts.cached_export(checkpoint) == entry and len(calls) == 2
    finally:
        logging.getLogger("reformer_rt").removeHandler(logged)
    assert any("sha256" in line for line in logged.lines) and entry.read_bytes() == b"graph bytes"


# ----------------------------------------------------------------------------------------------- signals
def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    exe = shutil.which("reformer-rt")
    command = [exe] if exe else [sys.executable, "-m", "reformer_rt.runtime.commands.cli"]
    return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the stage never came"
        time.sleep(0.05)


def _stop_and_check(process: subprocess.Popen, sig: int) -> None:
    sent = time.monotonic()
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 30, "did not stop promptly"
    assert process.returncode == 128 + sig, err
    assert "interrupted" in err and "Traceback" not in err, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_export_tracing_leaves_nothing(tiny, tmp_path: Path, sig: int) -> None:
    process = _start(["export", str(tiny[0]), "-o", str(tmp_path / "m.onnx")])
    _wait_for(lambda: any(tmp_path.glob(".m.onnx.*")), process)  # the work directory: tracing starts now
    time.sleep(1.0)
    _stop_and_check(process, sig)
    assert list(tmp_path.iterdir()) == []


class _StderrWatcher:
    """Collects a child's stderr on a thread, so a test can wait for a line without blocking on the pipe."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for chunk in iter(lambda: process.stderr.read(1), ""):
            self.text += chunk

    def finish(self, process: subprocess.Popen, sent: float) -> None:
        """Wait for the stopped process; it must end promptly."""
        process.wait(timeout=60)
        self._thread.join(timeout=10)
        assert time.monotonic() - sent < 30, "did not stop promptly"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_run_inference_leaves_no_output(tiny, tmp_path: Path, sig: int) -> None:
    (tmp_path / "ids.json").write_text(json.dumps([[5] * 128] * 3000))
    process = _start(["run", str(tiny[1]), "--ids", str(tmp_path / "ids.json"), "-o", str(tmp_path / "x.npy"),
                      "--max-tokens-per-batch", "1024", "--backend", "onnxruntime", "--device", "cpu"])
    watcher = _StderrWatcher(process)
    _wait_for(lambda: "micro-batches" in watcher.text, process)  # inference has started
    process.send_signal(sig)
    watcher.finish(process, time.monotonic())
    assert process.returncode == 128 + sig, watcher.text[-2000:]
    assert "interrupted" in watcher.text and "Traceback" not in watcher.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.json"]


def test_ctrl_c_during_bench_stops_workers_and_writes_nothing(tiny, tmp_path: Path) -> None:
    out = tmp_path / "o"
    scratch = set(Path(tempfile.gettempdir()).glob("reformer-rt-bench-*"))
    process = _start(["bench", str(tiny[0]), "--out", str(out), "--lengths", "64,128", "--batches", "1,2,4",
                      "--backends", "torch", "--no-hf", "--repeat", "3"])
    watcher = _StderrWatcher(process)
    _wait_for(lambda: '"impl"' in watcher.text, process, seconds=240)  # the first point has been measured
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    watcher.finish(process, time.monotonic())
    assert process.returncode == 130, watcher.text[-2000:]
    assert "interrupted" in watcher.text and "Traceback" not in watcher.text
    assert list(out.iterdir()) == []
    assert set(Path(tempfile.gettempdir()).glob("reformer-rt-bench-*")) <= scratch  # its scratch directory is gone

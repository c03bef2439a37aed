"""``reformer-rt export --triton-repo``: a Triton Inference Server model repository whose config parses against
Triton's ModelConfig schema and whose interface is exactly ``reformer-rt serve``'s. (Under a real tritonserver:
``make triton-check``, which CI does not run: it needs its own environment.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc", reason="the model config schema ships with tritonclient (pip install "
                    "'.[serve]')")

from helpers.artifacts import BYTE_LM, Artifacts  # noqa: E402
from helpers.cli import in_process, one_error_line, real_process  # noqa: E402
from helpers.serving import SERVED_LM  # noqa: E402

from reformer_rt.models import InputError  # noqa: E402
from reformer_rt.runtime import Session  # noqa: E402
from reformer_rt.runtime.serving.model import ServedModel  # noqa: E402
from reformer_rt.runtime.serving.triton_repo import MODEL_PY, validate_config, write_repository  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(artifacts: Artifacts) -> Path:
    """The served tiny LM of the server tests (byte tokenizer included)."""
    return artifacts.checkpoint(SERVED_LM)


def _interface(config) -> tuple[list, list]:
    return ([(t.name, t.data_type, list(t.dims), t.optional) for t in config.input],
            [(t.name, t.data_type, list(t.dims)) for t in config.output])


def test_python_repository_serves_the_same_interface_as_reformer_rt_serve(checkpoint, tmp_path) -> None:
    target = write_repository(checkpoint, tmp_path / "repo", name="tiny", device="cpu")
    assert target == tmp_path / "repo" / "tiny"
    config = validate_config((target / "config.pbtxt").read_text())
    served = ServedModel("tiny", Session(checkpoint, backend="torch", device="cpu")).config()
    assert _interface(config) == _interface(served)
    assert config.backend == "python" and config.max_batch_size == served.max_batch_size
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert config.parameters["reformer_rt_backend"].string_value == "torch"
    assert (target / "1" / "model.py").read_text() == MODEL_PY
    copied = sorted(p.name for p in (target / "1" / "artifact").iterdir())
    assert copied == sorted(p.name for p in checkpoint.iterdir())
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["tiny"]  # no staging directory left


def test_onnxruntime_repository_for_an_onnx_file(artifacts: Artifacts, tmp_path) -> None:
    onnx_path = Path(shutil.copy(artifacts.export(BYTE_LM), tmp_path / "tiny.onnx"))  # the session's shared export
    target = write_repository(onnx_path, tmp_path / "repo", triton_backend="onnxruntime")
    assert target.name == "tiny" and (target / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    config = validate_config((target / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and not config.HasField("dynamic_batching")
    inputs, outputs = _interface(config)
    assert [(n, d) for n, _, d, _ in inputs] == [("input_ids", [-1]), ("attention_mask", [-1])]
    assert [(n, d) for n, _, d in outputs] == [("logits", [-1, 258])]


def test_repository_mistakes_are_refused_and_leave_nothing(checkpoint, tmp_path) -> None:
    repo = tmp_path / "repo"
    write_repository(checkpoint, repo, name="taken", device="cpu")
    with pytest.raises(InputError, match="exists; remove it or choose another --name"):
        write_repository(checkpoint, repo, name="taken")
    with pytest.raises(InputError, match="without '/'"):
        write_repository(checkpoint, repo, name="a/b")
    with pytest.raises(InputError, match="expected one of"):
        write_repository(checkpoint, repo, name="x", triton_backend="tensorrt")
    with pytest.raises(InputError, match="ModelConfig"):
        validate_config('name: "x"\nmax_batch_size: "many"\n')
    assert sorted(p.name for p in repo.iterdir()) == ["taken"]


def test_export_command_writes_the_repository(checkpoint, tmp_path, capsys) -> None:
    """Written in process (``helpers/cli.py``); refused the second time in a real one."""
    argv = ["export", str(checkpoint), "--triton-repo", str(tmp_path / "repo"), "--name", "m"]
    result = in_process(argv, capsys)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "repo" / "m" / "config.pbtxt").is_file() and "tritonserver" in result.stdout
    again = real_process(*argv, timeout=300)
    assert again.returncode == 2 and "exists" in one_error_line("export", again.stderr)

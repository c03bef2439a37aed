"""Classification and QA heads through the whole runtime: exported (validated), run by the Session on the torch and
ONNX Runtime backends (each result equal to the model on that sequence alone), written by ``reformer-rt run``, and
served with their shapes in the model metadata."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from reformer_rt.export import export_metadata, export_onnx
from reformer_rt.export.metadata import recorded_task
from reformer_rt.models import (
    ReformerConfig, ReformerForQuestionAnswering, ReformerForSequenceClassification, load_pretrained,
)
from reformer_rt.models.heads import TASKS
from reformer_rt.runtime import Session
from reformer_rt.runtime.backends import OnnxRuntimeBackend, TorchBackend

BASE = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=32,
            attn_layers=("local", "lsh"), axial_pos_embds=False, max_position_embeddings=256,
            lsh_attn_chunk_length=16, local_attn_chunk_length=16, num_hashes=2, num_buckets=4, hash_seed=4)
LENGTHS = (3, 16, 30, 41, 64, 9)


def _save(cls, directory, **fields):
    torch.manual_seed(2)
    model = cls(ReformerConfig.from_dict({**BASE, **fields}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    classifier = _save(ReformerForSequenceClassification, root / "cls", id2label={"0": "a", "1": "b", "2": "c"},
                       problem_type="single_label_classification")
    qa = _save(ReformerForQuestionAnswering, root / "qa")
    for name in ("cls", "qa"):
        export_onnx(root / name, root / f"{name}.onnx", attention="portable", log=None)
    return root, classifier, qa


def _sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, BASE["vocab_size"], n) for n in LENGTHS]


def _alone(model, seq: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(seq)[None])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_classification_session_outputs(heads, backend: str) -> None:
    root, model, _ = heads
    session = Session(root / ("cls" if backend == "torch" else "cls.onnx"), backend=backend, device="cpu")
    assert session.task == "classification" and session.default_outputs == ("logits",)
    assert {"logits", "probabilities"} <= set(session.outputs)
    assert ("embedding" in session.outputs) == (backend == "torch")
    result = session.run(_sequences(), outputs=["logits", "probabilities"])
    assert result["logits"].shape == (len(LENGTHS), 3)
    for i, seq in enumerate(_sequences()):
        expected = _alone(model, seq)[0].numpy()
        assert np.abs(result["logits"][i] - expected).max() <= 1e-4
    assert np.allclose(result["probabilities"].sum(axis=1), 1.0, atol=1e-6)
    assert (result["probabilities"].argmax(1) == result["logits"].argmax(1)).all()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_question_answering_session_outputs(heads, backend: str) -> None:
    root, _, model = heads
    session = Session(root / ("qa" if backend == "torch" else "qa.onnx"), backend=backend, device="cpu")
    assert session.task == "question_answering" and session.default_outputs == ("start_logits", "end_logits")
    result = session.run(_sequences())  # the defaults: both
    assert result["start_logits"].shape == (len(LENGTHS), max(LENGTHS))
    for i, seq in enumerate(_sequences()):
        expected = _alone(model, seq)
        for name, want in (("start_logits", expected.start_logits), ("end_logits", expected.end_logits)):
            got = result[name][i]
            assert np.abs(got[:len(seq)] - want[0].numpy()).max() <= 1e-4 and not got[len(seq):].any()


def test_exports_record_the_task_and_outputs(heads) -> None:
    root, _, _ = heads
    assert export_metadata(root / "cls.onnx")["export_options"]["task"] == "classification"
    options = export_metadata(root / "qa.onnx")["export_options"]
    assert options["task"] == "question_answering" and options["output_names"] == ["start_logits", "end_logits"]


def test_the_task_table_drives_the_backends_and_the_export_metadata(heads) -> None:
    root, _, _ = heads
    for name in ("cls", "qa"):
        model = load_pretrained(root / name)
        task = TASKS[type(model)]
        assert TorchBackend(model).outputs == tuple(raw.name for raw in task.raw_outputs)
        assert OnnxRuntimeBackend(root / f"{name}.onnx").outputs == tuple(raw.name for raw in task.graph)
        meta = export_metadata(root / f"{name}.onnx")
        assert recorded_task(meta["export_options"]) is task
        assert tuple(meta["export_options"]["output_names"]) == task.outputs


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reformer_rt.runtime.commands.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_run_command_writes_every_head_output(heads, tmp_path) -> None:
    root, _, _ = heads
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([s.tolist() for s in _sequences()]))
    done = _cli("run", str(root / "qa.onnx"), "--ids", str(ids), "-o", str(tmp_path / "qa.npz"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == ["start_logits", "end_logits"]
    with np.load(tmp_path / "qa.npz") as saved:
        assert sorted(saved.files) == ["end_logits", "lengths", "start_logits"]
        assert saved["lengths"].tolist() == list(LENGTHS)
    refused = _cli("run", str(root / "qa"), "--ids", str(ids), "-o", str(tmp_path / "qa.npy"), "--backend", "torch")
    assert refused.returncode == 2 and "use -o OUT.npz" in refused.stderr
    done = _cli("run", str(root / "cls"), "--ids", str(ids), "-o", str(tmp_path / "cls.npy"), "--backend", "torch")
    assert done.returncode == 0 and np.load(tmp_path / "cls.npy").shape == (len(LENGTHS), 3)


def test_served_heads_show_their_shapes_and_answer(heads) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    from reformer_rt.runtime.bench.server_process import ServeProcess

    root, classifier, qa = heads
    with ServeProcess([f"cls={root / 'cls'}", f"qa={root / 'qa.onnx'}", "--backend", "auto", "--device", "cpu"],
                      start_timeout_s=120) as server:
        client = httpclient.InferenceServerClient(server.http)
        shapes = {o["name"]: o["shape"] for o in client.get_model_metadata("cls")["outputs"]}
        assert shapes["logits"] == [-1, 3] and shapes["probabilities"] == [-1, 3]
        shapes = {o["name"]: o["shape"] for o in client.get_model_metadata("qa")["outputs"]}
        assert shapes["start_logits"] == [-1, -1] and shapes["end_logits"] == [-1, -1]
        seq = _sequences()[3]
        tensor = httpclient.InferInput("input_ids", [1, len(seq)], "INT64")
        tensor.set_data_from_numpy(seq[None].astype(np.int64))
        result = client.infer("cls", [tensor], outputs=[httpclient.InferRequestedOutput("probabilities")])
        expected = torch.softmax(_alone(classifier, seq), dim=-1)[0].numpy()
        assert np.abs(result.as_numpy("probabilities")[0] - expected).max() <= 1e-5
        result = client.infer("qa", [tensor])  # no outputs named: both
        assert result.as_numpy("start_logits").shape == (1, len(seq)) and result.as_numpy("end_logits") is not None

"""Classification and QA heads through the whole runtime: exported (validated), run by the Session on the torch and
ONNX Runtime backends (each result equal to the model on that sequence alone), written by ``reformer-rt run``, and
served with their shapes in the model metadata. Each export is half a minute on 2 cores: ``make test`` makes the QA
head's; the classifier's, and the tests that need it, are ``slow``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.artifacts import Artifacts, TinyModel
from helpers.cli import in_process, one_error_line

from reformer_rt.export import export_metadata
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
CLASSIFIER = TinyModel("heads-cls", ReformerConfig.from_dict(
    {**BASE, "id2label": {"0": "a", "1": "b", "2": "c"}, "problem_type": "single_label_classification"}),
    seed=2, scale=0.1, model_class=ReformerForSequenceClassification)
QUESTION_ANSWERING = TinyModel("heads-qa", ReformerConfig.from_dict(BASE), seed=2, scale=0.1,
                               model_class=ReformerForQuestionAnswering)


def _path(artifacts: Artifacts, head: TinyModel, backend: str) -> Path:
    """The head's checkpoint for the torch backend; for ONNX Runtime its validated portable export, made once."""
    return artifacts.checkpoint(head) if backend == "torch" else artifacts.export(head, validate=True)


def _sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, BASE["vocab_size"], n) for n in LENGTHS]


def _alone(model, seq: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(seq)[None])


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=pytest.mark.slow)])
def test_classification_session_outputs(artifacts: Artifacts, backend: str) -> None:
    model = CLASSIFIER.build()
    session = Session(_path(artifacts, CLASSIFIER, backend), backend=backend, device="cpu")
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
def test_question_answering_session_outputs(artifacts: Artifacts, backend: str) -> None:
    model = QUESTION_ANSWERING.build()
    session = Session(_path(artifacts, QUESTION_ANSWERING, backend), backend=backend, device="cpu")
    assert session.task == "question_answering" and session.default_outputs == ("start_logits", "end_logits")
    result = session.run(_sequences())  # the defaults: both
    assert result["start_logits"].shape == (len(LENGTHS), max(LENGTHS))
    for i, seq in enumerate(_sequences()):
        expected = _alone(model, seq)
        for name, want in (("start_logits", expected.start_logits), ("end_logits", expected.end_logits)):
            got = result[name][i]
            assert np.abs(got[:len(seq)] - want[0].numpy()).max() <= 1e-4 and not got[len(seq):].any()


@pytest.mark.parametrize("head,task,outputs", [
    pytest.param(CLASSIFIER, "classification", ["logits"], id="classification", marks=pytest.mark.slow),
    pytest.param(QUESTION_ANSWERING, "question_answering", ["start_logits", "end_logits"], id="question_answering"),
])
def test_exports_record_the_task_and_outputs(artifacts: Artifacts, head: TinyModel, task: str,
                                             outputs: list[str]) -> None:
    options = export_metadata(_path(artifacts, head, "onnxruntime"))["export_options"]
    assert options["task"] == task and options["output_names"] == outputs


@pytest.mark.parametrize("head", [QUESTION_ANSWERING, pytest.param(CLASSIFIER, marks=pytest.mark.slow)],
                         ids=["qa", "cls"])
def test_the_task_table_drives_the_backends_and_the_export_metadata(artifacts: Artifacts, head: TinyModel) -> None:
    model = load_pretrained(artifacts.checkpoint(head))
    task = TASKS[type(model)]
    assert TorchBackend(model).outputs == tuple(raw.name for raw in task.raw_outputs)
    exported = artifacts.export(head, validate=True)
    assert OnnxRuntimeBackend(exported).outputs == tuple(raw.name for raw in task.graph)
    meta = export_metadata(exported)
    assert recorded_task(meta["export_options"]) is task
    assert tuple(meta["export_options"]["output_names"]) == task.outputs


def test_run_command_writes_every_head_output(artifacts: Artifacts, tmp_path, capsys) -> None:
    """In process (``helpers/cli.py``): ``test_session.py`` runs the command in a real one."""
    qa_onnx = _path(artifacts, QUESTION_ANSWERING, "onnxruntime")
    qa, classifier = artifacts.checkpoint(QUESTION_ANSWERING), artifacts.checkpoint(CLASSIFIER)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([s.tolist() for s in _sequences()]))
    done = in_process(["run", str(qa_onnx), "--ids", str(ids), "-o", str(tmp_path / "qa.npz"), "--quiet"], capsys)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == ["start_logits", "end_logits"]
    with np.load(tmp_path / "qa.npz") as saved:
        assert sorted(saved.files) == ["end_logits", "lengths", "start_logits"]
        assert saved["lengths"].tolist() == list(LENGTHS)
    refused = in_process(["run", str(qa), "--ids", str(ids), "-o", str(tmp_path / "qa.npy"), "--backend", "torch"],
                         capsys)
    assert refused.returncode == 2 and "use -o OUT.npz" in one_error_line("run", refused.stderr)
    done = in_process(["run", str(classifier), "--ids", str(ids), "-o", str(tmp_path / "cls.npy"), "--backend",
                       "torch"], capsys)
    assert done.returncode == 0 and np.load(tmp_path / "cls.npy").shape == (len(LENGTHS), 3)


def test_served_heads_show_their_shapes_and_answer(artifacts: Artifacts, tmp_path) -> None:
    """The classifier from its checkpoint on the torch backend (``auto`` would export it again, to the user's
    cache), the QA head from its export on the backend ``auto`` picks."""
    httpclient = pytest.importorskip("tritonclient.http")
    from reformer_rt.runtime.bench.server_process import ServeProcess

    classifier = CLASSIFIER.build()
    models = {"cls": {"path": str(artifacts.checkpoint(CLASSIFIER)), "backend": "torch"},
              "qa": str(_path(artifacts, QUESTION_ANSWERING, "onnxruntime"))}
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"models": models}))
    with ServeProcess(["--config", str(config), "--backend", "auto", "--device", "cpu"],
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

"""``reformer-rt serve`` with int8 models: an int8 export, and a checkpoint served with ``quantize: int8`` on the
torch backend (config file). Each answers a ragged batch exactly as its Session does for each sequence alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from helpers.artifacts import BYTE_LM, Artifacts
from helpers.serving import ServerProcess, ragged_sequences

from reformer_rt.runtime import Session


@pytest.fixture(scope="module")
def int8_server(artifacts: Artifacts, tiny_checkpoint: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    int8 = artifacts.export(BYTE_LM, quantize="int8")
    config = tmp_path_factory.mktemp("serve-int8") / "serve.json"
    config.write_text(json.dumps({"models": {"int8": str(int8), "torch8": {"path": str(tiny_checkpoint),
                                                                           "backend": "torch", "quantize": "int8"}},
                                  "device": "cpu"}))
    with ServerProcess("--config", str(config)) as process:
        yield process, int8


@pytest.mark.parametrize("name", ["int8", "torch8"])
def test_int8_models_answer_each_sequence_as_their_session_does_alone(int8_server, tiny_checkpoint: Path,
                                                                       name: str) -> None:
    server, int8 = int8_server
    session = Session(int8) if name == "int8" else Session(tiny_checkpoint, backend="torch", quantize="int8")
    seqs = ragged_sequences(3, seed=11, high=128)  # within the int8 export's 128 tokens
    ids = np.zeros((len(seqs), max(len(s) for s in seqs)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    inputs = [httpclient.InferInput("input_ids", list(ids.shape), "INT64"),
              httpclient.InferInput("attention_mask", list(mask.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(mask)
    client = httpclient.InferenceServerClient(server.http)
    result = client.infer(name, inputs, outputs=[httpclient.InferRequestedOutput("logits")])
    for row, seq in enumerate(seqs):
        np.testing.assert_array_equal(result.as_numpy("logits")[row, :len(seq)], session.run([seq])["logits"][0])

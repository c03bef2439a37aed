"""Fuzzing the input contract: whatever a caller passes, the answer is a ``ReformerError`` or a correct result --
never another exception, never a partial file.

Hypothesis generates id lists and arrays, attention masks, JSON id files, config dictionaries, damaged checkpoint
and ONNX files, and faults while a set of files is written. CI runs a fixed, bounded sample (derandomized,
``DEFAULT_EXAMPLES`` per test, well under a minute on 2 cores); a longer, random run is one command:

    REFORMER_RT_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz_inputs.py -p no:logging
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.artifacts import BYTE_LM, Artifacts

from reformer_rt.export.metadata import export_metadata
from reformer_rt.models import ReformerConfig, ReformerError, ReformerLM
from reformer_rt.models.errors import Interrupted
from reformer_rt.runtime import Session
from reformer_rt.runtime.artifacts import write_files_atomic
from reformer_rt.runtime.commands.run import _read_ids

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DEFAULT_EXAMPLES = 40
EXAMPLES = int(os.environ.get("REFORMER_RT_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="REFORMER_RT_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
CONFIG = BYTE_LM.config
VOCAB = CONFIG.vocab_size


@pytest.fixture(scope="module")
def checkpoint(artifacts: Artifacts) -> Path:
    return artifacts.checkpoint(BYTE_LM)


@pytest.fixture(scope="module")
def onnx_file(artifacts: Artifacts) -> Path:
    return artifacts.export(BYTE_LM)


@pytest.fixture(scope="module")
def session(checkpoint: Path) -> Session:
    return Session(checkpoint, backend="torch", device="cpu")


# -------------------------------------------------------------------------------------------- strategies
#: Mostly valid token ids, with the values users get wrong mixed in.
token = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1), st.integers(-3, VOCAB + 3),
                  st.sampled_from([2**63, 2**70, -(2**63) - 1]), st.booleans(), st.floats(allow_nan=True),
                  st.none(), st.text(max_size=2))
id_rows = st.lists(st.lists(st.one_of(token, st.lists(token, max_size=2)), max_size=40), max_size=4)
ID_DTYPES = ["int64", "int32", "uint8", "uint64", "bool", "float32", "float64", "complex64", "<U2", "object"]


@st.composite
def id_arrays(draw: st.DrawFn) -> np.ndarray:
    shape = tuple(draw(st.lists(st.integers(0, 24), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(ID_DTYPES))
    values = draw(st.integers(-2, VOCAB + 2))
    return np.full(shape, values).astype(dtype) if dtype != "object" else np.full(shape, values, dtype=object)


@st.composite
def masked_arrays(draw: st.DrawFn) -> tuple[np.ndarray, object]:
    rows, length = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    ids = np.asarray(draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length),
                                   min_size=rows, max_size=rows)), dtype=np.int64)
    kind = draw(st.sampled_from(["prefix", "noise", "floats", "strings", "ragged", "shape"]))
    if kind == "prefix":  # a valid right-padded mask, sometimes bool or float
        lengths = draw(st.lists(st.integers(0, length), min_size=rows, max_size=rows))
        mask = (np.arange(length)[None, :] < np.array(lengths)[:, None]).astype(draw(st.sampled_from(
            ["int64", "bool", "float32", "int8"])))
    elif kind == "noise":
        mask = np.asarray(draw(st.lists(st.integers(-2, 3), min_size=rows * length, max_size=rows * length)))
        mask = mask.reshape(rows, length)
    elif kind == "floats":
        mask = np.full((rows, length), draw(st.floats(allow_nan=True)))
    elif kind == "strings":
        mask = np.full((rows, length), draw(st.sampled_from(["1", "0", "yes"])))
    elif kind == "ragged":
        mask = [[1] * length] + [[1]] * (rows - 1) if rows > 1 else [[1, [1]]]
    else:
        mask = np.ones((rows, length + draw(st.integers(1, 3))))
    return ids, mask


def _expected_lengths(sequences: object, mask: object) -> list[int]:
    if mask is not None:
        return np.asarray(mask).astype(bool).sum(axis=1).tolist()
    return [len(row) for row in sequences]


def _check_result(session: Session, sequences: object, mask: object = None) -> None:
    """The contract: a ReformerError, or one correct row per sequence."""
    try:
        result = session.run(sequences, attention_mask=mask)
    except ReformerError as exc:
        assert "\n" not in str(exc)
        return
    lengths = _expected_lengths(sequences, mask)
    assert result["lengths"].tolist() == lengths
    assert result["logits"].shape == (len(lengths), max(lengths), VOCAB)
    assert all(np.isfinite(row).all() for row in result.rows["logits"])
    if isinstance(sequences, list):  # from Python lists, nothing but in-vocabulary ints was accepted
        flat = [x for row in sequences for x in row]
        assert all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < VOCAB for x in flat)


# ------------------------------------------------------------------------------------------------ inputs
@FUZZ
@given(sequences=id_rows)
def test_id_lists(session: Session, sequences: list) -> None:
    _check_result(session, sequences)


@FUZZ
@given(array=id_arrays(), as_tensor=st.booleans())
def test_id_arrays(session: Session, array: np.ndarray, as_tensor: bool) -> None:
    if as_tensor and array.dtype.kind in "iub" and array.dtype != np.uint64:
        _check_result(session, torch.from_numpy(array.copy()))
    else:
        _check_result(session, array)


@FUZZ
@given(case=masked_arrays())
def test_attention_masks(session: Session, case: tuple[np.ndarray, object]) -> None:
    ids, mask = case
    try:
        result = session.run(ids, attention_mask=mask)
    except ReformerError:
        return
    values = np.asarray(mask)
    assert values.dtype == bool or np.isin(values, (0, 1)).all()  # only a real 0/1 mask is accepted
    assert result["lengths"].tolist() == values.astype(bool).sum(axis=1).tolist()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 300) | st.floats() | st.text(max_size=3),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner,
                                                                                       max_size=2), max_leaves=20)


@FUZZ
@given(content=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64)),
       suffix=st.sampled_from([".json", ".npy", ".txt"]))
def test_id_files(session: Session, tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"ids{suffix}"
    path.write_bytes(content)
    try:
        sequences = _read_ids(path)
    except ReformerError:
        return
    _check_result(session, sequences)


# ----------------------------------------------------------------------------------------------- configs
CONFIG_FIELDS = sorted(CONFIG.to_dict())


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_values, min_size=1, max_size=3))
def test_config_dictionaries(changes: dict) -> None:
    data = {**CONFIG.to_dict(), **changes}
    try:
        config = ReformerConfig.from_dict(data)
    except ReformerError as exc:
        assert any(name in str(exc) for name in [*CONFIG_FIELDS, "config"])  # the message names the field
        return
    assert ReformerConfig.from_dict(json.loads(config.to_json())) == config  # a config that loads round-trips


# -------------------------------------------------------------------------------------------- damaged files
@st.composite
def damage(draw: st.DrawFn, size: int) -> tuple[str, int, bytes]:
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    where = draw(st.integers(0, size - 1))
    return kind, where, draw(st.binary(min_size=1, max_size=16))


def _damaged(data: bytes, how: tuple[str, int, bytes]) -> bytes:
    kind, where, noise = how
    if kind == "truncate":
        return data[:where]
    if kind == "flip":
        return data[:where] + bytes([data[where] ^ (noise[0] or 1)]) + data[where + 1:]
    return data[:where] + noise + data[where + len(noise):]


@FUZZ
@given(name=st.sampled_from(["config.json", "model.safetensors"]), how=st.data())
def test_damaged_checkpoint(checkpoint: Path, tmp_path: Path, name: str, how: st.DataObject) -> None:
    directory = tmp_path / "ckpt"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(checkpoint, directory)
    data = (directory / name).read_bytes()
    (directory / name).write_bytes(_damaged(data, how.draw(damage(len(data)))))
    try:
        model = ReformerLM.from_pretrained(directory)
    except ReformerError:
        return
    assert all(torch.isfinite(p).all() for p in model.parameters())


@functools.cache
def _export_logits(path: Path) -> np.ndarray:
    return Session(path, backend="onnxruntime", device="cpu").run([[5, 6, 7]])["logits"]


@FUZZ
@given(how=st.data())
def test_damaged_onnx_export(onnx_file: Path, tmp_path: Path, how: st.DataObject) -> None:
    """A damaged export is refused when opened (its recorded sha256), so it never runs with wrong numbers."""
    data = onnx_file.read_bytes()
    path = tmp_path / "m.onnx"
    path.write_bytes(_damaged(data, how.draw(damage(len(data)))))
    try:
        export_metadata(path)
    except ReformerError:
        return
    result = Session(path, backend="onnxruntime", device="cpu").run([[5, 6, 7]])["logits"]
    np.testing.assert_array_equal(result, _export_logits(onnx_file))


# ------------------------------------------------------------------------------------------- file sets
@FUZZ
@given(count=st.integers(1, 3), old=st.lists(st.booleans(), min_size=3, max_size=3),
       fault=st.sampled_from(["none", "os_error", "interrupt"]), at=st.integers(0, 2))
def test_file_sets_are_all_new_or_all_old(tmp_path: Path, count: int, old: list[bool], fault: str, at: int) -> None:
    directory = tmp_path / "out"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    paths = [directory / f"f{i}.npy" for i in range(count)]
    for path, exists in zip(paths, old):
        if exists:
            path.write_bytes(b"old " + path.name.encode())

    def payload(i: int):
        def write(handle) -> None:
            handle.write(b"new, half")
            if fault != "none" and i == at % count:
                raise OSError(28, "No space left on device") if fault == "os_error" else Interrupted(signal.SIGINT)
            handle.write(b" and whole")
        return write

    before = {p: p.read_bytes() for p in paths if p.exists()}
    try:
        write_files_atomic({p: payload(i) for i, p in enumerate(paths)})
    except (ReformerError, Interrupted):
        assert fault != "none"
        assert {p: p.read_bytes() for p in paths if p.exists()} == before
    else:
        assert fault == "none" and all(p.read_bytes() == b"new, half and whole" for p in paths)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        p.name for p in paths if p.exists())  # no temporary file left

"""Export refusals and the export-file check: options and output path refused before any work, the default LSH
form runs where it was made, a file edited or damaged after export is refused, and every way metadata can disagree
with its graph is named. Uses the session's shared tiny checkpoint and export (``BYTE_LM`` of
``tests/helpers/artifacts.py``)."""

from __future__ import annotations

import argparse
import inspect
import json
import signal
from pathlib import Path

import onnx
import pytest
import torch
from helpers.artifacts import BYTE_LM, Artifacts

from reformer_rt.export import ExportError, ExportInfo, export_info, export_metadata, export_onnx
from reformer_rt.export import cli as export_cli
from reformer_rt.export import lowering
from reformer_rt.export import onnx_export
from reformer_rt.export.metadata import DIGEST_KEY, PREFIX, read_metadata
from reformer_rt.models import InputError
from reformer_rt.models.errors import Interrupted, stop, stop_on_signals
from reformer_rt.models.presets import random_model

CONFIG = BYTE_LM.config


@pytest.fixture(scope="module")
def tiny(artifacts: Artifacts) -> tuple[Path, Path]:
    return artifacts.checkpoint(BYTE_LM), artifacts.export(BYTE_LM)


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model fails the test: the refusal must come first."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(onnx_export, "load_source", load)


@pytest.mark.parametrize("opset", [17, 26, 99, True])
def test_opset_outside_the_written_range_is_refused_first(tiny, tmp_path: Path, no_work, opset) -> None:
    with pytest.raises(ExportError, match=r"opset: .*\[18, 25\]"):
        export_onnx(tiny[0], tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,words", [("m.txt", ".onnx"), ("missing/m.onnx", "does not exist"),
                                        ("file/m.onnx", "not a directory"), ("dir.onnx", "is a directory")])
def test_output_path_is_checked_first(tiny, tmp_path: Path, no_work, name: str, words: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ExportError, match=words):
        export_onnx(tiny[0], tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "file"]


def test_default_form_is_portable_and_the_cli_says_where_it_runs(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect.signature(export_onnx).parameters["attention"].default == "portable"
    seen = {}

    def fake_export(source, output, **options):
        seen.update(options)
        return argparse.Namespace(attention=options["attention"])

    monkeypatch.setattr(export_cli, "export_onnx", fake_export)
    parser = argparse.ArgumentParser()
    export_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export", "ckpt", "-o", "m.onnx"])
    assert args.func(args) == 0 and seen["attention"] == "portable"
    assert "runs on: ONNX Runtime" in capsys.readouterr().out
    args = parser.parse_args(["export", "ckpt", "-o", "m.onnx", "--attention", "plugin"])
    args.func(args)
    assert "runs on: TensorRT" in capsys.readouterr().out


def test_nan_weights_in_a_model_object_are_named(tmp_path: Path) -> None:
    model = random_model(CONFIG)
    with torch.no_grad():
        model.lm_head.decoder.weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN"):
        export_onnx(model, tmp_path / "m.onnx")


def test_an_interrupt_swallowed_during_tracing_commits_nothing(tiny, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's exporter retries a capture an interrupt broke; the export must still stop before writing."""
    def swallowing_trace(*args, **kwargs):
        try:
            stop(signal.SIGINT)
        except Interrupted:
            pass
        return onnx.load(str(tiny[1]))

    monkeypatch.setattr(lowering, "trace", swallowing_trace)
    with stop_on_signals(), pytest.raises(Interrupted):
        export_onnx(tiny[0], tmp_path / "m.onnx", log=None)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- the export check
def _edited(source: Path, where: Path, unseal: bool = True, **options: object) -> Path:
    """A copy of ``source`` with export options / config entries replaced (and its fingerprint removed)."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    if unseal:
        props.pop(DIGEST_KEY)
    for key, value in options.items():
        group = "config" if key in CONFIG.to_dict() else "export_options"
        data = json.loads(props[PREFIX + group])
        props[PREFIX + group] = json.dumps({**data, key: value})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(where))
    return where


def test_export_is_sealed_and_a_damaged_copy_refused(tiny, tmp_path: Path) -> None:
    assert export_metadata(tiny[1])["sha256"]
    data = bytearray(tiny[1].read_bytes())
    weights = max(onnx.load(str(tiny[1])).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    data[data.find(weights) + len(weights) // 2] ^= 0x10  # still a valid ONNX file, with a wrong number in it
    (tmp_path / "m.onnx").write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged or edited"):
        export_metadata(tmp_path / "m.onnx")
    with pytest.raises(InputError, match="damaged or edited"):
        export_metadata(_edited(tiny[1], tmp_path / "e.onnx", unseal=False, max_length=64))


@pytest.mark.parametrize("change,words", [
    ({"output_name": "last_hidden_state"}, "output"),
    ({"opset": 17}, "opset: metadata says 17, graph has 18"),
    ({"attention": "plugin"}, "LSHAttention nodes"),
    ({"max_length": 10**6}, "max_length"),
    ({"vocab_size": 300}, "logits width: config says 300, graph has 258"),
])
def test_metadata_that_disagrees_with_the_graph_is_named(tiny, tmp_path: Path, change: dict, words: str) -> None:
    path = _edited(tiny[1], tmp_path / "m.onnx", **change)
    with pytest.raises(InputError, match="disagrees with its graph") as info:
        export_metadata(path)
    assert words in str(info.value)


def test_file_without_metadata_or_not_onnx(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(InputError, match="no reformer_rt metadata"):
        export_metadata(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffjunk" * 10)
    with pytest.raises(InputError, match="cannot read it as ONNX"):
        export_metadata(tmp_path / "junk.onnx")


# -------------------------------------------------------------------------------------------- ExportInfo
def test_export_info_is_the_checked_metadata_typed(tiny) -> None:
    info = export_info(tiny[1], attention="portable")
    options = read_metadata(tiny[1])["export_options"]
    assert (info.attention, info.dtype, info.opset, info.max_length, info.padding) == (
        options["attention"], options["dtype"], options["opset"], options["max_length"], options["padding"])
    assert info.task.name == "lm" and info.outputs == ("logits",) and info.config == CONFIG.resolved()
    assert ExportInfo.parse(read_metadata(tiny[1])) == info


def test_export_info_reads_a_file_from_before_tasks_were_recorded(tiny) -> None:
    metadata = read_metadata(tiny[1])
    old = {key: metadata["export_options"][key] for key in ("attention", "dtype", "opset", "max_length",
                                                            "output_name")}
    info = ExportInfo.parse({"config": metadata["config"], "export_options": old})
    assert info.task.name == "lm" and info.padding == "in_graph" and info.package_version == "unknown"


@pytest.mark.parametrize("change,words", [
    ({"max_length": None}, "export_options.max_length: got None; expected an integer"),
    ({"opset": "eighteen"}, "export_options.opset: got 'eighteen'; expected an integer"),
    ({"dtype": 16}, "export_options.dtype: got 16; expected a string"),
    ({"task": "translation"}, "task: got 'translation'; expected one of"),
    ({"task": "question_answering"}, "task 'question_answering' with outputs ['logits']"),
])
def test_bad_export_options_are_named_with_what_to_do(tiny, change: dict, words: str) -> None:
    metadata = read_metadata(tiny[1])
    bad = {**metadata, "export_options": {**metadata["export_options"], **change}}
    with pytest.raises(InputError, match="re-export it") as info:
        ExportInfo.parse(bad)
    assert words in str(info.value)


def test_metadata_without_its_entries_is_named(tiny, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="engine record: got entries \\['config'\\]; expected the 'config' and "
                                         "'export_options' entries.*; rebuild it"):
        ExportInfo.parse({"config": {}}, where="engine record", fix="rebuild it")
    with pytest.raises(InputError, match="its reformer_rt metadata is malformed: export_options.max_length: got "
                                         "'long'; expected an integer; re-export"):
        export_info(_edited(tiny[1], tmp_path / "m.onnx", max_length="long"))

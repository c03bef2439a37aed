"""Checkpoint I/O: own-format round trip, transformers reading our files, and errors that name the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from reformer_rt.models import CheckpointError, ConfigError, ReformerConfig, ReformerLM, ReformerModel

SMALL = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=24,
             attn_layers=("local", "lsh"), axial_pos_shape=(8, 16), axial_pos_embds_dim=(4, 12),
             max_position_embeddings=128, lsh_attn_chunk_length=16, local_attn_chunk_length=8, is_decoder=True)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**SMALL))  # num_buckets=None, hash_seed=None: resolved at construction
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_own_format_round_trip_records_resolved_hashing(saved) -> None:
    model, directory = saved
    data = json.loads((directory / "config.json").read_text())
    assert data["hash_seed"] == 0 and data["num_buckets"] == 16
    loaded = ReformerLM.from_pretrained(directory)
    ids = torch.randint(0, 40, (2, 64))
    assert torch.equal(loaded(ids), model(ids))
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".ckpt")]  # no temp dir left


def test_transformers_loads_our_checkpoint_with_the_same_logits(saved) -> None:
    transformers = pytest.importorskip("transformers")
    model, directory = saved
    hf = transformers.ReformerModelWithLMHead.from_pretrained(directory).eval()
    ids = torch.randint(0, 40, (1, 64))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5


def _rewrite(directory, edit) -> None:
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, str(directory / "model.safetensors"))


def test_missing_tensor_is_named(saved) -> None:
    _, directory = saved
    _rewrite(directory, lambda s: s.pop("reformer.encoder.layers.1.attention.self_attention.value.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.attention\.self_attention\.value"):
        ReformerLM.from_pretrained(directory)


def test_unexpected_tensor_is_named(saved) -> None:
    _, directory = saved
    _rewrite(directory, lambda s: s.__setitem__("reformer.encoder.layers.2.extra", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*layers\.2\.extra"):
        ReformerLM.from_pretrained(directory)


def test_misshaped_tensor_is_named(saved) -> None:
    _, directory = saved
    _rewrite(directory, lambda s: s.__setitem__("lm_head.decoder.weight", torch.zeros(41, 32)))
    with pytest.raises(CheckpointError, match=r"lm_head\.decoder\.weight has shape \(41, 32\); expected \(40, 32\)"):
        ReformerLM.from_pretrained(directory)


def test_lm_needs_a_head_but_body_does_not(saved, tmp_path) -> None:
    model, directory = saved
    ReformerModel.from_pretrained(directory)  # drops the LM head
    body_dir = tmp_path / "body"
    model.reformer.save_pretrained(body_dir)
    with pytest.raises(CheckpointError, match=r"missing tensor.*lm_head\.decoder"):
        ReformerLM.from_pretrained(body_dir)


def test_corrupt_and_missing_files(saved, tmp_path) -> None:
    _, directory = saved
    with pytest.raises(CheckpointError, match="not a directory"):
        ReformerLM.from_pretrained(tmp_path / "nope")
    (directory / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        ReformerLM.from_pretrained(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        ReformerLM.from_pretrained(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ReformerLM.from_pretrained(directory)


def test_bin_checkpoint_is_loaded_weights_only(saved, tmp_path) -> None:
    """A pickle that would run code is refused, not executed."""
    _, directory = saved
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((directory / "config.json").read_text())
    torch.save({"x": torch.zeros(1), "f": print}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loads") as info:
        ReformerLM.from_pretrained(evil)
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" not in message and "GLOBAL print" in message
    assert "safetensors" in message  # how to fix it


def test_save_into_unwritable_location_is_a_clear_error(saved, tmp_path) -> None:
    model, _ = saved
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write"):
        model.save_pretrained(blocker / "sub")


def _resave(directory, change) -> None:
    state = load_file(directory / "model.safetensors")
    change(state)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_nan_weights_are_named_as_nan(saved) -> None:
    _, directory = saved
    key = "reformer.encoder.layers.0.attention.self_attention.value.weight"

    def poison(state):
        state[key][0, 0] = float("nan")
    _resave(directory, poison)
    with pytest.raises(CheckpointError, match="NaN") as info:
        ReformerLM.from_pretrained(directory)
    assert key in str(info.value)


def test_integer_tensor_where_float_expected_is_refused(saved) -> None:
    _, directory = saved
    key = "reformer.encoder.layers.0.attention.self_attention.value.weight"

    def to_int(state):
        state[key] = state[key].round().to(torch.int64)
    _resave(directory, to_int)
    with pytest.raises(CheckpointError, match="int64") as info:
        ReformerLM.from_pretrained(directory)
    assert key in str(info.value)


@pytest.mark.parametrize("index", ["{oops", "[1, 2]", '{"weight_map": ["a"]}', '{"weight_map": {"x": 5}}',
                                   '{"weight_map": {}}', '{"weight_map": {"x": "../../etc/passwd"}}',
                                   '{"weight_map": {"x": "model-00002-of-00002.safetensors"}}'])
def test_malformed_sharded_index_is_one_clear_error(saved, index: str) -> None:
    _, directory = saved
    (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
    (directory / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json|model-00002"):
        ReformerLM.from_pretrained(directory)


def test_sharded_checkpoint_loads(saved) -> None:
    model, directory = saved
    state = load_file(directory / "model.safetensors")
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in halves.items():
        save_file({k: state[k] for k in names}, str(directory / name), metadata={"format": "pt"})
    (directory / "model.safetensors").unlink()
    weight_map = {k: name for name, names in halves.items() for k in names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = ReformerLM.from_pretrained(directory)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("content", [lambda: torch.zeros(3), lambda: {"a": 1, "b": "x"}])
def test_bin_that_is_not_a_state_dict_of_tensors(saved, tmp_path, content) -> None:
    _, directory = saved
    (directory / "model.safetensors").unlink()
    torch.save(content(), directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="state dict"):
        ReformerLM.from_pretrained(directory)


def test_config_json_that_is_a_directory(saved) -> None:
    _, directory = saved
    (directory / "config.json").unlink()
    (directory / "config.json").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        ReformerLM.from_pretrained(directory)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("vocab_size", 10**12, "vocab_size=1000000000000 disagrees with the weights, which fit vocab_size=40"),
    ("feed_forward_size", 4096, "feed_forward_size=4096 disagrees with the weights, which fit feed_forward_size=24"),
    ("num_attention_heads", 4, "num_attention_heads=4 disagrees with the weights, which fit num_attention_heads=2"),
])
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_config_that_contradicts_its_weights_is_refused_before_allocation(saved, tmp_path, field, value, words,
                                                                         weights) -> None:
    """A config field every stored tensor it sizes disagrees with: one ConfigError naming the field and both values,
    before the model is built (a 10**12-row embedding would need 64 TB)."""
    _, directory = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    data = json.loads((directory / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**data, field: value}))
    if weights == "bin":
        torch.save(load_file(directory / "model.safetensors"), bad / "pytorch_model.bin")
    else:
        (bad / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=words) as info:
        ReformerLM.from_pretrained(bad)
    assert "\n" not in str(info.value)

"""Our ReformerLM / ReformerModel against transformers on the same checkpoint: max abs diff <= 1e-4 (fp32)."""

from __future__ import annotations

import pytest
import torch

from reformer_rt.models import ReformerLM, ReformerModel
from reformer_rt.models.fused import fused_attention

TOL = 1e-4


def _ragged_mask(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    return (torch.arange(length)[None, :] < lengths[:, None]).long()


def _compare(hf_out: torch.Tensor, ours: torch.Tensor, mask: torch.Tensor | None) -> float:
    assert hf_out.shape == ours.shape
    diff = (hf_out - ours).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return diff.max().item()


@pytest.mark.parametrize("arch,length", [
    ("crime_shrunk", 64),    # multiple of the chunk lcm: LSH and local chunked paths
    ("crime_shrunk", 75),    # not a multiple: padded to 80 and cut back
    ("crime_shrunk", 12),    # shorter than every chunk: full attention everywhere
    ("enwik8_like", 128),    # 4 hash rounds over 4 chunks
    ("enwik8_like", 100),    # padded, padding bucket in every round
    ("enwik8_like", 32),     # exactly one chunk: standard path
    ("encoder", 48),
    ("encoder", 37),
    ("encoder", 16),         # LSH chunked (8) but local full (16)
])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_lm_logits_match_transformers(hf_checkpoint, arch: str, length: int, fused: bool) -> None:
    hf, directory = hf_checkpoint(arch)
    ours = ReformerLM.from_pretrained(directory)
    ids = torch.randint(0, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad(), fused_attention(fused):
        diff = _compare(hf(ids).logits, ours(ids), None)
    assert diff <= TOL, f"{arch} L={length}: max abs diff {diff}"


@pytest.mark.parametrize("arch,length", [("encoder", 48), ("encoder", 45), ("crime_shrunk", 70),
                                         ("enwik8_like", 96)])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_padded_ragged_batch_matches_transformers(hf_checkpoint, arch: str, length: int, fused: bool) -> None:
    hf, directory = hf_checkpoint(arch)
    ours = ReformerLM.from_pretrained(directory)
    ids = torch.randint(0, hf.config.vocab_size, (3, length), generator=torch.Generator().manual_seed(1))
    mask = _ragged_mask(3, length, seed=length)
    with torch.no_grad(), fused_attention(fused):
        diff = _compare(hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask), mask)
    assert diff <= TOL, f"{arch} L={length} ragged: max abs diff {diff} on valid positions"


@pytest.mark.parametrize("arch", ["crime_shrunk", "encoder"])
def test_last_hidden_state_matches_transformers(hf_checkpoint, arch: str) -> None:
    hf, directory = hf_checkpoint(arch, lm=False)
    ours = ReformerModel.from_pretrained(directory)
    ids = torch.randint(0, hf.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(3))
    mask = _ragged_mask(2, 80, seed=3)
    with torch.no_grad():
        diff = _compare(hf(ids, attention_mask=mask).last_hidden_state, ours(ids, attention_mask=mask), mask)
    assert diff <= TOL
    assert ours(ids).shape == (2, 80, 2 * hf.config.hidden_size)


def test_body_loads_from_lm_checkpoint(hf_checkpoint) -> None:
    hf, directory = hf_checkpoint("enwik8_like")
    ours = ReformerModel.from_pretrained(directory)
    ids = torch.randint(0, 258, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf.reformer(ids).last_hidden_state
    assert _compare(expected, ours(ids), None) <= TOL


@pytest.mark.parametrize("overrides", [
    dict(hidden_act="silu", chunk_size_lm_head=32, chunk_size_feed_forward=12),
    dict(hidden_act="gelu_new", is_decoder=False, lsh_num_chunks_before=0, lsh_num_chunks_after=1,
         local_num_chunks_before=0, local_num_chunks_after=1),
    dict(num_buckets=16, num_hashes=3, lsh_attn_chunk_length=8, local_attn_chunk_length=32),
])
def test_config_variants_match_transformers(hf_checkpoint, overrides: dict) -> None:
    hf, directory = hf_checkpoint("crime_shrunk", **overrides)
    ours = ReformerLM.from_pretrained(directory)
    ids = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(5))
    mask = _ragged_mask(2, 96, seed=5)
    with torch.no_grad():
        diff = _compare(hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask), mask)
    assert diff <= TOL


def test_unresolved_buckets_match_transformers_at_declared_length(hf_checkpoint) -> None:
    """num_buckets=None: HF decides from the first input's length; we decide from max_length -- same rule."""
    hf, directory = hf_checkpoint("enwik8_like", num_buckets=None)
    ours = ReformerLM.from_pretrained(directory, max_length=256)
    ids = torch.randint(0, 258, (1, 256), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf(ids).logits  # sets hf num_buckets from L=256
        diff = _compare(expected, ours(ids), None)
    assert list(ours.config.num_buckets if isinstance(ours.config.num_buckets, tuple)
                else [ours.config.num_buckets]) == list(hf.config.num_buckets if isinstance(
                    hf.config.num_buckets, (list, tuple)) else [hf.config.num_buckets])
    assert diff <= TOL


def test_pytorch_model_bin_checkpoint(hf_checkpoint, tmp_path) -> None:
    """Older HF checkpoints (google/reformer-*) ship pytorch_model.bin; it loads with weights_only=True."""
    hf, directory = hf_checkpoint("crime_shrunk")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((directory / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    ours = ReformerLM.from_pretrained(bin_dir)
    ids = torch.randint(0, 64, (1, 64), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert _compare(hf(ids).logits, ours(ids), None) <= TOL

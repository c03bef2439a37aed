"""The LSH attention op, defined once: contract (v1) and the fp32 reference implementation.

Every other implementation -- the torch custom op, the Triton kernels, the ONNX plugin node and portable lowering,
the TensorRT plugin -- reads its names, attributes and constants from here and is tested against
``lsh_attention_reference``. Nothing in this module imports anything but torch.

Semantics are those of transformers' ``LSHSelfAttention`` in eval mode with ``hash_seed`` set (Kitaev et al.,
"Reformer: The Efficient Transformer", 2020, sections 2-3), stated so that an implementation can be written from
this docstring alone:

1. Hashing. ``rotated[b,h,r,l,:] = qk[b,h,l,:] @ rotations[h,:,r,:]`` (fp32). For each factor ``f`` of
   ``bucket_factors`` (taking the next ``f/2`` rotation columns) the factor bucket is ``argmax([x, -x])`` (first
   maximum wins); factor buckets combine mixed-radix, the first factor least significant. Positions whose mask is
   0 get the extra bucket ``prod(bucket_factors)``.
2. Sort. Per (b, h, round): positions ordered by (bucket, position) -- a stable sort by bucket.
3. Chunks. The ``num_hashes`` sorted rounds are concatenated (length ``num_hashes * L``) and cut into chunks of
   ``chunk_length``; each chunk attends to itself plus ``chunks_before`` / ``chunks_after`` neighbouring chunks
   of that concatenation, wrapping around its ends (so the first chunk of round r sees the last chunk of round
   r - 1, and round 0 sees the last round).
4. Scores. Queries are raw ``qk``; keys are ``qk / sqrt(mean(qk^2) + 1e-6) / sqrt(D)``. Masks use ORIGINAL
   positions: a key whose mask is 0, or (causal) a key after the query, is REPLACED by ``MASK_VALUE``; then a key
   at the query's own position is replaced by ``SELF_MASK_VALUE`` (always: shared-QK attention must not prefer
   itself). Values per dtype of ``qk``.
5. Per chunk row: ``lse = logsumexp(scores)``, ``out = softmax(scores) @ v`` (fp32 accumulation).
6. Rounds combine by weights ``softmax_r(lse_r)`` at each original position (one round: output as is). A row
   that can only see itself has ``lse`` = the self-mask value; fp32 rounding at that magnitude makes such a
   position's round weights sum to slightly less than 1 (0.998 at -1e5). HF does exactly this; so do we.
7. ``L <= chunk_length``: no hashing; full attention over the sequence with the same masks (HF's standard path).
   Otherwise ``L`` must be a multiple of ``chunk_length`` (the model pads before calling the op).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

# --------------------------------------------------------------------------------------------------- identity
OP_NAMESPACE = "reformer_rt"
OP_NAME = "LSHAttention"
OP_ID = f"{OP_NAMESPACE}::{OP_NAME}"
OP_VERSION = 1
ONNX_DOMAIN = OP_NAMESPACE
#: String attributes every ONNX node carries so TensorRT's ONNX parser maps it to the plugin (values: strings).
PLUGIN_NAMESPACE_ATTR = "plugin_namespace"
PLUGIN_VERSION_ATTR = "plugin_version"
PLUGIN_ATTRIBUTES = {PLUGIN_NAMESPACE_ATTR: OP_NAMESPACE, PLUGIN_VERSION_ATTR: str(OP_VERSION)}
#: The oldest TensorRT the plugin is written for (its Python plugin API, ``tensorrt.plugin``), and what every message
#: that asks for TensorRT tells the user to install (the CUDA 13 wheels start at 10.13.2).
TENSORRT_MIN_VERSION = (10, 8)
TENSORRT_INSTALL_HINT = (f'pip install "tensorrt-cu12>={TENSORRT_MIN_VERSION[0]}.{TENSORRT_MIN_VERSION[1]}" (CUDA 12 '
                         'driver) or "tensorrt-cu13>=10.13.2" (CUDA 13 driver), on a machine with an NVIDIA GPU')


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: str
    dtypes: tuple[str, ...]
    doc: str


@dataclasses.dataclass(frozen=True)
class AttributeSpec:
    name: str
    kind: str  # ONNX attribute type: "INT" or "INTS"
    minimum: int
    doc: str


INPUTS = (
    TensorSpec("qk", "[B,H,L,D]", ("float32", "float16"), "shared query/key vectors"),
    TensorSpec("v", "[B,H,L,D]", ("float32", "float16"), "value vectors, same dtype as qk"),
    TensorSpec("rotations", "[H,D,n_hashes,rot/2]", ("float32",), "random rotations, rot = sum(bucket_factors)"),
    TensorSpec("mask", "[B,L]", ("int32",), "1 = token, 0 = padding; always present (all ones if no padding)"),
)
OUTPUTS = (TensorSpec("out", "[B,H,L,D]", ("float32", "float16"), "attention output, dtype of v"),)
ATTRIBUTES = (
    AttributeSpec("num_hashes", "INT", 1, "hash rounds"),
    AttributeSpec("bucket_factors", "INTS", 2, "even bucket counts; one value = unfactorized"),
    AttributeSpec("chunk_length", "INT", 1, "sorted chunk size"),
    AttributeSpec("chunks_before", "INT", 0, "neighbour chunks attended before"),
    AttributeSpec("chunks_after", "INT", 0, "neighbour chunks attended after"),
    AttributeSpec("causal", "INT", 0, "1 = mask keys after the query (by original position)"),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)

#: Replacement scores (HF's values), keyed by the dtype of qk.
MASK_VALUE = {torch.float32: -1e9, torch.float16: -1e4}
SELF_MASK_VALUE = {torch.float32: -1e5, torch.float16: -1e3}
LEN_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LSHAttrs:
    """The op's attributes, validated. ``as_dict`` gives them in contract order with ints only."""

    num_hashes: int
    bucket_factors: tuple[int, ...]
    chunk_length: int
    chunks_before: int = 0
    chunks_after: int = 0
    causal: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bucket_factors", tuple(int(f) for f in self.bucket_factors))
        object.__setattr__(self, "causal", bool(self.causal))
        for spec in ATTRIBUTES:
            values = getattr(self, spec.name)
            values = values if isinstance(values, tuple) else (int(values),)
            if not values or any(v < spec.minimum for v in values):
                raise ValueError(f"LSHAttention.{spec.name}: got {getattr(self, spec.name)!r}; "
                                 f"expected {spec.kind} >= {spec.minimum} ({spec.doc})")
        if any(f % 2 for f in self.bucket_factors):
            raise ValueError(f"LSHAttention.bucket_factors: got {self.bucket_factors}; expected even counts")

    @property
    def num_buckets(self) -> int:
        """Buckets per round, without the padding bucket."""
        return math.prod(self.bucket_factors)

    @property
    def rotation_size(self) -> int:
        return sum(self.bucket_factors)

    def rotations_shape(self, num_heads: int, head_dim: int) -> tuple[int, int, int, int]:
        return (num_heads, head_dim, self.num_hashes, self.rotation_size // 2)

    def as_dict(self) -> dict[str, int | list[int]]:
        return {
            "num_hashes": self.num_hashes,
            "bucket_factors": list(self.bucket_factors),
            "chunk_length": self.chunk_length,
            "chunks_before": self.chunks_before,
            "chunks_after": self.chunks_after,
            "causal": int(self.causal),
        }


def make_rotations(seed: int, num_heads: int, head_dim: int, attrs: LSHAttrs) -> torch.Tensor:
    """Rotations [H, D, n_hashes, rot/2], fp32, drawn exactly as a seeded HF model draws them on CPU.

    HF calls ``torch.manual_seed(hash_seed)`` then ``torch.randn(shape)`` in every LSH layer's forward; a fresh
    CPU generator with the same seed yields the same numbers without touching the global RNG.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(attrs.rotations_shape(num_heads, head_dim), generator=generator, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- reference
def lsh_candidates(qk: torch.Tensor, rotations: torch.Tensor, attrs: LSHAttrs) -> list[torch.Tensor]:
    """Per bucket factor f, the scores ``[xR, -xR]`` [B, H, n_hashes, L, f] whose argmax is that factor's bucket."""
    # [B,H,L,D] x [H,D,n_hashes*rot/2] -> [B,H,n_hashes,L,rot/2]: the one matrix product HF's einsum runs, so fp32
    # results agree bit for bit; written as a MatMul because ONNX Runtime's Einsum kernel is 4x slower.
    heads, dim, n_hashes, half = rotations.shape
    rotated = torch.matmul(qk.float(), rotations.float().reshape(heads, dim, n_hashes * half))
    rotated = rotated.view(*qk.shape[:3], n_hashes, half).permute(0, 1, 3, 2, 4)
    out, start = [], 0
    for factor in attrs.bucket_factors:
        part = rotated[..., start:start + factor // 2]
        out.append(torch.cat([part, -part], dim=-1))
        start += factor // 2
    return out


def lsh_hash(qk: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor, attrs: LSHAttrs) -> torch.Tensor:
    """Bucket ids [B, H, n_hashes, L] (int64); padded positions get ``attrs.num_buckets``."""
    candidates = lsh_candidates(qk, rotations, attrs)
    buckets = torch.zeros(candidates[0].shape[:-1], dtype=torch.int64, device=qk.device)
    radix = 1
    for factor, scores in zip(attrs.bucket_factors, candidates):
        buckets = buckets + radix * torch.argmax(scores, dim=-1)
        radix *= factor
    valid = (mask != 0)[:, None, None, :]
    return torch.where(valid, buckets, torch.full_like(buckets, attrs.num_buckets))


def lsh_sort(buckets: torch.Tensor) -> torch.Tensor:
    """Positions [B, H, n_hashes, L] in each round's (bucket, position) order: a stable argsort by bucket."""
    length = buckets.shape[-1]
    positions = torch.arange(length, device=buckets.device)
    # Keys are unique, so any argsort of them is the stable order.
    return torch.argsort(buckets * length + positions, dim=-1)


def look_around(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """[B,H,n_chunks,chunk,...] -> [B,H,n_chunks,(before+1+after)*chunk,...], wrapping around the chunk axis."""
    if before == 0 and after == 0:
        return x
    shifted = [torch.roll(x, shifts=-i, dims=2) for i in range(-before, after + 1)]
    return torch.cat(shifted, dim=3)


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B,H,N,D], rows [B,H,M] indices into N -> [B,H,M,D], copying whole rows.

    One index_select over the flattened rows: it lowers to an ONNX ``Gather`` of contiguous rows, several times
    faster in ONNX Runtime than the element-wise ``GatherElements`` / ``ScatterElements`` of torch.gather/scatter.
    """
    batch, heads, n, dim = x.shape
    offsets = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * n
    return x.reshape(batch * heads * n, dim).index_select(0, (rows + offsets).flatten()).view(batch, heads, -1, dim)


def _keys(qk: torch.Tensor) -> torch.Tensor:
    norm = qk * torch.rsqrt(torch.mean(qk**2, dim=-1, keepdim=True) + LEN_NORM_EPS)
    return norm / math.sqrt(qk.shape[-1])


def _masked_scores(scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor,
                   causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Apply padding/causal masks, then the self mask. Positions are original positions, broadcastable."""
    allowed = k_valid
    if causal:
        allowed = allowed & (q_pos.unsqueeze(-1) >= k_pos.unsqueeze(-2))
    scores = torch.where(allowed, scores, MASK_VALUE[dtype])
    not_self = q_pos.unsqueeze(-1) != k_pos.unsqueeze(-2)
    return torch.where(not_self, scores, SELF_MASK_VALUE[dtype])


def lsh_attention_reference(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                            attrs: LSHAttrs) -> torch.Tensor:
    """The oracle: plain fp32 PyTorch, [B,H,L,D] in, [B,H,L,D] out in the dtype of ``v``."""
    return lsh_attention_by_length(lsh_hashed_attention, qk, v, rotations, mask, attrs)


def lsh_attention_by_length(hashed: Callable[..., torch.Tensor], qk: torch.Tensor, v: torch.Tensor,
                            rotations: torch.Tensor, mask: torch.Tensor, attrs: LSHAttrs) -> torch.Tensor:
    """Semantics step 7 around a hashed path: ``L <= chunk_length`` is full attention, otherwise ``hashed`` (the
    reference's or another formulation of steps 1-6) on an L that must be a multiple of ``chunk_length``."""
    length = qk.shape[2]
    if length <= attrs.chunk_length:
        return lsh_full_attention(qk, v, mask, attrs)
    if length % attrs.chunk_length:
        raise ValueError(f"{OP_NAME}: got L={length}; expected L <= chunk_length or a multiple of "
                         f"chunk_length={attrs.chunk_length} (pad the sequence first)")
    return hashed(qk, v, rotations, mask, attrs)


def lsh_full_attention(qk: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, attrs: LSHAttrs) -> torch.Tensor:
    """The reference's ``L <= chunk_length`` path (semantics step 7): full attention with the same masks."""
    length = qk.shape[2]
    q, val = qk.float(), v.float()
    positions = torch.arange(length, device=qk.device)
    scores = torch.matmul(q, _keys(q).transpose(-1, -2))  # [B,H,L,L]
    scores = _masked_scores(scores, positions, positions, (mask != 0)[:, None, None, :], attrs.causal, qk.dtype)
    out = torch.matmul(torch.exp(scores - torch.logsumexp(scores, dim=-1, keepdim=True)), val)
    return out.to(v.dtype)


def lsh_hashed_attention(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                         attrs: LSHAttrs) -> torch.Tensor:
    """The reference's hashed path (semantics steps 1-6); L must be a multiple of ``chunk_length``."""
    batch, heads, length, dim = qk.shape
    q, val = qk.float(), v.float()
    valid = mask != 0
    n_hashes, chunk = attrs.num_hashes, attrs.chunk_length
    n_chunks = n_hashes * length // chunk
    order = lsh_sort(lsh_hash(q, rotations, mask, attrs)).reshape(batch, heads, n_hashes * length)
    q_sorted = _take_rows(q, order).view(batch, heads, n_chunks, chunk, dim)
    k_sorted = _take_rows(_keys(q), order).view(batch, heads, n_chunks, chunk, dim)
    v_sorted = _take_rows(val, order).view(batch, heads, n_chunks, chunk, dim)

    before, after = attrs.chunks_before, attrs.chunks_after
    q_pos = order.view(batch, heads, n_chunks, chunk)
    k_pos = look_around(q_pos, before, after)  # [B,H,n_chunks,w*chunk]
    k_valid = torch.gather(valid[:, None, :].expand(batch, heads, length), 2, k_pos.flatten(2))
    scores = torch.matmul(q_sorted, look_around(k_sorted, before, after).transpose(-1, -2))
    scores = _masked_scores(scores, q_pos, k_pos, k_valid.view(k_pos.shape).unsqueeze(-2), attrs.causal, qk.dtype)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B,H,n_chunks,chunk,1]
    out_sorted = torch.matmul(torch.exp(scores - lse), look_around(v_sorted, before, after))

    undo = unsort_index(order, n_hashes, length)
    return combine_rounds(_take_rows(out_sorted.view(batch, heads, -1, dim), undo), lse, undo, n_hashes).to(v.dtype)


def unsort_index(order: torch.Tensor, n_hashes: int, length: int) -> torch.Tensor:
    """[B,H,n_hashes*L] sort order -> for each (round, position), its row in the sorted concatenation."""
    batch, heads = order.shape[:2]
    # Row i of round r goes back to (r, order[i]). (An offset per round broadcast over L, not repeat_interleave:
    # the latter mis-lowers to ONNX for a symbolic L.)
    rounds = torch.arange(n_hashes, device=order.device).unsqueeze(-1) * length  # [n_hashes,1]
    target = (order.view(batch, heads, n_hashes, length) + rounds).view(batch, heads, n_hashes * length)
    sorted_rows = torch.arange(n_hashes * length, device=order.device).expand_as(target)
    return torch.empty_like(target).scatter_(2, target, sorted_rows)


def combine_rounds(out: torch.Tensor, lse: torch.Tensor, undo: torch.Tensor, n_hashes: int) -> torch.Tensor:
    """Semantics step 6: the rounds' outputs [B,H,n_hashes*L,D] (original order) weighted by softmax over rounds of
    their logsumexp (sorted order, any shape with B,H first; ``undo`` puts it in original order) -> [B,H,L,D]."""
    batch, heads, rows, dim = out.shape
    out = out.view(batch, heads, n_hashes, rows // n_hashes, dim)
    if n_hashes == 1:
        return out[:, :, 0].contiguous()
    lse = torch.gather(lse.reshape(batch, heads, -1), 2, undo).view(batch, heads, n_hashes, rows // n_hashes, 1)
    weights = torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True))
    return torch.sum(out * weights, dim=2)

"""Streamed evaluation's pieces: the model over one long sequence, layer by layer and piece by piece, in memory that
follows the activations.

The model's ``forward`` holds each layer's intermediates over the whole sequence at once (a 1,048,576-token pass of
the crime-and-punishment architecture needs about 20 KB per token that way). Here a sequence of L positions keeps
only what the reversible composition needs across layers -- the two streams [L, hidden] -- and computes everything
else in pieces of ``piece`` positions, adding each piece's result into the streams in place:

* embeddings, feed-forward, the attention's output projection, the final layer norm and the heads are per
  position: any piece of positions;
* local attention is local: a piece of whole chunks plus the neighbour chunks it looks at (wrapped around the
  sequence's ends exactly as ``look_around`` wraps them);
* LSH attention hashes per position (pieces), sorts each head's rounds over the whole sequence (the only global
  step: an index of L per round), then attends over pieces of SORTED chunks plus their neighbours in the sorted
  concatenation; one head at a time, whose qk and values [L, D] are the layer's only sequence-long intermediates.

Each piece is a plain function of its inputs and the weights it needs (below, ``*_piece``): ``TorchPieces`` calls
them with the model's own parameters; the ONNX Runtime backend runs graphs exported from the same functions
(``reformer_rt.export.pieces``). The driver that lays out each piece's inputs and adds its results into the
streams is the runtime's (``reformer_rt.runtime.streaming.stream_hidden``), the same for both. The math per piece is
the fused CPU formulation (``fused.py``), so results agree with the model's fused forward to float32 rounding; the
attention cores are ``fused.local_attention_window`` and ``fused.lsh_attention_window``.

Known limits: one sequence at a time (a batch's rows never interact); lengths must be a chunk multiple above every
chunk length (``can_stream``; the model's own padding rule gives that for long inputs, shorter ones take the short
attention paths of ``forward``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .attention import LSHSelfAttention, lsh_attrs
from .config import ReformerConfig
from .fused import local_attention_window, lsh_attention_window
from .lsh import lsh_hash

#: Positions per piece unless the caller says otherwise: few enough pieces that per-operation costs vanish (torch on
#: 2 busy cores, 65,536 tokens: 21 s with pieces of 8,192, 17 s of 16,384, 13 s of 32,768 or 65,536; ONNX Runtime
#: the same at every size), small enough that a piece's own intermediates stay near 200 MB (crime-and-punishment).
DEFAULT_PIECE = 32768


# ------------------------------------------------------------------------------------------------------ pieces
class LayerNormWeights(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor


class LocalWeights(NamedTuple):
    norm: LayerNormWeights
    query: torch.Tensor  # [H*D, hidden]
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor  # [hidden, H*D]


class LSHHeadWeights(NamedTuple):
    norm: LayerNormWeights
    query_key: torch.Tensor  # [D, hidden]: this head's rows
    value: torch.Tensor
    rotations: torch.Tensor  # [1, D, n_hashes, rot/2]


class FeedForwardWeights(NamedTuple):
    norm: LayerNormWeights
    dense: torch.Tensor  # [ff, hidden]
    dense_bias: torch.Tensor
    output: torch.Tensor  # [hidden, ff]
    output_bias: torch.Tensor


def _norm(x: torch.Tensor, norm: LayerNormWeights, config: ReformerConfig) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, config.layer_norm_eps)


def embed_piece(ids: torch.Tensor, positions: torch.Tensor, word: torch.Tensor, tables: tuple[torch.Tensor, ...],
                config: ReformerConfig) -> torch.Tensor:
    """ids, positions [C] -> [C, hidden]: word plus position embeddings (``ReformerEmbeddings``)."""
    if config.axial_pos_embds:
        rows, cols = tables  # [s0, 1, d0], [1, s1, d1]
        columns = config.axial_pos_shape[1]
        position = torch.cat([rows[positions // columns, 0], cols[0, positions % columns]], dim=-1)
    else:
        position = tables[0][positions]
    return F.embedding(ids, word) + position


def local_attention_piece(x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, weights: LocalWeights,
                          config: ReformerConfig) -> torch.Tensor:
    """One local-attention layer's output projection for the inner chunks of a laid-out stretch: x [n_ext, chunk,
    hidden] (the stream before the layer), mask, positions [n_ext, chunk] -> [n*chunk, hidden]."""
    heads, dim = config.num_attention_heads, config.attention_head_size
    before, after = config.local_num_chunks_before, config.local_num_chunks_after
    n_ext, chunk, hidden = x.shape
    rows = _norm(x, weights.norm, config).reshape(n_ext * chunk, hidden)
    inner = rows[before * chunk:(n_ext - after) * chunk]
    q = F.linear(inner, weights.query).view(-1, chunk, heads, dim)  # [n, chunk, H, D]
    k = (F.linear(rows, weights.key) / dim**0.5).view(n_ext, chunk, heads, dim)
    v = F.linear(rows, weights.value).view(n_ext, chunk, heads, dim)
    outs = [local_attention_window(q[..., h, :], k[..., h, :], v[..., h, :], mask, positions, before, after,
                                   config.is_decoder) for h in range(heads)]
    merged = torch.stack(outs, dim=-2).reshape(-1, heads * dim).to(x.dtype)  # [n*chunk, H*D]
    return F.linear(merged, weights.output)


def lsh_project_piece(x: torch.Tensor, mask: torch.Tensor, weights: LSHHeadWeights,
                      config: ReformerConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One head of an LSH layer, per position: x [C, hidden], mask [C] -> qk, v [C, D] and buckets
    [n_hashes, C] (semantics step 1 of ``lsh.py``; padding positions in the padding bucket)."""
    rows = _norm(x, weights.norm, config)
    qk, v = F.linear(rows, weights.query_key), F.linear(rows, weights.value)
    buckets = lsh_hash(qk[None, None], weights.rotations, mask[None], lsh_attrs(config))  # [1, 1, n_hashes, C]
    return qk, v, buckets[0, 0]


def lsh_attend_piece(qk: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                     config: ReformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk attention over a laid-out stretch of sorted chunks (``fused.lsh_attention_window``): qk, v [n_ext,
    chunk, D], mask, positions [n_ext, chunk] -> out [n*chunk, D] float32, lse [n*chunk] float32."""
    out, lse = lsh_attention_window(qk, v, mask, positions, lsh_attrs(config))
    return out.reshape(-1, out.shape[-1]), lse.reshape(-1)


def attention_output_piece(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One head's share of the attention's output projection: [C, D] x [hidden, D] -> [C, hidden] (the projection
    of the heads' concatenation is the sum of these)."""
    return F.linear(out, weight)


def feed_forward_piece(x: torch.Tensor, weights: FeedForwardWeights, config: ReformerConfig) -> torch.Tensor:
    """``FeedForward`` over rows: [C, hidden] -> [C, hidden]."""
    from .modeling import _ACTIVATIONS  # the model's table of activations (a module-level import would cycle)

    act = _ACTIVATIONS[config.hidden_act]()
    inner = act(F.linear(_norm(x, weights.norm, config), weights.dense, weights.dense_bias))
    return F.linear(inner, weights.output, weights.output_bias)


def final_norm_piece(attn: torch.Tensor, hidden: torch.Tensor, norm: LayerNormWeights,
                     config: ReformerConfig) -> torch.Tensor:
    """The encoder's last step: LayerNorm(concat(streams)): [C, hidden] x 2 -> [C, 2*hidden]."""
    return _norm(torch.cat([attn, hidden], dim=-1), norm, config)


def lm_head_piece(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The LM head: [C, 2*hidden] -> logits [C, vocab]."""
    return F.linear(hidden, weight, bias)


# -------------------------------------------------------------------------------------------------- executors
@dataclasses.dataclass(frozen=True)
class ModelWeights:
    """Every weight the pieces take, by layer, read from a model's modules (no copies: views of its parameters)."""

    word: torch.Tensor
    tables: tuple[torch.Tensor, ...]
    attention: tuple[LocalWeights | tuple[LSHHeadWeights, ...], ...]  # per layer (LSH: per head)
    attention_output: tuple[tuple[torch.Tensor, ...], ...]  # per LSH layer, per head: [hidden, D] (local: none)
    feed_forward: tuple[FeedForwardWeights, ...]
    final_norm: LayerNormWeights

    @classmethod
    def of(cls, body: torch.nn.Module) -> ModelWeights:
        """The weights of a ``ReformerModel`` (an LM's ``.reformer``)."""
        config: ReformerConfig = body.config
        position = body.embeddings.position_embeddings
        tables = tuple(position.weights) if config.axial_pos_embds else (position.embedding.weight,)
        attention, outputs, feed_forward = [], [], []
        dim = config.attention_head_size
        for layer in body.encoder.layers:
            block, ff = layer.attention, layer.feed_forward
            norm = LayerNormWeights(block.layer_norm.weight, block.layer_norm.bias)
            inner, projection = block.self_attention, block.output.dense.weight
            heads = range(config.num_attention_heads)
            if isinstance(inner, LSHSelfAttention):
                attention.append(tuple(LSHHeadWeights(norm, inner.query_key.weight[h * dim:(h + 1) * dim],
                                                      inner.value.weight[h * dim:(h + 1) * dim],
                                                      inner.rotations[h:h + 1]) for h in heads))
                outputs.append(tuple(projection[:, h * dim:(h + 1) * dim] for h in heads))
            else:
                attention.append(LocalWeights(norm, inner.query.weight, inner.key.weight, inner.value.weight,
                                              projection))
                outputs.append(())
            feed_forward.append(FeedForwardWeights(LayerNormWeights(ff.layer_norm.weight, ff.layer_norm.bias),
                                                   ff.dense.dense.weight, ff.dense.dense.bias,
                                                   ff.output.dense.weight, ff.output.dense.bias))
        final = body.encoder.layer_norm
        return cls(body.embeddings.word_embeddings.weight, tables, tuple(attention), tuple(outputs),
                   tuple(feed_forward), LayerNormWeights(final.weight, final.bias))


class TorchPieces:
    """The pieces with a model's own parameters, one method per piece function (call inside
    ``torch.inference_mode()``); ``reformer_rt.runtime.streaming`` drives them."""

    def __init__(self, body: torch.nn.Module, lm_head: torch.nn.Module | None = None) -> None:
        self.config: ReformerConfig = body.config
        self.weights = ModelWeights.of(body)
        self._head = lm_head

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return embed_piece(ids, positions, self.weights.word, self.weights.tables, self.config)

    def local_attention(self, layer: int, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return local_attention_piece(x, mask, positions, self.weights.attention[layer], self.config)

    def lsh_project(self, layer: int, head: int, x: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return lsh_project_piece(x, mask, self.weights.attention[layer][head], self.config)

    def lsh_attend(self, qk: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lsh_attend_piece(qk, v, mask, positions, self.config)

    def attention_output(self, layer: int, head: int, out: torch.Tensor) -> torch.Tensor:
        return attention_output_piece(out, self.weights.attention_output[layer][head])

    def feed_forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return feed_forward_piece(x, self.weights.feed_forward[layer], self.config)

    def final_norm(self, attn: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return final_norm_piece(attn, hidden, self.weights.final_norm, self.config)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self._head is not None, "lm_head asked of a model without one"
        return lm_head_piece(hidden, self._head.decoder.weight, self._head.decoder.bias)


# ------------------------------------------------------------------------------------------------------ lengths
def piece_length(config: ReformerConfig, piece: int = DEFAULT_PIECE) -> int:
    """``piece`` rounded down to a multiple of the chunk multiple (at least one), so that pieces hold whole chunks of
    every layer."""
    multiple = config.chunk_multiple
    return max(multiple, piece // multiple * multiple)


def can_stream(config: ReformerConfig, length: int) -> bool:
    """Whether a padded ``length`` can run in pieces: a chunk multiple longer than every chunk (the chunked attention
    paths; shorter sequences take ``forward``'s full-attention paths)."""
    chunks = (config.lsh_attn_chunk_length, config.local_attn_chunk_length)
    return length % config.chunk_multiple == 0 and length > max(chunks)

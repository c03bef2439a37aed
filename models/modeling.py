"""Reformer encoder/decoder in PyTorch, numerically identical to transformers' ``ReformerModel`` (eval mode).

Read top to bottom: embeddings -> feed-forward -> layer (attention + feed-forward, reversible) -> encoder ->
``ReformerModel`` (last hidden state, [B, L, 2*hidden]) -> ``ReformerLM`` (logits, [B, L, vocab]).

The reversible two-stream composition (Gomez et al., 2017; Reformer section 3) is evaluated forward only:
``Y1 = X1 + Attention(X2)``, ``Y2 = X2 + FeedForward(Y1)``, both streams starting from the embeddings; the output
is ``LayerNorm(concat(Y1, Y2))``. Inputs longer than the shortest chunk length and not a multiple of the chunk
lengths' lcm are padded (masked) to that multiple and the outputs cut back, as HF does. Module and parameter
names follow HF so its state dicts load without renaming (see ``checkpoint.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .attention import LocalSelfAttention, LSHSelfAttention
from .config import ReformerConfig
from .errors import InputError, InputTypeError
from .fused import fused_active

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


class AxialPositionEmbeddings(nn.Module):
    """Position p = (p // s1, p % s1) on an s0 x s1 grid; its embedding concatenates one row of each factor table."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        (s0, s1), (d0, d1) = config.axial_pos_shape, config.axial_pos_embds_dim
        self.columns = s1
        self.weights = nn.ParameterList([nn.Parameter(torch.ones(s0, 1, d0)), nn.Parameter(torch.ones(1, s1, d1))])

    def forward(self, length: int, device: torch.device) -> torch.Tensor:
        return self.at(torch.arange(length, device=device))

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of arbitrary positions [...] -> [..., hidden] (the cached decoding path's one new token)."""
        rows = self.weights[0][positions // self.columns, 0]  # [..., d0]
        cols = self.weights[1][0, positions % self.columns]  # [..., d1]
        return torch.cat([rows, cols], dim=-1)


class PositionEmbeddings(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, length: int, device: torch.device) -> torch.Tensor:
        return self.at(torch.arange(length, device=device))

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of arbitrary positions [...] -> [..., hidden]."""
        return self.embedding(positions)


class ReformerEmbeddings(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (AxialPositionEmbeddings(config) if config.axial_pos_embds
                                    else PositionEmbeddings(config))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_embeddings(input_ids.shape[1], input_ids.device)
        return self.word_embeddings(input_ids) + positions


def _apply_in_chunks(fn: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over slices of the sequence axis: same result, peak activation memory bounded by ``chunk`` rows."""
    if chunk <= 0 or x.shape[1] <= chunk:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(chunk, dim=1)], dim=1)


class _Dense(nn.Module):
    """A Linear one level down, only so parameter names read ``dense.dense.weight`` as in HF checkpoints."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class FeedForward(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.chunk = config.chunk_size_feed_forward
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = _Dense(config.hidden_size, config.feed_forward_size)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.output = _Dense(config.feed_forward_size, config.hidden_size)

    def _forward_chunk(self, x: torch.Tensor) -> torch.Tensor:
        if fused_active() and x.dtype == torch.float32:  # as rows: an ONNX Gemm with its bias and activation
            # fused (bit-identical in torch); float16 stays a MatMul: ONNX Runtime's CPU float16 Gemm is far less
            # accurate
            return self._forward_rows(x.reshape(-1, x.shape[-1])).view(x.shape)
        return self._forward_rows(x)

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.act(self.dense.dense(self.layer_norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply_in_chunks(self._forward_chunk, x, self.chunk)


class _SelfOutput(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.num_attention_heads * config.attention_head_size, config.hidden_size,
                               bias=False)


class ReformerAttention(nn.Module):
    def __init__(self, config: ReformerConfig, attention_type: str) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attention = (LSHSelfAttention(config) if attention_type == "lsh"
                               else LocalSelfAttention(config))
        self.output = _SelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.self_attention(self.layer_norm(x), mask))


class ReformerLayer(nn.Module):
    def __init__(self, config: ReformerConfig, attention_type: str) -> None:
        super().__init__()
        self.attention = ReformerAttention(config, attention_type)
        self.feed_forward = FeedForward(config)

    def forward(self, attn_stream: torch.Tensor, hidden_stream: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn_stream = attn_stream + self.attention(hidden_stream, mask)  # Y1 = X1 + f(X2)
        hidden_stream = hidden_stream + self.feed_forward(attn_stream)  # Y2 = X2 + g(Y1)
        return attn_stream, hidden_stream


class ReformerEncoder(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ReformerLayer(config, t) for t in config.attn_layers)
        self.layer_norm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn_stream = hidden_stream = embeddings
        for layer in self.layers:
            attn_stream, hidden_stream = layer(attn_stream, hidden_stream, mask)
        return self.layer_norm(torch.cat([attn_stream, hidden_stream], dim=-1))


class _PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for both model classes (the work is in ``checkpoint.py``)."""

    config: ReformerConfig

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int | None = None):  # -> Self
        """Load an HF or reformer-rt checkpoint directory. ``max_length`` resolves ``num_buckets=None``. The config is
        checked against the stored shapes before the model is built (``checkpoint.check_config``)."""
        path = Path(path)
        shapes = checkpoint.stored_shapes(path) if path.is_dir() else None
        if shapes is not None:
            checkpoint.check_config(cls, checkpoint.read_config(path, max_length), shapes, path)
        config, state = checkpoint.load(path, max_length)
        if shapes is None:
            checkpoint.check_config(cls, config, {key: tuple(value.shape) for key, value in state.items()}, path)
        model = cls(config)
        checkpoint.apply_state_dict(model, state, Path(path))
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        checkpoint.save(self, Path(path))  # type: ignore[arg-type]


class ReformerModel(_PretrainedMixin, nn.Module):
    """``model(input_ids, attention_mask=None)`` -> last hidden state [B, L, 2*hidden] (HF ``ReformerModel``)."""

    ARCHITECTURE = "ReformerModel"
    HEAD_PREFIXES: tuple[str, ...] = ()  # checkpoint key prefixes of its head (see checkpoint.py)

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.config = config if config.is_resolved else config.resolved()
        self.embeddings = ReformerEmbeddings(self.config)
        self.encoder = ReformerEncoder(self.config)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            check_inputs(self.config, input_ids, attention_mask)
        batch, length = input_ids.shape
        mask = (torch.ones_like(input_ids, dtype=torch.int32) if attention_mask is None
                else (attention_mask != 0).to(torch.int32))
        padded = self.config.padded_length(length)
        if padded != length:
            pad_id = self.config.pad_token_id or 0
            input_ids = torch.cat([input_ids, input_ids.new_full((batch, padded - length), pad_id)], dim=1)
            mask = torch.cat([mask, mask.new_zeros((batch, padded - length))], dim=1)
        hidden = self.encoder(self.embeddings(input_ids), mask)
        return hidden[:, :length]


class LMHead(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.chunk = config.chunk_size_lm_head
        self.decoder = nn.Linear(2 * config.hidden_size, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _apply_in_chunks(self._decode, hidden, self.chunk)

    def _decode(self, hidden: torch.Tensor) -> torch.Tensor:
        if fused_active() and hidden.dtype == torch.float32:  # as rows: one ONNX Gemm with its bias (FeedForward)
            return self.decoder(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)
        return self.decoder(hidden)


class ReformerLM(_PretrainedMixin, nn.Module):
    """``model(input_ids, attention_mask=None)`` -> logits [B, L, vocab] (HF ``ReformerModelWithLMHead``)."""

    ARCHITECTURE = "ReformerModelWithLMHead"
    HEAD_PREFIXES = ("lm_head.",)

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.reformer = ReformerModel(config)
        self.config = self.reformer.config
        self.lm_head = LMHead(self.config)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.reformer(input_ids, attention_mask))


def check_inputs(config: ReformerConfig, input_ids: object, attention_mask: object) -> None:
    """Reject bad model inputs with an error naming the argument and the allowed range."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputTypeError(f"input_ids: got {type(input_ids).__name__}; expected a torch.Tensor of token ids")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InputTypeError(f"input_ids: got dtype {input_ids.dtype}; expected an integer dtype (torch.long)")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids: got shape {tuple(input_ids.shape)}; expected [batch, length] "
                         "(use input_ids.unsqueeze(0) for a single sequence)")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise InputError(f"input_ids: got shape {tuple(input_ids.shape)}; expected at least one sequence of "
                         "at least one token")
    padded = config.padded_length(length)
    if padded > config.max_position_embeddings:
        raise InputError(f"input_ids: got length {length} (runs at {padded} after padding to a multiple of "
                         f"{config.chunk_multiple}); expected at most max_position_embeddings="
                         f"{config.max_position_embeddings} -- split the input")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise InputError(f"input_ids: got token id {bad}; expected ids in [0, {config.vocab_size - 1}] "
                         "(vocab_size) -- was the input tokenized for this model?")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise InputTypeError(f"attention_mask: got {type(attention_mask).__name__}; expected a torch.Tensor")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise InputTypeError(f"attention_mask: got dtype {attention_mask.dtype}; expected bool or an integer "
                             "dtype of 1 (token) / 0 (padding)")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"attention_mask: got shape {tuple(attention_mask.shape)}; expected the shape of "
                         f"input_ids {tuple(input_ids.shape)}")
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise InputError("attention_mask: got values other than 0 and 1; expected 1 = token, 0 = padding")

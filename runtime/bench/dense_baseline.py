"""The baseline a Reformer has to beat on a GPU: a dense causal transformer of the same width with flash attention.

What users run instead of a Reformer: pre-LayerNorm blocks of causal self-attention through
``F.scaled_dot_product_attention(is_causal=True)`` -- FlashAttention on fp16 CUDA tensors (Dao et al., 2022) --
and a GELU feed-forward. Sized like the enwik8 Reformer it is compared with (``bench/gpu.py``): 12 layers, d_model
1024, 8 heads x 128, feed-forward 4096, the same vocabulary. No position table (a learned or rotary one costs
little next to attention). Random weights; it exists to be timed, and returns the last hidden state [B, L, d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, feed_forward: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_attention = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ln_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, feed_forward), nn.GELU(), nn.Linear(feed_forward, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        qkv = self.qkv(self.ln_attention(x)).view(batch, length, 3, self.heads, d_model // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B,L,3,H,D] -> 3 x [B,H,L,D]
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, d_model))  # [B,H,L,D] -> [B,L,H*D]
        return x + self.ff(self.ln_ff(x))


class DenseTransformer(nn.Module):
    def __init__(self, vocab_size: int = 258, d_model: int = 1024, heads: int = 8, feed_forward: int = 4096,
                 layers: int = 12) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(DenseBlock(d_model, heads, feed_forward) for _ in range(layers))
        self.ln_final = nn.LayerNorm(d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)

"""Cached decoding through a ``ReformerLM``: prefill prompts, then one token per row and step (HF's cached path).

    cache = DecodeCache.empty(model, batch=2, capacity=1100, prompt_capacity=1000)
    logits = prefill(model, cache, rows=[0], input_ids=ids_a)     # [1, vocab]: the prompt's next-token logits
    logits = prefill(model, cache, rows=[1], input_ids=ids_b)     # prompts of one length share a prefill
    logits = step(model, cache, next_ids)                         # [2, vocab]; each row at its own position

The composition is the model's (``modeling.py``): embeddings, then per layer ``Y1 = X1 + Attention(X2)``,
``Y2 = X2 + FeedForward(Y1)``, then ``LayerNorm(concat(Y1, Y2))`` and the LM head -- with each attention layer's
``prefill`` / ``step`` (``attention.py``) in place of its ``forward``, and positions continuing from each row's
cached length (HF: ``start_idx_pos_encodings``). A prompt's prefill is the full forward of that prompt alone
(padded to the chunk multiple as HF pads it), so rows never influence each other. What the cached step computes,
and how it differs from recomputing the sequence: ``cache.py``.

Limits: ``ReformerLM`` with a causal config only (``is_decoder``, as HF's ``ReformerModelWithLMHead``); positions
stop at ``max_position_embeddings``; the capacity is fixed when the cache is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .cache import LocalCache, LSHCache
from .errors import ConfigError, InputError
from .modeling import ReformerLM, check_inputs


@dataclasses.dataclass
class DecodeCache:
    """Every layer's cache for B rows, and the tokens each row holds (``lengths``, on the host). Mutable: ``prefill``
    and ``step`` write into it; ``select`` keeps some rows (finished rows leave the batch)."""

    layers: list[LocalCache | LSHCache]
    lengths: list[int]
    capacity: int

    @classmethod
    def empty(cls, model: ReformerLM, batch: int, capacity: int, prompt_capacity: int) -> DecodeCache:
        """Room for ``capacity`` tokens per row, of which prompts take at most ``prompt_capacity``."""
        check_decoder(model)
        limit = model.config.max_position_embeddings
        if not 1 <= prompt_capacity <= capacity <= limit:
            raise InputError(f"cache capacity: got {capacity} tokens for prompts of up to {prompt_capacity}; expected "
                             f"prompt length <= capacity <= max_position_embeddings={limit} -- shorten the prompt "
                             "or generate fewer tokens")
        like = model.lm_head.decoder.weight
        layers = [layer.attention.self_attention.empty_cache(batch, capacity, prompt_capacity, like)
                  for layer in model.reformer.encoder.layers]
        return cls(layers, [0] * batch, capacity)

    def select(self, rows: Sequence[int]) -> DecodeCache:
        index = torch.tensor(list(rows), dtype=torch.int64, device=self.layers[0].values.device)
        return DecodeCache([layer.select(index) for layer in self.layers], [self.lengths[i] for i in rows],
                           self.capacity)


def check_decoder(model: ReformerLM) -> None:
    """Cached decoding needs a causal language model (what HF generates with)."""
    if not isinstance(model, ReformerLM):
        raise ConfigError(f"generation: got a {type(model).__name__}; expected a language model checkpoint "
                          "(ReformerModelWithLMHead) -- this one has no LM head")
    if not model.config.is_decoder:
        raise ConfigError("is_decoder: got false; generation needs a causal model (is_decoder: true), as HF's "
                          "ReformerModelWithLMHead does -- a masked-LM encoder cannot generate left to right")
    after = {"lsh_num_chunks_after": model.config.lsh_num_chunks_after,
             "local_num_chunks_after": model.config.local_num_chunks_after}
    if any(after.values()):
        raise ConfigError(f"{' / '.join(after)}: got {' / '.join(map(str, after.values()))}; expected 0 for a causal "
                          "language model (HF's ReformerModelWithLMHead refuses look-ahead chunks too)")


def prefill(model: ReformerLM, cache: DecodeCache, rows: Sequence[int], input_ids: torch.Tensor) -> torch.Tensor:
    """Run prompts of one length, input_ids [b, P], into ``rows`` of ``cache`` -> next-token logits [b, vocab]."""
    check_inputs(model.config, input_ids, None)
    batch, length = input_ids.shape
    if len(rows) != batch or any(cache.lengths[row] for row in rows):
        raise InputError(f"prefill rows: got {list(rows)} for {batch} prompts; expected one empty row per prompt")
    if length > cache.capacity:
        raise InputError(f"prefill: got a {length}-token prompt; the cache holds {cache.capacity} per row")
    padded = model.config.padded_length(length)
    mask = torch.ones(batch, padded, dtype=torch.int32, device=input_ids.device)
    mask[:, length:] = 0
    pad = input_ids.new_full((batch, padded - length), model.config.pad_token_id or 0)
    body = model.reformer
    attn_stream = hidden_stream = body.embeddings(torch.cat([input_ids, pad], dim=1))
    index = torch.tensor(list(rows), dtype=torch.int64, device=input_ids.device)
    for layer, layer_cache in zip(body.encoder.layers, cache.layers):
        attention = layer.attention
        out = attention.self_attention.prefill(attention.layer_norm(hidden_stream), mask, length, layer_cache, index)
        attn_stream = attn_stream + attention.output.dense(out)  # Y1 = X1 + f(X2)
        hidden_stream = hidden_stream + layer.feed_forward(attn_stream)  # Y2 = X2 + g(Y1)
    for row in rows:
        cache.lengths[row] = length
    last = torch.cat([attn_stream[:, length - 1:length], hidden_stream[:, length - 1:length]], dim=-1)
    return model.lm_head(body.encoder.layer_norm(last))[:, 0]


def step(model: ReformerLM, cache: DecodeCache, input_ids: torch.Tensor) -> torch.Tensor:
    """One new token per row, input_ids [B], each at its row's next position -> next-token logits [B, vocab]."""
    host = list(cache.lengths)
    if len(host) != input_ids.shape[0] or min(host) < 1:
        raise InputError(f"step: got {input_ids.shape[0]} ids for {len(host)} rows; expected one id per prefilled row")
    if max(host) >= cache.capacity:
        raise InputError(f"step: a row holds {max(host)} tokens, the cache's capacity; expected fewer -- make the "
                         "cache with room for every token to generate")
    lengths = torch.tensor(host, dtype=torch.int64, device=input_ids.device)
    body = model.reformer
    embeddings = body.embeddings.word_embeddings(input_ids) + body.embeddings.position_embeddings.at(lengths)
    attn_stream = hidden_stream = embeddings[:, None]  # [B,1,hidden]
    for layer, layer_cache in zip(body.encoder.layers, cache.layers):
        attention = layer.attention
        out = attention.self_attention.step(attention.layer_norm(hidden_stream), layer_cache, lengths, host)
        attn_stream = attn_stream + attention.output.dense(out)
        hidden_stream = hidden_stream + layer.feed_forward(attn_stream)
    cache.lengths = [n + 1 for n in host]
    return model.lm_head(body.encoder.layer_norm(torch.cat([attn_stream, hidden_stream], dim=-1)))[:, 0]

"""decode_layers_ref: the spec of one KV-cached decode step through a stack of pre-LN decoder layers (MusicGen's
layout: self-attention with a fused QKV projection, cross-attention over a prefix-masked condition, a GELU MLP; no
projection biases, LayerNorms with bias). Plain PyTorch, float64-capable. Projections may be stored in bf16 or int8
(QuantizedLinearWeight): their meaning is their dequantized weight, exact in float64."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmdkernels.linear.quantize import QuantizedLinearWeight


class DecoderLayerWeights(NamedTuple):
    """One decoder layer's tensors, in the order the compiled op takes them (csrc/decode/decode_layers_cpu.cpp).

    D = model dim, F = MLP dim; projections are [out, in] (nn.Linear's layout), none has a bias. A projection is a
    tensor (x's dtype) or a QuantizedLinearWeight (mmdkernels.linear.pack_decode_weight: bf16, or int8 + scales);
    the norms are tensors of x's dtype.
    """

    self_norm_weight: torch.Tensor  # [D]
    self_norm_bias: torch.Tensor  # [D]
    qkv: torch.Tensor  # [3D, D]: rows of q, then k, then v
    self_out: torch.Tensor  # [D, D]
    cross_norm_weight: torch.Tensor  # [D]
    cross_norm_bias: torch.Tensor  # [D]
    cross_q: torch.Tensor  # [D, D]
    cross_out: torch.Tensor  # [D, D]
    mlp_norm_weight: torch.Tensor  # [D]
    mlp_norm_bias: torch.Tensor  # [D]
    fc1: torch.Tensor  # [F, D], GELU after it
    fc2: torch.Tensor  # [D, F]


PROJECTIONS = ("qkv", "self_out", "cross_q", "cross_out", "fc1", "fc2")


def _project(h: torch.Tensor, weight) -> torch.Tensor:
    if isinstance(weight, QuantizedLinearWeight):
        weight = weight.dequantize(h.dtype)
    return F.linear(h, weight)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q [B, H, Dh] over the first lengths[b] entries of k, v [B, H, S, Dh] (q's dtype, or a reduced-precision
    cache: read as q's dtype)."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(q.shape[-1])
    keep = torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", torch.softmax(scores, dim=-1), v)


def decode_layers_ref(
    x: torch.Tensor,
    layers: list[DecoderLayerWeights],
    self_k: torch.Tensor,
    self_v: torch.Tensor,
    cross_k: torch.Tensor,
    cross_v: torch.Tensor,
    cross_lengths: torch.Tensor,
    step: int,
    num_heads: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """One decode step through every layer; writes this step's keys/values into self_k/self_v at `step`.

    Args:
        x: [B, D] the step's input embeddings.
        layers: L DecoderLayerWeights.
        self_k, self_v: [L, B, H, S_max, Dh] self-attention caches (positions < step already filled); x's dtype
            or a reduced-precision one (bfloat16 / float16: the step's K/V are rounded to it when written).
        cross_k, cross_v: [L, B, H, Tc, Dh] the condition's keys/values; cross_lengths int64 [B] valid entries.
        step: this step's position, 0 <= step < S_max.
        num_heads: H (D = H * Dh).
        eps: the LayerNorms' epsilon.
    Returns:
        [B, D]: the residual stream after the last layer (before the model's final norm).
    """
    batch, dim = x.shape
    head_dim = dim // num_heads
    self_lengths = torch.full((batch,), step + 1, dtype=torch.long, device=x.device)
    for index, w in enumerate(layers):
        h = F.layer_norm(x, (dim,), w.self_norm_weight, w.self_norm_bias, eps)
        q, k, v = _project(h, w.qkv).view(batch, 3, num_heads, head_dim).unbind(1)
        self_k[index, :, :, step] = k
        self_v[index, :, :, step] = v
        x = x + _project(_attend(q, self_k[index], self_v[index], self_lengths).reshape(batch, dim), w.self_out)
        h = F.layer_norm(x, (dim,), w.cross_norm_weight, w.cross_norm_bias, eps)
        q = _project(h, w.cross_q).view(batch, num_heads, head_dim)
        x = x + _project(_attend(q, cross_k[index], cross_v[index], cross_lengths).reshape(batch, dim), w.cross_out)
        h = F.layer_norm(x, (dim,), w.mlp_norm_weight, w.mlp_norm_bias, eps)
        x = x + _project(F.gelu(_project(h, w.fc1)), w.fc2)
    return x


class DecoderEnds(NamedTuple):
    """What a decode step adds around the layers to go from tokens to logits, in the order the compiled op takes
    them (csrc/decode/decode_layers_cpu.cpp, lm_decode_logits). D = model dim, R = token streams, C = logits."""

    embedding: torch.Tensor  # [V, D]: the stacked token tables
    offsets: torch.Tensor  # int64 [R]: the first row of stream r's table
    final_norm_weight: torch.Tensor  # [D]
    final_norm_bias: torch.Tensor  # [D]
    head: torch.Tensor  # [C, D] (every codebook's head stacked), or a QuantizedLinearWeight (bf16, int8 + scales)


def embed_tokens_ref(tokens: torch.Tensor, position: torch.Tensor, ends: DecoderEnds) -> torch.Tensor:
    """tokens int64 [B, R], position [D] -> the step's input embeddings [B, D]: the rows tokens[b, r] + offsets[r]
    of the embedding summed over r, plus the position's embedding."""
    return ends.embedding[tokens + ends.offsets].sum(1) + position


def decode_logits_ref(
    tokens: torch.Tensor,
    position: torch.Tensor,
    ends: DecoderEnds,
    layers: list[DecoderLayerWeights],
    self_k: torch.Tensor,
    self_v: torch.Tensor,
    cross_k: torch.Tensor,
    cross_v: torch.Tensor,
    cross_lengths: torch.Tensor,
    step: int,
    num_heads: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """One whole decode step, tokens to logits: embed_tokens_ref, decode_layers_ref, the final LayerNorm, the heads.

    Args:
        tokens: int64 [B, R] this step's input tokens (row ids within each stream's table).
        position: [D] this step's position embedding.
        ends: DecoderEnds (embedding, offsets, final norm, heads).
        layers, self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads, eps: as decode_layers_ref.
    Returns:
        logits [B, C].
    """
    x = decode_layers_ref(
        embed_tokens_ref(tokens, position, ends), layers, self_k, self_v, cross_k, cross_v, cross_lengths, step,
        num_heads, eps,
    )  # fmt: skip
    h = F.layer_norm(x, (x.shape[1],), ends.final_norm_weight, ends.final_norm_bias, eps)
    return _project(h, ends.head)

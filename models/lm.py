"""A MusicGen-style multi-codebook LM: pre-norm transformer decoder (causal self-attention, cross-attention to an
encoded text prompt, GELU MLP) over the step sequence of a codebook pattern (mmdkernels.patterns).

- delay / parallel: a step holds K codes. Input = sum of K embeddings (one table of C + 1 entries per codebook, the
  extra entry is the special token C), output = K heads of C logits.
- flatten: a step holds one code. Input = the embedding of the previous code in its codebook's table plus a learned
  embedding of the codebook this step predicts; output = that codebook's head. Per-codebook heads (not one shared
  head) keep the parameters equal to the delay model's, so the two patterns compare at the same model size.

Layers mirror Hugging Face's MusicgenDecoder (LayerNorm with bias, bias-free projections and MLP, sinusoidal
positions): `models.checkpoints.load_hf_musicgen` copies a MusicgenForCausalLM's weights in (the decode benchmark
uses it).

Decoding uses a static KV cache (`new_cache`): self-attention keys/values live in preallocated [L, B, H, S_max, Dh]
buffers written in place at each step; cross-attention keys/values are computed once from the condition.
`decode_step` is one path: embed, the decoder layers, the heads. Every kernel on it is chosen by the library's
dispatcher (mmdkernels/_dispatch.py; force one with MMDKERNELS_BACKEND_<OP>, e.g. DECODE_ATTENTION=sdpa, or
DECODE_LAYERS=reference to run the layers one op at a time): on CPU a step runs as one `mmdkernels.decode_logits`
call, tokens to logits, and the layers of a depth-head model as one `mmdkernels.decode_layers` call
(DECODE_LOGITS=reference forces that for every model). Its one variant is the CUDA-graph step:
the step is a device tensor and attention runs over the whole cache under a length mask (fixed shapes, no host read
of a length).

`quantize_for_decode(model, "bf16" | "fp16" | "int8")` stores a copy of every decoder projection and the heads in
that precision (mmdkernels.pack_decode_weight), which inference (model.eval()) then uses: decode steps, prefill and
teacher-forced scoring; a decode step streams the packed copies as stored (the C++ kernels on CPU for bf16 / int8,
the Triton kernel on CUDA for all three, CUDA graphs included). Training mode uses the float32 parameters, which
stay the master copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mmdkernels
from mmdkernels import (
    DecoderEnds,
    QuantizedLinearWeight,
    decode_layers_backend,
    decode_linear,
    decode_logits_backend,
    pack_decode_weight,
)
from mmdkernels.attention import REDUCED_CACHE_DTYPES
from mmdkernels.linear import PRECISIONS
from mmdkernels.patterns import PATTERNS, apply_pattern, num_streams, revert_pattern, valid_mask
from models.depth_head import DepthHead
from models.text_encoder import Condition, TextEncoder

HEADS = ("independent", "depth")


@dataclass
class LMConfig:
    num_codebooks: int = 4
    codebook_size: int = 256
    pattern: str = "delay"
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.0
    text_dim: int = 64
    text_layers: int = 1
    text_heads: int = 4
    max_text_tokens: int = 64
    init_std: float = 0.02
    head: str = "independent"  # "independent": K heads (product of marginals); "depth": models.depth_head
    depth_hidden: int = 0  # the depth head's MLP width (0: 2 * dim)

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "depth" and self.pattern == "flatten":
            raise ValueError("head='depth' models the K codes of a step jointly: use pattern 'delay' or 'parallel'")
        if self.dim % self.num_heads:
            raise ValueError(f"dim = {self.dim} must be a multiple of num_heads = {self.num_heads}")

    @property
    def special(self) -> int:
        """The special token id (C): start token and the empty positions of the delay pattern."""
        return self.codebook_size

    @classmethod
    def preset(cls, name: str, **overrides) -> LMConfig:
        """ "small" (CPU default) or "musicgen-small" (d = 1024, 24 layers, 16 heads, K = 4, C = 2048)."""
        presets = {
            "small": {},
            "musicgen-small": dict(
                dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, codebook_size=2048, num_codebooks=4, text_dim=256
            ),
        }
        if name not in presets:
            raise ValueError(f"preset must be one of {tuple(presets)}, got {name!r}")
        return cls(**{**presets[name], **overrides})


# A decode step's single position is a row of a cached block of rows instead of six small tensor ops (~0.15 ms of a
# B = 4 int8 step of the benchmark decoder): per width, the aligned block of _SINUSOID_BLOCK_ROWS positions around
# the last one asked for (at most 8 MiB at D = 2048), recomputed when the steps move past it.
_SINUSOID_BLOCKS: dict[int, tuple[int, torch.Tensor]] = {}
_SINUSOID_BLOCK_ROWS = 1024


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """int64 positions [S] -> [S, dim] float32 embeddings (cos then sin, as MusicGen / tensor2tensor). One CPU
    position (a decode step) is read from a cached block of rows computed by the same formula (the same values, bit
    for bit: tests/test_lm.py)."""
    if positions.dim() == 1 and positions.numel() == 1 and positions.device.type == "cpu":
        if positions.dtype == torch.int64 and (position := int(positions)) >= 0:
            return _position_row(position, dim)[None].clone()
    return _sinusoids(positions, dim)


def _position_row(position: int, dim: int) -> torch.Tensor:
    """The float32 CPU embedding [dim] of one position >= 0: a view into the cached block of rows (read only)."""
    first, block = _SINUSOID_BLOCKS.get(dim, (-1, None))
    if block is None or not first <= position < first + _SINUSOID_BLOCK_ROWS:
        first = position - position % _SINUSOID_BLOCK_ROWS
        with torch.inference_mode(False):
            block = _sinusoids(torch.arange(first, first + _SINUSOID_BLOCK_ROWS), dim)
        _SINUSOID_BLOCKS[dim] = (first, block)
    return block[position - first]


def _sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    inv_freq = torch.exp(torch.arange(half, device=positions.device) * (-math.log(10000.0) / (half - 1)))
    angles = positions.float()[:, None] * inv_freq[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def attend_cache(q, k_cache, v_cache, length) -> torch.Tensor:
    """One query per row over the first `length` cache entries: q [B, H, Dh], caches [B, H, S_max, Dh] -> [B, H, Dh].

    length: int (all rows equal): mmdkernels.decode_attention, whose dispatcher picks the kernel. Or an int64 tensor
    [1] on q's device (the CUDA-graph step), which a captured graph cannot read on the host: SDPA over the whole cache
    under a length mask (the cache is zero-initialised, so masked entries hold no NaN that could leak); a
    reduced-precision cache (bfloat16 / float16 under float32 q) instead goes to mmdkernels.decode_attention with the
    lengths on the device (the Triton kernel on a GPU: it reads the cache as stored, where SDPA would need a float32
    copy of the whole cache every step, and reads no length on the host).
    """
    if isinstance(length, int):
        return mmdkernels.decode_attention(q, k_cache, v_cache, length)
    if k_cache.dtype != q.dtype:
        return mmdkernels.decode_attention(q, k_cache, v_cache, length.repeat(q.shape[0]))
    mask = (torch.arange(k_cache.shape[2], device=q.device) < length)[None]
    return F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask)[:, :, 0]


@dataclass
class KVCache:
    """Static decode state for one generation: self-attention buffers written in place, cross-attention K/V fixed."""

    self_k: torch.Tensor  # [L, B, H, S_max, Dh]
    self_v: torch.Tensor  # [L, B, H, S_max, Dh]
    cross_k: torch.Tensor  # [L, B, H, Tc, Dh]
    cross_v: torch.Tensor  # [L, B, H, Tc, Dh]
    cross_mask: torch.Tensor  # bool [B, 1, 1, Tc]
    # int64 [B]: the condition's lengths when its mask is a prefix (True then False), so that a decode step's
    # cross-attention can go through decode_attention; None for other masks (then SDPA with the mask)
    cross_lengths: torch.Tensor | None = None


# Parameter and submodule registrations anywhere in the process (torch's global registration hooks): a model's cached
# decode preparation (MusicLM.prepared_decode_layers) is rebuilt after any, so a replaced weight or layer is never
# streamed in place of the new one.
_registrations = [0]


def _count_registration(*_) -> None:
    _registrations[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_module_registration_hook(_count_registration)


@dataclass(frozen=True)
class DecodeWeight:
    """A parameter's copy in a decode precision (quantize_for_decode), with the parameter's version when packed: an
    in-place change of the parameter since (an optimizer step, load_state_dict) makes the copy stale."""

    packed: QuantizedLinearWeight
    version: int

    def get(self, parameter: torch.Tensor, name: str) -> QuantizedLinearWeight:
        if parameter._version != self.version:
            raise RuntimeError(
                f"{name} changed since quantize_for_decode packed it: call quantize_for_decode(model, "
                f"{self.packed.precision!r}) again (or model.train() to use the float32 weights)"
            )
        return self.packed


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose few-row inference calls on CPU (a decode step) go through
    mmdkernels.decode_linear, which streams the weights once instead of packing them for a GEMM; training and
    larger batches take F.linear as before. After quantize_for_decode, inference uses the packed copy (on CUDA too:
    decode_linear's Triton kernel reads it as stored)."""

    decode_weight: DecodeWeight | None = None

    def inference_weight(self) -> torch.Tensor | QuantizedLinearWeight:
        """The weight this layer computes with: its packed copy in eval mode after quantize_for_decode, else the
        float32 parameter."""
        if self.training or self.decode_weight is None:
            return self.weight
        return self.decode_weight.get(self.weight, "a Linear weight")

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """x [..., in] -> activation(x W^T + b) [..., out]; activation None or "gelu" (fused in the decode kernel)."""
        return decode_linear(x, self.inference_weight(), self.bias, activation=activation)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=False)  # fused: one GEMM per step instead of three
        self.out = Linear(dim, dim, bias=False)

    def forward(self, x, cache_k=None, cache_v=None, start=0) -> torch.Tensor:
        """x [B, S, D] at positions start.. -> [B, S, D]. With cache views [B, H, S_max, Dh], writes K/V in place.

        start: int, or an int64 tensor [1] (then S must be 1: the fixed-shape CUDA-graph step)."""
        batch, steps, dim = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if cache_k is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(start, torch.Tensor):
            cache_k.index_copy_(2, start, k.to(cache_k.dtype))
            cache_v.index_copy_(2, start, v.to(cache_v.dtype))
            y = attend_cache(q[:, :, 0], cache_k, cache_v, start + 1)[:, :, None]
        else:
            cache_k[:, :, start : start + steps] = k
            cache_v[:, :, start : start + steps] = v
            if steps == 1:
                y = attend_cache(q[:, :, 0], cache_k, cache_v, start + 1)[:, :, None]
            else:
                keys = torch.arange(start + steps, device=x.device)
                mask = keys[None] <= keys[start:, None]
                cached_k, cached_v = (cache[:, :, : start + steps].to(q.dtype) for cache in (cache_k, cache_v))
                y = F.scaled_dot_product_attention(q, cached_k, cached_v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, steps, dim))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim, bias=False)
        self.kv = Linear(dim, 2 * dim, bias=False)
        self.out = Linear(dim, dim, bias=False)

    def project_kv(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """condition [B, Tc, D] -> keys, values [B, H, Tc, Dh]."""
        batch, length, dim = condition.shape
        k, v = self.kv(condition).view(batch, length, 2, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, k, v, mask, lengths=None) -> torch.Tensor:
        """x [B, S, D], k/v [B, H, Tc, Dh], mask bool [B, 1, 1, Tc] -> [B, S, D]. lengths: int64 [B] when the mask
        is a prefix mask (a decode step then attends with mmdkernels.decode_attention, as the self-attention does);
        None for other masks and in a CUDA-graph step (SDPA under the mask)."""
        batch, steps, dim = x.shape
        q = self.q(x).view(batch, steps, self.num_heads, dim // self.num_heads).transpose(1, 2)
        if steps == 1 and lengths is not None:
            y = mmdkernels.decode_attention(q[:, :, 0], k, v, lengths)[:, :, None]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, steps, dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.dropout = config.dropout
        self.self_norm = nn.LayerNorm(config.dim)
        self.self_attn = SelfAttention(config.dim, config.num_heads)
        self.cross_norm = nn.LayerNorm(config.dim)
        self.cross_attn = CrossAttention(config.dim, config.num_heads)
        self.mlp_norm = nn.LayerNorm(config.dim)
        self.fc1 = Linear(config.dim, config.ffn_dim, bias=False)
        self.fc2 = Linear(config.ffn_dim, config.dim, bias=False)

    def _drop(self, x):
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x, cross, cache=None, start=0):
        """x [B, S, D]; cross = (k, v, mask[, lengths]) of this layer; cache = (k, v) views of this layer or None."""
        cache_k, cache_v = cache if cache is not None else (None, None)
        x = x + self._drop(self.self_attn(self.self_norm(x), cache_k, cache_v, start))
        x = x + self._drop(self.cross_attn(self.cross_norm(x), *cross))
        return x + self._drop(self.fc2(self.fc1(self.mlp_norm(x), activation="gelu")))


def decode_layer_weights(layers) -> list[mmdkernels.DecoderLayerWeights]:
    """The layers' tensors for mmdkernels.decode_layers (the fused CPU decode step)."""
    return [
        mmdkernels.DecoderLayerWeights(
            layer.self_norm.weight,
            layer.self_norm.bias,
            layer.self_attn.qkv.inference_weight(),
            layer.self_attn.out.inference_weight(),
            layer.cross_norm.weight,
            layer.cross_norm.bias,
            layer.cross_attn.q.inference_weight(),
            layer.cross_attn.out.inference_weight(),
            layer.mlp_norm.weight,
            layer.mlp_norm.bias,
            layer.fc1.inference_weight(),
            layer.fc2.inference_weight(),
        )
        for layer in layers
    ]


class MusicLM(nn.Module):
    """The LM. forward(inputs [B, R, S], condition) -> logits [B, R, S, C] (teacher forcing or prefill);
    decode_step(tokens [B, R], step, cache) -> logits [B, R, C] (one KV-cached step)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        k, c, d = config.num_codebooks, config.codebook_size, config.dim
        self.text_encoder = TextEncoder(
            config.text_dim, d, config.text_layers, config.text_heads, config.max_text_tokens
        )
        self.token_embedding = nn.Embedding(k * (c + 1), d)  # K tables of C + 1 rows, stacked
        self.register_buffer("table_offset", torch.arange(k) * (c + 1), persistent=False)
        self.target_embedding = nn.Embedding(k, d) if config.pattern == "flatten" else None
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.heads = nn.Parameter(torch.empty(k, c, d))  # [K, C, D]: one output head per codebook
        self.depth_head = DepthHead(k, c, d, config.depth_hidden or 2 * d) if config.head == "depth" else None
        self.apply(self._init_weights)
        nn.init.normal_(self.heads, std=config.init_std)
        self.decode_precision = "fp32"  # set by quantize_for_decode
        self.decode_heads: DecodeWeight | None = None  # the heads [K * C, D], packed by quantize_for_decode

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def head_weight(self, codebook: int | None = None) -> torch.Tensor | QuantizedLinearWeight:
        """The heads inference computes with, as a decode_linear weight: all K stacked [K * C, D], or one codebook's
        [C, D]; the packed copy in eval mode after quantize_for_decode, else the float32 parameter."""
        c, d = self.config.codebook_size, self.config.dim
        if self.training or self.decode_heads is None:
            return self.heads.view(-1, d) if codebook is None else self.heads[codebook]
        packed = self.decode_heads.get(self.heads, "heads")
        if codebook is None:
            return packed
        rows = slice(codebook * c, (codebook + 1) * c)
        return QuantizedLinearWeight(packed.data[rows], None if packed.scale is None else packed.scale[rows])

    def _dense_heads(self) -> torch.Tensor:
        """The heads [K, C, D] as a float tensor (dequantised after quantize_for_decode, in eval mode)."""
        weight = self.head_weight()
        if isinstance(weight, QuantizedLinearWeight):
            weight = weight.dequantize(self.heads.dtype)
        return weight.view(self.heads.shape)

    @property
    def streams(self) -> int:
        return num_streams(self.config.pattern, self.config.num_codebooks)

    def encode_condition(self, prompts: list[str | None]) -> Condition:
        """B prompts (None = null condition) -> Condition (embeddings [B, Tc, D] in the model's dtype)."""
        condition = self.text_encoder(prompts)
        return Condition(condition.embeddings.to(self.heads.dtype), condition.mask)

    def _cross(self, condition: Condition) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        mask = condition.mask[:, None, None, :]
        return [(*layer.cross_attn.project_kv(condition.embeddings), mask) for layer in self.layers]

    def new_cache(self, condition: Condition, max_steps: int, dtype: torch.dtype | None = None) -> KVCache:
        """Preallocate the decode state for condition's B rows and up to max_steps steps (zero-filled).

        dtype: the self-attention cache's storage dtype; None keeps the model's. torch.bfloat16 (or float16) under a
        float32 model is a reduced-precision cache: half the bytes every step reads (at 30 s of MusicGen-small the
        float32 cache streams as many bytes per step as int8 weights); each step's K/V are rounded to it once and
        attention accumulates in float32 (quality: docs/decoding.md). The cross-attention K/V keep the model's."""
        if dtype is not None and dtype != self.heads.dtype:
            if self.heads.dtype != torch.float32 or dtype not in REDUCED_CACHE_DTYPES:
                raise ValueError(
                    f"dtype must be None, the model's {self.heads.dtype}, or bfloat16 / float16 under a float32 "
                    f"model, got {dtype}"
                )
        cfg = self.config
        batch = condition.embeddings.shape[0]
        shape = (cfg.num_layers, batch, cfg.num_heads, max_steps, cfg.dim // cfg.num_heads)
        cross = self._cross(condition)
        lengths = condition.mask.sum(-1)
        prefix = torch.arange(condition.mask.shape[-1], device=lengths.device)[None] < lengths[:, None]
        return KVCache(
            self_k=self.heads.new_zeros(shape, dtype=dtype),
            self_v=self.heads.new_zeros(shape, dtype=dtype),
            cross_k=torch.stack([k for k, _, _ in cross]),
            cross_v=torch.stack([v for _, v, _ in cross]),
            cross_mask=cross[0][2],
            cross_lengths=lengths if bool(torch.equal(prefix, condition.mask)) and bool(lengths.min() > 0) else None,
        )

    def _embed(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """inputs [B, R, S] token ids at int64 positions [S] -> [B, S, D]."""
        k = self.config.num_codebooks
        if self.target_embedding is None:
            x = self.token_embedding(inputs + self.table_offset[:, None]).sum(1)
        else:  # flatten: the input is the previous step's code, of codebook (s - 1) mod K; step s predicts s mod K
            x = self.token_embedding(inputs[:, 0] + self.table_offset[(positions - 1) % k])
            x = x + self.target_embedding(positions % k)
        return x + sinusoidal_positions(positions, self.config.dim).to(x.dtype)

    def _logits(self, h: torch.Tensor, positions: torch.Tensor, step, step_codes=None) -> torch.Tensor:
        """h [B, S, D] at positions [S] (step: the int position of a single step, else None) -> logits [B, R, S, C].
        step_codes [B, K, S]: the steps' codes, which the depth head conditions on (teacher forcing)."""
        k = self.config.num_codebooks
        if self.depth_head is not None:
            if step_codes is None:
                raise ValueError("a depth-head model scores a step given its codes: pass step_codes (or decode_hidden)")
            return torch.einsum("bksd,kcd->bksc", self.depth_head.hidden(h, step_codes), self._dense_heads())
        if self.target_embedding is None:
            if h.shape[1] == 1:  # decode: one GEMM over the stacked heads
                return decode_linear(h[:, 0], self.head_weight()).view(h.shape[0], k, 1, -1)
            return torch.einsum("bsd,kcd->bksc", h, self._dense_heads())
        if isinstance(step, int):
            return decode_linear(h, self.head_weight(step % k))[:, None]
        if h.shape[1] == 1:  # fixed-shape step: the head is picked on the device
            weight = self.head_weight()
            if isinstance(weight, QuantizedLinearWeight):  # all K packed heads read as stored, not a float copy
                logits = decode_linear(h[:, 0], weight).view(h.shape[0], k, -1)
                return logits.index_select(1, positions % k)[:, :, None]
            return (h @ weight.view(self.heads.shape).index_select(0, positions % k)[0].t())[:, None]
        heads = self._dense_heads()
        logits = h.new_empty(h.shape[0], 1, h.shape[1], self.config.codebook_size)
        for codebook in range(k):  # flatten: step s belongs to codebook s mod K; positions are consecutive
            first = (codebook - int(positions[0])) % k
            logits[:, 0, first::k] = h[:, first::k] @ heads[codebook].t()
        return logits

    def forward(
        self,
        inputs: torch.Tensor,
        condition: Condition,
        cache: KVCache | None = None,
        start: int = 0,
        step_codes: torch.Tensor | None = None,
    ):
        """Teacher-forced (cache None) or prefill/incremental (cache given) pass over S steps from `start`.

        Args:
            inputs: int64 [B, R, S]: the token fed at each step (the previous step's codes; the special token C first).
            condition: Condition for B rows (ignored when cache is given: its cross K/V were computed from it).
            cache: KVCache from new_cache, written at steps start .. start + S - 1.
            start: the absolute step of inputs[..., 0].
            step_codes: int64 [B, K, S], the codes of these steps (the targets): needed by a depth-head model only.
        Returns:
            logits [B, R, S, C] (float, the model's dtype).
        """
        positions = torch.arange(start, start + inputs.shape[2], device=inputs.device)
        cross = self._cross(condition) if cache is None else self._cached_cross(cache, prefix_lengths=True)
        h = self._layers(self._embed(inputs, positions), cross, cache, start)
        single = start if inputs.shape[2] == 1 else None
        return self._logits(h, positions, single, step_codes)

    def decode_step(self, tokens: torch.Tensor, step, cache: KVCache) -> torch.Tensor:
        """One KV-cached step: tokens [B, R] (the codes of step - 1, or the special token at step 0) -> logits
        [B, R, C] for step `step`. step: int, or an int64 tensor [1] on the model's device (the CUDA-graph variant:
        fixed shapes, attention under a length mask)."""
        if isinstance(step, int):
            logits = self._fused_decode_step(tokens, step, cache)
            if logits is not None:
                return logits
        h, positions = self._decode_backbone(tokens, step, cache)
        return self._logits(h, positions, step if isinstance(step, int) else None)[:, :, 0]

    def decode_hidden(self, tokens: torch.Tensor, step: int, cache: KVCache) -> torch.Tensor:
        """One KV-cached backbone step as decode_step, returning the final-normed state h [B, D] the heads (or the
        depth head) read, instead of logits."""
        return self._decode_backbone(tokens, step, cache)[0][:, 0]

    def depth_logits(self, h: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
        """A depth-head model's logits [B, C] for codebook k of a step, given h [B, D] and the step's codes [B, K]
        whose columns < k are drawn."""
        return decode_linear(self.depth_head.step_hidden(h, codes, k), self.head_weight(k))

    def _decode_backbone(self, tokens, step, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, R] at step (int or int64 tensor [1]) -> (final-normed h [B, 1, D], positions [1])."""
        graphed = isinstance(step, torch.Tensor)
        positions = step if graphed else torch.tensor([step], device=tokens.device)
        x = self._embed(tokens[:, :, None], positions)
        prepared = None if graphed else self._fused_decode_layers(x, cache)
        if prepared is not None:
            x = mmdkernels.decode_layers(
                x[:, 0],
                prepared,
                cache.self_k,
                cache.self_v,
                cache.cross_k,
                cache.cross_v,
                cache.cross_lengths,
                step,
                num_heads=self.config.num_heads,
                eps=self.layers[0].self_norm.eps,
                backend="cpp",
            )
            return self.final_norm(x[:, None]), positions
        return self._layers(x, self._cached_cross(cache, prefix_lengths=not graphed), cache, step), positions

    def _fused_decode_step(self, tokens: torch.Tensor, step: int, cache: KVCache) -> torch.Tensor | None:
        """Logits [B, R, C] of a whole decode step in mmdkernels.decode_logits' compiled CPU op (tokens to logits in
        one call: the embedding sum, the layers, the final norm, the heads) where it runs: any model without a depth
        head, under the conditions of _fused_decode_layers; else None (the step then runs in parts). A delay or
        parallel step sums one row of each codebook's table and reads all K heads; a flatten step reads the previous
        step's code (codebook (step - 1) mod K), adds the target embedding of codebook step mod K to the position's
        row, and reads that codebook's head."""
        if self.depth_head is not None or tokens.device.type != "cpu":
            return None
        if self.training or cache.cross_lengths is None or self.decode_precision == "fp16" or step < 0:
            return None
        eps = self.layers[0].self_norm.eps
        if self.final_norm.eps != eps or not self.final_norm.elementwise_affine:
            return None  # the op normalises with one epsilon, every norm with weight and bias
        prepared = self.prepared_decode_layers()
        k = self.config.num_codebooks
        position = _position_row(step, self.config.dim)
        if self.target_embedding is None:
            offsets, head = self.table_offset, self.head_weight()
        else:
            table = (step - 1) % k
            offsets, head = self.table_offset[table : table + 1], self.head_weight(step % k)
            position = self.target_embedding.weight[step % k] + position
        ends = DecoderEnds(self.token_embedding.weight, offsets, self.final_norm.weight, self.final_norm.bias, head)
        if decode_logits_backend(tokens, position, ends, prepared) != "cpp":
            return None
        logits = mmdkernels.decode_logits(
            tokens, position, ends, prepared, cache.self_k, cache.self_v, cache.cross_k, cache.cross_v,
            cache.cross_lengths, step, num_heads=self.config.num_heads, eps=eps, backend="cpp",
        )  # fmt: skip
        return logits.view(tokens.shape[0], tokens.shape[1], -1)

    def _fused_decode_layers(self, x: torch.Tensor, cache: KVCache) -> mmdkernels.PreparedDecoderLayers | None:
        """The prepared layers when an int decode step runs all layers in mmdkernels.decode_layers' compiled CPU op
        (inference, a prefix-masked condition, and the dispatcher choosing "cpp" for the input: float32 CPU rows, no
        autograd, the extension loaded; MMDKERNELS_BACKEND_DECODE_LAYERS=reference keeps the per-layer path); else
        None."""
        if self.training or cache.cross_lengths is None or self.decode_precision == "fp16":
            return None  # fp16: the C++ step streams fp32, bf16 or int8 projections
        prepared = self.prepared_decode_layers()
        return prepared if decode_layers_backend(x[:, 0], prepared) == "cpp" else None

    def prepared_decode_layers(self) -> mmdkernels.PreparedDecoderLayers:
        """The decoder layers' inference weights checked and flattened once for mmdkernels.decode_layers (a decode
        step then spends no Python on its 12 L tensors), cached. Rebuilt when the model changes mode (train / eval),
        decode precision (quantize_for_decode), device or dtype (.to()), when a parameter or module is registered
        anywhere (a weight or layer replaced), and when a parameter with a packed copy changed in place (which then
        raises, as every inference use of a stale copy does). In-place changes of float32 weights need nothing: the
        preparation holds the parameters themselves."""
        key = (id(self), self.training, self.decode_precision, _registrations[0])
        cached = self.__dict__.get("_prepared_layers")
        if cached is not None and cached[0] == key and all(p._version == v for p, v in cached[2]):
            return cached[1]
        prepared = mmdkernels.prepare_decode_layers(decode_layer_weights(self.layers))
        watched = [
            (linear.weight, linear.decode_weight.version)
            for linear in self.layers.modules()
            if isinstance(linear, Linear) and not linear.training and linear.decode_weight is not None
        ]
        self.__dict__["_prepared_layers"] = (key, prepared, watched)
        return prepared

    def _forget_prepared_layers(self) -> None:
        self.__dict__.pop("_prepared_layers", None)

    def _apply(self, fn, recurse=True):
        self._forget_prepared_layers()  # .to(), .double(), ...: the preparation's dtype and device
        return super()._apply(fn, recurse)

    def _cached_cross(self, cache: KVCache, prefix_lengths: bool) -> list[tuple]:
        """The cache's cross-attention K/V per layer; with its prefix lengths unless a CUDA-graph step (SDPA)."""
        lengths = cache.cross_lengths if prefix_lengths else None
        return [(cache.cross_k[i], cache.cross_v[i], cache.cross_mask, lengths) for i in range(len(self.layers))]

    def _layers(self, x, cross, cache: KVCache | None, start) -> torch.Tensor:
        """The decoder layers then the final norm: x [B, S, D] at `start` -> h [B, S, D]."""
        for i, layer in enumerate(self.layers):
            x = layer(x, cross[i], (cache.self_k[i], cache.self_v[i]) if cache is not None else None, start)
        return self.final_norm(x)


def quantize_for_decode(model: MusicLM, precision: str) -> MusicLM:
    """Store the model's decode weights in `precision` for inference; returns the model (changed in place).

    Packs (mmdkernels.pack_decode_weight) every decoder-layer projection (models.lm.Linear) and the output heads
    once. In eval mode every inference pass then computes with the packed copies: decode_step (the fused CPU step
    included, but for fp16, which the C++ step does not stream: bf16 is the CPU choice; on CUDA the Triton kernel
    streams all three), prefill and teacher-forced scoring (nll_per_frame). Training mode keeps using the float32
    parameters, which stay the master copy (the state dict is unchanged); a packed copy whose parameter changed in
    place since (an optimizer step, load_state_dict) raises at its next inference use: quantize again. Embeddings,
    norms, the text encoder and a depth head's MLP stay float32 (a step reads only a few rows of them, or they run
    once per generation). Move the model to its device first: the packed copies are not buffers.

    Args:
        model: a MusicLM.
        precision: "fp32" (drop the packed copies: back to the float32 parameters), "bf16", "fp16" or "int8" (per
            output channel scales; mmdkernels/linear/quantize.py).

    Example:
        >>> model = quantize_for_decode(MusicLM(LMConfig()).eval(), "int8")
        >>> logits = model.decode_step(tokens, 0, model.new_cache(condition, 100))
    """
    if not isinstance(model, MusicLM):
        raise TypeError(f"model must be a MusicLM, got {type(model).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")

    def pack(parameter: torch.Tensor) -> DecodeWeight | None:
        if precision == "fp32":
            return None
        return DecodeWeight(pack_decode_weight(parameter.view(-1, parameter.shape[-1]), precision), parameter._version)

    for module in model.modules():
        if isinstance(module, Linear):
            module.decode_weight = pack(module.weight)
    model.decode_heads = pack(model.heads)
    model.decode_precision = precision
    model._forget_prepared_layers()
    return model


def decode_weight_bytes(model: MusicLM) -> int:
    """Bytes of weights one decode step streams: every decoder-layer projection but the cross-attention K/V (run once
    per generation) and all heads, in the model's decode precision (norms and embedding rows are negligible)."""
    total = 0
    for layer in model.layers:
        for linear in (layer.self_attn.qkv, layer.self_attn.out, layer.cross_attn.q, layer.cross_attn.out, layer.fc1,
                       layer.fc2):  # fmt: skip
            weight = linear.weight if linear.decode_weight is None else linear.decode_weight.packed
            total += weight.nbytes if isinstance(weight, QuantizedLinearWeight) else weight.numel() * 4
    heads = model.heads if model.decode_heads is None else model.decode_heads.packed
    return total + (heads.nbytes if isinstance(heads, QuantizedLinearWeight) else heads.numel() * 4)


def teacher_forcing(codes: torch.Tensor, pattern: str, special: int):
    """codes [B, K, T] -> (inputs [B, R, S], targets [B, R, S], valid bool [R, S]): inputs are the targets shifted
    one step right with the special token first."""
    targets = apply_pattern(codes.long(), pattern, special)
    start = torch.full_like(targets[:, :, :1], special)
    inputs = torch.cat([start, targets[:, :, :-1]], dim=2)
    return inputs, targets, valid_mask(pattern, codes.shape[1], codes.shape[2], codes.device)


def _check_codes(model: MusicLM, codes) -> None:
    cfg = model.config
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[1] != cfg.num_codebooks:
        got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes must be an integer tensor [B, K={cfg.num_codebooks}, T], got {got}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.codebook_size):
        raise ValueError(
            f"codes must lie in [0, C = {cfg.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
        )


def code_log_likelihoods(model: MusicLM, codes: torch.Tensor, condition: Condition) -> torch.Tensor:
    """Teacher-forced log-probability of every code: codes [B, K, T] -> float [B, K, T]."""
    _check_codes(model, codes)
    cfg = model.config
    inputs, targets, valid = teacher_forcing(codes.to(model.heads.device), cfg.pattern, cfg.special)
    logits = model(inputs, condition, step_codes=targets if model.depth_head is not None else None)
    # special positions (no code) get a dummy target; revert_pattern keeps only the valid positions
    log_probs = -F.cross_entropy(logits.permute(0, 3, 1, 2), targets.clamp(max=cfg.codebook_size - 1), reduction="none")
    return revert_pattern(log_probs, cfg.pattern, cfg.num_codebooks, codes.shape[2])


def lm_loss(model: MusicLM, codes: torch.Tensor, condition: Condition) -> torch.Tensor:
    """Mean cross-entropy (nats per code) over the valid positions of the pattern: codes [B, K, T] -> scalar."""
    return -code_log_likelihoods(model, codes, condition).mean()


@torch.no_grad()
def nll_per_frame(
    model: MusicLM,
    codes: torch.Tensor,
    conditions: list[str | None] | None = None,
    pattern: str | None = None,
    batch_size: int = 16,
) -> float:
    """Held-out negative log-likelihood in nats per audio frame: the sum over the K codes of a frame of -log p,
    averaged over all B * T frames. Comparable between delay and flatten models (both score every code once).

    Args:
        codes: int [B, K, T] held-out codes.
        conditions: B prompts (None entries or None for all: the null condition).
        pattern: must equal model.config.pattern if given (a guard against comparing the wrong models).
        batch_size: rows per forward pass.
    """
    if pattern is not None and pattern != model.config.pattern:
        raise ValueError(f"pattern {pattern!r} does not match the model's pattern {model.config.pattern!r}")
    _check_codes(model, codes)
    conditions = [None] * codes.shape[0] if conditions is None else list(conditions)
    if len(conditions) != codes.shape[0]:
        raise ValueError(f"conditions must hold B = {codes.shape[0]} prompts, got {len(conditions)}")
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, codes.shape[0], batch_size):
        condition = model.encode_condition(conditions[i : i + batch_size])
        total += float(code_log_likelihoods(model, codes[i : i + batch_size], condition).double().sum())
    model.train(was_training)
    return -total / (codes.shape[0] * codes.shape[2])

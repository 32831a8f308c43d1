"""One KV-cached decode step through a stack of MusicGen-style decoder layers, in one call.

A decode step of a small LM is a stream of its weights through a few rows, plus ~40 small ops a layer whose Python
overhead rivals the arithmetic on a CPU. The C++ op (csrc/decode/decode_layers_cpu.cpp) runs the whole layer stack
in one call, through this library's few-row linear and decode attention; `decode_layers_ref` is its spec. It lives in
the library (not the model) because only compiled code removes that overhead; the layer layout it fixes is spelled
once, in `DecoderLayerWeights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmdkernels._dispatch import (
    LINEAR_MAX_ROWS,
    checking_values,
    choose_backend,
    env_backend,
    linear_rows_prefer_torch,
)
from mmdkernels.attention import REDUCED_CACHE_DTYPES
from mmdkernels.decode import ops
from mmdkernels.decode.reference import (
    PROJECTIONS,
    DecoderEnds,
    DecoderLayerWeights,
    decode_layers_ref,
    decode_logits_ref,
)
from mmdkernels.linear.quantize import QuantizedLinearWeight

__all__ = [
    "DecoderEnds",
    "DecoderLayerWeights",
    "PreparedDecoderLayers",
    "decode_layers",
    "decode_layers_backend",
    "decode_layers_ref",
    "decode_logits",
    "decode_logits_backend",
    "decode_logits_ref",
    "prepare_decode_layers",
]


def _check_layers(layers, dim: int, dtype: torch.dtype, device: torch.device, whose: str) -> None:
    """The layers' types and shapes for model dim D, dtype and device (`whose`: where those come from, for errors)."""
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(w, DecoderLayerWeights) for w in layers)
    ):
        raise TypeError("layers must be a non-empty list of DecoderLayerWeights")
    for index, w in enumerate(layers):
        for name, tensor in w._asdict().items():
            if name in PROJECTIONS and isinstance(tensor, QuantizedLinearWeight):
                if tensor.device != device:
                    raise TypeError(f"layers[{index}].{name} must be on {whose} device {device}, got {tensor.device}")
            elif not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.device != device:
                raise TypeError(
                    f"layers[{index}].{name} must be a tensor of {whose} dtype and device ({dtype}, {device})"
                    + (" or a QuantizedLinearWeight" if name in PROJECTIONS else "")
                )
        expected = {"qkv": (3 * dim, dim), "self_out": (dim, dim), "cross_q": (dim, dim), "cross_out": (dim, dim)}
        expected.update({n: (dim,) for n in w._fields if n.endswith(("_weight", "_bias"))})
        expected.update(fc1=(w.fc1.shape[0], dim), fc2=(dim, w.fc1.shape[0]))
        for name, shape in expected.items():
            if tuple(getattr(w, name).shape) != shape:
                raise ValueError(
                    f"layers[{index}].{name} must have shape {list(shape)}, got {list(getattr(w, name).shape)}"
                )


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating tensor [B, D], got {got}")


def _check_state(x, num_layers, self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads) -> None:
    """The step's arguments besides the layers (x already checked by _check_x)."""
    batch, dim = x.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing D = {dim}, got {num_heads!r}")
    head_dim = dim // num_heads
    for name, cache in (("self_k", self_k), ("self_v", self_v), ("cross_k", cross_k), ("cross_v", cross_v)):
        tensor, self_cache = isinstance(cache, torch.Tensor), name.startswith("self")
        reduced = tensor and self_cache and x.dtype == torch.float32 and cache.dtype in REDUCED_CACHE_DTYPES
        if not tensor or (cache.dtype != x.dtype and not reduced) or cache.device != x.device:
            also = " (self_k / self_v: or bfloat16 / float16 under float32 x)" if self_cache else ""
            raise TypeError(f"{name} must be a tensor of x's dtype and device ({x.dtype}, {x.device}){also}")
        if cache.dim() != 5 or tuple(cache.shape[:3]) != (num_layers, batch, num_heads) or cache.shape[4] != head_dim:
            raise ValueError(
                f"{name} must have shape [L={num_layers}, B={batch}, H={num_heads}, S, Dh={head_dim}], "
                f"got {list(cache.shape)}"
            )
    if self_v.dtype != self_k.dtype:
        raise TypeError(f"self_v must have self_k's dtype {self_k.dtype}, got {self_v.dtype}")
    if self_v.shape != self_k.shape or cross_v.shape != cross_k.shape:
        raise ValueError("self_v / cross_v must have the shapes of self_k / cross_k")
    if not isinstance(cross_lengths, torch.Tensor) or cross_lengths.dtype != torch.int64:
        raise TypeError("cross_lengths must be an int64 tensor [B]")
    if cross_lengths.shape != (batch,) or cross_lengths.device != x.device:
        raise ValueError(f"cross_lengths must have shape [B={batch}] on x's device, got {list(cross_lengths.shape)}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self_k.shape[3]:
        raise ValueError(f"step must be an int in [0, S_max = {self_k.shape[3]}), got {step!r}")


@dataclass(frozen=True, eq=False)
class PreparedDecoderLayers:
    """A stack of DecoderLayerWeights checked once and flattened in the compiled op's order (prepare_decode_layers):
    what a generation loop hands decode_layers at every step, so that the step does not re-check and re-flatten
    12 L tensors in Python (~1 ms a step for 24 layers). Holds the tensors themselves: an in-place change of a
    weight is seen; replacing one needs a new preparation."""

    layers: tuple[DecoderLayerWeights, ...]
    tensors: tuple[torch.Tensor, ...]  # the stored tensor of every field, layer by layer: [12 L]
    scales: tuple[torch.Tensor | None, ...]  # int8 projections' scales, None elsewhere; () when there are none
    dim: int
    dtype: torch.dtype
    device: torch.device
    contiguous: bool  # whether every tensor is contiguous


def prepare_decode_layers(layers: list[DecoderLayerWeights]) -> PreparedDecoderLayers:
    """Check and flatten L layers' weights once for decode_layers (every step after takes the result as is).

    Args:
        layers: L DecoderLayerWeights of one dtype and device (the norms'); projections may be QuantizedLinearWeight.
    Returns:
        PreparedDecoderLayers, accepted wherever decode_layers and decode_layers_backend take `layers`.

    Example:
        >>> prepared = mmdkernels.prepare_decode_layers(weights)
        >>> h = mmdkernels.decode_layers(emb, prepared, *caches, step, num_heads=16)
    """
    if not isinstance(layers, (list, tuple)) or not layers or not isinstance(layers[0], DecoderLayerWeights):
        raise TypeError("layers must be a non-empty list of DecoderLayerWeights")
    norm = layers[0].self_norm_weight
    if not isinstance(norm, torch.Tensor) or norm.dim() != 1:
        raise TypeError("layers[0].self_norm_weight must be a 1-d tensor [D]")
    return _prepare(layers, norm.shape[0], norm.dtype, norm.device, "the layers'")


def _prepare(layers, dim: int, dtype: torch.dtype, device: torch.device, whose: str) -> PreparedDecoderLayers:
    """prepare_decode_layers for model dim D, dtype and device (`whose`: where those come from, for errors)."""
    _check_layers(layers, dim, dtype, device, whose)
    flat = [pair for w in layers for pair in _flat(w)]
    tensors = tuple(t for t, _ in flat)
    scales = tuple(scale for _, scale in flat)
    return PreparedDecoderLayers(
        layers=tuple(layers),
        tensors=tensors,
        scales=scales if any(scale is not None for scale in scales) else (),
        dim=dim,
        dtype=dtype,
        device=device,
        contiguous=all(t.is_contiguous() for t in tensors),
    )


def _check_prepared_matches(x: torch.Tensor, prepared: PreparedDecoderLayers) -> None:
    if x.dtype != prepared.dtype or x.device != prepared.device or x.shape[1] != prepared.dim:
        raise TypeError(
            f"x must be a {prepared.dtype} tensor [B, D={prepared.dim}] on {prepared.device} (the prepared layers'), "
            f"got {x.dtype} {list(x.shape)} on {x.device}"
        )


def _flat(w: DecoderLayerWeights) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(stored tensor, int8 scale or None) per field, in the op's order."""
    return [(t.data, t.scale) if isinstance(t, QuantizedLinearWeight) else (t, None) for t in w]


def _kernel_reasons(x, layers, backend: str) -> list[str]:
    if backend != "cpp":
        return []
    reasons = []
    if x.dtype != torch.float32:
        reasons.append(f"dtype {x.dtype}: the fused step takes float32")
    if x.shape[0] > LINEAR_MAX_ROWS:
        reasons.append(f"{x.shape[0]} rows: the fused step takes at most {LINEAR_MAX_ROWS}")
    if isinstance(layers, PreparedDecoderLayers):
        tensors, contiguous = layers.tensors, layers.contiguous
    else:
        tensors = [t for w in layers for t, _ in _flat(w)]
        contiguous = all(t.is_contiguous() for t in tensors)
    # requires_grad is read now, not at preparation (a weight may be unfrozen since); only when grad mode is on
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
        reasons.append("autograd is recording: the fused step has no backward (use it under torch.no_grad)")
    if not contiguous:
        reasons.append("a layer weight is not contiguous")
    return reasons


def decode_layers_backend(x: torch.Tensor, layers: list[DecoderLayerWeights] | PreparedDecoderLayers) -> str:
    """The backend decode_layers(x, layers, ...) would run ("cpp" or "reference"): a model that keeps its own layers
    as the slow path asks this first."""
    return choose_backend(x, None, "decode_layers", op_reasons=lambda name: _kernel_reasons(x, layers, name))


def decode_layers(
    x: torch.Tensor,
    layers: list[DecoderLayerWeights] | PreparedDecoderLayers,
    self_k: torch.Tensor,
    self_v: torch.Tensor,
    cross_k: torch.Tensor,
    cross_v: torch.Tensor,
    cross_lengths: torch.Tensor,
    step: int,
    *,
    num_heads: int,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """One KV-cached decode step through every layer (see decode_layers_ref for the maths).

    Args:
        x: [B, D] the step's input embeddings; the C++ op serves float32 CPU inputs of at most 16 rows.
        layers: L DecoderLayerWeights (x's dtype and device); projections may be QuantizedLinearWeight (bf16, or int8
            with per-output-channel scales: mmdkernels.linear.pack_decode_weight), streamed as stored by the C++ op;
            or their prepare_decode_layers (checked once: what a generation loop passes at every step).
        self_k, self_v: [L, B, H, S_max, Dh] self-attention caches, written at `step` (in place): x's dtype, or
            bfloat16 / float16 under float32 x (a reduced-precision cache, half the bytes; the step's K/V are
            rounded to it and attention accumulates in float32).
        cross_k, cross_v: [L, B, H, Tc, Dh] the condition's keys/values; cross_lengths: int64 [B] valid entries.
        step: this step's position (a Python int), 0 <= step < S_max.
        num_heads: H. eps: the LayerNorms' epsilon.
        backend: None (the C++ op where it can run, else the reference), "cpp" or "reference".
    Returns:
        [B, D]: the residual stream after the last layer.

    Example:
        >>> h = mmdkernels.decode_layers(emb, weights, cache.self_k, cache.self_v, cache.cross_k, cache.cross_v,
        ...                              cache.cross_lengths, step, num_heads=16)
    """
    _check_x(x)
    if isinstance(layers, PreparedDecoderLayers):
        prepared = layers
        _check_prepared_matches(x, prepared)
    else:  # checked and flattened once, for the backend's reasons and the call
        prepared = _prepare(layers, x.shape[1], x.dtype, x.device, "x's")
    _check_state(x, len(prepared.layers), self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads)
    backend = choose_backend(x, backend, "decode_layers", op_reasons=lambda name: _kernel_reasons(x, prepared, name))
    if backend == "reference":
        weights = list(prepared.layers)
        return decode_layers_ref(x, weights, self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads, eps)
    return ops.decode_layers_op()(
        x,
        list(prepared.tensors),
        list(prepared.scales),
        self_k,
        self_v,
        cross_k,
        cross_v,
        cross_lengths,
        step,
        num_heads,
        float(eps),
        linear_rows_prefer_torch(x.shape[0]),
    )


def _check_ends(tokens, position, ends, prepared: PreparedDecoderLayers) -> None:
    """The tokens, position and ends of decode_logits against the prepared layers' dim, dtype and device."""
    dim, dtype, device = prepared.dim, prepared.dtype, prepared.device
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
        got = f"{tokens.dtype} tensor of shape {list(tokens.shape)}" if isinstance(tokens, torch.Tensor) else tokens
        raise TypeError(f"tokens must be an int64 tensor [B, R], got {got}")
    if tokens.device != device or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be [B, R] with B, R >= 1 on {device} (the layers'), got {list(tokens.shape)}")
    if not isinstance(ends, DecoderEnds):
        raise TypeError(f"ends must be a DecoderEnds, got {type(ends).__name__}")
    for name, tensor, shape in (
        ("position", position, (dim,)),
        ("ends.final_norm_weight", ends.final_norm_weight, (dim,)),
        ("ends.final_norm_bias", ends.final_norm_bias, (dim,)),
        ("ends.embedding", ends.embedding, None),
    ):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.device != device:
            raise TypeError(f"{name} must be a tensor of the layers' dtype and device ({dtype}, {device})")
        if shape is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
    if ends.embedding.dim() != 2 or ends.embedding.shape[1] != dim:
        raise ValueError(f"ends.embedding must have shape [V, D={dim}], got {list(ends.embedding.shape)}")
    offsets = ends.offsets
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64 or offsets.device != device:
        raise TypeError(f"ends.offsets must be an int64 tensor [R] on {device}")
    if tuple(offsets.shape) != (tokens.shape[1],):
        raise ValueError(f"ends.offsets must have shape [R={tokens.shape[1]}], got {list(offsets.shape)}")
    head = ends.head
    if isinstance(head, QuantizedLinearWeight):
        if head.device != device:
            raise TypeError(f"ends.head must be on the layers' device {device}, got {head.device}")
    elif not isinstance(head, torch.Tensor) or head.dtype != dtype or head.device != device:
        raise TypeError(
            f"ends.head must be a tensor of the layers' dtype and device ({dtype}, {device}) or a QuantizedLinearWeight"
        )
    if len(head.shape) != 2 or head.shape[1] != dim:
        raise ValueError(f"ends.head must have shape [C, D={dim}], got {list(head.shape)}")


def _ends_tensors(ends: DecoderEnds) -> list[torch.Tensor]:
    head = ends.head.data if isinstance(ends.head, QuantizedLinearWeight) else ends.head
    return [ends.embedding, ends.final_norm_weight, ends.final_norm_bias, head]


def _logits_reasons(tokens, position, ends, prepared: PreparedDecoderLayers, backend: str) -> list[str]:
    if backend != "cpp":
        return []
    reasons = []
    if prepared.dtype != torch.float32:
        reasons.append(f"dtype {prepared.dtype}: the fused step takes float32")
    if tokens.shape[0] > LINEAR_MAX_ROWS:
        reasons.append(f"{tokens.shape[0]} rows: the fused step takes at most {LINEAR_MAX_ROWS}")
    ends_tensors = _ends_tensors(ends)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*prepared.tensors, *ends_tensors, position)):
        reasons.append("autograd is recording: the fused step has no backward (use it under torch.no_grad)")
    if not prepared.contiguous or not all(t.is_contiguous() for t in (*ends_tensors, position)):
        reasons.append("a layer weight, the embedding, the final norm, the head or the position is not contiguous")
    return reasons


def _choose_logits_backend(tokens, position, ends, prepared: PreparedDecoderLayers, requested: str | None) -> str:
    # The environment's choice for decode_layers holds for the layers inside the whole step too: forcing
    # MMDKERNELS_BACKEND_DECODE_LAYERS=reference (the per-layer path) sends an automatic decode_logits to its reference.
    if requested is None and env_backend("decode_logits") is None and env_backend("decode_layers") == "reference":
        requested = "reference"
    return choose_backend(
        position, requested, "decode_logits",
        op_reasons=lambda name: _logits_reasons(tokens, position, ends, prepared, name),
    )  # fmt: skip


def decode_logits_backend(
    tokens: torch.Tensor, position: torch.Tensor, ends: DecoderEnds, layers: PreparedDecoderLayers
) -> str:
    """The backend decode_logits(tokens, position, ends, layers, ...) would run ("cpp" or "reference"); an automatic
    choice follows MMDKERNELS_BACKEND_DECODE_LAYERS=reference (the layers' reference) unless _DECODE_LOGITS is set."""
    return _choose_logits_backend(tokens, position, ends, layers, None)


def decode_logits(
    tokens: torch.Tensor,
    position: torch.Tensor,
    ends: DecoderEnds,
    layers: list[DecoderLayerWeights] | PreparedDecoderLayers,
    self_k: torch.Tensor,
    self_v: torch.Tensor,
    cross_k: torch.Tensor,
    cross_v: torch.Tensor,
    cross_lengths: torch.Tensor,
    step: int,
    *,
    num_heads: int,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """One whole KV-cached decode step, tokens to logits, in one call (see decode_logits_ref for the maths): the
    embedding sum, every layer (as decode_layers), the final LayerNorm and the stacked heads.

    Args:
        tokens: int64 [B, R] this step's input tokens, row ids within each stream's table (B <= 16 for the C++ op).
        position: [D] this step's position embedding (the layers' dtype; float32 for the C++ op).
        ends: DecoderEnds: embedding [V, D], offsets int64 [R], final_norm_weight / _bias [D], head [C, D] (a
            tensor, or a QuantizedLinearWeight: bf16, or int8 with per-row scales).
        layers: as decode_layers (a prepare_decode_layers result is what a generation loop passes every step).
        self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads, eps: as decode_layers.
        backend: None (the C++ op where it can run, else the reference), "cpp" or "reference".
    Returns:
        logits [B, C] (float32 from the C++ op).

    Example:
        >>> ends = mmdkernels.DecoderEnds(table, offsets, norm.weight, norm.bias, heads.view(-1, d))
        >>> logits = mmdkernels.decode_logits(tokens, pos_row, ends, prepared, *caches, step, num_heads=16)
    """
    prepared = layers if isinstance(layers, PreparedDecoderLayers) else prepare_decode_layers(layers)
    _check_ends(tokens, position, ends, prepared)
    batch = tokens.shape[0]
    _check_state(
        position.new_empty(batch, prepared.dim), len(prepared.layers), self_k, self_v, cross_k, cross_v,
        cross_lengths, step, num_heads,
    )  # fmt: skip
    backend = _choose_logits_backend(tokens, position, ends, prepared, backend)
    if backend == "reference":  # the C++ op checks the rows itself
        rows = tokens + ends.offsets
        if checking_values() and bool(((rows < 0) | (rows >= ends.embedding.shape[0])).any()):
            raise ValueError(
                f"tokens + ends.offsets must index the embedding's {ends.embedding.shape[0]} rows, got rows "
                f"{int(rows.min())}..{int(rows.max())}"
            )
        return decode_logits_ref(
            tokens, position, ends, list(prepared.layers), self_k, self_v, cross_k, cross_v, cross_lengths, step,
            num_heads, eps,
        )  # fmt: skip
    head = ends.head
    head_data, head_scale = (head.data, head.scale) if isinstance(head, QuantizedLinearWeight) else (head, None)
    return ops.decode_logits_op()(
        tokens,
        position,
        ends.embedding,
        ends.offsets,
        ends.final_norm_weight,
        ends.final_norm_bias,
        head_data,
        head_scale,
        list(prepared.tensors),
        list(prepared.scales),
        self_k,
        self_v,
        cross_k,
        cross_v,
        cross_lengths,
        step,
        num_heads,
        float(eps),
        linear_rows_prefer_torch(batch),
    )

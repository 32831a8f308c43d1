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

from mmdkernels._dispatch import LINEAR_MAX_ROWS, choose_backend, linear_rows_prefer_torch
from mmdkernels.decode import ops
from mmdkernels.decode.reference import PROJECTIONS, DecoderLayerWeights, decode_layers_ref
from mmdkernels.linear.quantize import QuantizedLinearWeight

__all__ = [
    "DecoderLayerWeights",
    "PreparedDecoderLayers",
    "decode_layers",
    "decode_layers_backend",
    "decode_layers_ref",
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
        if not isinstance(cache, torch.Tensor) or cache.dtype != x.dtype or cache.device != x.device:
            raise TypeError(f"{name} must be a tensor of x's dtype and device ({x.dtype}, {x.device})")
        if cache.dim() != 5 or tuple(cache.shape[:3]) != (num_layers, batch, num_heads) or cache.shape[4] != head_dim:
            raise ValueError(
                f"{name} must have shape [L={num_layers}, B={batch}, H={num_heads}, S, Dh={head_dim}], "
                f"got {list(cache.shape)}"
            )
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
        self_k, self_v: [L, B, H, S_max, Dh] self-attention caches, written at `step` (in place).
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

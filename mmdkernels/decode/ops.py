"""The compiled decode step (csrc/decode/decode_layers_cpu.cpp) and its fake for torch.compile."""

from __future__ import annotations

from mmdkernels import _ext


def _decode_layers_fake(
    x, weights, scales, self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads, eps, torch_linear
):
    return x.new_empty(x.shape)


_ext.register_on_load("mmdkernels::lm_decode_layers", _decode_layers_fake)


def decode_layers_op():
    """mmdkernels::lm_decode_layers (CPU): see mmdkernels.decode.decode_layers."""
    return _ext.compiled_op("lm_decode_layers", "cpp")


def _decode_logits_fake(
    tokens, position, embedding, offsets, final_norm_weight, final_norm_bias, head, head_scale, weights, scales,
    self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads, eps, torch_linear,
):  # fmt: skip
    return position.new_empty(tokens.shape[0], head.shape[0])


_ext.register_on_load("mmdkernels::lm_decode_logits", _decode_logits_fake)


def decode_logits_op():
    """mmdkernels::lm_decode_logits (CPU): see mmdkernels.decode.decode_logits."""
    return _ext.compiled_op("lm_decode_logits", "cpp")

"""mmdkernels: fused kernels for multi-codebook audio language models.

    import mmdkernels
    loss = mmdkernels.mmd_loss(q, delay=True)      # q: [B, K, D, T] per-codebook RVQ outputs
    crit = mmdkernels.MMDLoss(delay=True)          # drop-in for the published EnCodec-MMD loss

Importing is lean: no compiled extension is loaded, no CUDA initialised, nothing compiled until an op runs.
"""

from mmdkernels import metrics, patterns
from mmdkernels._ext import cpu_capability
from mmdkernels.attention import decode_attention, decode_attention_ref
from mmdkernels.decode import (
    DecoderEnds,
    DecoderLayerWeights,
    PreparedDecoderLayers,
    decode_layers,
    decode_layers_backend,
    decode_layers_ref,
    decode_logits,
    decode_logits_backend,
    decode_logits_ref,
    prepare_decode_layers,
)
from mmdkernels.gemm import gemm_path, set_gemm_path
from mmdkernels.linear import decode_linear, decode_linear_ref
from mmdkernels.linear.quantize import QuantizedLinearWeight, pack_decode_weight
from mmdkernels.mmd import DEFAULT_BANDWIDTHS, mmd_loss, mmd_loss_ref
from mmdkernels.nn import MMDLoss, ResidualVQ, RVQOutput
from mmdkernels.rvq import rvq_decode, rvq_decode_ref, rvq_encode, rvq_encode_ref
from mmdkernels.sampling import check_sample_args, sample, sample_ref

__version__ = "0.1.0"
__all__ = [
    "cpu_capability",
    "gemm_path",
    "set_gemm_path",
    "decode_layers",
    "decode_layers_backend",
    "decode_layers_ref",
    "decode_logits",
    "decode_logits_backend",
    "decode_logits_ref",
    "DecoderEnds",
    "DecoderLayerWeights",
    "PreparedDecoderLayers",
    "prepare_decode_layers",
    "decode_linear",
    "decode_linear_ref",
    "QuantizedLinearWeight",
    "pack_decode_weight",
    "mmd_loss",
    "mmd_loss_ref",
    "MMDLoss",
    "ResidualVQ",
    "RVQOutput",
    "DEFAULT_BANDWIDTHS",
    "rvq_encode",
    "rvq_decode",
    "rvq_encode_ref",
    "rvq_decode_ref",
    "decode_attention",
    "decode_attention_ref",
    "sample",
    "sample_ref",
    "check_sample_args",
    "metrics",
    "patterns",
]

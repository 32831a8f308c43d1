"""Fused multi-codebook sampling: CFG, temperature, top-k, top-p and the draw for all B x K rows in one launch."""

from __future__ import annotations

import torch

from mmdkernels._dispatch import choose_backend
from mmdkernels.sampling import ops
from mmdkernels.sampling.reference import (
    check_sample_args,
    check_uniform_values,
    draw_uniforms,
    kept_distribution_ref,
    raise_for_invalid_rows,
    sample_ref,
)

__all__ = ["sample", "sample_ref", "kept_distribution_ref", "check_sample_args"]


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_coef: float | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Sample one token per codebook per sequence: CFG -> temperature -> top-k -> top-p -> inverse-CDF draw.

    Args:
        logits: [B, K, V] float32/bfloat16/float16 (float64 runs the reference); with cfg_coef, [2B, K, V] with the
            B conditional rows first, then the B unconditional ones (torch.cat([cond, uncond])).
        temperature: >= 0; 0 is greedy (argmax, lowest index on ties; top-k/top-p are then ignored).
        top_k: keep the k most likely tokens (ties: lower index first); 0 or >= V keeps all.
        top_p: keep the most likely tokens while the mass ranked before them is < top_p; 1.0 disables.
        cfg_coef: classifier-free guidance: uncond + cfg_coef * (cond - uncond); None disables.
        generator: draws the uniforms (torch.rand, float64) when `uniforms` is None. None uses torch's global
            generator: reproducible only through torch.manual_seed. Not traceable by torch.compile: in a compiled
            step pass `uniforms` instead.
        uniforms: [B, K] float32/float64 in [0, 1): the draw's uniforms, given by the caller (e.g. drawn ahead
            for a whole generation, or for a torch.compile'd decode step).
        backend: "cpp", "cuda", "triton" or "reference"; None picks the fastest available.
    Returns:
        int64 [B, K] token indices in [0, V). Raises ValueError on a row with NaN/+inf logits or only -inf logits
        (checked eagerly; under torch.compile the check is skipped and such rows give -1).

    Example:
        >>> logits = model(torch.cat([codes, codes]), cond=torch.cat([text, null_text]))  # [2B, K, V]
        >>> g = torch.Generator().manual_seed(0)
        >>> next_codes = mmdkernels.sample(logits, temperature=1.0, top_k=250, cfg_coef=3.0, generator=g)
    """
    batch, num_codebooks = check_sample_args(logits, temperature, top_k, top_p, cfg_coef, generator, uniforms)
    compiling = torch.compiler.is_compiling()
    backend = choose_backend(logits, backend, "sample")
    if backend == "reference":
        return sample_ref(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cfg_coef=cfg_coef,
            generator=generator,
            uniforms=uniforms,
        )
    if uniforms is None:
        uniforms = draw_uniforms(batch, num_codebooks, logits.device, generator)
    elif not compiling:
        check_uniform_values(uniforms)
    tokens = ops.sample_op(backend)(
        logits.detach().contiguous(),
        uniforms.double().contiguous(),
        float(temperature),
        int(top_k),
        float(top_p),
        float(cfg_coef if cfg_coef is not None else 0.0),
        cfg_coef is not None,
    )
    if not compiling:
        raise_for_invalid_rows(tokens)
    return tokens

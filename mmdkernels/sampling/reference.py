"""Plain-PyTorch multi-codebook sampling: the spec every sampling kernel is tested against (docs/sampling_kernels.md).

Per row (one codebook of one sequence), in this order:
  1. CFG: x = uncond + c * (cond - uncond), rounded in the compute dtype; a token that is -inf in either branch is
     -inf in the mixture (a ban in either branch stays a ban).
  2. temperature: z = x * float32(1 / T) (an exact multiply, the same bits in every backend); T == 0 is greedy:
     argmax of x, lowest index on ties.
  3. rank tokens by (z descending, index ascending). top-k keeps rank < k.
  4. e = exp(z - max z). top-p keeps a rank iff the float64 sum (in rank order) of e over the top-k tokens ranked
     before it is < p * S_k, S_k the float64 sum (in vocabulary order) of e over the top-k tokens; so at least the
     top token survives.
  5. draw: with S the float64 cumsum (in VOCABULARY order) of e over the kept tokens, the token is the smallest
     kept index i with e_i > 0 and S_i > u * S_last; if rounding leaves none, the last such index.
A row is invalid, and its token -1, when a logit is NaN or +inf (before or after CFG/temperature) or every token
is -inf; the public functions raise on invalid rows.
"""

from __future__ import annotations

import math
import numbers

import torch

INVALID_TOKEN = -1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the spec computes in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_temperature(temperature: float, dtype: torch.dtype) -> float:
    """1 / T rounded to `dtype`'s precision (what z = x * inv_t multiplies by in every backend)."""
    inv = 1.0 / temperature
    if dtype == torch.float64:
        return inv
    return float(torch.tensor(inv, dtype=torch.float32))


def mixed_logits_ref(logits: torch.Tensor, cfg_coef: float | None) -> torch.Tensor:
    """Classifier-free guidance mix: [2B, K, V] (conditional rows first) -> [B, K, V] in the compute dtype;
    without cfg_coef, [B, K, V] converted to the compute dtype."""
    x = logits.to(compute_dtype(logits.dtype))
    if cfg_coef is None:
        return x
    cond, uncond = x.chunk(2, dim=0)
    coef = torch.tensor(cfg_coef, dtype=x.dtype, device=x.device)
    mixed = uncond + coef * (cond - uncond)
    banned = (cond == -math.inf) | (uncond == -math.inf)
    bad = torch.isnan(cond) | torch.isnan(uncond) | (cond == math.inf) | (uncond == math.inf)
    return mixed.masked_fill(banned, -math.inf).masked_fill(bad, math.nan)


def invalid_rows_ref(z: torch.Tensor) -> torch.Tensor:
    """[..., V] -> bool [...]: rows with a NaN or +inf, or with every token -inf."""
    return torch.isnan(z).any(-1) | (z == math.inf).any(-1) | (z == -math.inf).all(-1)


def kept_mask_ref(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Which tokens survive top-k then top-p. z [R, V] scaled logits (valid rows) -> bool [R, V] (vocab order)."""
    num_tokens = z.shape[-1]
    sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)  # stable: equal z keep index order
    weights = torch.exp(sorted_z - sorted_z[:, :1]).double()
    keep = torch.ones_like(sorted_z, dtype=torch.bool)
    if 0 < top_k < num_tokens:
        keep[:, top_k:] = False
    if top_p < 1.0:
        weights = weights.masked_fill(~keep, 0.0)
        in_vocab_order = torch.zeros_like(weights).scatter_(-1, order, weights)
        total = in_vocab_order.cumsum(-1)[:, -1:]  # summed in vocabulary order, as the draw sums
        mass_through = weights.cumsum(-1)
        mass_before = torch.cat([torch.zeros_like(mass_through[:, :1]), mass_through[:, :-1]], dim=-1)
        keep &= mass_before < top_p * total
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def sample_rows_ref(
    x: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Sample one token per row. x [R, V] mixed logits (float32/float64), uniforms [R] in [0, 1) ->
    int64 [R] (INVALID_TOKEN for invalid rows)."""
    if temperature == 0:
        invalid = invalid_rows_ref(x)
        tokens = torch.where(invalid[:, None], 0.0, x).argmax(-1)  # argmax returns the first maximum
        return tokens.masked_fill(invalid, INVALID_TOKEN)
    z = x * inverse_temperature(temperature, x.dtype)
    invalid = invalid_rows_ref(z)
    z = torch.where(invalid[:, None], 0.0, z)
    kept = kept_mask_ref(z, top_k, top_p)
    weights = torch.exp(z - z.amax(-1, keepdim=True)).double().masked_fill(~kept, 0.0)
    mass_through = weights.cumsum(-1)
    threshold = uniforms.double() * mass_through[:, -1]
    drawable = weights > 0
    hits = drawable & (mass_through > threshold[:, None])
    last_drawable = x.shape[-1] - 1 - drawable.flip(-1).int().argmax(-1)
    tokens = torch.where(hits.any(-1), hits.int().argmax(-1), last_drawable)
    return tokens.masked_fill(invalid, INVALID_TOKEN)


def kept_distribution_ref(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_coef: float | None = None,
) -> torch.Tensor:
    """The distribution sample() draws from: logits [B or 2B, K, V] -> float64 probabilities [B, K, V]
    (the kept tokens' softmax renormalised over the kept set; one-hot at the argmax when temperature == 0)."""
    x = mixed_logits_ref(logits, cfg_coef)
    rows = x.reshape(-1, x.shape[-1])
    if temperature == 0:
        probs = torch.zeros_like(rows, dtype=torch.float64)
        probs.scatter_(-1, rows.argmax(-1, keepdim=True), 1.0)
        return probs.view(x.shape)
    z = rows * inverse_temperature(temperature, rows.dtype)
    kept = kept_mask_ref(z, top_k, top_p)
    weights = torch.exp(z - z.amax(-1, keepdim=True)).double().masked_fill(~kept, 0.0)
    return (weights / weights.sum(-1, keepdim=True)).view(x.shape)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sample_args(logits, temperature, top_k, top_p, cfg_coef, generator, uniforms) -> tuple[int, int]:
    """Validate sample()'s arguments (shapes, dtypes, ranges; no device sync). Returns (B, K)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape [B, K, V], got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor [B, K, V], got {logits.dtype}")
    if logits.dim() != 3 or min(logits.shape) < 1:
        raise ValueError(f"logits must have shape [B, K, V] with B, K, V >= 1, got shape {tuple(logits.shape)}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables top-k), got {top_k!r}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] (1 disables top-p), got {top_p!r}")
    rows = logits.shape[0]
    if cfg_coef is not None:
        if not _is_real(cfg_coef) or not math.isfinite(cfg_coef):
            raise ValueError(f"cfg_coef must be a finite number or None, got {cfg_coef!r}")
        if rows % 2:
            raise ValueError(
                f"with cfg_coef, logits must have an even number of rows [2B, K, V] (B conditional then B "
                f"unconditional), got shape {tuple(logits.shape)}"
            )
        rows //= 2
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if uniforms is not None:
        if not isinstance(uniforms, torch.Tensor) or uniforms.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"uniforms must be a float32/float64 tensor [B, K], got {getattr(uniforms, 'dtype', type(uniforms))}"
            )
        if tuple(uniforms.shape) != (rows, logits.shape[1]):
            raise ValueError(
                f"uniforms must have shape [B, K] = {(rows, logits.shape[1])}, got {tuple(uniforms.shape)}"
            )
        if uniforms.device != logits.device:
            raise ValueError(f"uniforms is on {uniforms.device} but logits is on {logits.device}: they must match")
    return rows, logits.shape[1]


def check_uniform_values(uniforms: torch.Tensor) -> None:
    """Caller-given uniforms must lie in [0, 1) (a device sync; skipped under torch.compile)."""
    if not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        raise ValueError("uniforms must lie in [0, 1)")


def raise_for_invalid_rows(tokens: torch.Tensor) -> None:
    """Raise if any row came back INVALID_TOKEN (a device sync; skipped under torch.compile)."""
    bad = (tokens == INVALID_TOKEN).nonzero()
    if bad.numel():
        b, k = bad[0].tolist()
        raise ValueError(
            f"logits row (b={b}, k={k}) (and {bad.shape[0] - 1} more) has no distribution to sample: it contains "
            f"NaN or +inf (before or after CFG/temperature scaling) or every token is -inf"
        )


def draw_uniforms(batch: int, num_codebooks: int, device, generator: torch.Generator | None) -> torch.Tensor:
    """u [B, K] float64 in [0, 1) from `generator` (None: torch's global generator, reproducible only through
    torch.manual_seed)."""
    return torch.rand((batch, num_codebooks), dtype=torch.float64, device=device, generator=generator)


def sample_ref(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_coef: float | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The PyTorch spec of mmdkernels.sample (same arguments, same tokens). Returns int64 [B, K]."""
    batch, num_codebooks = check_sample_args(logits, temperature, top_k, top_p, cfg_coef, generator, uniforms)
    compiling = torch.compiler.is_compiling()
    if uniforms is None:
        uniforms = draw_uniforms(batch, num_codebooks, logits.device, generator)
    elif not compiling:
        check_uniform_values(uniforms)
    x = mixed_logits_ref(logits.detach(), cfg_coef)
    tokens = sample_rows_ref(x.reshape(-1, x.shape[-1]), uniforms.reshape(-1), temperature, top_k, top_p)
    tokens = tokens.view(batch, num_codebooks)
    if not compiling:
        raise_for_invalid_rows(tokens)
    return tokens

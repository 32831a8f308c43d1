"""The one tolerance rule of the numeric tests (STYLE.md, Tests), and its table of floors per dtype.

A kernel is compared with the float64 reference (the spec, run on the same inputs) and judged against PyTorch's own
computation of the same maths in the kernel's dtype (the *baseline*: the reference run in float32 / bfloat16 /
float16). This is flash-attention's rule:

    max |actual - ref64|  <=  factor(kind) * max |baseline - ref64|  +  floor(dtype, kind) * scale

- factor 2 (FACTOR): the kernel may round twice as badly as PyTorch does on the same case (another summation order,
  another exp). Measured per case, so a case that PyTorch itself rounds badly (cancellation) gets room, a benign one
  does not. Gradients: 3 (GRADIENT_FACTOR). A fused kernel's backward is another algorithm than autograd through the
  forward (closed-form, expanded sums), not another order of the same sums, and where the gradient nearly cancels
  both float32 errors are rounding noise of the same size: the MMD kernels' error was 1.0-2.2x PyTorch's over seeds
  and ISA paths on the large dHSIC cases (1e-3..1e-2 of max |grad|), 2.6x on the AMD EPYC that failed a fitted
  tolerance, up to 3.1x on small cases (where the floor dominates).
- floor * scale: for the cases where the baseline happens to be (nearly) exact, e.g. a one-term sum or an output
  that rounds to the same value; `scale` is the size of the result (default max |ref64|) or, where terms cancel, the
  size of the terms before they cancel (the caller says which). The floors are a few roundings at that scale:

    dtype       forward                       gradient                       why
    float32     8 eps32 (9.5e-7)              64 eps32 (7.6e-6)              a few float32 roundings of the result;
                                                                             a backward pass chains several more
    bfloat16    u_bf16 + 8 eps32 (3.9e-3)     u_bf16 + 64 eps32              the kernels compute in float32 and
    float16     u_fp16 + 8 eps32 (4.9e-4)     u_fp16 + 64 eps32              round the output once (u = eps / 2)
    float64     256 eps64 (5.7e-14)           1024 eps64 (2.3e-13)           no higher precision to compare with:
                                                                             the floor alone bounds two float64 paths

  A kernel whose algorithm carries a documented extra error (the MMD bandwidth chain, mmdkernels/mmd/plan.py) adds
  it to the floor where it calls the rule, with the reason.

Nothing here is fitted to one machine: the baseline is re-measured on whatever CPU/BLAS/ISA runs the suite, and the
floors are multiples of the dtype's epsilon. Bitwise equality (torch.equal) is only for two runs of the SAME code path
(same op, same backend, same shapes), or for outputs that are exact by construction (codes on integer data, tokens
drawn from the same uniforms): another CPU, BLAS or ISA path rounds differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FACTOR = 2.0
GRADIENT_FACTOR = 3.0
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Floor:
    """Floors relative to the comparison's scale."""

    forward: float
    gradient: float


def _low_precision(dtype: torch.dtype) -> Floor:
    unit_roundoff = torch.finfo(dtype).eps / 2
    return Floor(forward=unit_roundoff + 8 * EPS32, gradient=unit_roundoff + 64 * EPS32)


FLOORS = {
    torch.float32: Floor(forward=8 * EPS32, gradient=64 * EPS32),
    torch.bfloat16: _low_precision(torch.bfloat16),
    torch.float16: _low_precision(torch.float16),
    torch.float64: Floor(forward=256 * EPS64, gradient=1024 * EPS64),
}


def table_floor(dtype: torch.dtype, kind: str = "forward") -> float:
    """The table's floor for results of `dtype`; kind "forward" or "gradient"."""
    if kind not in ("forward", "gradient"):
        raise ValueError(f"kind must be 'forward' or 'gradient', got {kind!r}")
    return getattr(FLOORS[dtype], kind)


def _as64(t) -> torch.Tensor:
    return torch.as_tensor(t).detach().to(device="cpu", dtype=torch.float64)


def max_error(a, b) -> float:
    """max |a - b| in float64 (NaN if either holds a NaN where the other does not)."""
    a, b = _as64(a), _as64(b)
    if a.numel() == 0:
        return 0.0
    return (a - b).abs().max().item()


def bound(ref64, baseline=None, *, dtype: torch.dtype, kind="forward", factor=None, floor_rel=None, scale=None):
    """The allowed max error: factor * max|baseline - ref64| + floor * scale, and its parts (for messages)."""
    factor = (GRADIENT_FACTOR if kind == "gradient" else FACTOR) if factor is None else factor
    ref = _as64(ref64)
    baseline_error = 0.0 if baseline is None else max_error(baseline, ref)
    if scale is None:
        scale = ref.abs().max().item() if ref.numel() else 0.0
    floor_rel = table_floor(dtype, kind) if floor_rel is None else floor_rel
    return factor * baseline_error + floor_rel * float(scale), factor, baseline_error, floor_rel, float(scale)


def assert_close_to_reference(
    actual,
    ref64,
    baseline=None,
    *,
    name: str,
    kind: str = "forward",
    dtype: torch.dtype | None = None,
    factor: float | None = None,
    floor: float | None = None,
    scale: float | None = None,
) -> float:
    """Asserts max|actual - ref64| <= factor * max|baseline - ref64| + floor * scale; returns the error.

    Args:
        actual: the kernel's result (any dtype; compared in float64).
        ref64: the reference on the same inputs, in float64.
        baseline: PyTorch's computation of the same maths in the kernel's dtype, on the same inputs. None only where
            the kernel's dtype is float64 itself (two float64 paths: the floor alone bounds them).
        name: what is compared, for the message ("cpp gradient", ...).
        kind: "forward" or "gradient" (which floor).
        dtype: the dtype whose floor applies (default: actual's dtype).
        factor, floor: the rule's factor and the floor relative to scale (default: FACTOR or GRADIENT_FACTOR for
            the kind, and the table's floor).
        scale: the size that the floor is relative to (default max|ref64|; pass the size of the summed terms where
            they cancel).
    """
    if isinstance(actual, torch.Tensor) and isinstance(ref64, torch.Tensor):
        assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} vs reference {tuple(ref64.shape)}"
    dtype = dtype or (actual.dtype if isinstance(actual, torch.Tensor) else torch.float64)
    if baseline is None and dtype != torch.float64:
        raise ValueError(f"{name}: a {dtype} result needs the baseline (PyTorch's own {dtype} computation)")
    allowed, factor, baseline_error, floor_rel, scale = bound(
        ref64, baseline, dtype=dtype, kind=kind, factor=factor, floor_rel=floor, scale=scale
    )
    error = max_error(actual, ref64)
    assert error <= allowed, (
        f"{name}: max error {error:.3g} against float64 > allowed {allowed:.3g} = {factor:g} x {baseline_error:.3g} "
        f"(PyTorch in {dtype}) + floor {floor_rel:.3g} x scale {scale:.3g}"
    )
    return error


def assert_codes_near_optimal(rows, codebooks, codes, *, name: str, factor: float | None = None) -> None:
    """Residual VQ codes from a kernel on float data, judged by the rule instead of by equality with one reference.

    Walking the kernel's own path (the residual its earlier codes leave), every code must be the nearest entry up to
    what rounding allows: score(code) - min score <= 2 * (factor * e32 + floor * scale), scores |c|^2 - 2 r.c in
    float64, e32 the error of PyTorch's float32 scores along the same path (max over rows and entries of the stage),
    scale max |score|. Twice the rule's bound: a kernel swaps two entries only if its errors on both scores add up to
    their gap. Exact ties (integer data) are the caller's to check with torch.equal.

    Args:
        rows: [N, D] the kernel's input rows as it saw them (low-precision inputs: upcast to float32 first).
        codebooks: [K, C, D] likewise.
        codes: int64 [N, K] the kernel's codes.
    """
    x32, books32 = rows.detach().cpu().float(), codebooks.detach().cpu().float()
    codes = codes.cpu()
    residual64, residual32 = x32.double(), x32.clone()
    for stage in range(books32.shape[0]):
        book32 = books32[stage]
        book64 = book32.double()
        scores64 = (book64 * book64).sum(1)[None, :] - 2.0 * residual64 @ book64.t()
        scores32 = (book32 * book32).sum(1)[None, :] - 2.0 * residual32 @ book32.t()
        chosen = codes[:, stage]
        gaps = scores64.gather(1, chosen[:, None])[:, 0] - scores64.min(dim=1).values
        allowed, factor, e32, floor_rel, scale = bound(scores64, scores32, dtype=torch.float32, factor=factor)
        worst = int(gaps.argmax()) if gaps.numel() else 0
        assert gaps.numel() == 0 or gaps[worst] <= 2 * allowed, (
            f"{name}: stage {stage}, row {worst}: code {int(chosen[worst])} scores {gaps[worst].item():.3g} above "
            f"the nearest entry > allowed 2 x ({factor:g} x {e32:.3g} (PyTorch float32 scores) + {floor_rel:.3g} x "
            f"{scale:.3g})"
        )
        residual64 = residual64 - book64[chosen]
        residual32 = residual32 - book32[chosen]

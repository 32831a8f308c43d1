"""Backend choice for every op, in one place: explicit `backend=`, else the environment, else the op's priority list
for the input's device and dtype (the measured speed tables live here too).

Providers: "reference" (the op's PyTorch spec), "cpp" (C++ CPU kernels), "cuda" (CUDA kernels), "triton", and the
torch-native ones some ops have: "sdpa" (decode_attention: torch's scaled_dot_product_attention) and "torch"
(decode_linear: F.linear). Each provider says why it cannot run an input (xformers-style `not_supported_reasons`,
plus the op's own reasons); an explicitly requested provider that cannot run raises with its reasons, and automatic
choice that falls back to the reference warns once with every faster provider's reasons.

Environment: MMDKERNELS_BACKEND_<OP> (e.g. MMDKERNELS_BACKEND_DECODE_ATTENTION=sdpa) forces one op and must name one
of its providers; MMDKERNELS_BACKEND forces every op that has the named provider (the others keep their automatic
choice). Either way a forced provider that cannot run the input raises, as `backend=` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmdkernels import _ext

PROVIDERS = ("reference", "cpp", "triton", "cuda", "sdpa", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV = "MMDKERNELS_BACKEND"
COMPILED = ("cpp", "cuda", "triton")


@dataclass(frozen=True)
class OpBackends:
    """An op's providers and its automatic order: priority(x) lists providers to try, fastest first."""

    providers: tuple[str, ...]
    priority: Callable[[torch.Tensor], tuple[str, ...]]
    # whether falling back to the reference for any reason warns once (the fused ops, where the reference is far
    # slower); False: only a missing build warns, a fallback by design (row counts, autograd) is silent
    warn_on_any_fallback: bool = True


def _fused_priority(x: torch.Tensor) -> tuple[str, ...]:
    return {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}.get(x.device.type, ("reference",))


# decode_attention: where torch's SDPA measured faster than the fused kernels (benchmarks/bench_attention*.py,
# docs/attention_kernels.md): on CPU for bfloat16 where the CPU has bfloat16 dot-product instructions (AVX512-BF16
# or AMX: oneDNN's bfloat16 GEMMs took 71-92 % of the C++ kernel's time on a Sapphire Rapids Xeon); without them
# (AVX2: an AMD EPYC Zen 3) SDPA's bfloat16 took 7-12x the C++ kernel's time at 1 thread (RESULTS.md, session 21). On
# an H200 (benchmarks/bench_attention_gpu.py, bfloat16, Dh = 64, caches of 250 and 1000 entries; RESULTS.md, session
# 18) the CUDA kernel took 0.55-0.65x SDPA's time up to 64 (sequence, head) rows, except 1.11-1.14x at 8 and 64
# rows with 250 entries, and 1.14-2.2x SDPA's time from 128 rows (B = 8 x 16 heads, 64 x 16): the CUDA kernel up to
# CUDA_KERNEL_MAX_ROWS rows at 2-byte dtypes (float16 by the same loads; float32 not measured: SDPA first).
def _cpu_has_bf16_dot() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX tiles), as torch reports them."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


SDPA_FASTER_ON_CPU = (torch.bfloat16,) if _cpu_has_bf16_dot() else ()
CUDA_KERNEL_MAX_ROWS = 64
CUDA_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _attention_priority(q: torch.Tensor) -> tuple[str, ...]:
    if q.dtype not in KERNEL_DTYPES:
        return ("reference",)  # float64: the spec itself
    if q.device.type == "cuda":
        if q.dtype in CUDA_KERNEL_DTYPES and q.shape[0] * q.shape[1] <= CUDA_KERNEL_MAX_ROWS:
            return ("cuda", "sdpa", "triton", "reference")
        return ("sdpa", "cuda", "triton", "reference")
    if q.device.type == "cpu":
        first = ("sdpa", "cpp") if q.dtype in SDPA_FASTER_ON_CPU else ("cpp", "sdpa")
        return (*first, "reference")
    return ("sdpa", "reference")


# decode_linear: the C++ few-row kernel streams each weight once where torch's GEMM packs it per call; at one row
# torch's GEMV does not pack either, and which is faster is measured once per process (mmdkernels/linear/one_row.py:
# level on the AVX-512 Xeon, the C++ kernel 1.5-1.8x at 2 threads on an AMD EPYC); on CUDA cuBLAS's GEMV streams once.
LINEAR_MAX_ROWS = 16  # the C++ kernel keeps all rows' accumulators in registers; larger batches are GEMMs


def linear_rows_prefer_torch(rows: int) -> bool:
    """Whether `rows` float32 CPU rows of a decode-step linear go to torch's F.linear rather than the C++ kernel (the
    rule the fused decode step, csrc/decode, is handed too)."""
    if rows > LINEAR_MAX_ROWS:
        return True
    if rows == 1:
        from mmdkernels.linear.one_row import one_row_uses_cpp

        return not (_ext.available("cpu") and one_row_uses_cpp())
    return False


def _linear_priority(x: torch.Tensor) -> tuple[str, ...]:
    rows = x.numel() // max(1, x.shape[-1])
    if x.device.type != "cpu" or linear_rows_prefer_torch(rows):
        return ("torch", "reference")
    return ("cpp", "torch", "reference")


def _quantized_linear_priority(x: torch.Tensor) -> tuple[str, ...]:
    """decode_linear with bf16/fp16/int8 weights (mmdkernels/linear/quantize.py) at 1 to 16 rows. CPU: the C++ kernel,
    one row included (torch has no GEMV on such weights: "torch" dequantises them, a full float32 copy, then calls
    F.linear). CUDA: the CUDA kernel, then Triton's, then "torch": measured on an H200 (benchmarks/bench_linear_gpu.py,
    32 weights of 4096 x 1024, RESULTS.md, session 18) the CUDA kernel took 0.33 / 0.34 / 0.53 / 0.75x the time of
    "torch" (bf16, 1 / 2 / 8 / 16 rows) and 0.70 / 0.59 / 0.68 / 0.49x Triton's (bf16), and was the fastest packed
    path at every row count and precision measured (int8 through "torch" was not). Larger batches are GEMMs: "torch"."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows > LINEAR_MAX_ROWS or x.device.type not in ("cpu", "cuda"):
        return ("torch", "reference")
    if x.device.type == "cuda":
        return ("cuda", "triton", "torch", "reference")
    return ("cpp", "torch", "reference")


def _cpu_float32_priority(x: torch.Tensor) -> tuple[str, ...]:
    return ("cpp", "reference") if x.device.type == "cpu" and x.dtype == torch.float32 else ("reference",)


OPS = {
    "mmd_loss": OpBackends(("reference", "cpp", "triton", "cuda"), _fused_priority),
    "rvq_encode": OpBackends(("reference", "cpp", "triton", "cuda"), _fused_priority),
    "rvq_decode": OpBackends(("reference", "cpp", "triton", "cuda"), _fused_priority),
    "sample": OpBackends(("reference", "cpp", "triton", "cuda"), _fused_priority),
    "decode_attention": OpBackends(("reference", "sdpa", "cpp", "triton", "cuda"), _attention_priority),
    "decode_linear": OpBackends(("reference", "torch", "cpp"), _linear_priority),
    "decode_linear_quantized": OpBackends(("reference", "torch", "cpp", "triton", "cuda"), _quantized_linear_priority),
    "decode_layers": OpBackends(("reference", "cpp"), _cpu_float32_priority, warn_on_any_fallback=False),
    "decode_logits": OpBackends(("reference", "cpp"), _cpu_float32_priority, warn_on_any_fallback=False),
}


def checking_values() -> bool:
    """Whether to run the data-dependent input checks (NaN/Inf, index ranges). Eagerly yes; inside torch.compile no:
    reading a value back would sync the device and break the graph (the compiled kernels still bound-check indices)."""
    return not torch.compiler.is_compiling()


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(backend: str, x: torch.Tensor, max_codebooks: int | None = None) -> list[str]:
    """Why provider `backend` cannot run on input x in general (empty list: it can); ops add their own reasons."""
    if backend not in PROVIDERS:
        raise ValueError(f"backend must be one of {PROVIDERS} or None, got {backend!r}")
    reasons = []
    if backend not in COMPILED:
        return reasons
    if x.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype}: the fused kernels take float32/bfloat16/float16 (use backend='reference')")
    if max_codebooks is not None and x.shape[1] > max_codebooks:
        reasons.append(f"K = {x.shape[1]} codebooks: the fused kernels support at most {max_codebooks}")
    if backend == "cpp":
        if x.device.type != "cpu":
            reasons.append(f"input on {x.device}: the C++ kernel runs on CPU tensors")
        elif not _ext.available("cpu"):
            reasons.append(_ext.load_error("cpu"))
    elif backend == "cuda":
        if x.device.type != "cuda":
            reasons.append(f"input on {x.device}: the CUDA kernel runs on CUDA tensors")
        elif not _ext.available("cuda"):
            reasons.append(_ext.load_error("cuda"))
    elif backend == "triton":
        if not _ext.triton_installed():
            reasons.append("triton is not installed")
        elif x.device.type == "cpu" and not triton_interpreter_enabled():
            reasons.append("input on cpu: Triton runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"input on {x.device}: Triton runs on CUDA tensors")
    return reasons


def _warns(spec: OpBackends, reasons: list[str]) -> bool:
    if spec.warn_on_any_fallback:
        return bool(reasons)
    unbuilt = {_ext.load_error("cpu"), _ext.load_error("cuda")} - {""}
    return any(reason.split(": ", 1)[-1] in unbuilt for reason in reasons)


def env_backend(op: str) -> str | None:
    """The provider the environment forces for `op`, or None."""
    spec = OPS[op]
    per_op = f"{ENV}_{op.upper()}"
    forced = os.environ.get(per_op) or None
    if forced is not None:
        if forced not in spec.providers:
            raise ValueError(f"{per_op}={forced!r}: {op} has the backends {spec.providers}")
        return forced
    forced = os.environ.get(ENV) or None
    if forced is not None and forced not in PROVIDERS:
        raise ValueError(f"{ENV}={forced!r}: expected one of {PROVIDERS}")
    return forced if forced in spec.providers else None


def choose_backend(
    x: torch.Tensor,
    requested: str | None,
    op: str,
    max_codebooks: int | None = None,
    op_reasons: Callable[[str], list[str]] | None = None,
) -> str:
    """The provider that will run `op` on x.

    Args:
        x: the op's main input (its device and dtype decide).
        requested: the caller's `backend=` argument, or None.
        op: a key of OPS.
        max_codebooks: the fused kernels' codebook limit, checked on x.shape[1].
        op_reasons: the op's own reasons a provider cannot run this input (e.g. too many rows), or None.
    """
    spec = OPS[op]
    if requested is not None and requested not in spec.providers:
        raise ValueError(f"{op}: backend must be one of {spec.providers} or None, got {requested!r}")
    requested = requested or env_backend(op)

    def reasons_for(backend: str) -> list[str]:
        extra = op_reasons(backend) if op_reasons is not None else []
        return not_supported_reasons(backend, x, max_codebooks) + extra

    if requested is not None:
        reasons = reasons_for(requested)
        if reasons:
            raise RuntimeError(f"{op}: backend {requested!r} cannot run this input: " + "; ".join(reasons))
        return requested
    all_reasons = []
    for backend in spec.priority(x):
        reasons = reasons_for(backend)
        if not reasons:
            if backend == "reference" and x.dtype in KERNEL_DTYPES and _warns(spec, all_reasons):
                _ext.warn_once(
                    f"{op}-{x.device.type}",
                    f"{op}: no fused kernel available for {x.device.type} input, using the PyTorch reference "
                    f"(slower{', O(N^2) memory' if op == 'mmd_loss' else ''}). Reasons: " + "; ".join(all_reasons),
                )
            return backend
        all_reasons += [f"{backend}: {r}" for r in reasons]
    raise RuntimeError(f"{op}: no backend can run this input: " + "; ".join(all_reasons))

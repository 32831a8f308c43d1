"""MKL's GEMM with the B operand packed per call (torch.mm) vs packed once (cblas_sgemm_pack / cblas_sgemm_compute,
which torch's x86 CPU library exports), on the tile products of the CPU shuffle MMD at N = 8192 (RESULTS.md).

    python benchmarks/gemm_packed_ab.py 2      # threads

Shapes: the forward dot tile (256 rows of x against a 4096-row column block, D = 512) and the gradient's row side
(weights [256, 4096] @ column block [4096, 512]); the column side for reference (no packed form tried). Minimum of 20
calls each, after one warm-up. A scratch measurement for issue 14: nothing in the library uses the packed API yet.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import torch

ROW_MAJOR, NO_TRANS, TRANS, PACKED, B_MATRIX = 101, 111, 112, 151, 162


def _mkl() -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    if not hasattr(lib, "cblas_sgemm_pack"):
        raise SystemExit("this torch build exports no cblas_sgemm_pack (not MKL)")
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    lib.cblas_sgemm_pack_get_size.argtypes = [ctypes.c_int] * 4
    lib.cblas_sgemm_pack.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    lib.cblas_sgemm_compute.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return lib


def _best(fn, calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _packed_case(lib, label: str, m: int, n: int, k: int, a: torch.Tensor, b: torch.Tensor, b_trans: bool) -> None:
    """out [m, n] = a [m, k] @ B, B = b.t() (b [n, k]) when b_trans else b [k, n]."""
    out, out_packed = torch.empty(m, n), torch.empty(m, n)
    t_mm = _best(lambda: torch.mm(a, b.t() if b_trans else b, out=out))
    buf = torch.empty(lib.cblas_sgemm_pack_get_size(B_MATRIX, m, n, k) // 4 + 16)
    ld_b = k if b_trans else n

    def pack():
        lib.cblas_sgemm_pack(
            ROW_MAJOR, B_MATRIX, TRANS if b_trans else NO_TRANS, m, n, k, 1.0, b.data_ptr(), ld_b, buf.data_ptr()
        )

    t_pack = _best(pack)
    t_compute = _best(
        lambda: lib.cblas_sgemm_compute(
            ROW_MAJOR, NO_TRANS, PACKED, m, n, k, a.data_ptr(), k, buf.data_ptr(), n, 0.0, out_packed.data_ptr(), n
        )
    )
    flops = 2.0 * m * n * k
    print(
        f"{label}: torch.mm {t_mm * 1e3:.3f} ms ({flops / t_mm / 1e9:.0f} GFLOP/s), packed B {t_compute * 1e3:.3f} ms "
        f"({flops / t_compute / 1e9:.0f} GFLOP/s, {t_mm / t_compute:.2f}x), packing B once {t_pack * 1e3:.3f} ms, "
        f"max |diff| {(out - out_packed).abs().max().item():.1e}"
    )


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    torch.set_num_threads(threads)
    lib = _mkl()
    torch.manual_seed(0)
    print(f"{threads} threads")
    _packed_case(
        lib,
        "forward dots [256x512] @ [4096x512]^T",
        256,
        4096,
        512,
        torch.randn(256, 512),
        torch.randn(4096, 512),
        True,
    )
    _packed_case(
        lib,
        "gradient rows [256x4096] @ [4096x512]",
        256,
        512,
        4096,
        torch.randn(256, 4096),
        torch.randn(4096, 512),
        False,
    )
    wt, a = torch.randn(256, 4096).t(), torch.randn(256, 512)
    out = torch.empty(4096, 512)
    t_mm = _best(lambda: torch.mm(wt, a, out=out))
    print(
        f"gradient columns [256x4096]^T @ [256x512]: torch.mm {t_mm * 1e3:.3f} ms "
        f"({2.0 * 4096 * 512 * 256 / t_mm / 1e9:.0f} GFLOP/s)"
    )


if __name__ == "__main__":
    main()

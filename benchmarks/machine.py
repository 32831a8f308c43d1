"""What a CPU benchmark ran on: the CPU (model, vendor), the GEMM path the C++ kernels chose, and the machine's best
bare float32 GEMM speed (max over the MKL and oneDNN providers and torch.mm, issue 14's definition; our own packed
GEMM is timed beside them but not counted), so that a kernel's time can be read as a multiple of the bare products it
replaces, on Intel and AMD alike.

    python -m benchmarks.machine [rounds]     # the bare GEMM table of issue 14 on this machine
"""

from __future__ import annotations

import functools
import sys
import time

import torch

from mmdkernels import _ext

GEMM_TABLE_SHAPES = [(8192, 8192, 512), (1024, 8192, 512), (2048, 2048, 512), (512, 2048, 128)]  # M x N x K
BEST_GEMM_SHAPE = (2048, 2048, 512)  # the machine-level figure every benchmark records


@functools.cache
def cpu_model() -> dict:
    """{"cpu_model": "AMD EPYC 9B45", "cpu_vendor": "AuthenticAMD"} from /proc/cpuinfo ("unknown" elsewhere)."""
    fields = {"model name": "unknown", "vendor_id": "unknown"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in fields and fields[key.strip()] == "unknown":
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    return {"cpu_model": fields["model name"], "cpu_vendor": fields["vendor_id"]}


def providers() -> list[str]:
    """The GEMM providers of the C++ kernels available here ([] without the C++ library)."""
    if not _ext.available("cpu"):
        return []
    from mmdkernels.gemm import gemm_path

    return ["mkl", "onednn", "own"] if gemm_path()["onednn_available"] else ["mkl", "own"]


def bare_gemm_gflops(m: int, n: int, k: int, rounds: int = 3) -> dict[str, float]:
    """GFLOP/s of a [m, k] @ [n, k]^T float32 product per provider, interleaved (A, B, A, B, ...), fastest round each.

    Returns:
        {"mkl": x, "onednn": y, "own": z} (the providers available), with torch's own `a @ b.t()` as "torch.mm".
    """
    from mmdkernels.gemm import gemm_mm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    calls = {name: functools.partial(gemm_mm, a, b.t(), name) for name in providers()}
    calls["torch.mm"] = lambda: a @ b.t()
    best = {name: float("inf") for name in calls}
    for name, call in calls.items():  # warm-up: oneDNN builds its kernel on the first call
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 2.0 * m * n * k / seconds / 1e9 for name, seconds in best.items()}


@functools.cache
def best_gemm_gflops(m: int, n: int, k: int) -> float:
    """The best bare GEMM speed at this shape: max over the libraries' providers (MKL, oneDNN, torch.mm), GFLOP/s.
    Our own packed GEMM is left out: it is one of the kernels' paths, not a bare product they are measured against."""
    return max(gflops for name, gflops in bare_gemm_gflops(m, n, k).items() if name != "own")


def gemm_chosen() -> dict:
    """The C++ kernels' GEMM mode and the providers its measured choices picked so far (empty before any kernel)."""
    if not _ext.available("cpu"):
        return {"gemm_mode": "none", "gemm_chosen": []}
    from mmdkernels.gemm import gemm_path

    report = gemm_path()
    if report["mode"] != "auto":
        return {"gemm_mode": report["mode"], "gemm_chosen": [report["mode"]]}
    return {"gemm_mode": "auto", "gemm_chosen": sorted({c["chosen"] for c in report["choices"]})}


def linear_blocking_chosen() -> dict:
    """How many shapes the few-row linear kernel measured so far ran on each weight-row blocking (blocking.h)."""
    if not _ext.available("cpu"):
        return {}
    from mmdkernels.linear.ops import blocking_choices

    chosen = [c["chosen"] for c in blocking_choices()]
    return {f"linear_blocking_{b}": chosen.count(b) for b in ("wide", "spread", "single", "segments")}


def linear_tile_paths() -> dict:
    """The AMX tile paths the few-row linear takes on this CPU ("bf16", "int8"; linear_amx.h, linear_amx_int8.h)."""
    if not _ext.available("cpu"):
        return {}
    from mmdkernels.linear.ops import tile_paths

    return {"linear_tile_paths": ",".join(tile_paths()) or "none"}


def dhsic_tile_chosen() -> dict:
    """The C++ dHSIC's measured distance-tile choices so far, as "kernel/schedule" (e.g. "gemm/per-thread")."""
    if not _ext.available("cpu"):
        return {}
    from mmdkernels.mmd.ops import dhsic_tile_choices

    return {"dhsic_tile_chosen": sorted({f"{c['chosen']}/{c['schedule']}" for c in dhsic_tile_choices()})}


def machine_info() -> dict:
    """The fields every CPU benchmark records in extra_info."""
    info = dict(
        cpu_model(),
        **gemm_chosen(),
        **linear_blocking_chosen(),
        **linear_tile_paths(),
        **dhsic_tile_chosen(),
        threads=torch.get_num_threads(),
    )
    if providers():
        info["best_bare_gemm_gflops"] = round(best_gemm_gflops(*BEST_GEMM_SHAPE), 1)
        info["best_bare_gemm_shape"] = "x".join(map(str, BEST_GEMM_SHAPE))
    return info


def time_vs_bare_products(seconds: float, flops: float, shape: tuple[int, int, int]) -> dict:
    """A kernel's time as a multiple of the bare products it replaces (`flops` of them, run at the best speed this
    machine reaches at `shape`, M x N x K)."""
    gflops = best_gemm_gflops(*shape)
    bare = flops / gflops / 1e9
    return {
        "bare_products_gflops": round(gflops, 1),
        "bare_products_ms": round(bare * 1e3, 2),
        "time_vs_bare_products": round(seconds / bare, 2),
    }


def main(rounds: int = 3) -> None:
    print(cpu_model(), f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
    names = providers() + ["torch.mm"]
    print("| M x N x K | " + " | ".join(f"{name} GFLOP/s" for name in names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for shape in GEMM_TABLE_SHAPES:
        speeds = bare_gemm_gflops(*shape, rounds=rounds)
        print(f"| {' x '.join(map(str, shape))} | " + " | ".join(f"{speeds[name]:.0f}" for name in names) + " |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)

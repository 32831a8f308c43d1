"""Few-row linear layers of a decode step on the CPU: mmdkernels.decode_linear (C++, weights streamed once; stored in
float32, bfloat16 or int8 with per-output-channel scales) vs F.linear (torch's GEMM, which packs the weight panel
on every call), and the memory floor: a `.sum()` over a float32 buffer as large as the weights.

One round multiplies M rows by a model's worth of weight matrices: 32 matrices of 2048 x 512 (128 MiB in float32, the
linear layers of the d = 512, 8-layer decoder of bench_decode.py), more than the L2 caches hold, as in a real decode
step (a server CPU's L3 may hold them: then the floor is the L3's bandwidth, and the sum measures it). Reported: ms
per round, the weight bytes streamed per second (GB/s), and the time against the floor for the same bytes, measured
in the same test right after. M = 16 is classifier-free guidance at B = 8: its GB/s against M = 8's is the CFG
target (>= 0.9). Threads: MMDKERNELS_BENCH_THREADS (default 1, as bench_decode.py). CI size: 4 matrices.
MMDKERNELS_LINEAR_AMX=0 keeps bf16/int8 weights off the AMX tiles (csrc/linear/linear_amx.h) on CPUs that have them;
benchmarks/linear_kernel_ab.sh times the kernels without torch, against an older commit's, interleaved."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

import mmdkernels
from benchmarks.conftest import FULL
from mmdkernels.linear import decode_linear_ref, pack_decode_weight

MATRICES = 32 if FULL else 4
OUT_FEATURES, IN_FEATURES = 2048, 512
THREADS = int(os.environ.get("MMDKERNELS_BENCH_THREADS", "1"))
ROUNDS = 20 if FULL else 5
# provider -> (weight precision, function of (x, packed weight))
PROVIDERS = {
    "cpp-fp32": ("fp32", lambda x, w: mmdkernels.decode_linear(x, w, backend="cpp")),
    "cpp-bf16": ("bf16", lambda x, w: mmdkernels.decode_linear(x, w, backend="cpp")),
    "cpp-int8": ("int8", lambda x, w: mmdkernels.decode_linear(x, w, backend="cpp")),
    "torch-fp32": ("fp32", lambda x, w: F.linear(x, w)),
}


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(OUT_FEATURES, IN_FEATURES, generator=g) for _ in range(MATRICES)]


@pytest.fixture(scope="module")
def packed(weights):
    return {precision: [pack_decode_weight(w, precision) for w in weights] for precision in ("fp32", "bf16", "int8")}


def _nbytes(w) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes


def bandwidth_info(provider: str, precision: str, rows: int, nbytes: int, best: float, floor: float) -> dict:
    """extra_info of a weight-streaming case: weights' size, GB/s against the floor's (one read of as many bytes)."""
    return dict(
        provider=provider,
        precision=precision,
        rows=rows,
        weight_mib=round(nbytes / 2**20, 2),
        weight_gb_per_s=round(nbytes / best / 1e9, 2),
        floor_gb_per_s=round(nbytes / floor / 1e9, 2),
        vs_floor=round(best / floor, 2),
    )


def _floor_seconds(nbytes: int) -> float:
    """The best of a few `.sum()`s over a float32 buffer of nbytes: the time to read that many bytes once."""
    buffer = torch.ones(max(1, nbytes // 4))
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return best


def _with_threads(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.no_grad():
            return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_decode_linear(benchmark, packed, provider, rows):
    benchmark.group = f"decode-linear-M{rows}-{MATRICES}x{OUT_FEATURES}x{IN_FEATURES}"
    precision, linear = PROVIDERS[provider]
    ws = packed[precision]
    x = torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    outputs = _with_threads(
        lambda: benchmark.pedantic(lambda: [linear(x, w) for w in ws], rounds=ROUNDS, warmup_rounds=2, iterations=1)
    )
    for y, w in zip(outputs, ws):  # against the spec on the same (packed) weights
        torch.testing.assert_close(y, decode_linear_ref(x, w), rtol=1e-4, atol=1e-4)
    nbytes = sum(_nbytes(w) for w in ws)
    floor = _with_threads(lambda: _floor_seconds(nbytes))
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(
        bandwidth_info(provider, precision, rows, nbytes, best, floor),
        threads=THREADS,
        cpu_capability=mmdkernels.cpu_capability(),
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_memory_floor(benchmark, packed, precision):
    """The floor of every group above: one `.sum()` over a float32 buffer of the weights' bytes in `precision`."""
    benchmark.group = f"decode-linear-floor-{MATRICES}x{OUT_FEATURES}x{IN_FEATURES}"
    nbytes = sum(_nbytes(w) for w in packed[precision])
    buffer = torch.ones(nbytes // 4)
    _with_threads(lambda: benchmark.pedantic(buffer.sum, rounds=ROUNDS, warmup_rounds=2, iterations=1))
    benchmark.extra_info.update(
        provider="sum",
        precision=precision,
        weight_mib=round(nbytes / 2**20, 2),
        weight_gb_per_s=round(nbytes / benchmark.stats.stats.min / 1e9, 2),
        threads=THREADS,
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_rows_16_vs_8(benchmark, packed, precision):
    """The CFG target on a busy machine: 8 and 16 rows through the C++ kernel timed in turn, round by round (the
    same load for both); extra_info: 16 rows' bandwidth against 8 rows' from the best round of each (target >= 0.9)."""
    benchmark.group = f"decode-linear-16-vs-8-{MATRICES}x{OUT_FEATURES}x{IN_FEATURES}"
    ws = packed[precision]
    g = torch.Generator().manual_seed(1)
    xs = {rows: torch.randn(rows, IN_FEATURES, generator=g) for rows in (8, 16)}
    seconds = {8: [], 16: []}

    def round_pair():
        for rows, x in xs.items():
            start = time.perf_counter()
            for w in ws:
                mmdkernels.decode_linear(x, w, backend="cpp")
            seconds[rows].append(time.perf_counter() - start)

    _with_threads(lambda: benchmark.pedantic(round_pair, rounds=ROUNDS, warmup_rounds=1, iterations=1))
    nbytes = sum(_nbytes(w) for w in ws)
    best = {rows: min(times[1:]) for rows, times in seconds.items()}  # the first entry: warm-up
    benchmark.extra_info.update(
        precision=precision,
        gb_per_s_8_rows=round(nbytes / best[8] / 1e9, 2),
        gb_per_s_16_rows=round(nbytes / best[16] / 1e9, 2),
        bandwidth_16_vs_8=round(best[8] / best[16], 3),
        threads=THREADS,
        cpu_capability=mmdkernels.cpu_capability(),
    )

"""One row of float32 (a B = 1 decode step): the C++ few-row kernel or torch's GEMV, chosen by measurement.

At one row torch's F.linear does not pack the weight (it is a GEMV), so it streams each weight once, as the C++
kernel does; which is faster depends on the machine: on the 2-core AVX-512 Xeon MKL's GEMV streamed at the memory's
speed, on a 2-core AMD EPYC (Zen 3) it ran on one thread only (~10 GB/s against the C++ kernel's 15-18 GB/s at 2
threads; benchmarks/RESULTS.md, session 8). So the first one-row float32 linear of a process (per thread count) times
both on weights larger than a typical L3 (so that they stream from memory, as a decode step's do), interleaved,
fastest of three rounds each, and keeps the faster; the C++ kernel only when more than 5 % ahead, so that noise on a
machine where the two are level does not flip it.

``MMDKERNELS_LINEAR_ONE_ROW=auto|cpp|torch`` forces the choice (read at each call); ``MMDKERNELS_GEMM_VERBOSE=1``
prints each measurement. :func:`one_row_choices` reports them.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from mmdkernels._ext import constant_under_compile

ENV = "MMDKERNELS_LINEAR_ONE_ROW"
MODES = ("auto", "cpp", "torch")
MEASURE_SHAPE = (4096, 1024)  # out x in features of one weight: a 1024-wide model's FFN
MEASURE_WEIGHTS = 4  # 4 x 16 MiB: past a 32 MiB L3
MARGIN = 1.05
# The C++ kernel's first calls of a shape time its weight-row blockings in turn (csrc/linear/blocking.h: 4 blockings x
# 8 calls); these calls settle that choice first, so that the comparison times the blocking the model will run.
BLOCKING_CALLS = 4 * 8
_choices: dict[int, dict] = {}


def mode() -> str:
    """The forced mode from MMDKERNELS_LINEAR_ONE_ROW ("auto" when unset); ValueError naming the allowed values."""
    value = os.environ.get(ENV, "auto") or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def _measure(threads: int) -> dict:
    from mmdkernels.linear import ops

    kernel = ops.small_batch_linear_op()
    out_features, in_features = MEASURE_SHAPE
    weights = [torch.full((out_features, in_features), 0.5) for _ in range(MEASURE_WEIGHTS)]
    x = torch.full((1, in_features), 0.25)
    calls = {
        "cpp": lambda w: kernel(x, w, None, False),
        "torch": lambda w: torch.nn.functional.linear(x, w),
    }
    best = dict.fromkeys(calls, float("inf"))
    with torch.no_grad():
        for i in range(BLOCKING_CALLS):
            calls["cpp"](weights[i % MEASURE_WEIGHTS])
        for name, call in calls.items():  # warm-up
            call(weights[0])
        for _ in range(3):
            for name, call in calls.items():
                start = time.perf_counter()
                for w in weights:
                    call(w)
                best[name] = min(best[name], time.perf_counter() - start)
    nbytes = 4 * out_features * in_features * MEASURE_WEIGHTS
    gb_per_s = {name: nbytes / seconds / 1e9 for name, seconds in best.items()}
    chosen = "cpp" if gb_per_s["cpp"] > MARGIN * gb_per_s["torch"] else "torch"
    choice = {"threads": threads, "chosen": chosen, "gb_per_s": {k: round(v, 2) for k, v in gb_per_s.items()}}
    if os.environ.get("MMDKERNELS_GEMM_VERBOSE") == "1":
        print(
            f"mmdkernels linear one row ({threads} threads): cpp {gb_per_s['cpp']:.1f}, torch {gb_per_s['torch']:.1f} "
            f"GB/s -> {chosen}",
            file=sys.stderr,
        )
    return choice


@constant_under_compile
def one_row_uses_cpp() -> bool:
    """Whether a one-row float32 CPU linear runs the C++ kernel (forced, or measured once per thread count)."""
    forced = mode()
    if forced != "auto":
        return forced == "cpp"
    threads = torch.get_num_threads()
    if threads not in _choices:
        _choices[threads] = _measure(threads)
    return _choices[threads]["chosen"] == "cpp"


def one_row_choices() -> list[dict]:
    """The measurements so far: [{"threads", "chosen": "cpp" | "torch", "gb_per_s": {"cpp": x, "torch": y}}]."""
    return list(_choices.values())

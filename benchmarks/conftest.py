"""Benchmark sizes: small in CI (MMDKERNELS_BENCH=ci, the default), the issue's sizes with MMDKERNELS_BENCH=full;
every CPU benchmark records the machine (benchmarks/machine.py) in its extra_info."""

import os

import pytest
import torch

FULL = os.environ.get("MMDKERNELS_BENCH", "ci") == "full"


def pytest_report_header(config):
    return [
        f"benchmark sizes: {'full' if FULL else 'ci (set MMDKERNELS_BENCH=full for the issue sizes)'}",
        f"torch threads: {torch.get_num_threads()}",
    ]


def pytest_collection_modifyitems(config, items):
    """Full-size benchmarks run for many minutes: no global per-test timeout there (pyproject's guards CI sizes)."""
    if FULL:
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(0))


@pytest.fixture(autouse=True)
def _record_machine(request):
    """Every CPU benchmark records the CPU, the GEMM path the C++ kernels chose and the machine's best bare GEMM
    speed (benchmarks/machine.py); filled in after the test, so the path reflects the choices its kernels made."""
    yield
    benchmark = request.node.funcargs.get("benchmark")
    if benchmark is not None and "_gpu" not in request.node.module.__name__:
        from benchmarks.machine import machine_info

        for key, value in machine_info().items():  # what the test recorded itself wins (its own thread count)
            benchmark.extra_info.setdefault(key, value)

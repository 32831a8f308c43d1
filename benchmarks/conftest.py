"""Benchmark sizes: small in CI (MMDKERNELS_BENCH=ci, the default), the issue's sizes with MMDKERNELS_BENCH=full."""

import os

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
        import pytest

        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(0))

"""Test-wide setup: Triton runs under its interpreter on machines without a GPU (set before triton is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    from mmdkernels import _ext

    cpu = "loaded" if _ext.cpu_extension() is not None else _ext.load_error("cpu")
    return [
        f"torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}",
        f"mmdkernels C++ extension: {cpu}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
    ]


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def single_thread():
    """Tiny models (the LM tests): extra threads only add synchronisation (10x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

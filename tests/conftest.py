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


@pytest.fixture(params=["mkl", "onednn", "own"])
def each_gemm_path(request):
    """Runs a module's tests once per GEMM provider of the C++ CPU kernels (mmdkernels.gemm), forced. Without the C++
    library the module runs once ("mkl", nothing to force) and "onednn" skips, as it does on a torch without it."""
    from mmdkernels import _ext

    if not _ext.available("cpu"):
        if request.param != "mkl":
            pytest.skip(reason="the C++ CPU library is not built: no GEMM path to force")
        yield None
        return
    from mmdkernels.gemm import forced_gemm_path, gemm_path

    if request.param == "onednn" and not gemm_path()["onednn_available"]:
        pytest.skip(reason="this torch has no oneDNN matmul")
    with forced_gemm_path(request.param):
        yield request.param


def _force_tile_kernel(param: str, env_var: str, monkeypatch):
    """Yields with a C++ tile-kernel choice forced: param "gemm-mkl" / "gemm-onednn" / "gemm-own" (the GEMM tile on
    that provider) or "fused" (our micro-kernel), through env_var (read by the library at every call)."""
    from mmdkernels import _ext

    kernel, _, gemm = param.partition("-")
    if not _ext.available("cpu") and param != "gemm-mkl":
        pytest.skip(reason="the C++ CPU library is not built: no tile kernel to force")
    monkeypatch.setenv(env_var, kernel)
    if not gemm or not _ext.available("cpu"):
        yield param
        return
    from mmdkernels.gemm import forced_gemm_path, gemm_path

    if gemm == "onednn" and not gemm_path()["onednn_available"]:
        pytest.skip(reason="this torch has no oneDNN matmul")
    with forced_gemm_path(gemm):
        yield param


@pytest.fixture(params=["gemm-mkl", "gemm-onednn", "gemm-own", "fused"])
def each_rvq_path(request, monkeypatch):
    """Runs a module's tests once per tile kernel of the C++ RVQ encoder (MMDKERNELS_RVQ_TILE), forced: the score
    tile on each GEMM provider, and the micro-kernel with the argmin fused (csrc/rvq/rvq_fused.h)."""
    yield from _force_tile_kernel(request.param, "MMDKERNELS_RVQ_TILE", monkeypatch)


@pytest.fixture(params=["gemm-mkl", "gemm-onednn", "gemm-own", "fused"])
def each_dhsic_tile(request, monkeypatch):
    """Runs a module's tests once per distance-tile kernel of the C++ dHSIC (MMDKERNELS_MMD_TILE), forced: the GEMM
    tile on each provider, and the micro-kernel with the distance epilogue fused (csrc/mmd/gram_fused.h)."""
    yield from _force_tile_kernel(request.param, "MMDKERNELS_MMD_TILE", monkeypatch)

"""The CPU kernels' GEMM (csrc/gemm, mmdkernels/gemm.py): every provider against float64 on odd shapes, layouts and
strided operands; our packed kernel across its blocking and thread counts; the auto choice and its report;
MMDKERNELS_GEMM errors; oneDNN really running oneDNN.
(tests/test_rvq.py and tests/test_mmd.py run their kernels with each provider forced: the each_gemm_path fixture.)"""

import os
import platform
import subprocess
import sys

import pytest
import torch
from subprocess_util import run
from tolerances import assert_close_to_reference

import mmdkernels
from mmdkernels import _ext
from mmdkernels.gemm import GEMM_ENV, forced_gemm_path, gemm_mm, gemm_path, set_gemm_path

pytestmark = pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ CPU library is not built")


def providers() -> list[str]:
    """The providers this torch and CPU have (oneDNN is absent from some builds and refuses CPUs without AVX-512)."""
    if not _ext.available("cpu"):
        return ["mkl"]
    return ["mkl", "onednn", "own"] if gemm_path()["onednn_available"] else ["mkl", "own"]


def operand(rows, cols, layout, g):
    """A float32 [rows, cols] operand: "n" row-major, "t" a transposed view, "s" rows strided inside a wider one,
    "x" no unit stride at all."""
    if layout == "t":
        return torch.randn(cols, rows, generator=g).t()
    if layout == "x":
        return torch.randn(2 * rows, 3 * cols, generator=g)[::2, ::3]
    if layout == "s":
        return torch.randn(rows, cols + 5, generator=g)[:, 2 : 2 + cols]
    return torch.randn(rows, cols, generator=g)


SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 2), (3, 4, 1), (17, 31, 13), (64, 97, 128), (257, 130, 67)]


@pytest.mark.parametrize("provider", ["mkl", "onednn", "own"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layouts", ["nn", "nt", "tn", "tt", "sn", "st", "ns"])
def test_provider_matches_float64(provider, shape, layouts, seeded):
    if provider not in providers():
        pytest.skip(reason="this torch has no oneDNN matmul")
    m, n, k = shape
    a, b = operand(m, k, layouts[0], seeded), operand(k, n, layouts[1], seeded)
    out = gemm_mm(a, b, provider)
    ref64 = a.double() @ b.double()
    assert_close_to_reference(out, ref64, a @ b, name=f"{provider} {layouts} {shape}", scale=(a.abs() @ b.abs()).max())


# past every block of csrc/gemm/packed_gemm.h (depth 256, rows 120 / 240, columns 512) with ragged edges
BLOCKED_SHAPES = [(7, 2100, 300), (301, 45, 513), (150, 2049, 257)]


@pytest.mark.parametrize("shape", BLOCKED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layouts", ["nn", "nt", "tn", "xx"])
def test_own_kernel_across_its_blocks_matches_float64(shape, layouts, seeded):
    m, n, k = shape
    a, b = operand(m, k, layouts[0], seeded), operand(k, n, layouts[1], seeded)
    out = gemm_mm(a, b, "own")
    ref64 = a.double() @ b.double()
    assert_close_to_reference(out, ref64, a @ b, name=f"own {layouts} {shape}", scale=(a.abs() @ b.abs()).max())


def test_own_kernel_is_the_same_bits_at_every_thread_count(seeded):
    """Threads take whole column panels and every element sums in the same order: 1, 2 and 3 threads agree bit for
    bit (the MMD and RVQ results must not depend on the thread count)."""
    a, b = torch.randn(200, 300, generator=seeded), torch.randn(900, 300, generator=seeded).t()
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(gemm_mm(a, b, "own"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_empty_and_zero_depth_products():
    for provider in providers():
        assert gemm_mm(torch.randn(0, 3), torch.randn(3, 4), provider).shape == (0, 4)
        assert torch.equal(gemm_mm(torch.randn(2, 0), torch.randn(0, 4), provider), torch.zeros(2, 4))


def same_class(choice) -> bool:
    """Whether a reported choice is the shape class of a [300, 64] @ [64, 200]^T product at top level."""
    m, n, k = choice["m"], choice["n"], choice["k"]
    top_level = choice["threads"] == torch.get_num_threads()
    return choice["layout"] == "nt" and 256 < m <= 512 and 128 < n <= 256 and 32 < k <= 64 and top_level


def test_auto_measures_once_per_shape_class_and_reports(seeded):
    with forced_gemm_path("auto"):
        a, b = torch.randn(300, 64, generator=seeded), torch.randn(200, 64, generator=seeded)
        out = gemm_mm(a, b.t())
        assert_close_to_reference(out, a.double() @ b.double().t(), a @ b.t(), name="auto")
        choices = [c for c in gemm_path()["choices"] if same_class(c)]
        assert len(choices) == 1, gemm_path()
        assert (choices[0]["m"], choices[0]["n"], choices[0]["k"]) == (300, 200, 64)
        gemm_mm(a[:290], b[:190].t())  # same shape class: no new measurement
        assert len([c for c in gemm_path()["choices"] if same_class(c)]) == 1
    choice = choices[0]
    assert choice["gflops"]["mkl"] > 0
    assert (choice["gflops"]["onednn"] > 0) == ("onednn" in providers())
    assert choice["gflops"]["own"] > 0
    margin = 1.1  # csrc/gemm/choice_cpu.cpp: another provider must beat MKL by 10 %
    gflops = choice["gflops"]
    best_other = max(("onednn", "own"), key=lambda p: (gflops[p], p == "own"))
    assert choice["chosen"] == (best_other if gflops[best_other] > margin * gflops["mkl"] else "mkl")


def test_forced_path_is_reported_and_restored():
    before = gemm_path()["mode"]
    with forced_gemm_path("mkl"):
        assert gemm_path()["mode"] == "mkl"
    assert gemm_path()["mode"] == before
    assert mmdkernels.gemm_path()["mode"] == before


def test_bad_path_names_the_allowed_values():
    with pytest.raises(ValueError, match="auto, mkl, onednn, own"):
        set_gemm_path("openblas")
    with pytest.raises(ValueError, match="provider must be one of"):
        gemm_mm(torch.randn(2, 2), torch.randn(2, 2), "auto")


def test_bad_operands_are_named():
    with pytest.raises(RuntimeError, match="a must have dtype Float"):
        gemm_mm(torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 2), "mkl")
    with pytest.raises(RuntimeError, match="must share K"):
        gemm_mm(torch.randn(2, 3), torch.randn(4, 2), "mkl")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", code], timeout=120, env={**os.environ, **env})


def test_invalid_env_value_is_a_clear_error_in_the_kernels():
    code = "import torch, mmdkernels; mmdkernels.rvq_encode(torch.randn(1, 4, 3), torch.randn(1, 5, 4))"
    result = _python(code, **{GEMM_ENV: "fastest"})
    assert result.returncode != 0
    assert f"{GEMM_ENV}: unknown GEMM path 'fastest'; expected one of auto, mkl, onednn, own" in result.stderr


def test_env_value_forces_the_path():
    code = "import mmdkernels; print(mmdkernels.gemm_path()['mode'])"
    assert _python(code, **{GEMM_ENV: "mkl"}).stdout.strip() == "mkl"


def test_onednn_provider_runs_onednn_matmul():
    """Not MKL under another name: oneDNN's verbose log shows a matmul primitive executing, and none for mkl."""
    if "onednn" not in providers():
        pytest.skip(reason="this torch has no oneDNN matmul")
    code = (
        "import torch; from mmdkernels.gemm import gemm_mm; import sys\n"
        "a, b = torch.randn(64, 32), torch.randn(32, 48)\n"
        "gemm_mm(a, b, sys.argv[1] if len(sys.argv) > 1 else 'mkl')\n"
    )
    logs = {}
    for provider in ("onednn", "mkl"):
        result = run([sys.executable, "-c", code, provider], timeout=120, env={**os.environ, "ONEDNN_VERBOSE": "1"})
        assert result.returncode == 0, result.stderr
        logs[provider] = result.stdout
    assert any(",exec," in line and ",matmul," in line for line in logs["onednn"].splitlines()), logs["onednn"]
    assert ",matmul," not in logs["mkl"]


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"), reason="x86 Linux flags")
def test_onednn_is_available_exactly_where_torchs_matmul_runs_float32():
    """torch's mkldnn_matmul refuses every dtype without AVX-512 BW/VL/DQ or AVX-NE-CONVERT (e.g. AMD Zen 3): there
    the provider is unavailable, forcing it is a clear error, and auto measures and chooses among MKL and ours."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip(reason="this torch has no oneDNN")
    flags = _cpu_flags()
    expected = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    assert gemm_path()["onednn_available"] == expected, sorted(f for f in flags if f.startswith("avx"))
    if expected:
        return
    with pytest.raises(RuntimeError, match="onednn provider is unavailable .* needs AVX-512 BW/VL/DQ"):
        gemm_mm(torch.randn(3, 2), torch.randn(2, 4), "onednn")
    with forced_gemm_path("auto"):
        gemm_mm(torch.randn(300, 64), torch.randn(200, 64).t())
    assert all(c["chosen"] in ("mkl", "own") and c["gflops"]["onednn"] == 0 for c in gemm_path()["choices"])


def test_auto_inside_the_rvq_parallel_region_gives_the_forced_paths_codes(monkeypatch):
    """The encoder calls the GEMM from every thread of its parallel region: the measurement there (one thread
    measures, the others wait) picks a provider for the single-threaded context and the codes stay exact."""
    monkeypatch.setenv("MMDKERNELS_RVQ_TILE", "gemm")  # the encoder's GEMM tile kernel, not its fused one
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (1, 24, 1500), generator=g).float()  # three row blocks of 512: two threads share them
    books = torch.randint(-2, 3, (3, 300, 24), generator=g).float()
    codes = {}
    for path in ["auto", *providers()]:
        with forced_gemm_path(path):
            codes[path] = mmdkernels.rvq_encode(x, books, backend="cpp")
    for path in providers():
        assert torch.equal(codes["auto"], codes[path]), path
    inner = [c for c in gemm_path()["choices"] if c["layout"] == "nt" and c["k"] == 24 and c["n"] == 300]
    assert any(c["threads"] == 1 for c in inner), gemm_path()


@pytest.mark.parametrize("provider", ["mkl", "onednn", "own", ""])
def test_opcheck_gemm_ops(provider):
    """The GEMM's registered ops (test and report hooks): schema and autograd registration; the tensor-free control
    ops (mode, choices, availability) their schema."""
    if provider == "onednn" and "onednn" not in providers():
        pytest.skip(reason="this torch has no oneDNN matmul")
    g = torch.Generator().manual_seed(0)
    args = (operand(5, 7, "n", g), operand(7, 3, "t", g), provider)
    torch.library.opcheck(
        torch.ops.mmdkernels.gemm_mm.default, args, test_utils=("test_schema", "test_autograd_registration")
    )
    for op, op_args in (("gemm_mode", ()), ("gemm_choices", ()), ("gemm_onednn_available", ())):
        torch.library.opcheck(getattr(torch.ops.mmdkernels, op).default, op_args, test_utils=("test_schema",))
    mode = torch.ops.mmdkernels.gemm_mode()
    torch.library.opcheck(torch.ops.mmdkernels.gemm_set_mode.default, (mode,), test_utils=("test_schema",))


def test_rvq_tile_kernel_choice_is_measured_and_printed():
    """The RVQ encoder's tile kernel (GEMM + scan, or the fused micro-kernel) is chosen by timing both on the first
    call of a shape class, and MMDKERNELS_GEMM_VERBOSE=1 prints the times and the choice."""
    code = (
        "import torch, mmdkernels\n"
        "x, books = torch.randn(2, 64, 300), torch.randn(2, 512, 64)\n"
        "mmdkernels.rvq_encode(x, books, backend='cpp')\n"
    )
    result = _python(code, MMDKERNELS_GEMM_VERBOSE="1", MMDKERNELS_RVQ_TILE="auto")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mmdkernels rvq tile:")]
    assert len(lines) == 1 and "rows 512 entries 512 dim 64" in lines[0], result.stderr
    assert lines[0].endswith(("-> gemm", "-> fused")), lines[0]


@pytest.mark.parametrize("frames,expected", [(300, "a block per thread"), (200, "one block")])
def test_rvq_tile_kernel_is_measured_as_the_encode_runs(frames, expected):
    """With 2 threads and more than one 512-row block, the encode runs every block on one thread inside a parallel
    region (its GEMM single-threaded), so the measurement times the GEMM there too: the GEMM choice it triggers is
    keyed "1 threads". With one block (N = 400) both run outside a region, the GEMM on both threads."""
    code = (
        "import torch, mmdkernels\ntorch.set_num_threads(2)\n"
        f"x, books = torch.randn(2, 64, {frames}), torch.randn(2, 512, 64)\n"
        "mmdkernels.rvq_encode(x, books, backend='cpp')\n"
    )
    result = _python(code, MMDKERNELS_GEMM_VERBOSE="1", MMDKERNELS_RVQ_TILE="auto", MMDKERNELS_GEMM="auto")
    assert result.returncode == 0, result.stderr
    rvq = [line for line in result.stderr.splitlines() if line.startswith("mmdkernels rvq tile:")]
    assert len(rvq) == 1 and expected in rvq[0], result.stderr
    gemm = [line for line in result.stderr.splitlines() if line.startswith("mmdkernels gemm:") and "x512x64" in line]
    threads = "1 threads" if expected == "a block per thread" else "2 threads"
    assert gemm and threads in gemm[0], result.stderr

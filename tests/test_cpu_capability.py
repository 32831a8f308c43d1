"""The run-time choice among the per-ISA CPU libraries (mmdkernels._C_avx512, _C_avx2, ...): the widest one the CPU
supports, MMDKERNELS_CPU_CAPABILITY to force one, clear errors otherwise. Loader logic is tested with a simulated
CPU; the real libraries in subprocesses (a process loads one op library)."""

import os
import platform
import subprocess
import sys

import pytest
import torch

import mmdkernels
from mmdkernels import _ext

AVX2_ONLY = {"avx2": True, "fma3": True, "f16c": True}
AVX512 = {**AVX2_ONLY, "avx512_f": True, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True}


@pytest.fixture
def simulated(monkeypatch):
    """Runs the loader's choice against a simulated CPU and set of built libraries."""

    def choose(capabilities, built, forced=None):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
        monkeypatch.setattr(_ext, "built_cpu_variants", lambda: built)
        if forced is None:
            monkeypatch.delenv(_ext.CAPABILITY_ENV, raising=False)
        else:
            monkeypatch.setenv(_ext.CAPABILITY_ENV, forced)
        _ext._cpu_module_choice.cache_clear()
        try:
            return _ext._cpu_module_choice()
        finally:
            _ext._cpu_module_choice.cache_clear()

    return choose


def test_widest_supported_library_is_chosen(simulated):
    assert simulated(AVX512, ["avx512", "avx2"]) == ("mmdkernels._C_avx512", "")
    assert simulated(AVX2_ONLY, ["avx512", "avx2"]) == ("mmdkernels._C_avx2", "")
    assert simulated({**AVX512, "avx512_bw": False}, ["avx512", "avx2"]) == ("mmdkernels._C_avx2", "")


def test_forced_capability(simulated):
    assert simulated(AVX512, ["avx512", "avx2"], forced="AVX2") == ("mmdkernels._C_avx2", "")
    module, why = simulated(AVX2_ONLY, ["avx512", "avx2"], forced="avx512")
    assert module is None and "lacks" in why
    module, why = simulated(AVX512, ["avx512", "avx2"], forced="native")
    assert module is None and "not built" in why and _ext.CAPABILITY_ENV in why
    with pytest.raises(ValueError, match=_ext.CAPABILITY_ENV):
        simulated(AVX512, ["avx512", "avx2"], forced="avx3")


def test_cpu_without_avx2_gets_a_reason_not_a_crash(simulated):
    module, why = simulated({"sse4_2": True}, ["avx512", "avx2"])
    assert module is None and "AVX2" in why
    module, why = simulated(AVX512, [])
    assert module is None and "no compiled CPU library" in why


def test_capability_names_the_loaded_library():
    if _ext.cpu_extension() is None:
        pytest.skip(reason=f"no compiled CPU library: {_ext.load_error('cpu')}")
    capability = mmdkernels.cpu_capability()
    assert capability in _ext.built_cpu_variants()
    assert _ext._cpu_supports(capability)
    forced = os.environ.get(_ext.CAPABILITY_ENV)
    if forced:
        assert capability == forced.lower()


SUBPROCESS = """
import torch, mmdkernels
print(mmdkernels.cpu_capability())
x = torch.randn(3, 4, 6, 9, generator=torch.Generator().manual_seed(0))
ref = mmdkernels.mmd_loss(x.double(), estimator="dhsic", backend="reference")
out = mmdkernels.mmd_loss(x, estimator="dhsic")
assert abs(out.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item())), (out, ref)
"""


@pytest.mark.parametrize("variant", ["avx512", "avx2"])
def test_each_built_library_loads_and_computes(variant):
    if variant not in _ext.built_cpu_variants():
        pytest.skip(reason=f"the {variant} library is not built here")
    if not _ext._cpu_supports(variant):
        pytest.skip(reason=f"this CPU cannot run the {variant} library")
    env = dict(os.environ, **{_ext.CAPABILITY_ENV: variant})
    result = subprocess.run([sys.executable, "-c", SUBPROCESS], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == variant


def test_unusable_forced_library_falls_back_with_one_warning():
    env = dict(os.environ, **{_ext.CAPABILITY_ENV: "native"})
    if "native" in _ext.built_cpu_variants():
        pytest.skip(reason="a native library is built here")
    code = SUBPROCESS.replace("print(mmdkernels.cpu_capability())", "assert mmdkernels.cpu_capability() == 'reference'")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _ext.CAPABILITY_ENV in result.stderr  # the fallback warning says why


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the per-ISA libraries are x86-64's")
@pytest.mark.parametrize(
    "variants, expected",
    [("none", ""), ("avx2", "_C_avx2"), ("avx2,avx512", "_C_avx2 _C_avx512"), ("bogus", "unknown ['bogus']")],
)
def test_setup_builds_the_variants_asked_for(variants, expected):
    """MMDKERNELS_CPU_VARIANTS picks the CPU libraries setup.py builds ("none": the CUDA library alone, as
    benchmarks/gpu_check.sh builds it beside the CPU one); an unknown name stops the build naming it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MMDKERNELS_PRINT_EXTENSIONS": "1", "MMDKERNELS_CPU_VARIANTS": variants,
           "MMDKERNELS_SKIP_CUDA": "1"}  # fmt: skip
    env.pop("MMDKERNELS_CPU_ARCH", None)
    result = subprocess.run(
        [sys.executable, "setup.py"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    if variants == "bogus":
        assert result.returncode != 0 and expected in result.stderr
    else:
        assert result.returncode == 0 and result.stdout.strip() == expected, result.stderr[-2000:]

"""Builds mmdkernels' compiled extensions.

- mmdkernels._C: the op schemas and the C++ CPU kernels (always; warns and installs without it on failure paths
  that users can hit, e.g. no C++ compiler).
- mmdkernels._C_cuda: the CUDA kernels, whenever torch is a CUDA build and CUDA_HOME has nvcc, even without a GPU.
Environment: MMDKERNELS_SKIP_CUDA=1 skips the CUDA build; MMDKERNELS_CPU_ARCH (default "native") sets -march;
TORCH_CUDA_ARCH_LIST picks the GPU architectures (9.0 for H100/H200 keeps the build short).
"""

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvidia_include_dirs():
    """torch's CUDA headers include cuBLAS/cuSPARSE headers that the nvidia pip packages ship."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return [d for d in dirs if os.path.isdir(d)]


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("mmdkernels: torch is not importable at build time; installing without compiled kernels.")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn("mmdkernels: no C++ compiler found; installing without compiled kernels (reference fallback).")
        return [], {}

    arch = os.environ.get("MMDKERNELS_CPU_ARCH", "native")
    cxx_flags = [
        "-O3",
        "-std=c++17",
        "-fopenmp",  # at::parallel_for runs serially in code compiled without it (ATen/ParallelOpenMP.h)
        "-fno-math-errno",
        "-Wall",
        f"-march={arch}",
        "-mprefer-vector-width=512",
    ]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cpu_sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp"))
    exts = [
        cpp_extension.CppExtension(
            "mmdkernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            # resolves to the libgomp.so.1 torch has loaded already: one OpenMP runtime, torch's thread settings
            extra_link_args=["-fopenmp"],
        )
    ]

    cuda_home = cpp_extension.CUDA_HOME
    want_cuda = os.environ.get("MMDKERNELS_SKIP_CUDA", "0") != "1"
    if want_cuda and torch.version.cuda and cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cuda_sources = ["csrc/cuda_module.cpp"] + sorted(glob.glob("csrc/*/*_cuda.cu"))
        exts.append(
            cpp_extension.CUDAExtension(
                "mmdkernels._C_cuda",
                cuda_sources,
                include_dirs=include_dirs + _nvidia_include_dirs(),
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            )
        )
    elif want_cuda:
        warnings.warn(
            "mmdkernels: CUDA kernels not built (needs a CUDA build of torch and nvcc under CUDA_HOME; "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home})."
        )
    return exts, {"build_ext": _tolerant_build_ext(cpp_extension.BuildExtension)}


def _tolerant_build_ext(base):
    """A failed extension build warns and installs without it (the package falls back to the reference kernels,
    warning once at run time); MMDKERNELS_STRICT_BUILD=1 makes it an error instead."""

    class TolerantBuildExtension(base):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # compiler or nvcc failure
                if os.environ.get("MMDKERNELS_STRICT_BUILD", "0") == "1":
                    raise
                warnings.warn(f"mmdkernels: building {ext.name} failed, installing without it: {error}")

    return TolerantBuildExtension.with_options(use_ninja=True)


ext_modules, cmdclass = _extensions()
if "--help" not in sys.argv:
    setup(ext_modules=ext_modules, cmdclass=cmdclass)

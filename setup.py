"""Builds mmdkernels' compiled extensions.

- mmdkernels._C_<isa>: the op schemas and the C++ CPU kernels, once per instruction set (on x86-64: `avx512` and
  `avx2`, each a whole library compiled for that ISA, as FAISS ships its avx2/avx512 builds); mmdkernels._ext loads
  the widest one the running CPU supports (`mmdkernels.cpu_capability()`, MMDKERNELS_CPU_CAPABILITY=avx2 forces the
  narrower one). Elsewhere one `default` library with the compiler's baseline flags.
- mmdkernels._C_cuda: the CUDA kernels, whenever torch is a CUDA build and CUDA_HOME has nvcc, even without a GPU.
Environment: MMDKERNELS_SKIP_CUDA=1 skips the CUDA build; MMDKERNELS_CPU_ARCH=native (opt-in, local builds only)
builds a single `native` library with -march=native instead; MMDKERNELS_CPU_VARIANTS=avx2 builds a subset (none:
no CPU library);
MMDKERNELS_NO_EXTENSIONS=1 installs the Python package alone (scripts/setup_env.sh builds incrementally after);
TORCH_CUDA_ARCH_LIST picks the GPU architectures (9.0 for H100/H200 keeps the build short).
Builds are incremental: objects live in build/temp.*/<extension>/ (ninja), and an extension whose sources, headers,
flags and torch version are unchanged is not rebuilt.
"""

import glob
import os
import platform
import shutil
import sys
import warnings

from setuptools import setup
from setuptools.modified import newer_group

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
    if os.environ.get("MMDKERNELS_NO_EXTENSIONS", "0") == "1":
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn("mmdkernels: no C++ compiler found; installing without compiled kernels (reference fallback).")
        return [], {}

    include_dirs = [os.path.join(ROOT, "csrc")]
    cpu_sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp"))
    exts = []
    for variant, isa_flags in _cpu_variants().items():
        name = f"mmdkernels._C_{variant}"
        cxx_flags = [
            "-O3",
            "-std=c++17",
            "-fopenmp",  # at::parallel_for runs serially in code compiled without it (ATen/ParallelOpenMP.h)
            "-fno-math-errno",
            # lets GCC turn compare-and-select into blends: without it the AVX2 library's exp loops (fast_exp's
            # range clamp) stayed scalar, "control flow in loop" (AVX-512's masked moves were converted either way)
            "-fno-trapping-math",
            "-Wall",
            f"-DMMDKERNELS_CPU_VARIANT={variant}",
            *isa_flags,
        ]
        exts.append(
            cpp_extension.CppExtension(
                name,
                cpu_sources,
                include_dirs=include_dirs,
                depends=_headers() + [_flags_stamp(name, cxx_flags)],
                extra_compile_args={"cxx": cxx_flags},
                # resolves to the libgomp.so.1 torch has loaded already: one OpenMP runtime, torch's thread settings
                extra_link_args=["-fopenmp"],
            )
        )

    cuda_home = cpp_extension.CUDA_HOME
    want_cuda = os.environ.get("MMDKERNELS_SKIP_CUDA", "0") != "1"
    if want_cuda and torch.version.cuda and cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cuda_sources = ["csrc/cuda_module.cpp"] + sorted(glob.glob("csrc/*/*_cuda.cu"))
        cuda_flags = {"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]}
        stamp = _flags_stamp("mmdkernels._C_cuda", [*cuda_flags["cxx"], *cuda_flags["nvcc"], os.environ["TORCH_CUDA_ARCH_LIST"]])
        exts.append(
            cpp_extension.CUDAExtension(
                "mmdkernels._C_cuda",
                cuda_sources,
                include_dirs=include_dirs + _nvidia_include_dirs(),
                depends=_headers() + [stamp],
                extra_compile_args=cuda_flags,
            )
        )
    elif want_cuda:
        warnings.warn(
            "mmdkernels: CUDA kernels not built (needs a CUDA build of torch and nvcc under CUDA_HOME; "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home})."
        )
    return exts, {"build_ext": _tolerant_build_ext(cpp_extension.BuildExtension)}


# Each CPU library's instruction set. The avx512 set is torch's own AVX512 capability (F, BW, VL, DQ); the CPU's
# other AVX-512 extensions (BF16, VNNI, ...) are not assumed.
X86_CPU_VARIANTS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mprefer-vector-width=512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}


def _cpu_variants():
    """{variant: ISA flags} of the CPU libraries to build."""
    arch = os.environ.get("MMDKERNELS_CPU_ARCH")
    if arch:
        return {"native": [f"-march={arch}", "-mprefer-vector-width=512"]}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {"default": []}
    wanted = os.environ.get("MMDKERNELS_CPU_VARIANTS")
    if not wanted:
        return dict(X86_CPU_VARIANTS)
    if wanted == "none":  # the CUDA library alone (benchmarks/gpu_check.sh builds the CPU one beside it)
        return {}
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = sorted(set(names) - set(X86_CPU_VARIANTS))
    if unknown:
        raise SystemExit(
            f"MMDKERNELS_CPU_VARIANTS: unknown {unknown}; expected a subset of {list(X86_CPU_VARIANTS)} or none"
        )
    return {name: X86_CPU_VARIANTS[name] for name in names}


def _headers():
    return sorted(glob.glob("csrc/**/*.h", recursive=True))


def _flags_stamp(name, flags):
    """A file whose content is the extension's flags and torch's version, rewritten only when they change: listed in
    the extension's depends, so that a flag or torch change rebuilds it and nothing else does."""
    import torch

    text = "\n".join([torch.__version__, *flags]) + "\n"
    path = os.path.join(ROOT, "build", "flags", f"{name}.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return os.path.relpath(path, ROOT)


def _tolerant_build_ext(base):
    """A failed extension build warns and installs without it (the package falls back to the reference kernels,
    warning once at run time); MMDKERNELS_STRICT_BUILD=1 makes it an error instead."""

    class TolerantBuildExtension(base):
        def build_extension(self, ext):
            # torch's ninja mode forces every extension through compile + link; skip the ones whose sources, headers,
            # flags and torch version (ext.depends) are all older than the built library
            target = self.get_ext_fullpath(ext.name)
            if os.path.exists(target) and not newer_group(list(ext.sources) + list(ext.depends), target, "newer"):
                print(f"mmdkernels: {ext.name} is up to date")
                return
            # one object folder per extension: the CPU libraries compile the same sources with different flags
            base_temp = self.build_temp
            self.build_temp = os.path.join(base_temp, ext.name)
            try:
                super().build_extension(ext)
            except Exception as error:  # compiler or nvcc failure
                if os.environ.get("MMDKERNELS_STRICT_BUILD", "0") == "1":
                    raise
                warnings.warn(f"mmdkernels: building {ext.name} failed, installing without it: {error}")
            finally:
                self.build_temp = base_temp

    return TolerantBuildExtension.with_options(use_ninja=True)


ext_modules, cmdclass = _extensions()
if os.environ.get("MMDKERNELS_PRINT_EXTENSIONS") == "1":  # scripts/dev_build.sh: which libraries this build makes
    print(" ".join(ext.name.split(".")[-1] for ext in ext_modules))
elif "--help" not in sys.argv:
    setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Lazy loading of the compiled extensions; records why one could not load and warns once.

The C++ CPU kernels are built once per instruction set (mmdkernels._C_avx512, mmdkernels._C_avx2, see setup.py);
the first CPU op loads the widest one this CPU supports, or the one MMDKERNELS_CPU_CAPABILITY names.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

_CPU_MODULE = "mmdkernels._C"  # the key of the CPU library in _loaded/_errors, whichever variant it is
CPU_VARIANTS = ("native", "avx512", "avx2", "default")  # preference order; "native": MMDKERNELS_CPU_ARCH builds
CAPABILITY_ENV = "MMDKERNELS_CPU_CAPABILITY"
_CUDA_MODULE = "mmdkernels._C_cuda"
REINSTALL_HINT = "rebuild with `pip install -e . --no-build-isolation` (see README)"

_loaded: dict[str, object] = {}
_errors: dict[str, str] = {}
_warned: set[str] = set()
_on_load: dict[str, tuple] = {}  # "mmdkernels::op" -> (fake, autograd) registered once the schemas load
_registered_on_load: set[str] = set()


def register_on_load(qualified_name: str, fake, backward=None, setup_context=None) -> None:
    """Register a compiled op's fake (and autograd, when given) as soon as the op library that defines its schema is
    loaded, so torch.compile can trace the op even when its first call happens inside a compiled region."""
    _on_load[qualified_name] = (fake, backward, setup_context)
    if _CPU_MODULE in _loaded:
        _register_pending()


def _register_pending() -> None:
    for name, (fake, backward, setup_context) in _on_load.items():
        if name not in _registered_on_load:
            torch.library.register_fake(name)(fake)
            if backward is not None:
                torch.library.register_autograd(name, backward, setup_context=setup_context)
            _registered_on_load.add(name)


def _cpu_supports(variant: str) -> bool:
    """Whether this CPU executes the instructions the `variant` library was compiled for (setup.py's flag sets)."""
    if variant in ("native", "default"):
        return True
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    has_avx2 = all(caps.get(flag, False) for flag in ("avx2", "fma3", "f16c"))
    if variant == "avx2":
        return has_avx2
    return has_avx2 and all(caps.get(flag, False) for flag in ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq"))


def built_cpu_variants() -> list[str]:
    """The CPU libraries present in the installed package, in preference order."""
    return [v for v in CPU_VARIANTS if importlib.util.find_spec(f"mmdkernels._C_{v}") is not None]


@functools.cache
def _cpu_module_choice() -> tuple[str | None, str]:
    """(module to import, '') or (None, why none can be used)."""
    built = built_cpu_variants()
    forced = os.environ.get(CAPABILITY_ENV, "").strip().lower()
    if forced:
        if forced not in CPU_VARIANTS:
            raise ValueError(f"{CAPABILITY_ENV}={forced!r}: expected one of {list(CPU_VARIANTS)}")
        if forced not in built:
            return None, f"{CAPABILITY_ENV}={forced} but that library is not built (built: {built}); {REINSTALL_HINT}"
        if not _cpu_supports(forced):
            return None, f"{CAPABILITY_ENV}={forced} but this CPU lacks its instructions"
        return f"mmdkernels._C_{forced}", ""
    for variant in built:
        if _cpu_supports(variant):
            return f"mmdkernels._C_{variant}", ""
    if not built:
        return None, f"no compiled CPU library in the package; {REINSTALL_HINT}"
    return None, f"this CPU supports none of the built libraries {built} (x86-64 needs AVX2 + FMA)"


def _load(name: str) -> object | None:
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    target, why_not = _cpu_module_choice() if name == _CPU_MODULE else (name, "")
    if target is None:
        _errors[name] = why_not
        return None
    try:
        module = importlib.import_module(target)
    except ImportError as error:  # not built, or built against another torch
        _errors[name] = f"{target} could not be imported ({error}); {REINSTALL_HINT}"
        return None
    _loaded[name] = module
    if name == _CPU_MODULE:
        _register_pending()
    return module


def cpu_extension() -> object | None:
    """The op library with the C++ CPU kernels (defines every mmdkernels:: schema), or None."""
    return _load(_CPU_MODULE)


def constant_under_compile(fn):
    """torch.compiler.assume_constant_result without its import of torch._dynamo (which pulls in triton and would
    make `import mmdkernels` heavy): dynamo calls `fn` eagerly while tracing and uses the result as a constant.
    tests/test_compile.py checks that the marker is still the one torch uses."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def cpu_capability() -> str:
    """The instruction set of the C++ CPU kernels in use: "avx512", "avx2", "native" (a -march build), "default"
    (non-x86 builds), or "reference" when no compiled library loads (ops run the PyTorch reference).
    MMDKERNELS_CPU_CAPABILITY=avx2 (set before the first op) forces the narrower library."""
    module = cpu_extension()
    return "reference" if module is None else module.cpu_variant


def cuda_extension() -> object | None:
    """The CUDA kernels (registered onto the schemas of the CPU extension), or None."""
    if cpu_extension() is None:
        _errors.setdefault(_CUDA_MODULE, f"needs {_CPU_MODULE}: {_errors.get(_CPU_MODULE)}")
        return None
    return _load(_CUDA_MODULE)


def compiled_op(name: str, backend: str):
    """torch.ops.mmdkernels.<name> from the compiled library of `backend` ("cpp" or "cuda"), loading it first; raises
    RuntimeError with the reason (and the rebuild command) when that library is unavailable."""
    which = "cuda" if backend == "cuda" else "cpu"
    if not available(which):
        raise RuntimeError(load_error(which))
    return getattr(torch.ops.mmdkernels, name)


@constant_under_compile
def available(which: str) -> bool:
    """Whether the `cpu` or `cuda` extension loads; torch.compile treats the answer as a constant (no graph break)."""
    return (cpu_extension() if which == "cpu" else cuda_extension()) is not None


@constant_under_compile
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def load_error(which: str) -> str:
    """Why `cpu` or `cuda` extension is unavailable ('' if it loaded)."""
    name = _CPU_MODULE if which == "cpu" else _CUDA_MODULE
    return _errors.get(name, "")


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

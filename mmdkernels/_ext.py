"""Lazy loading of the compiled extensions; records why one could not load and warns once."""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

_CPU_MODULE = "mmdkernels._C"
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


def _load(name: str) -> object | None:
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as error:  # not built, or built against another torch
        _errors[name] = f"{name} could not be imported ({error}); {REINSTALL_HINT}"
        return None
    _loaded[name] = module
    if name == _CPU_MODULE:
        _register_pending()
    return module


def cpu_extension() -> object | None:
    """The op library with the C++ CPU kernels (defines every mmdkernels:: schema), or None."""
    return _load(_CPU_MODULE)


def cuda_extension() -> object | None:
    """The CUDA kernels (registered onto the schemas of the CPU extension), or None."""
    if cpu_extension() is None:
        _errors.setdefault(_CUDA_MODULE, f"needs {_CPU_MODULE}: {_errors.get(_CPU_MODULE)}")
        return None
    return _load(_CUDA_MODULE)


def constant_under_compile(fn):
    """torch.compiler.assume_constant_result without its import of torch._dynamo (which pulls in triton and would
    make `import mmdkernels` heavy): dynamo calls `fn` eagerly while tracing and uses the result as a constant.
    tests/test_compile.py checks that the marker is still the one torch uses."""
    fn._dynamo_marked_constant = True
    return fn


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

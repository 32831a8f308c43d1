"""Lazy loading of the compiled extensions; records why one could not load and warns once."""

from __future__ import annotations

import importlib
import warnings

_CPU_MODULE = "mmdkernels._C"
_CUDA_MODULE = "mmdkernels._C_cuda"
REINSTALL_HINT = "rebuild with `pip install -e . --no-build-isolation` (see README)"

_loaded: dict[str, object] = {}
_errors: dict[str, str] = {}
_warned: set[str] = set()


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


def load_error(which: str) -> str:
    """Why `cpu` or `cuda` extension is unavailable ('' if it loaded)."""
    name = _CPU_MODULE if which == "cpu" else _CUDA_MODULE
    return _errors.get(name, "")


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

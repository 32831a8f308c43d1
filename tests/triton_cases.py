"""What every Triton test module on CPU shares: the interpreter marks (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported when there is no GPU; the compiled kernels are covered by the *_gpu.py tests)."""

import os

import pytest


def interpreter_marks(gpu_tests: str) -> list:
    """pytestmark for a module testing Triton kernels on CPU tensors under the interpreter."""
    return [
        pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1",
            reason="CPU tensors need the Triton interpreter (tests/conftest.py sets it without a GPU); "
            f"on a GPU machine, {gpu_tests} runs the compiled Triton kernels",
        ),
        # Triton's interpreter itself warns when a kernel loops over range(runtime scalar).
        pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
    ]

"""The one place that chooses a backend (mmdkernels/_dispatch.py): priorities per op, device and dtype; the
environment's meaning, the same for every op; errors that list the reasons."""

import pytest
import torch

import mmdkernels
from mmdkernels import _dispatch, _ext

needs_cpu_kernels = pytest.mark.skipif(not _ext.available("cpu"), reason="no compiled CPU library")


def test_every_op_lists_its_providers_and_the_reference():
    for op, spec in _dispatch.OPS.items():
        assert "reference" in spec.providers, op
        assert set(spec.providers) <= set(_dispatch.PROVIDERS), op


@needs_cpu_kernels
@pytest.mark.parametrize(
    "op, x, expected",
    [
        ("mmd_loss", torch.zeros(2, 3, 4, 5), "cpp"),
        ("mmd_loss", torch.zeros(2, 3, 4, 5, dtype=torch.float64), "reference"),
        ("decode_attention", torch.zeros(2, 4, 16), "cpp"),
        ("decode_attention", torch.zeros(2, 4, 16, dtype=torch.bfloat16), "cpp"),  # SDPA first only with bf16 dots
        ("decode_attention", torch.zeros(2, 4, 16, dtype=torch.float64), "reference"),
        ("decode_linear", torch.zeros(4, 32), "cpp"),
        ("decode_linear", torch.zeros(17, 32), "torch"),  # a GEMM
        ("decode_linear", torch.zeros(4, 32, dtype=torch.float64), "torch"),
    ],
)
def test_automatic_choice_on_cpu(monkeypatch, op, x, expected):
    monkeypatch.setattr(_dispatch, "SDPA_FASTER_ON_CPU", ())  # as on a CPU without bfloat16 dot products
    assert _dispatch.choose_backend(x, None, op) == expected


@pytest.mark.parametrize("forced", ["cpp", "torch"])
def test_one_float32_row_follows_the_measured_choice(monkeypatch, forced):
    """One row: the C++ kernel or torch's GEMV, whichever mmdkernels/linear/one_row.py measured (here forced)."""
    monkeypatch.setenv("MMDKERNELS_LINEAR_ONE_ROW", forced)
    expected = forced if _ext.available("cpu") else "torch"
    assert _dispatch.choose_backend(torch.zeros(1, 32), None, "decode_linear") == expected


def test_op_reasons_move_the_choice_on():
    x = torch.zeros(4, 32)
    assert _dispatch.choose_backend(x, None, "decode_linear", op_reasons=lambda b: ["no"] if b == "cpp" else []) == "torch"
    with pytest.raises(RuntimeError, match="decode_linear: backend 'cpp' cannot run this input: no"):
        _dispatch.choose_backend(x, "cpp", "decode_linear", op_reasons=lambda b: ["no"] if b == "cpp" else [])


def test_unknown_backend_names_the_op_and_its_providers():
    with pytest.raises(ValueError, match=r"decode_linear: backend must be one of \('reference', 'torch', 'cpp'\)"):
        mmdkernels.decode_linear(torch.zeros(2, 4), torch.zeros(3, 4), backend="sdpa")
    with pytest.raises(ValueError, match="mmd_loss: backend must be one of"):
        mmdkernels.mmd_loss(torch.randn(2, 2, 4, 6), backend="torch")


def test_global_environment_applies_to_the_ops_that_have_the_provider(monkeypatch):
    monkeypatch.setenv("MMDKERNELS_BACKEND", "sdpa")
    assert _dispatch.env_backend("decode_attention") == "sdpa"
    assert _dispatch.env_backend("mmd_loss") is None  # no sdpa there: automatic choice, no error
    x = torch.randn(2, 2, 4, 6)
    torch.testing.assert_close(mmdkernels.mmd_loss(x, estimator="dhsic"), mmdkernels.mmd_loss_ref(x, estimator="dhsic"))
    monkeypatch.setenv("MMDKERNELS_BACKEND", "reference")
    assert all(_dispatch.env_backend(op) == "reference" for op in _dispatch.OPS)
    monkeypatch.setenv("MMDKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="MMDKERNELS_BACKEND='nonsense'"):
        _dispatch.env_backend("sample")


def test_per_op_environment(monkeypatch):
    monkeypatch.setenv("MMDKERNELS_BACKEND", "reference")
    monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LINEAR", "torch")  # the per-op form wins
    assert _dispatch.env_backend("decode_linear") == "torch"
    assert _dispatch.env_backend("rvq_encode") == "reference"
    monkeypatch.setenv("MMDKERNELS_BACKEND_RVQ_ENCODE", "sdpa")
    with pytest.raises(ValueError, match="MMDKERNELS_BACKEND_RVQ_ENCODE='sdpa': rvq_encode has the backends"):
        _dispatch.env_backend("rvq_encode")


def test_environment_forcing_an_impossible_provider_raises(monkeypatch):
    monkeypatch.setenv("MMDKERNELS_BACKEND_SAMPLE", "cuda")
    with pytest.raises(RuntimeError, match="sample: backend 'cuda' cannot run this input"):
        mmdkernels.sample(torch.randn(2, 2, 10), generator=torch.Generator().manual_seed(0))


def test_linear_reference_is_the_spec():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    y = mmdkernels.decode_linear(x.double(), w.double(), b.double(), activation="gelu", backend="reference")
    expected = torch.nn.functional.gelu(torch.einsum("abd,nd->abn", x.double(), w.double()) + b.double())
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


@needs_cpu_kernels
def test_fallback_by_design_is_silent(recwarn):
    """decode_layers at 17 rows goes to its reference by design (the model then keeps its own layers): no warning."""
    from mmdkernels.decode import DecoderLayerWeights, decode_layers_backend

    weights = [DecoderLayerWeights(*[torch.zeros(3 * 8, 8) if i == 2 else torch.zeros(8, 8) for i in range(12)])]
    assert decode_layers_backend(torch.zeros(17, 8), weights) == "reference"
    assert not [w for w in recwarn if "no fused kernel" in str(w.message)]

"""One float32 row (mmdkernels/linear/one_row.py): the measured choice between the C++ kernel and torch's GEMV, its
report and override, and both paths against the spec, alone and inside the fused decode step."""

import pytest
import torch
from test_decode_layers import assert_step_matches_spec, make_problem
from tolerances import assert_close_to_reference

from mmdkernels import _ext, decode_linear
from mmdkernels._dispatch import linear_rows_prefer_torch
from mmdkernels.linear import decode_linear_ref, one_row

pytestmark = pytest.mark.skipif(not _ext.available("cpu"), reason="no compiled CPU library")


def test_auto_measures_once_per_thread_count_and_reports(monkeypatch):
    monkeypatch.delenv(one_row.ENV, raising=False)
    monkeypatch.setattr(one_row, "_choices", {})
    monkeypatch.setattr(one_row, "MEASURE_WEIGHTS", 1)  # a short measurement: the rule, not the speed, is tested
    uses_cpp = one_row.one_row_uses_cpp()
    assert one_row.one_row_uses_cpp() == uses_cpp
    (choice,) = one_row.one_row_choices()
    assert choice["threads"] == torch.get_num_threads()
    speeds = choice["gb_per_s"]
    assert speeds["cpp"] > 0 and speeds["torch"] > 0
    # the rounded speeds can sit on either side of the margin only when they are within rounding of it
    if abs(speeds["cpp"] - one_row.MARGIN * speeds["torch"]) > 0.05:
        assert choice["chosen"] == ("cpp" if speeds["cpp"] > one_row.MARGIN * speeds["torch"] else "torch")
    assert uses_cpp == (choice["chosen"] == "cpp")
    assert linear_rows_prefer_torch(1) == (not uses_cpp)


@pytest.mark.parametrize("forced", ["cpp", "torch"])
def test_env_forces_the_path(monkeypatch, forced):
    monkeypatch.setenv(one_row.ENV, forced)
    monkeypatch.setattr(one_row, "_choices", {})
    assert linear_rows_prefer_torch(1) == (forced == "torch")
    assert one_row.one_row_choices() == []  # forced: nothing measured
    assert not linear_rows_prefer_torch(2) and linear_rows_prefer_torch(17)  # other row counts keep their rule


def test_bad_env_value_names_the_allowed_values(monkeypatch):
    monkeypatch.setenv(one_row.ENV, "mkl")
    with pytest.raises(ValueError, match="MMDKERNELS_LINEAR_ONE_ROW='mkl': expected one of auto, cpp, torch"):
        linear_rows_prefer_torch(1)


@pytest.mark.parametrize("forced", ["cpp", "torch"])
@pytest.mark.parametrize("shape", [(1, 7, 5), (1, 130, 67), (1, 256, 1000)], ids=str)
def test_one_row_linear_matches_the_spec_on_each_path(monkeypatch, forced, shape):
    monkeypatch.setenv(one_row.ENV, forced)
    g = torch.Generator().manual_seed(sum(shape))
    rows, out_features, in_features = shape
    x, w = torch.randn(rows, in_features, generator=g), torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g)
    for activation in (None, "gelu"):
        with torch.no_grad():
            y = decode_linear(x, w, bias, activation=activation)
        ref64 = decode_linear_ref(x.double(), w.double(), bias.double(), activation=activation)
        base = decode_linear_ref(x, w, bias, activation=activation)
        assert_close_to_reference(y, ref64, base, name=f"one row {forced} {shape} {activation}")


@pytest.mark.parametrize("forced", ["cpp", "torch"])
def test_fused_decode_step_at_one_row_matches_the_spec_on_each_path(monkeypatch, forced):
    monkeypatch.setenv(one_row.ENV, forced)
    assert_step_matches_spec(make_problem(1, step=5, seed=77), f"decode_layers one row {forced}")

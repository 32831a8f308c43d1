"""torch.library.opcheck (schema, fake, autograd registration, dynamic shapes) for custom ops that no op-specific
test file checks: the few-row linear. The others are checked in tests/test_{mmd_ops,opcheck_mmd,rvq,sampling,
sampling_triton,attention,attention_triton}.py (test_opcheck_mmd.py also holds the Triton RVQ ops)."""

import pytest
import torch

from mmdkernels import _ext
from mmdkernels.linear import ops as linear_ops


@pytest.mark.skipif(not _ext.available("cpu"), reason="no compiled CPU library")
@pytest.mark.parametrize("rows, with_bias, gelu", [(1, False, False), (5, True, True), (16, True, False)])
def test_opcheck_small_batch_linear(rows, with_bias, gelu):
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 37, generator=g), torch.randn(29, 37, generator=g)
    bias = torch.randn(29, generator=g) if with_bias else None
    torch.library.opcheck(linear_ops.small_batch_linear_op(), (x, weight, bias, gelu))

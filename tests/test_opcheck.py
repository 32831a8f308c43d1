"""torch.library.opcheck (schema, fake, autograd registration, dynamic shapes) for custom ops that no op-specific
test file checks: the few-row linear and the Triton RVQ ops (under TRITON_INTERPRET=1). The others are checked in
tests/test_{mmd_ops,opcheck_mmd,rvq,sampling,sampling_triton,attention,attention_triton}.py."""

import pytest
import torch

from mmdkernels import _dispatch, _ext
from mmdkernels.linear import ops as linear_ops
from mmdkernels.rvq import ops as rvq_ops


@pytest.mark.skipif(not _ext.available("cpu"), reason="no compiled CPU library")
@pytest.mark.parametrize("rows, with_bias, gelu", [(1, False, False), (5, True, True), (16, True, False)])
def test_opcheck_small_batch_linear(rows, with_bias, gelu):
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 37, generator=g), torch.randn(29, 37, generator=g)
    bias = torch.randn(29, generator=g) if with_bias else None
    torch.library.opcheck(linear_ops.small_batch_linear_op(), (x, weight, bias, gelu))


@pytest.mark.skipif(
    not (_ext.triton_installed() and (torch.cuda.is_available() or _dispatch.triton_interpreter_enabled())),
    reason="Triton needs a CUDA device or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("return_quantized", [False, True])
def test_opcheck_triton_rvq_ops(return_quantized):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 8, generator=g).to(device)  # the op's layout: rows [N, D], codes [N, K]
    books = torch.randn(3, 16, 8, generator=g).to(device)
    sqnorms = books.square().sum(-1)
    torch.library.opcheck(rvq_ops.encode_op("triton"), (x, books, sqnorms, return_quantized))
    codes = torch.randint(0, 16, (37, 3), generator=g).to(device)
    torch.library.opcheck(rvq_ops.decode_op("triton"), (codes, books))

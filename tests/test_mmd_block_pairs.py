"""The symmetric planes' block-pair mapping (csrc/mmd/block_pairs.h): the arithmetic the CUDA kernels run, through its
CPU test hook (mmdkernels::symmetric_block_pairs), and its Triton statement (triton_common.column_steps and
column_block) under the interpreter. Every unordered pair of blocks, diagonal included, must be visited exactly once,
and every row block must do (nearly) the same work."""

import importlib.util
import os

import pytest
import torch

from mmdkernels.mmd import ops

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    import triton
    import triton.language as tl

    from mmdkernels.mmd import triton_common

    @triton.jit
    def _mapping_kernel(out_ptr, num_blocks, MAX_STEPS: tl.constexpr):
        """out[block, step] = the column block of each step a row block takes on a symmetric plane."""
        block = tl.program_id(0)
        for step in range(0, triton_common.column_steps(block, num_blocks, True)):
            col = triton_common.column_block(block, step, num_blocks, True)
            tl.store(out_ptr + block * MAX_STEPS + step, col.to(tl.int64))


BLOCK_COUNTS = [1, 2, 3, 4, 5, 8, 13, 64, 101]


def _cpp_pairs(num_blocks: int) -> torch.Tensor:
    ops.shuffle_op("cpp")  # loads the extension
    return torch.ops.mmdkernels.symmetric_block_pairs(torch.arange(num_blocks), num_blocks)


@pytest.mark.parametrize("num_blocks", BLOCK_COUNTS)
def test_every_unordered_block_pair_once(num_blocks):
    table = _cpp_pairs(num_blocks)
    assert table.shape == (num_blocks, 1 + num_blocks // 2)
    assert torch.equal(table[:, 0], torch.arange(num_blocks)), "step 0 must be the diagonal block"
    seen = {}
    for row, cols in enumerate(table.tolist()):
        owned = [c for c in cols if c >= 0]
        assert cols[: len(owned)] == owned, f"row block {row}: -1 may only follow its owned blocks, got {cols}"
        for col in owned:
            pair = (min(row, col), max(row, col))
            assert pair not in seen, f"pair {pair} visited by row blocks {seen[pair]} and {row}"
            seen[pair] = row
    assert len(seen) == num_blocks * (num_blocks + 1) // 2, "some pair of blocks is never visited"
    work = (table >= 0).sum(1)
    assert work.max() - work.min() <= (1 if num_blocks % 2 == 0 else 0), work.tolist()


def test_hook_rejects_bad_input():
    ops.shuffle_op("cpp")
    with pytest.raises(RuntimeError, match="row_blocks must lie in"):
        torch.ops.mmdkernels.symmetric_block_pairs(torch.tensor([0, 3]), 3)
    with pytest.raises(RuntimeError, match="row_blocks must have dtype"):
        torch.ops.mmdkernels.symmetric_block_pairs(torch.tensor([0.0]), 3)
    with pytest.raises(RuntimeError, match="num_blocks must be at least 1"):
        torch.ops.mmdkernels.symmetric_block_pairs(torch.tensor([0]), 0)


def test_opcheck_symmetric_block_pairs():
    """The hook is a registered op: schema and autograd registration (CPU only, no fake: nothing traces it)."""
    ops.shuffle_op("cpp")
    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.mmdkernels.symmetric_block_pairs.default, (torch.arange(5), 5), test_utils=checks)


@pytest.mark.skipif(not HAS_TRITON, reason="the Triton backend needs the triton package")
# Triton's interpreter itself warns when a kernel loops over range(runtime scalar).
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
@pytest.mark.parametrize("num_blocks", BLOCK_COUNTS)
def test_triton_mapping_matches_the_header(num_blocks):
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(reason="Triton needs a CUDA device or TRITON_INTERPRET=1")
    max_steps = 1 + num_blocks // 2
    got = torch.full((num_blocks, max_steps), -1, dtype=torch.int64, device=device)
    _mapping_kernel[(num_blocks,)](got, num_blocks, MAX_STEPS=max_steps)
    assert torch.equal(got.cpu(), _cpp_pairs(num_blocks))

"""Global-batch MMD over torch.distributed (gloo, CPU): 2 and 3 spawned processes against one process on the
concatenated batch.

Each world is spawned once (process start-up dominates) and runs every case; the tests then compare its saved
results. Tolerances: loss and gradient within the float64-reference rule of tests/mmd_cases.py, and within float32
summation-order error (loss 1e-6 relative, gradient 2e-5 of max |grad|) of the single-process fused loss on the same
concatenated batch and permutations. Every world runs under one deadline: its collectives wait as long as the world
may run, a rank still running then prints its stack and the parent kills it, so no test can hang or leave a process.
"""

from __future__ import annotations

import datetime
import faulthandler
import math
import os
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmd_cases import GRAD_FLOOR_CPU, GRAD_FLOOR_GPU, LOSS_FLOOR, LOSS_RTOL, RULE_FACTOR, make_input
from subprocess_util import stop_processes

import mmdkernels
from mmdkernels.mmd import reference as ref
from mmdkernels.mmd.distributed import row_share

WORLD_DEADLINE_S = 120.0  # spawn to exit, per world: 10-30 s on 2 busy cores
STACK_DUMP_S = WORLD_DEADLINE_S - 10  # a rank still running then prints where it is (pytest shows its stderr)
# The first test's setup runs both worlds (pytest-timeout counts fixture setup).
pytestmark = pytest.mark.timeout(2 * WORLD_DEADLINE_S + 120)
SEED = 11
K, D, T = 3, 4, 10

# (name, batch sizes per rank, backend, options)
CASES_2 = [
    (f"{est}-{mode}-delay{int(delay)}", (3, 2), "cpp", dict(estimator=est, mode=mode, delay=delay))
    for est in ("shuffle", "dhsic")
    for mode in ("joint", "pairwise")
    for delay in (False, True)
] + [
    ("shuffle-reference-norm", (2, 3), "cpp", dict(estimator="shuffle", mode="joint", normalization="reference")),
    ("triton-shuffle-pairwise", (1, 1), "triton", dict(estimator="shuffle", mode="pairwise", delay=True)),
    ("triton-dhsic-joint", (1, 1), "triton", dict(estimator="dhsic", mode="joint")),
    ("reference-float64-dhsic", (2, 1), "reference", dict(estimator="dhsic", mode="pairwise")),
]
CASES_3 = [
    ("shuffle-joint-delay1", (2, 1, 3), "cpp", dict(estimator="shuffle", mode="joint", delay=True)),
    ("shuffle-pairwise-delay0", (1, 3, 2), "cpp", dict(estimator="shuffle", mode="pairwise")),
    ("dhsic-joint-delay1", (2, 2, 1), "cpp", dict(estimator="dhsic", mode="joint", delay=True)),
    ("dhsic-pairwise-delay0", (3, 1, 1), "cpp", dict(estimator="dhsic", mode="pairwise")),
]


def _inputs(case, case_index: int) -> list[torch.Tensor]:
    name, batches, backend, _ = case
    dtype = torch.float64 if backend == "reference" else torch.float32
    num_frames = 7 if backend == "triton" else T  # the interpreter is slow: N = 2 x 7
    full = make_input((sum(batches), K, D, num_frames), dtype=dtype, seed=100 + case_index)
    return list(full.split(list(batches)))


def _device(backend: str) -> str:
    """Triton runs on CUDA tensors unless its interpreter is on (tests/conftest.py turns it on without a GPU)."""
    return "cuda" if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _worker(rank: int, world_size: int, folder: str, cases: list) -> None:
    faulthandler.enable()  # a crash prints the rank's stack
    faulthandler.dump_traceback_later(STACK_DUMP_S, exit=False)
    torch.set_num_threads(1)
    # Collectives may wait as long as the world may run: a shorter gloo timeout only turns a slow moment on a busy
    # machine into an error on one rank, after which that rank's collectives no longer pair with its peers'.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=WORLD_DEADLINE_S),
    )
    results = {}
    completed = False
    try:
        for index, case in enumerate(cases):
            name, _, backend, options = case
            device = _device(backend)
            x = _inputs(case, index)[rank].to(device).requires_grad_()
            try:
                loss = mmdkernels.mmd_loss(
                    x,
                    backend=backend,
                    generator=torch.Generator(device=device).manual_seed(SEED),
                    process_group=dist.group.WORLD,
                    **options,
                )
                loss.backward()
                results[name] = (loss.detach().cpu(), x.grad.cpu())
            except Exception:  # recorded: the test reports it
                results[name] = traceback.format_exc()
        results.update(_failure_cases(rank))
        completed = True
    finally:
        torch.save(results, f"{folder}/rank{rank}.pt")
        if completed:  # every case ran and its result is saved: what _run_world checks after a crash at teardown
            open(f"{folder}/rank{rank}.done", "w").close()
        try:
            dist.barrier()  # no rank tears its gloo connections down while another still uses them
        finally:
            dist.destroy_process_group()


def _failure_cases(rank: int) -> dict:
    """Cases where ranks disagree or one rank's input is bad: every rank must raise (and the group stay usable)."""
    out = {}
    good = make_input((2, K, D, T), seed=rank)
    attempts = {
        "nan-on-rank-1": lambda: mmdkernels.mmd_loss(
            good if rank != 1 else torch.full_like(good, float("nan")), process_group=dist.group.WORLD
        ),
        "3-dims-on-rank-0": lambda: mmdkernels.mmd_loss(good if rank != 0 else good[0], process_group=dist.group.WORLD),
        "different-d": lambda: mmdkernels.mmd_loss(
            good if rank != 0 else good[:, :, :2].contiguous(), process_group=dist.group.WORLD
        ),
        "different-seeds": lambda: mmdkernels.mmd_loss(
            good, generator=torch.Generator().manual_seed(rank), process_group=dist.group.WORLD
        ),
        "different-mode": lambda: mmdkernels.mmd_loss(
            good, mode=("joint", "pairwise")[rank % 2], process_group=dist.group.WORLD
        ),
        # no generator: the ranks share rank 0's seed, so they agree whatever their global RNG states
        "shared-seed": lambda: (torch.manual_seed(rank), mmdkernels.mmd_loss(good, process_group=dist.group.WORLD))[1],
    }
    for name, attempt in attempts.items():
        try:
            out[name] = attempt().detach()
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def _run_world(world_size: int, cases: list, folder) -> list[dict]:
    context = mp.start_processes(
        _worker, args=(world_size, str(folder), cases), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + WORLD_DEADLINE_S
    try:  # a rank that raised or died raises here (torch names it); the rest are killed
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                running = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                pytest.fail(
                    f"the {world_size}-process world did not finish within {WORLD_DEADLINE_S} s: ranks {running} "
                    f"were still running (their stacks are in the captured stderr)"
                )
    except mp.ProcessExitedException as exc:
        # Seen once in a fresh-clone CI run (session 20): a rank aborted by a signal ("terminate called without an
        # active exception", gloo's threads) after every rank had saved all its results, i.e. while tearing the
        # group down. The results are complete then, and the tests below judge them; a rank that died earlier
        # (no .done file from every rank) still fails here.
        finished = all((folder / f"rank{r}.done").exists() for r in range(world_size))
        if exc.exit_code is None or exc.exit_code >= 0 or not finished:
            raise
        warnings.warn(f"the {world_size}-process world's rank {exc.error_index} died by {exc.signal_name} after "
                      f"saving all its results (at teardown); judging the saved results")
    finally:  # the deadline, a rank's failure or an interrupted test (pytest-timeout): no rank outlives the fixture
        stop_processes(context.processes)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:  # the ranks inherit it; the rest of the session does not
        env.setenv("OMP_NUM_THREADS", "1")
        return {
            size: (cases, _run_world(size, cases, tmp_path_factory.mktemp(f"world{size}")))
            for size, cases in ((2, CASES_2), (3, CASES_3))
        }


def _single_process(case, case_index: int, backend: str | None, dtype: torch.dtype):
    """(loss, grad) as float64 of one process on the concatenated batch, with the permutations the ranks drew."""
    _, _, case_backend, options = case
    device = _device(case_backend)
    x = torch.cat(_inputs(case, case_index)).to(dtype).to(device).requires_grad_()
    generator = torch.Generator(device=device).manual_seed(SEED)
    if backend is None:
        num_frames = x.shape[3] - K if options.get("delay") else x.shape[3]
        perms = ref.draw_permutations(x.shape[0] * num_frames, K, generator, x.device)
        loss = ref.mmd_loss_ref(x, perms=perms, **options)
    else:
        loss = mmdkernels.mmd_loss(x, backend=backend, generator=generator, **options)
    loss.backward()
    return loss.detach().double().cpu(), x.grad.double().cpu()


def _check_case(world_size: int, worlds, name: str) -> None:
    cases, results = worlds[world_size]
    index = [c[0] for c in cases].index(name)
    case = cases[index]
    for rank, result in enumerate(results):
        assert not isinstance(result[name], str), f"rank {rank} raised:\n{result[name]}"
    losses = [r[name][0].double() for r in results]
    grad = torch.cat([r[name][1].double() for r in results])
    assert all(loss == losses[0] for loss in losses), f"ranks disagree on the loss: {losses}"
    loss = losses[0]

    loss64, grad64 = _single_process(case, index, None, torch.float64)
    loss32, grad32 = _single_process(case, index, None, torch.float32)
    options = case[3]
    pairs = math.comb(K, 2) if options["mode"] == "pairwise" else 1
    loss_tol = RULE_FACTOR * (loss32 - loss64).abs() + LOSS_FLOOR * 6 * pairs + LOSS_RTOL * loss64.abs()
    assert (loss - loss64).abs() <= loss_tol, f"loss {loss.item()} vs float64 {loss64.item()}"
    scale = grad64.abs().max()
    # Triton's exp (tl.exp) raised to the chain's powers: the GPU floor (tests/test_mmd_triton.py: rtol 3e-4)
    floor = GRAD_FLOOR_GPU if case[2] == "triton" else GRAD_FLOOR_CPU
    grad_tol = RULE_FACTOR * (grad32 - grad64).abs().max() / scale + floor
    assert (grad - grad64).abs().max() / scale <= grad_tol

    backend = case[2]
    single_loss, single_grad = _single_process(case, index, backend, case_index_dtype(backend))
    torch.testing.assert_close(loss, single_loss, rtol=1e-6, atol=1e-9)
    # float32 summation order: the ranks' partial gradients are added by all_reduce
    torch.testing.assert_close(grad, single_grad, rtol=0, atol=GRAD_FLOOR_CPU * single_grad.abs().max().item())


def case_index_dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend == "reference" else torch.float32


@pytest.mark.parametrize("name", [c[0] for c in CASES_2])
def test_two_ranks_match_single_process(worlds, name):
    _check_case(2, worlds, name)


@pytest.mark.parametrize("name", [c[0] for c in CASES_3])
def test_three_ranks_match_single_process(worlds, name):
    _check_case(3, worlds, name)


@pytest.mark.parametrize("world_size", [2, 3])
def test_bad_input_on_one_rank_raises_on_every_rank(worlds, world_size):
    results = worlds[world_size][1]
    assert "NaN" in results[1]["nan-on-rank-1"] and "rank 1" in results[1]["nan-on-rank-1"]
    for rank in (0, *range(2, world_size)):
        assert "RuntimeError" in results[rank]["nan-on-rank-1"] and "[1]" in results[rank]["nan-on-rank-1"]
    assert "ValueError" in results[0]["3-dims-on-rank-0"] and "[B, K, D, T]" in results[0]["3-dims-on-rank-0"]
    assert all("RuntimeError" in r["3-dims-on-rank-0"] and "[0]" in r["3-dims-on-rank-0"] for r in results[1:])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_must_agree_on_permutations_and_arguments(worlds, world_size):
    results = worlds[world_size][1]
    assert all("different permutations" in r["different-seeds"] for r in results)
    assert all("same arguments" in r["different-mode"] for r in results)
    assert all("same D" in r["different-d"] and "[2, 4" in r["different-d"] for r in results)
    shared = [r["shared-seed"] for r in results]
    assert all(isinstance(v, torch.Tensor) and torch.isfinite(v) and v == shared[0] for v in shared), shared


@pytest.mark.parametrize("num_samples,world_size", [(10, 3), (16384, 2), (7, 4), (1000, 3), (1, 2)])
def test_row_shares_cover_the_plane_evenly(num_samples, world_size):
    shares = [row_share(num_samples, r, world_size) for r in range(world_size)]
    assert shares[0][0] == 0 and shares[-1][1] == num_samples
    assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(shares, shares[1:]))
    sizes = [end - begin for begin, end in shares]
    assert max(sizes) - min(sizes) <= 1


def test_process_group_requires_initialised_distributed():
    if dist.is_initialized():
        pytest.skip(reason="a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        mmdkernels.mmd_loss(make_input((2, K, D, T)), process_group=object())


def _backend_available(backend: str) -> bool:
    return backend != "cuda" or torch.cuda.is_available()


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("mode", ["joint", "pairwise"])
@pytest.mark.parametrize("num_samples", [301, 1000, 1100])
def test_row_range_ops_over_a_partition_sum_to_the_full_ops(backend, mode, num_samples):
    """The op contract in one process: partial results over rows [0, a), [a, b), [b, N) add up to the full op.
    N = 301, 1000, 1100: 2, 4 and 5 blocks of 256 rows (C++ computes each pair of blocks of a symmetric term once,
    owned cyclically; even and odd block counts own differently), the ranges cutting blocks."""
    if not _backend_available(backend):
        pytest.skip(reason="needs a CUDA device")
    if backend == "triton" and num_samples > 301:
        pytest.skip(reason="the Triton interpreter is slow: one small size (N = 20) is its test")
    from mmdkernels.mmd import ops
    from mmdkernels.mmd.plan import build_plan

    device = "cuda" if backend == "cuda" else _device(backend)
    num_samples = 20 if backend == "triton" else num_samples  # the Triton interpreter is slow
    g = torch.Generator().manual_seed(3)
    z = ref.standardize(torch.randn(num_samples, K, D, generator=g) + torch.randn(num_samples, 1, D, generator=g))
    z = z.contiguous().to(device)
    perms = torch.stack([torch.randperm(num_samples, generator=g) for _ in range(K)]).to(device)
    groups = ref.codebook_groups(K, mode, device=device)
    plan = build_plan(ref.DEFAULT_BANDWIDTHS).as_op_args()
    weights = [1e-3, 1e-3, -2e-3]
    shuffle_rows, dhsic_sums, dhsic_rows = ops.row_range_ops(backend)
    ranges = [(0, 5), (5, 5), (5, num_samples // 2), (num_samples // 2, num_samples)]

    full_loss, full_grad = ops.shuffle_op(backend)(z, perms, groups, *plan, weights, True)
    parts = [shuffle_rows(z, perms, groups, *plan, weights, *rows, True) for rows in ranges]
    assert all(loss.dtype == torch.float64 for loss, _ in parts)
    torch.testing.assert_close(sum(loss for loss, _ in parts).float(), full_loss, rtol=1e-5, atol=1e-7)
    scale = full_grad.abs().max().item()
    torch.testing.assert_close(sum(grad for _, grad in parts), full_grad, rtol=0, atol=GRAD_FLOOR_CPU * scale)

    full_loss, full_grad = ops.dhsic_op(backend)(z, groups, *plan, True)
    sums = sum(dhsic_sums(z, groups, *plan, *rows) for rows in ranges)
    assert sums.shape == (K * len(ref.DEFAULT_BANDWIDTHS) + 1, num_samples) and sums.dtype == torch.float64
    parts = [dhsic_rows(z, groups, *plan, sums, *rows, True) for rows in ranges]
    for loss, _ in parts:  # Triton sums each row block's joint Grams in float32: blocks move with the range
        torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-7)
    scale = full_grad.abs().max().item()
    torch.testing.assert_close(sum(grad for _, grad in parts), full_grad, rtol=0, atol=GRAD_FLOOR_CPU * scale)


@pytest.mark.parametrize("rows", [(-1, 5), (5, 4), (0, 400)])
def test_row_range_ops_reject_bad_ranges(rows):
    from mmdkernels.mmd import ops

    ops.row_range_ops("cpp")
    z = torch.randn(300, K, D)
    groups = ref.codebook_groups(K, "joint")
    with pytest.raises(RuntimeError, match="row range"):
        torch.ops.mmdkernels.mmd_dhsic_sums(z, groups, [0.5], [-2], [1], 0.0, *rows)

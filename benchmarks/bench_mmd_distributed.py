"""Global-batch MMD over 2 gloo processes vs the single-process fused loss at the same N_global, in one run.

One spawned world of 2 processes, 1 thread each (the same threads per process for both providers): rank 0 first
times the single-process fused loss (forward + backward) on the whole batch while rank 1 waits at a barrier, then
both ranks time the distributed loss on their halves. Reported (extra_info and stdout): the median per-process
times, their ratio (target: distributed / single < 0.5 at N_global = 16384, MMDKERNELS_BENCH=full) and the agreement
of loss and gradient. Times are wall and CPU seconds of each process: on a shared machine the CPU times are the fair
measure.
The pytest-benchmark time itself is the whole world's wall time (process start-up included): read extra_info.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmdkernels
from benchmarks.conftest import FULL

NUM_CODEBOOKS, DIM, BATCH = 4, 128, 8
N_GLOBAL = 16384 if FULL else 1024
WORLD_SIZE = 2
THREADS_PER_PROCESS = 1
ROUNDS = 2 if FULL else 1
DEADLINE_S = 900 if FULL else 120


def make_batch(num_samples: int) -> torch.Tensor:
    """The global batch [BATCH, K, D, N / BATCH]; rank r takes the r-th contiguous block of batch items."""
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, NUM_CODEBOOKS, DIM, num_samples // BATCH)
    return torch.randn(shape, generator=g) + 0.5 * torch.randn(BATCH, 1, DIM, shape[3], generator=g)


def _timed(function, rounds: int) -> tuple[tuple[float, float], tuple]:
    """((median wall s, median CPU s of this process), last result). CPU time (all of the process's threads, gloo's
    included) measures the work a process does even when other jobs share the cores."""
    walls, cpus, result = [], [], None
    for _ in range(rounds + 1):  # the first call warms up
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return (statistics.median(walls[1:]), statistics.median(cpus[1:])), result


def _loss_and_grad(x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().requires_grad_()
    loss = mmdkernels.mmd_loss(leaf, generator=torch.Generator().manual_seed(0), backend="cpp", **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(THREADS_PER_PROCESS)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=DEADLINE_S),
    )
    batch = make_batch(N_GLOBAL)
    result = {}
    if rank == 0:
        result["single_s"], (result["single_loss"], result["single_grad"]) = _timed(
            lambda: _loss_and_grad(batch), ROUNDS
        )
    dist.barrier()
    mine = batch.chunk(WORLD_SIZE)[rank]
    result["distributed_s"], (result["loss"], result["grad"]) = _timed(
        lambda: _loss_and_grad(mine, process_group=dist.group.WORLD), ROUNDS
    )
    torch.save(result, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def run_world(folder) -> list[dict]:
    context = mp.start_processes(_worker, args=(str(folder),), nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the benchmark world did not finish within {DEADLINE_S} s")
    finally:  # the deadline, a rank's failure or an interrupted run (pytest-timeout): no rank outlives the world
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


@pytest.mark.timeout(DEADLINE_S + 120)  # the full size runs past pytest's default timeout
def test_mmd_distributed_vs_single_process(benchmark, tmp_path):
    benchmark.group = f"mmd-distributed-N{N_GLOBAL}"
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS_PER_PROCESS))
    results = {}

    def run():
        results["ranks"] = run_world(tmp_path)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    ranks = results["ranks"]
    single = ranks[0]
    distributed_s = max(r["distributed_s"][0] for r in ranks)
    distributed_cpu_s = max(r["distributed_s"][1] for r in ranks)
    grad = torch.cat([r["grad"] for r in ranks])
    loss_diff = abs(float(ranks[0]["loss"]) - float(single["single_loss"]))
    grad_diff = float((grad - single["single_grad"]).abs().max() / single["single_grad"].abs().max())
    benchmark.extra_info.update(
        N_global=N_GLOBAL,
        KD=NUM_CODEBOOKS * DIM,
        processes=WORLD_SIZE,
        threads_per_process=THREADS_PER_PROCESS,
        cpu_cores=os.cpu_count(),
        device=platform.processor() or platform.machine(),
        load_average=os.getloadavg()[0],
        single_process_s=round(single["single_s"][0], 4),
        distributed_per_process_s=round(distributed_s, 4),
        ratio=round(distributed_s / single["single_s"][0], 3),
        single_process_cpu_s=round(single["single_s"][1], 4),
        distributed_per_process_cpu_s=round(distributed_cpu_s, 4),
        cpu_ratio=round(distributed_cpu_s / single["single_s"][1], 3),
        loss=float(single["single_loss"]),
        loss_abs_diff=loss_diff,
        grad_max_rel_diff=grad_diff,
    )
    print(f"\n{benchmark.extra_info}")
    assert loss_diff <= 1e-6 * abs(float(single["single_loss"])) + 1e-9
    # Both sides are float32 sums over N terms in different orders, each ~1e-5 (N = 4096) to ~5e-5 (N = 16384) of
    # max |grad| from the float64 reference.
    assert grad_diff <= 1e-4

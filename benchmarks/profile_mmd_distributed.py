"""Where the global-batch MMD's time goes: each stage of mmdkernels/mmd/distributed.py timed on every rank.

    .venv/bin/python benchmarks/profile_mmd_distributed.py [N_GLOBAL]      # default 16384, 2 gloo processes

Prints, per rank, the forward + backward time and the seconds spent in each stage (the fused row-range op, the
agreement, the gather, standardisation, all-reduces, the scatter of the gradient), 1 thread per process as in
bench_mmd_distributed.py. A profile, not a benchmark: compare its "op" line with the single-process loss there.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE, NUM_CODEBOOKS, DIM, BATCH = 2, 4, 128, 8
STAGES = (
    "_agree",
    "gather_samples",
    "_gather_rows",
    "standardize_",
    "_all_reduce",
    "standardize_backward_",
    "scatter_samples",
)


def _timed(times: dict, name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return result

    return wrapper


def _worker(rank: int, num_samples: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    import mmdkernels
    from mmdkernels.mmd import distributed

    times: dict[str, float] = {}
    for name in STAGES:
        setattr(distributed, name, _timed(times, name, getattr(distributed, name)))
    row_range_ops = distributed.ops.row_range_ops
    distributed.ops.row_range_ops = lambda backend: tuple(_timed(times, "op", f) for f in row_range_ops(backend))
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(BATCH, NUM_CODEBOOKS, DIM, num_samples // BATCH, generator=g)
    share = BATCH // WORLD_SIZE
    x = batch[rank * share : (rank + 1) * share].contiguous().requires_grad_()
    for _ in range(2):  # the first call warms up
        times.clear()
        start = time.perf_counter()
        loss = mmdkernels.mmd_loss(
            x, generator=torch.Generator().manual_seed(0), backend="cpp", process_group=dist.group.WORLD
        )
        loss.backward()
        total = time.perf_counter() - start
    stages = ", ".join(f"{name} {seconds:.3f}" for name, seconds in sorted(times.items(), key=lambda kv: -kv[1]))
    print(f"rank {rank}: forward + backward {total:.3f} s; {stages}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    mp.spawn(_worker, args=(n, 29533), nprocs=WORLD_SIZE)

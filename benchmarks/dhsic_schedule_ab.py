"""dHSIC's tile schedules and tile kernels against each other and against the shuffle estimator, in one process.

Each round calls mmd_loss forward + backward (joint, benchmarks.bench_mmd.make_input: K = 4, D = 128) once per
(schedule, tile kernel) pair, forced through MMDKERNELS_DHSIC_SCHEDULE and MMDKERNELS_MMD_TILE (both read at every
call), then the shuffle estimator; the first round is a warm-up (the measured choices of each shape class); the
table shows the minimum over the other rounds. Interleaving in one process is what makes the ratios usable on a
noisy VM (RESULTS.md, session 12):

    python benchmarks/dhsic_schedule_ab.py --threads 2 --sizes 4096 8192 --rounds 6
    python benchmarks/dhsic_schedule_ab.py --schedules auto --kernels auto     # what users get, vs shuffle
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def compare(num_samples: int, rounds: int, schedules: list[str], kernels: list[str]) -> dict[str, float]:
    """{"<schedule>/<kernel>": seconds, ..., "shuffle": seconds}: minima over `rounds` rounds after a warm-up."""
    from benchmarks.bench_mmd import forward_backward, make_input

    x = make_input(num_samples)
    configs = [(s, k) for k in kernels for s in schedules]
    best: dict[str, float] = {}
    saved = {name: os.environ.get(name) for name in ("MMDKERNELS_DHSIC_SCHEDULE", "MMDKERNELS_MMD_TILE")}
    try:
        for round_index in range(rounds + 1):
            times = {}
            for schedule, kernel in configs:
                os.environ["MMDKERNELS_DHSIC_SCHEDULE"], os.environ["MMDKERNELS_MMD_TILE"] = schedule, kernel
                times[f"{schedule}/{kernel}"] = _timed(lambda: forward_backward(x, "cpp", estimator="dhsic"))
            _restore(saved)
            times["shuffle"] = _timed(lambda: forward_backward(x, "cpp", estimator="shuffle"))
            if round_index > 0:
                for key, seconds in times.items():
                    best[key] = min(best.get(key, float("inf")), seconds)
    finally:
        _restore(saved)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--schedules", nargs="+", default=["per-thread", "inside"])
    parser.add_argument("--kernels", nargs="+", default=["gemm", "fused"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks.machine import cpu_model

    print(f"{cpu_model()['cpu_model']}, {args.threads} threads, {args.rounds} rounds (+1 warm-up)")
    for num_samples in args.sizes:
        best = compare(num_samples, args.rounds, args.schedules, args.kernels)
        shuffle = best["shuffle"]
        for key, seconds in best.items():
            print(f"N={num_samples} {key:>20}: {seconds:.3f} s  / shuffle {seconds / shuffle:.3f}")


if __name__ == "__main__":
    main()

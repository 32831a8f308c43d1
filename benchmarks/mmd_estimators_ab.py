"""dHSIC vs shuffle on the C++ CPU kernel, forward + backward, interleaved across source trees (RESULTS.md).

Each (tree, estimator, N) is timed in a fresh subprocess with PYTHONPATH=<tree>, one thread, by process CPU time
(time.process_time, so time the process spent waiting for a shared core is not counted), the minimum over `--calls`
calls; rounds interleave every tree and estimator before the next round, so load changes hit all sides alike.
Input: z = standardised randn(N, 4, 128) + randn(N, 1, 128) (seed 0), joint mode, default bandwidths, the ops called
directly (ops.shuffle_op / ops.dhsic_op, compute_grad=True).

    python benchmarks/mmd_estimators_ab.py --trees /work/main . --sizes 2048 4096 --rounds 3
    python benchmarks/mmd_estimators_ab.py --trees . --sizes 4096 --forward-only   # pass 1 alone (no gradient)
    python benchmarks/mmd_estimators_ab.py --trees . --tile-kernels gemm fused     # dHSIC's distance tiles forced

    python benchmarks/mmd_estimators_ab.py --alternate-tiles 4096 8               # gemm vs fused tiles, one process

--tile-kernels sets MMDKERNELS_MMD_TILE for the dHSIC children (auto: the measured choice; a tree without the switch
ignores it), each kernel a column of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ESTIMATORS = ("shuffle", "dhsic")


def _problem(num_samples: int):
    """(z [N, 4, 128] standardised, joint groups, the default plan's op args): the module docstring's input."""
    import torch

    from mmdkernels.mmd import reference as ref
    from mmdkernels.mmd.plan import build_plan

    g = torch.Generator().manual_seed(0)
    z = torch.randn(num_samples, 4, 128, generator=g) + torch.randn(num_samples, 1, 128, generator=g)
    plan = build_plan(ref.DEFAULT_BANDWIDTHS).as_op_args()
    return ref.standardize(z).contiguous(), ref.codebook_groups(4, "joint"), plan


def _child(estimator: str, num_samples: int, calls: int, compute_grad: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    import mmdkernels
    from mmdkernels.mmd import ops
    from mmdkernels.mmd import reference as ref

    z, groups, plan = _problem(num_samples)
    if estimator == "dhsic":

        def call():
            return ops.dhsic_op("cpp")(z, groups, *plan, compute_grad)

    else:
        perms = ref.draw_permutations(num_samples, 4, torch.Generator().manual_seed(0), z.device)
        weights, _ = ref.normalization_weights("unbiased", num_samples, 1, 1, len(ref.DEFAULT_BANDWIDTHS))

        def call():
            return ops.shuffle_op("cpp")(z, perms, groups, *plan, list(weights), compute_grad)

    call()  # warm-up: loads the library, measures the GEMM shape classes
    times = []
    for _ in range(calls):
        start = time.process_time()
        loss, _ = call()
        times.append(time.process_time() - start)
    return {"min_s": min(times), "loss": float(loss), "package": os.path.dirname(mmdkernels.__file__)}


def _alternate_tiles(num_samples: int, calls: int) -> None:
    """dHSIC forward + backward in one process, MMDKERNELS_MMD_TILE alternating gemm / fused call by call (the
    library reads it at every call), so load changes hit both kernels alike; prints each kernel's minimum."""
    import torch

    torch.set_num_threads(1)
    from mmdkernels.mmd import ops

    z, groups, plan = _problem(num_samples)
    best = {"gemm": float("inf"), "fused": float("inf")}
    for call in range(2 * calls + 2):  # the first two calls warm up
        kernel = "gemm" if call % 2 == 0 else "fused"
        os.environ["MMDKERNELS_MMD_TILE"] = kernel
        start = time.process_time()
        ops.dhsic_op("cpp")(z, groups, *plan, True)
        if call >= 2:
            best[kernel] = min(best[kernel], time.process_time() - start)
    print(f"N={num_samples} dHSIC fwd+bwd, min of {calls}: gemm {best['gemm']:.3f} s, fused {best['fused']:.3f} s, "
          f"fused/gemm {best['fused'] / best['gemm']:.2f} (load {os.getloadavg()[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", default=["."], help="source trees, each with its built mmdkernels")
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3, help="calls per subprocess (the minimum is kept)")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--forward-only", action="store_true", help="compute_grad=False")
    parser.add_argument("--tile-kernels", nargs="+", default=["auto"], choices=["auto", "gemm", "fused"],
                        help="MMDKERNELS_MMD_TILE values for dHSIC")
    parser.add_argument("--alternate-tiles", nargs=2, type=int, metavar=("N", "CALLS"),
                        help="dHSIC with the gemm and fused tiles alternating in one process")
    parser.add_argument("--child", nargs=3, metavar=("ESTIMATOR", "N", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.alternate_tiles:
        _alternate_tiles(*args.alternate_tiles)
        return
    if args.child:
        estimator, num_samples, calls = args.child
        print(json.dumps(_child(estimator, int(num_samples), int(calls), not args.forward_only)))
        return

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    sides = [(e, t) for e in args.estimators for t in (args.tile_kernels if e == "dhsic" else ["auto"])]
    names = {side: side[0] if side[0] == "shuffle" or len(args.tile_kernels) == 1 else f"dhsic-{side[1]}"
             for side in sides}
    best: dict[tuple[str, str, int], float] = {}
    for round_index in range(args.rounds):
        for num_samples in args.sizes:
            for tree in args.trees:
                for estimator, tile in sides:
                    command = [sys.executable, os.path.abspath(__file__), "--child", estimator, str(num_samples),
                               str(args.calls)] + (["--forward-only"] if args.forward_only else [])
                    child_env = dict(env, PYTHONPATH=os.path.abspath(tree), MMDKERNELS_MMD_TILE=tile)
                    out = subprocess.run(command, env=child_env, check=True, capture_output=True, text=True).stdout
                    result = json.loads(out.strip().splitlines()[-1])
                    name = names[(estimator, tile)]
                    key = (tree, name, num_samples)
                    best[key] = min(best.get(key, float("inf")), result["min_s"])
                    load = os.getloadavg()[0]
                    print(f"round {round_index} N={num_samples} {tree} {name}: {result['min_s']:.3f} s "
                          f"(loss {result['loss']:.6g}, load {load:.2f}, {result['package']})", flush=True)
    print("\nminimum over rounds (s), and dHSIC / shuffle:")
    for num_samples in args.sizes:
        for tree in args.trees:
            row = {names[side]: best[(tree, names[side], num_samples)] for side in sides}
            times = "  ".join(f"{name} {t:.3f}" for name, t in row.items())
            ratios = "  ".join(f"{name}/shuffle {t / row['shuffle']:.2f}" for name, t in row.items()
                               if name != "shuffle" and "shuffle" in row)
            print(f"N={num_samples} {tree}: {times}  {ratios}")


if __name__ == "__main__":
    main()

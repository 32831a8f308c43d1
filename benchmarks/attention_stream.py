"""GB/s of the C++ decode attention op over its KV caches, cold (8 layers' caches called in turn) and hot (one
layer's caches called again), per cache length: a scratch measurement for RESULTS.md, not a pytest benchmark.

    python benchmarks/attention_stream.py --threads 1 --lengths 200 1000
"""

from __future__ import annotations

import argparse
import time

import torch

from mmdkernels.attention import ops

LAYERS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 1000])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    op = ops.decode_attention_op("cpp")
    shape = (args.batch, args.heads, args.max_len, args.head_dim)
    for length in args.lengths:
        if not 1 <= length <= args.max_len:
            raise ValueError(f"--lengths must be in [1, --max-len = {args.max_len}], got {length}")
        caches = [(torch.randn(shape), torch.randn(shape)) for _ in range(LAYERS)]
        q = torch.randn(args.batch, args.heads, args.head_dim)
        lengths = torch.full((args.batch,), length)
        for name, order in (("cold", caches), ("hot", caches[:1] * LAYERS)):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(4):
                    for k, v in order:
                        op(q, k, v, lengths, args.head_dim**-0.5)
                best = min(best, (time.perf_counter() - start) / (4 * LAYERS))
            gb = 2 * args.batch * args.heads * length * args.head_dim * 4 / 1e9
            print(f"threads {args.threads} length {length} {name}: {best * 1e6:.0f} us, {gb / best:.1f} GB/s")


if __name__ == "__main__":
    main()

"""GB/s of decode_linear streaming weights from memory, per precision, against F.linear and a `sum` of the same bytes.

48 float32 weights of 4096 x 1024 (768 MiB; bf16 / int8 copies packed once), all called in turn with `rows` rows of
x, the fastest of 4 rounds (a scratch measurement for RESULTS.md, not a pytest benchmark):

    python benchmarks/linear_stream.py --threads 1 --rows 1
"""

from __future__ import annotations

import argparse
import time

import torch

from mmdkernels import decode_linear, pack_decode_weight

BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1}


def best_seconds(fn, rounds: int = 4) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--weights", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = [torch.randn(4096, 1024) for _ in range(args.weights)]
    x = torch.randn(args.rows, 1024)
    with torch.no_grad():
        for precision, size in BYTES_PER_WEIGHT.items():
            packed = weights if precision == "fp32" else [pack_decode_weight(w, precision) for w in weights]
            nbytes = sum(w.numel() for w in weights) * size
            line = f"threads {args.threads} rows {args.rows} {precision}: "
            line += f"{nbytes / best_seconds(lambda: [decode_linear(x, w) for w in packed]) / 1e9:.1f} GB/s"
            if precision == "fp32":
                ours = best_seconds(lambda: [decode_linear(x, w, backend="cpp") for w in weights])
                torchs = best_seconds(lambda: [torch.nn.functional.linear(x, w) for w in weights])
                buffer = torch.rand(nbytes // 4)
                line += f" (C++ kernel {nbytes / ours / 1e9:.1f}, F.linear {nbytes / torchs / 1e9:.1f}, "
                line += f"sum {nbytes / best_seconds(buffer.sum) / 1e9:.1f})"
            print(line, flush=True)


if __name__ == "__main__":
    main()

"""The few-row linear's weight-row blocking inside decode steps: "wide", "spread", "auto" (the measured choice),
"single" and "segments" (MMDKERNELS_LINEAR_BLOCKING, switched between rounds of one process), rounds interleaved, min
ms per step: a scratch measurement for RESULTS.md, not a pytest benchmark. Presets: the benchmark decoder at B = 4,
MusicGen-small at B = 1.

    MMDKERNELS_GEMM_VERBOSE=1 PYTHONPATH=. python benchmarks/linear_blocking_ab.py --threads 1 --preset benchmark-b4
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from models.lm import LMConfig, MusicLM, quantize_for_decode

PRESETS = {
    "benchmark-b4": (dict(dim=512, num_layers=8, num_heads=8, ffn_dim=2048), 4),
    "musicgen-small-b1": (dict(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096), 1),
}
MODES = ("wide", "spread", "auto", "single", "segments")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="benchmark-b4")
    parser.add_argument("--weights", nargs="+", choices=("fp32", "bf16", "int8"), default=["fp32", "bf16", "int8"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes, batch = PRESETS[args.preset]
    torch.manual_seed(0)
    base = MusicLM(LMConfig(pattern="delay", num_codebooks=4, codebook_size=2048, **sizes)).eval()
    for precision in args.weights:
        model = quantize_for_decode(copy.deepcopy(base), precision)
        tokens = torch.full((batch, 4), model.config.special)
        times = {mode: [] for mode in MODES}
        with torch.inference_mode():
            condition = model.encode_condition([f"prompt {i}" for i in range(batch)])
            cache = model.new_cache(condition, 1024)
            position = 0
            os.environ["MMDKERNELS_LINEAR_BLOCKING"] = "auto"
            for _ in range(4):  # auto measures and decides on these
                model.decode_step(tokens, position, cache)
                position += 1
            for _ in range(args.rounds):
                for mode in MODES:
                    os.environ["MMDKERNELS_LINEAR_BLOCKING"] = mode
                    start = time.perf_counter()
                    for _ in range(6):
                        model.decode_step(tokens, position, cache)
                        position += 1
                    times[mode].append((time.perf_counter() - start) / 6)
            os.environ["MMDKERNELS_LINEAR_BLOCKING"] = "auto"
        best = {mode: min(values) for mode, values in times.items()}
        print(
            f"{args.preset} {precision} threads {args.threads}: "
            + "  ".join(f"{mode} {1e3 * t:.2f} ms" for mode, t in best.items())
            + f"  auto/wide {best['auto'] / best['wide']:.3f}  spread/wide {best['spread'] / best['wide']:.3f}"
            + f"  segments/spread {best['segments'] / best['spread']:.3f}"
        )


if __name__ == "__main__":
    main()

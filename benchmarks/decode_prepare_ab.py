"""The fused CPU decode step with its layers prepared once (what MusicLM.decode_step does: the cached
mmdkernels.prepare_decode_layers) against the same step re-gathering and re-checking the layers' 12 L tensors in
Python at every step (the list form of mmdkernels.decode_layers, as every step did before session 13), in one
process, interleaved round by round; the two give identical logits (checked first).

    python benchmarks/decode_prepare_ab.py --threads 2 --case benchmark-decoder --weights fp32 bf16 int8
    python benchmarks/decode_prepare_ab.py --threads 1 --case musicgen-small --weights fp32 int8
"""

from __future__ import annotations

import argparse
import time

import torch

import mmdkernels
from models.lm import LMConfig, MusicLM, decode_layer_weights, quantize_for_decode

CASES = {  # model sizes, batch (the decode benchmarks' cases, benchmarks/bench_decode.py)
    "benchmark-decoder": (dict(dim=512, num_layers=8, num_heads=8, ffn_dim=2048, codebook_size=2048), 4),
    "musicgen-small": (dict(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, codebook_size=2048), 1),
}


def step_with_list(model: MusicLM, tokens: torch.Tensor, step: int, cache) -> torch.Tensor:
    """decode_step, but handing decode_layers the layers as a fresh list of DecoderLayerWeights (checked per call)."""
    positions = torch.tensor([step])
    x = model._embed(tokens[:, :, None], positions)[:, 0]
    if mmdkernels.decode_layers_backend(x, decode_layer_weights(model.layers)) != "cpp":
        raise RuntimeError("the fused C++ step does not run here (no extension built?)")
    x = mmdkernels.decode_layers(
        x, decode_layer_weights(model.layers), cache.self_k, cache.self_v, cache.cross_k, cache.cross_v,
        cache.cross_lengths, step, num_heads=model.config.num_heads, eps=model.layers[0].self_norm.eps, backend="cpp",
    )  # fmt: skip
    return model._logits(model.final_norm(x[:, None]), positions, step)[:, :, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--case", choices=CASES, default="benchmark-decoder")
    parser.add_argument("--weights", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes, batch = CASES[args.case]
    print(f"{args.case}, B = {batch}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps; min ms/step")
    for precision in args.weights:
        torch.manual_seed(0)
        model = quantize_for_decode(MusicLM(LMConfig(pattern="delay", num_codebooks=4, **sizes)).eval(), precision)
        tokens = torch.full((batch, 4), model.config.special)
        calls = {"per-step list": lambda *a: step_with_list(model, *a), "prepared once": model.decode_step}
        with torch.inference_mode():
            condition = model.encode_condition([f"prompt {i}" for i in range(batch)])
            caches = {name: model.new_cache(condition, 1024) for name in calls}
            outs = {name: [call(tokens, s, caches[name]) for s in range(4)][-1] for name, call in calls.items()}
            torch.testing.assert_close(outs["prepared once"], outs["per-step list"], rtol=0, atol=0)
            times = {name: [] for name in calls}
            position = 4
            for r in range(args.rounds):
                for name in calls if r % 2 == 0 else reversed(calls):
                    start = time.perf_counter()
                    for s in range(position, position + args.steps):
                        calls[name](tokens, s, caches[name])
                    times[name].append((time.perf_counter() - start) / args.steps)
                position += args.steps
        best = {name: min(t) for name, t in times.items()}
        print(
            f"  {precision}: per-step list {1e3 * best['per-step list']:.2f}, prepared once "
            f"{1e3 * best['prepared once']:.2f}, prepared / list {best['prepared once'] / best['per-step list']:.3f}"
        )


if __name__ == "__main__":
    main()

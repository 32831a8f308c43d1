"""Times the default-path CPU kernels and a model decode step of whichever mmdkernels (and models) the import path
finds, and prints one JSON line of best-of-rounds times in ms: run it against two checkouts, interleaved, to show a
refactor kept the speed (the numbers in benchmarks/RESULTS.md, "One house: before/after").

    for round in 1 2 3; do
      for tree in /path/before /path/after; do PYTHONPATH=$tree .venv/bin/python benchmarks/compare_trees.py 1; done
    done

Arguments: threads (default 1: then times are CPU time, which a loaded machine disturbs least); --decode-only (only
the decode steps); --weights fp32,int8 (the decode step per weight precision, models.lm.quantize_for_decode; default
fp32). Only public APIs that both trees have are used.
"""

import argparse
import json
import time

import torch

import mmdkernels


def best_ms(fn, reps: int) -> float:
    """Best of reps, in CPU time of this process with one thread (what a shared machine's other loads disturb least:
    time spent waiting for a core is not counted), else in wall time."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * min(times)


def kernels(res: dict) -> None:
    """The default-path kernels, one shape each."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 4, 128, 260, generator=g, requires_grad=True)  # N = 8 * 257 = 2056 after the delay alignment

    def shuffle():
        mmdkernels.mmd_loss(q, delay=True, generator=torch.Generator().manual_seed(1)).backward()

    res["mmd_shuffle_N2056_fwd_bwd"] = best_ms(shuffle, 5)
    dhsic = lambda: mmdkernels.mmd_loss(q, delay=True, estimator="dhsic").backward()  # noqa: E731
    res["mmd_dhsic_N2056_fwd_bwd"] = best_ms(dhsic, 5)
    latents, codebooks = torch.randn(6, 128, 2000, generator=g), torch.randn(4, 2048, 128, generator=g)
    res["rvq_encode_N12000_C2048_K4"] = best_ms(lambda: mmdkernels.rvq_encode(latents, codebooks), 5)
    logits, uniforms = torch.randn(16, 4, 2048, generator=g), torch.rand(8, 4, generator=g, dtype=torch.float64)
    res["sample_B8_cfg_topk250"] = best_ms(
        lambda: mmdkernels.sample(logits, top_k=250, cfg_coef=3.0, uniforms=uniforms), 50
    )
    qa, kc, vc = torch.randn(8, 16, 64, generator=g), *torch.randn(2, 8, 16, 1024, 64, generator=g)
    lengths = torch.full((8,), 1000)
    res["attention_B8_H16_S1000"] = best_ms(lambda: mmdkernels.decode_attention(qa, kc, vc, lengths), 30)
    x, w = torch.randn(8, 1024, generator=g), torch.randn(4096, 1024, generator=g)
    res["linear_M8_1024x4096"] = best_ms(lambda: mmdkernels.decode_linear(x, w), 50)


def decode_steps(res: dict, weights: list[str]) -> None:
    """ms per step of a 1-second generation (B = 4, top-k 250, no CFG) of the benchmark decoder, per precision."""
    from models.generate import generate
    from models.lm import LMConfig, MusicLM, quantize_for_decode

    for precision in weights:
        torch.manual_seed(0)
        config = LMConfig(pattern="delay", dim=512, num_layers=8, num_heads=8, ffn_dim=2048, codebook_size=2048)
        model = quantize_for_decode(MusicLM(config).eval(), precision)
        steps = 50 + model.config.num_codebooks - 1

        def decode():
            prompts = ["a", "b", "c", "d"]
            generate(model, prompts, 1.0, top_k=250, cfg_coef=None, generator=torch.Generator().manual_seed(0))

        key = "decode_step_d512_L8_B4" + ("" if precision == "fp32" else f"_{precision}")
        res[key] = best_ms(decode, 3) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("threads", nargs="?", type=int, default=1)
    parser.add_argument("--decode-only", action="store_true")
    parser.add_argument("--weights", default="fp32", help="comma-separated: fp32, bf16, int8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    res = {"mmdkernels": mmdkernels.__file__}
    if not args.decode_only:
        kernels(res)
    decode_steps(res, args.weights.split(","))
    print(json.dumps(res))


if __name__ == "__main__":
    main()

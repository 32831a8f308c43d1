"""Times the default-path CPU kernels and a model decode step of whichever mmdkernels (and models) the import path
finds, and prints one JSON line of best-of-rounds times in ms: run it against two checkouts, interleaved, to show a
refactor kept the speed (the numbers in benchmarks/RESULTS.md, "One house: before/after").

    for round in 1 2 3; do
      for tree in /path/before /path/after; do PYTHONPATH=$tree .venv/bin/python benchmarks/compare_trees.py 1; done
    done

Argument: threads (default 1: then times are CPU time, which a loaded machine disturbs least). Only public APIs that
both trees have are used.
"""

import json
import sys
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


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    g = torch.Generator().manual_seed(0)
    res = {"mmdkernels": mmdkernels.__file__}
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

    from models.generate import generate
    from models.lm import LMConfig, MusicLM

    torch.manual_seed(0)
    model = MusicLM(LMConfig(pattern="delay", dim=512, num_layers=8, num_heads=8, ffn_dim=2048, codebook_size=2048))
    model.eval()
    steps = 50 + model.config.num_codebooks - 1

    def decode():
        generate(model, ["a", "b", "c", "d"], 1.0, top_k=250, cfg_coef=None, generator=torch.Generator().manual_seed(0))

    res["decode_step_d512_L8_B4"] = best_ms(decode, 3) / steps
    print(json.dumps(res))


if __name__ == "__main__":
    main()

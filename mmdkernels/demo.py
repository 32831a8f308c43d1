"""The main job on its embedded default: measure codebook dependence with the MMD loss, and time the kernels.

It residual-quantizes (fused `rvq_encode`) a synthetic latent sequence with K random codebooks (a real RVQ's
per-codebook outputs are dependent: each stage quantizes what the previous ones left), then reports the loss of
every estimator and mode for those outputs and for a control whose codebooks were made independent, and times the
fused kernel against the materialising reference, forward + backward, side by side.

    python -m mmdkernels.demo [--num-samples 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mmdkernels
from mmdkernels._dispatch import choose_backend


def synthetic_rvq_outputs(batch: int, frames: int, num_codebooks: int, dim: int, seed: int) -> torch.Tensor:
    """RVQ outputs of a smooth random latent sequence (a stand-in for an encoder's output until the codec lands)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, dim, frames, generator=g).cumsum(-1) / frames**0.5
    codebooks = torch.randn(num_codebooks, 64, dim, generator=g) * torch.logspace(0, -1, num_codebooks)[:, None, None]
    _, per_codebook = mmdkernels.rvq_encode(latents, codebooks, return_quantized=True)  # fused, all K stages
    return per_codebook


def independent_control(outputs: torch.Tensor, seed: int) -> torch.Tensor:
    """Each codebook's frames permuted on its own across (batch, time): same marginals, no dependence."""
    batch, num_codebooks, dim, frames = outputs.shape
    g = torch.Generator().manual_seed(seed)
    flat = outputs.permute(1, 0, 3, 2).reshape(num_codebooks, batch * frames, dim)
    shuffled = torch.stack([flat[k, torch.randperm(batch * frames, generator=g)] for k in range(num_codebooks)])
    return shuffled.reshape(num_codebooks, batch, frames, dim).permute(1, 0, 3, 2).contiguous()


def time_forward_backward(x: torch.Tensor, backend: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        leaf = x.detach().requires_grad_()
        start = time.perf_counter()
        mmdkernels.mmd_loss(leaf, generator=torch.Generator().manual_seed(0), backend=backend).backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=4096, help="N = batch x frames (default 4096)")
    parser.add_argument("--codebooks", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    batch = 8
    frames = max(args.num_samples // batch, args.codebooks + 2)
    outputs = synthetic_rvq_outputs(batch, frames, args.codebooks, args.dim, args.seed)
    control = independent_control(outputs, args.seed + 1)
    backend = choose_backend(outputs, None, "mmd_loss")
    print(
        f"mmdkernels {mmdkernels.__version__}: x = [B={batch}, K={args.codebooks}, D={args.dim}, T={frames}], "
        f"N = {batch * frames}, backend = {backend}, torch threads = {torch.get_num_threads()}"
    )

    results = {"shape": list(outputs.shape), "backend": backend, "loss": {}, "timing_s": {}}
    print(f"\n{'estimator':<10} {'mode':<9} {'RVQ outputs':>12} {'independent':>12}")
    for estimator in ("shuffle", "dhsic"):
        for mode in ("joint", "pairwise"):
            kwargs = dict(delay=True, estimator=estimator, mode=mode, generator=torch.Generator().manual_seed(1))
            dependent = mmdkernels.mmd_loss(outputs, **kwargs).item()
            kwargs["generator"] = torch.Generator().manual_seed(1)
            independent = mmdkernels.mmd_loss(control, **kwargs).item()
            results["loss"][f"{estimator}-{mode}"] = {"rvq": dependent, "independent": independent}
            print(f"{estimator:<10} {mode:<9} {dependent:>12.5f} {independent:>12.5f}")

    timing_input = outputs[..., : max(2048 // batch, args.codebooks + 2)]
    fused = time_forward_backward(timing_input, backend)
    reference = time_forward_backward(timing_input, "reference")
    results["timing_s"] = {"fused": fused, "reference": reference, "N": timing_input.shape[0] * timing_input.shape[3]}
    print(
        f"\nforward+backward at N = {results['timing_s']['N']}: fused ({backend}) {fused * 1e3:.1f} ms, "
        f"reference {reference * 1e3:.1f} ms, speed-up {reference / fused:.1f}x"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return results


if __name__ == "__main__":
    main()

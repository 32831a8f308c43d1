"""The C++ kernels on each GEMM path, interleaved in one process (round r of every provider before round r + 1 of
any; fastest round each), so that the ratios hold on a busy machine. Prints markdown tables.

The RVQ encoder (issue 14's size: N = 12,000, C = 2048, K = 4, D = 128) against FAISS IndexFlatL2 stage by stage:

    .venv/bin/python -m benchmarks.compare_gemm_paths [rounds]

The MMD loss forward + backward (joint; shuffle and dHSIC; benchmarks/bench_mmd.py's input) against the published
forward's three bare N x N x (K*D) products on each provider:

    .venv/bin/python -m benchmarks.compare_gemm_paths --mmd 8192 [rounds]
"""

from __future__ import annotations

import importlib.util
import sys
import time

import torch

import mmdkernels
from benchmarks.bench_rvq import DIM, NUM_CODEBOOKS, NUM_ENTRIES, faiss_encode, make_problem
from benchmarks.machine import cpu_model, providers
from mmdkernels.gemm import forced_gemm_path, gemm_mm, gemm_path

NUM_FRAMES = 12000


def main(rounds: int = 5) -> None:
    latents, codebooks = make_problem(NUM_FRAMES)
    calls = {}
    for path in ["auto", *providers()]:

        def encode(path=path):
            with forced_gemm_path(path):
                return mmdkernels.rvq_encode(latents, codebooks, backend="cpp")

        calls[f"cpp, gemm {path}"] = encode
    reference_codes = calls["cpp, gemm auto"]()
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        indexes = []
        for k in range(NUM_CODEBOOKS):
            index = faiss.IndexFlatL2(DIM)
            index.add(codebooks[k].numpy())
            indexes.append(index)
        calls["faiss IndexFlatL2"] = lambda: faiss_encode(latents, codebooks, indexes)
    best = {name: float("inf") for name in calls}
    agreement = {}
    for name, call in calls.items():
        agreement[name] = (call().long() == reference_codes).float().mean().item()
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    faiss_ms = best.get("faiss IndexFlatL2", float("nan")) * 1e3
    print(cpu_model(), f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
    print(f"rvq_encode N = {NUM_FRAMES}, C = {NUM_ENTRIES}, K = {NUM_CODEBOOKS}, D = {DIM}")
    print("| provider | ms | FAISS time / this | codes equal to cpp auto |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in best.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {faiss_ms / (seconds * 1e3):.2f}x | {agreement[name]:.4%} |")
    print("auto's choices:", gemm_path()["choices"])


def _fastest(calls: dict, rounds: int) -> dict:
    """{name: fastest seconds} over `rounds` interleaved rounds of every call (after one untimed call each)."""
    for call in calls.values():
        call()
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main_mmd(num_samples: int, rounds: int = 3) -> None:
    from benchmarks.bench_mmd import DIM as MMD_DIM
    from benchmarks.bench_mmd import NUM_CODEBOOKS as MMD_CODEBOOKS
    from benchmarks.bench_mmd import forward_backward, make_input

    x = make_input(num_samples)
    width = MMD_CODEBOOKS * MMD_DIM
    g = torch.Generator().manual_seed(1)
    flat, other = torch.randn(num_samples, width, generator=g), torch.randn(num_samples, width, generator=g)
    calls = {}
    for provider in providers():
        calls[f"bare 3 products, {provider}"] = lambda p=provider: (
            gemm_mm(flat, flat.t(), p),
            gemm_mm(other, other.t(), p),
            gemm_mm(flat, other.t(), p),
        )
    for estimator in ("shuffle", "dhsic"):
        for path in ["auto", *providers()]:

            def step(path=path, estimator=estimator):
                with forced_gemm_path(path):
                    forward_backward(x, "cpp", estimator=estimator)

            calls[f"{estimator} fwd+bwd, gemm {path}"] = step
    best = _fastest(calls, rounds)
    bare = min(seconds for name, seconds in best.items() if name.startswith("bare"))
    shuffle_auto = best["shuffle fwd+bwd, gemm auto"]
    print(cpu_model(), f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
    print(f"mmd_loss joint, N = {num_samples}, K = {MMD_CODEBOOKS}, D = {MMD_DIM}, fwd+bwd; bare products {width} deep")
    print("| call | s | / fastest bare 3 products | / shuffle auto |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {seconds / bare:.2f} | {seconds / shuffle_auto:.2f} |")
    print("auto's choices:", gemm_path()["choices"])


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--mmd":
        main_mmd(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)

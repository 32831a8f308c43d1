"""The RVQ encoder (issue 14's size: N = 12,000, C = 2048, K = 4, D = 128) on each GEMM path of the C++ kernels
against FAISS IndexFlatL2 stage by stage, interleaved in one process (round r of every provider before round r + 1 of
any; fastest round each), so that the ratios hold on a busy machine. Prints a markdown table.

    .venv/bin/python -m benchmarks.compare_gemm_paths [rounds]
"""

from __future__ import annotations

import importlib.util
import sys
import time

import torch

import mmdkernels
from benchmarks.bench_rvq import DIM, NUM_CODEBOOKS, NUM_ENTRIES, faiss_encode, make_problem
from benchmarks.machine import cpu_model, providers
from mmdkernels.gemm import forced_gemm_path, gemm_path

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


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)

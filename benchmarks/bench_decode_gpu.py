"""GPU decode: the MusicGen-small preset (d = 1024, 24 layers, 16 heads, FFN 4096, K = 4, C = 2048), B = 1, delay
pattern, top-k 250, no CFG; the one-step decode replayed from a CUDA graph vs eager launches. extra_info: ms per
delay step (target <= 5 ms on an H100), real-time factor. Skips without CUDA."""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import FULL
from models.generate import generate
from models.lm import LMConfig, MusicLM

SECONDS = 5.0 if FULL else 2.0
FRAME_RATE = 50

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
def test_decode_musicgen_small_gpu(benchmark, cuda_graph, dtype):
    config = LMConfig.preset("musicgen-small", pattern="delay")
    benchmark.group = f"decode-gpu-musicgen-small-B1-{SECONDS}s-{str(dtype).removeprefix('torch.')}"
    torch.manual_seed(0)
    model = MusicLM(config).to("cuda", dtype).eval()

    def run():
        g = torch.Generator("cuda").manual_seed(0)
        codes = generate(model, ["lofi hip hop"], SECONDS, top_k=250, cfg_coef=None, generator=g, cuda_graph=cuda_graph)
        torch.cuda.synchronize()
        return codes

    codes = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    steps = codes.shape[2] + config.num_codebooks - 1
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        cuda_graph=cuda_graph,
        dtype=str(dtype),
        steps=steps,
        ms_per_step=1e3 * seconds / steps,
        real_time_factor=seconds / SECONDS,
        torch=torch.__version__,
    )

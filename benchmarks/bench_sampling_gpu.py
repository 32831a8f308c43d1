"""GPU sampling, one group per mode: the CUDA and Triton kernels vs the reference on a MusicGen decode step
(B = 16 with CFG, K = 4, V = 2048) and on a larger batch (B = 256, V = 32000, top-p 0.9)."""

import pytest
import torch

import mmdkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
CASES = {
    "B16-cfg-K4-V2048-top_k=250": (16, 4, 2048, dict(top_k=250, cfg_coef=3.0)),
    "B16-cfg-K4-V2048-top_p=0.9": (16, 4, 2048, dict(top_p=0.9, cfg_coef=3.0)),
    "B256-K4-V32000-top_p=0.9": (256, 4, 32000, dict(top_p=0.9)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["cuda", "triton", "reference"])
def test_gpu_sample(benchmark, provider, case):
    batch, num_codebooks, vocab, kwargs = CASES[case]
    benchmark.group = f"gpu-sample-{case}"
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = 2 * batch if "cfg_coef" in kwargs else batch
    logits = 2.0 * torch.randn(rows, num_codebooks, vocab, device="cuda", generator=g)
    uniforms = torch.rand(batch, num_codebooks, dtype=torch.float64, device="cuda", generator=g)

    def step():
        tokens = mmdkernels.sample(logits, uniforms=uniforms, backend=provider, **kwargs)
        torch.cuda.synchronize()
        return tokens

    step()
    tokens = benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    reference = mmdkernels.sample(logits, uniforms=uniforms, backend="reference", **kwargs)
    benchmark.extra_info.update(
        provider=provider,
        device=torch.cuda.get_device_name(),
        agreement_with_reference=(tokens == reference).float().mean().item(),
    )

"""The reference codec: shapes, frame rate, losses, gradients (the MMD term reaches the encoder), bad input."""

import pytest
import torch

from models.codec import Codec, CodecConfig

TINY = dict(channels=4, latent_dim=16, codebook_size=32, mel_scales=(256, 512), mel_bins=32)


def test_default_frame_rate_is_50_hz_at_32_khz():
    config = CodecConfig()
    assert config.hop_length == 640 and config.frame_rate == 50.0


@pytest.mark.parametrize("strides", [(8, 5, 4, 4), (4, 4, 2), (5, 3)])
def test_shapes_round_trip(strides):
    codec = Codec(CodecConfig(strides=strides, **TINY)).eval()
    hop = codec.config.hop_length
    waveform = 0.1 * torch.randn(2, 1, 40 * hop)
    out = codec(waveform)
    assert out.reconstruction.shape == waveform.shape
    assert out.codes.shape == (2, 4, 40) and out.per_codebook.shape == (2, 4, 16, 40)
    assert torch.equal(codec.encode(waveform), out.codes)
    assert codec.decode(out.codes).shape == waveform.shape


@pytest.mark.parametrize("mmd_input", ["pre_quantization", "quantized"])
def test_mmd_term_reaches_the_encoder(mmd_input):
    torch.manual_seed(0)
    config = CodecConfig(lambda_mmd=1.0, mmd_every=0, mmd_input=mmd_input, **TINY)
    codec = Codec(config, generator=torch.Generator().manual_seed(0)).train()
    waveform = 0.1 * torch.randn(2, 1, 20 * 640)
    out = codec(waveform)
    assert {"l1", "mel", "commitment", "mmd", "total"} <= set(out.losses)
    out.losses["mmd"].backward()
    encoder_grads = [p.grad for p in codec.encoder.parameters() if p.grad is not None]
    assert encoder_grads and any(g.abs().sum() > 0 for g in encoder_grads)
    assert all(p.grad is None for p in codec.decoder.parameters())  # the MMD term does not involve the decoder


def test_mmd_streams_are_the_stage_inputs_or_outputs():
    codec = Codec(CodecConfig(**TINY), generator=torch.Generator().manual_seed(0)).train()
    waveform = 0.1 * torch.randn(2, 1, 12 * 640)
    out = codec(waveform)
    assert "mmd" not in out.losses  # the published recipe: the term is the trainer's macro-batch update
    latents = codec.encoder(waveform)
    # stage 0 quantizes the latents themselves; stage k's input is what stages < k left
    assert torch.allclose(out.mmd_streams[:, 0], latents, atol=1e-5)
    left = latents - out.per_codebook[:, 0].detach()
    assert torch.allclose(out.mmd_streams[:, 1], left, atol=1e-5)
    quantized = Codec(CodecConfig(mmd_input="quantized", **TINY)).eval()
    out = quantized(waveform)
    assert out.mmd_streams is out.per_codebook


def test_macro_batch_mmd_uses_every_batch_and_leaves_the_codebooks_alone():
    codec = Codec(CodecConfig(**TINY), generator=torch.Generator().manual_seed(0)).train()
    codec(0.1 * torch.randn(2, 1, 12 * 640))  # k-means initialisation
    codebooks = codec.quantizer.codebooks.clone()
    waveforms = [0.1 * torch.randn(2, 1, 12 * 640, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    loss = codec.macro_batch_mmd(waveforms)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.equal(codec.quantizer.codebooks, codebooks) and codec.quantizer.training
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in codec.encoder.parameters())
    assert all(p.grad is None for p in codec.decoder.parameters())
    # the same value as the published loss on the concatenated streams (same permutations: same generator seed)
    codec.generator.manual_seed(1)
    again = codec.macro_batch_mmd(waveforms)
    codec.generator.manual_seed(1)
    with torch.no_grad():
        codec.quantizer.eval()
        streams = torch.cat([codec(w).mmd_streams for w in waveforms])
        codec.quantizer.train()
    assert float(again) == pytest.approx(float(codec.mmd_criterion(streams)(streams)), rel=1e-4, abs=1e-6)


def test_training_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    codec = Codec(CodecConfig(**TINY)).train()
    t = torch.arange(16 * 640) / 32000
    waveform = (0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.2 * torch.sin(2 * torch.pi * 660 * t))[None, None]
    optimizer = torch.optim.Adam(codec.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = codec(waveform)
        optimizer.zero_grad()
        out.losses["total"].backward()
        optimizer.step()
        losses.append(out.losses["total"].item())
    assert losses[-1] < 0.8 * losses[0]


def test_bad_waveforms_raise():
    codec = Codec(CodecConfig(**TINY))
    with pytest.raises(ValueError, match=r"\[B, 1, S\]"):
        codec(torch.randn(2, 640))
    with pytest.raises(ValueError, match="multiple of the hop 640"):
        codec(torch.randn(1, 1, 1000))
    with pytest.raises(ValueError, match="mmd_input"):
        CodecConfig(mmd_input="latents")

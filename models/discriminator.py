"""EnCodec's multi-scale STFT discriminator and the adversarial losses of the published codec (audiocraft's
`MultiScaleSTFTDiscriminator`, hinge losses, relative feature matching), for `train_codec --adversarial`.

Each scale takes the complex STFT of the waveform (real and imaginary parts as two channels, [B, 2, frames, bins]),
runs 2-d convolutions that stride along frequency with growing time dilation, and returns logits and its feature
maps. Losses (audiocraft's adversarial.py):
    discriminator: mean_s [relu(1 - D_s(x)) + relu(1 + D_s(G(x)))]       (hinge)
    generator:     mean_s relu(1 - D_s(G(x)))                             (hinge)
    features:      mean_s mean_l |f_sl(x) - f_sl(G(x))| / mean |f_sl(x)|  (relative L1 feature matching)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# audiocraft's EnCodec uses (1024, 2048, 512, 256, 128) with hops n_fft / 4 and 32 filters; these are the CPU defaults
DEFAULT_SCALES = (1024, 2048, 512)


class STFTDiscriminator(nn.Module):
    """One scale: waveform [B, 1, S] -> (logits [B, 1, frames, bins'], feature maps)."""

    def __init__(self, n_fft: int, filters: int = 32, dilations: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        convs = [nn.Conv2d(2, filters, (3, 9), padding=(1, 4))]
        for dilation in dilations:
            padding = (dilation, 4)
            convs.append(nn.Conv2d(filters, filters, (3, 9), stride=(1, 2), dilation=(dilation, 1), padding=padding))
        convs.append(nn.Conv2d(filters, filters, (3, 3), padding=(1, 1)))
        self.convs = nn.ModuleList(convs)
        self.post = nn.Conv2d(filters, 1, (3, 3), padding=(1, 1))

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = torch.stft(
            waveform[:, 0], self.n_fft, self.n_fft // 4, window=self.window, normalized=True, return_complex=True
        )  # [B, bins, frames]
        z = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2, frames, bins]
        features = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            features.append(z)
        return self.post(z), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """Discriminators at several STFT sizes: waveform [B, 1, S] -> (list of logits, list of feature-map lists)."""

    def __init__(self, scales: tuple[int, ...] = DEFAULT_SCALES, filters: int = 32):
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(n_fft, filters) for n_fft in scales)

    def forward(self, waveform: torch.Tensor):
        outputs = [d(waveform) for d in self.discriminators]
        return [logits for logits, _ in outputs], [features for _, features in outputs]


def discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Hinge loss of the discriminator, averaged over scales."""
    losses = [F.relu(1 - real).mean() + F.relu(1 + fake).mean() for real, fake in zip(real_logits, fake_logits)]
    return torch.stack(losses).mean()


def generator_losses(
    fake_logits: list[torch.Tensor], real_features: list[list[torch.Tensor]], fake_features: list[list[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(adversarial hinge loss, relative feature-matching loss) of the generator, averaged over scales."""
    adversarial = torch.stack([F.relu(1 - fake).mean() for fake in fake_logits]).mean()
    matching = []
    for real_maps, fake_maps in zip(real_features, fake_features):
        per_layer = [
            (real.detach() - fake).abs().mean() / real.detach().abs().mean().clamp_min(1e-8)
            for real, fake in zip(real_maps, fake_maps)
        ]
        matching.append(torch.stack(per_layer).mean())
    return adversarial, torch.stack(matching).mean()

"""An EnCodec-style audio codec: SEANet convolutional encoder/decoder around the fused residual VQ.

    waveform [B, 1, S] --encoder--> latents [B, D, T] --ResidualVQ--> codes [B, K, T], per-codebook outputs
    [B, K, D, T] --decoder--> waveform [B, 1, S]

Default strides (8, 5, 4, 4) give a hop of 640 samples: 50 frames/s at 32 kHz, as MusicGen's codec. Channels are
configurable, small by default so the codec trains on a CPU. Losses: L1 on the waveform, multi-scale mel L1
(torchaudio), the RVQ commitment loss, and the MMD independence loss of arXiv 2406.02315 on the quantizer's
per-stage streams (delay-aligned by default):

- the published recipe (mmd_every >= 1, the default 32: audiocraft's EnCodec-MMD solver): every mmd_every training
  steps the trainer re-encodes the last mmd_every batches (`macro_batch_mmd`, encoder checkpointed), takes the
  per-stage streams *before* quantization (mmd_input="pre_quantization": stage k's input residual
  x - sum_{j<k} q_j) and back-propagates lambda_mmd times `mmdkernels.MMDLoss` (the published normalisation by the
  macro-batch size B) on its own; `forward` leaves the term out;
- mmd_every = 0: the term is part of every forward pass, on the batch alone (`mmdkernels.mmd_loss`, unbiased).

mmd_input="quantized" takes the straight-through per-codebook outputs q_k instead (values of the chosen entries,
gradient to the encoder).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.utils.checkpoint
import torchaudio
from torch import nn

import mmdkernels

MMD_INPUTS = ("pre_quantization", "quantized")


@dataclass
class CodecConfig:
    sample_rate: int = 32000
    channels: int = 8  # first conv's channels; doubled at every downsampling
    strides: tuple[int, ...] = (8, 5, 4, 4)
    latent_dim: int = 64
    num_codebooks: int = 4
    codebook_size: int = 256
    residual_layers: int = 1
    quantizer_dropout: bool = False
    lambda_mmd: float = 0.0
    mmd_delay: bool = True
    mmd_estimator: str = "shuffle"
    mmd_every: int = 32  # 0: the MMD term in every forward pass; N >= 1: a macro-batch of N batches every N steps
    mmd_input: str = "pre_quantization"  # or "quantized"
    mel_scales: tuple[int, ...] = (512, 1024, 2048)
    mel_bins: int = 64
    # l1 10: the waveform L1 is the only phase-sensitive loss without a discriminator; at weight 1 the phase-blind mel
    # loss dominates, the encoder's latents shrink and the codebooks collapse (README, main job)
    loss_weights: dict = field(default_factory=lambda: {"l1": 10.0, "mel": 1.0, "commitment": 1.0})

    @property
    def hop_length(self) -> int:
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def __post_init__(self):
        if self.mmd_input not in MMD_INPUTS:
            raise ValueError(f"mmd_input must be one of {MMD_INPUTS}, got {self.mmd_input!r}")
        if self.mmd_every < 0:
            raise ValueError(f"mmd_every must be >= 0, got {self.mmd_every}")

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualUnit(nn.Module):
    """x + conv1x1(elu(conv3(elu(x)))) with dilation: SEANet's residual block."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ELU(),
            nn.Conv1d(channels, channels // 2 or 1, 3, dilation=dilation, padding=dilation),
            nn.ELU(),
            nn.Conv1d(channels // 2 or 1, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residual_stack(channels: int, layers: int) -> list[nn.Module]:
    return [ResidualUnit(channels, 3**i) for i in range(layers)]


class SEANetEncoder(nn.Module):
    """waveform [B, 1, S] -> latents [B, latent_dim, S / hop] (S a multiple of the hop)."""

    def __init__(self, config: CodecConfig):
        super().__init__()
        channels = config.channels
        layers: list[nn.Module] = [nn.Conv1d(1, channels, 7, padding=3)]
        for stride in reversed(config.strides):  # EnCodec's encoder applies the decoder's ratios in reverse
            layers += _residual_stack(channels, config.residual_layers)
            padding = (stride + 1) // 2  # length exactly S / stride for odd strides too
            layers += [nn.ELU(), nn.Conv1d(channels, 2 * channels, 2 * stride, stride=stride, padding=padding)]
            channels *= 2
        layers += [nn.ELU(), nn.Conv1d(channels, config.latent_dim, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.net(waveform)


class SEANetDecoder(nn.Module):
    """latents [B, latent_dim, T] -> waveform [B, 1, T * hop]."""

    def __init__(self, config: CodecConfig):
        super().__init__()
        channels = config.channels * 2 ** len(config.strides)
        layers: list[nn.Module] = [nn.Conv1d(config.latent_dim, channels, 7, padding=3)]
        for stride in config.strides:
            padding = (stride + 1) // 2
            layers += [
                nn.ELU(),
                nn.ConvTranspose1d(
                    channels,
                    channels // 2,
                    2 * stride,
                    stride=stride,
                    padding=padding,
                    output_padding=2 * padding - stride,
                ),
            ]
            channels //= 2
            layers += _residual_stack(channels, config.residual_layers)
        layers += [nn.ELU(), nn.Conv1d(channels, 1, 7, padding=3), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


class MultiScaleMelLoss(nn.Module):
    """Mean over scales of L1 between log-mel spectrograms (n_fft in `scales`, hop n_fft / 4)."""

    def __init__(self, sample_rate: int, scales: tuple[int, ...], mel_bins: int):
        super().__init__()
        self.transforms = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=mel_bins, power=1.0
            )
            for n_fft in scales
        )

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = [
            (torch.log(mel(estimate) + 1e-5) - torch.log(mel(target) + 1e-5)).abs().mean() for mel in self.transforms
        ]
        return torch.stack(losses).mean()


@dataclass
class CodecOutput:
    """reconstruction [B, 1, S], codes [B, K, T], per_codebook [B, K, D, T], losses (name -> 0-dim tensor, 'total'),
    mmd_streams [B, K, D, T]: what the MMD loss takes (config.mmd_input)."""

    reconstruction: torch.Tensor
    codes: torch.Tensor
    per_codebook: torch.Tensor
    losses: dict
    mmd_streams: torch.Tensor


class Codec(nn.Module):
    """SEANet encoder, ResidualVQ bottleneck, SEANet decoder, and the training losses (see the module docstring)."""

    def __init__(self, config: CodecConfig | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config or CodecConfig()
        self.encoder = SEANetEncoder(self.config)
        self.quantizer = mmdkernels.ResidualVQ(
            self.config.latent_dim,
            self.config.num_codebooks,
            self.config.codebook_size,
            quantizer_dropout=self.config.quantizer_dropout,
            generator=generator,
        )
        self.decoder = SEANetDecoder(self.config)
        self.mel_loss = MultiScaleMelLoss(self.config.sample_rate, self.config.mel_scales, self.config.mel_bins)
        self.generator = generator

    def _check_waveform(self, waveform: torch.Tensor) -> None:
        if waveform.dim() != 3 or waveform.shape[1] != 1:
            raise ValueError(f"waveform must have shape [B, 1, S], got {tuple(waveform.shape)}")
        if waveform.shape[-1] % self.config.hop_length:
            raise ValueError(
                f"waveform length must be a multiple of the hop {self.config.hop_length}, got {waveform.shape[-1]}"
            )

    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform [B, 1, S] -> codes int64 [B, K, S / hop]."""
        self._check_waveform(waveform)
        return self.quantizer(self.encoder(waveform)).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> waveform [B, 1, T * hop]."""
        return self.decoder(mmdkernels.rvq_decode(codes, self.quantizer.codebooks[: codes.shape[1]]))

    def _mmd_streams(self, latents: torch.Tensor, per_codebook: torch.Tensor) -> torch.Tensor:
        """The per-stage streams [B, K, D, T] the MMD loss takes: stage k's input residual x - sum_{j<k} q_j
        (gradient identity to the latents x, as in audiocraft's RVQ) or the straight-through outputs q_k."""
        if self.config.mmd_input == "quantized":
            return per_codebook
        chosen = per_codebook.detach()
        return latents.unsqueeze(1) - (torch.cumsum(chosen, dim=1) - chosen)

    def mmd_criterion(self, streams: torch.Tensor, process_group=None) -> mmdkernels.MMDLoss:
        """The published loss for streams [B, K, D, T]: MMDLoss (normalised by the batch size B, clamped at 0),
        delay-aligned per config when T > K."""
        return mmdkernels.MMDLoss(
            delay=self.config.mmd_delay and streams.shape[-1] > streams.shape[1],
            estimator=self.config.mmd_estimator,
            # over several processes the ranks must draw the same permutations: a seed shared by rank 0
            generator=self.generator if process_group is None else None,
            process_group=process_group,
        )

    def macro_batch_mmd(self, waveforms: list[torch.Tensor], process_group=None) -> torch.Tensor:
        """The published recipe's MMD term: every waveform [B_i, 1, S] re-encoded (the encoder checkpointed, so only
        its outputs stay in memory until the backward pass), the quantizer in eval mode (no codebook updates), the
        streams of all batches concatenated into one macro-batch and `mmd_criterion` applied to it.

        Returns:
            0-dim loss (not yet multiplied by lambda_mmd); its gradient reaches the encoder only.
        """
        was_training = self.quantizer.training
        self.quantizer.eval()
        try:
            streams = []
            for waveform in waveforms:
                self._check_waveform(waveform)
                latents = torch.utils.checkpoint.checkpoint(self.encoder, waveform, use_reentrant=False)
                streams.append(self._mmd_streams(latents, self.quantizer(latents).per_codebook))
        finally:
            self.quantizer.train(was_training)
        streams = torch.cat(streams)
        return self.mmd_criterion(streams, process_group)(streams)

    def forward(self, waveform: torch.Tensor) -> CodecOutput:
        self._check_waveform(waveform)
        latents = self.encoder(waveform)
        quantized = self.quantizer(latents)
        streams = self._mmd_streams(latents, quantized.per_codebook)
        reconstruction = self.decoder(quantized.quantized)
        losses = {
            "l1": (reconstruction - waveform).abs().mean(),
            "mel": self.mel_loss(reconstruction, waveform),
            "commitment": quantized.commitment_loss,
        }
        total = sum(self.config.loss_weights[name] * value for name, value in losses.items())
        if self.config.lambda_mmd > 0 and self.config.mmd_every == 0 and streams.shape[1] >= 2:
            losses["mmd"] = self.step_mmd(streams)
            total = total + self.config.lambda_mmd * losses["mmd"]
        losses["total"] = total
        return CodecOutput(reconstruction, quantized.codes, quantized.per_codebook, losses, streams)

    def step_mmd(self, streams: torch.Tensor) -> torch.Tensor:
        """The MMD term of one forward pass (mmd_every = 0) on this batch's streams [B, K, D, T]; 0-dim, unbiased."""
        return mmdkernels.mmd_loss(
            streams,
            delay=self.config.mmd_delay and streams.shape[-1] > streams.shape[1],
            estimator=self.config.mmd_estimator,
            generator=self.generator,
        )

"""Thin nn.Modules over the ops (ResidualVQ lives in mmdkernels/rvq/module.py and is re-exported here)."""

from __future__ import annotations

from typing import Sequence

import torch

from mmdkernels.mmd import DEFAULT_BANDWIDTHS, mmd_loss
from mmdkernels.rvq.module import ResidualVQ, RVQOutput

__all__ = ["MMDLoss", "ResidualVQ", "RVQOutput"]


class MMDLoss(torch.nn.Module):
    """Drop-in for the published EnCodec-MMD loss (audiocraft fork, 2024), on the fused kernels.

    With the defaults it reproduces the published values: its batch-size normalisation ("reference"), its clamp
    at 0, and its RNG use (one torch.randperm(N) per codebook on the global RNG), so swapping it in changes only
    speed and memory. `delay` and `device` come first, as in the published constructor; `group_norm_mmd` is
    accepted for signature compatibility and, as in the published code, has no effect.

    Args:
        delay: delay-align codebook k by k frames before the loss.
        device: if set, inputs are moved there first.
        bandwidths, mode, estimator, normalization, generator, backend, process_group: as `mmdkernels.mmd_loss`
            (process_group: the loss over every rank's batch together, a collective).
    Shape:
        forward(inputs [B, K, D, T]) -> 0-dim float32 loss.
    """

    def __init__(
        self,
        delay: bool = False,
        device: torch.device | str | None = None,
        group_norm_mmd: bool = False,
        *,
        bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
        mode: str = "joint",
        estimator: str = "shuffle",
        normalization: str = "reference",
        generator: torch.Generator | None = None,
        backend: str | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
    ):
        super().__init__()
        self.delay = delay
        self.device = device
        self.group_norm_mmd = group_norm_mmd
        self.bandwidths = tuple(bandwidths)
        self.mode = mode
        self.estimator = estimator
        self.normalization = normalization
        self.generator = generator
        self.backend = backend
        self.process_group = process_group

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.device is not None:
            inputs = inputs.to(self.device)
        return mmd_loss(
            inputs,
            delay=self.delay,
            bandwidths=self.bandwidths,
            mode=self.mode,
            estimator=self.estimator,
            normalization=self.normalization,
            generator=self.generator,
            backend=self.backend,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        options = f"mode={self.mode!r}, estimator={self.estimator!r}, normalization={self.normalization!r}"
        return f"delay={self.delay}, {options}"

"""ResidualVQ: the trainable residual vector quantizer of EnCodec / audiocraft, on the fused RVQ kernels.

Semantics (what users know from audiocraft):
- K codebooks of C entries of size D; stage k quantizes the residual left by stages < k to its nearest entry
  (squared L2, ties to the lowest index): `mmdkernels.rvq_encode` runs all K stages in one fused kernel.
- Training: codebooks are not learned by gradients but by exponential moving averages (decay 0.99) of the counts
  and sums of the residuals each entry was chosen for, with Laplace-smoothed counts; each codebook is initialised
  by k-means (k-means++ seeding) on its stage's residuals of the first training batch; entries whose EMA count
  falls below `dead_code_threshold` are reset to random residuals of the current batch.
- Straight-through gradient: the output equals the quantized sum in value and the input in gradient; the
  per-codebook outputs [B, K, D, T] (what the MMD loss consumes) carry the same identity gradient to the input.
- Commitment loss: mean over stages of MSE(residual_k, quantized_k.detach()), times `commitment_weight`.
- Quantizer dropout: in training, a random number of stages n in [1, K] per batch (from `generator`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmdkernels.rvq import rvq_encode


@dataclass
class RVQOutput:
    """quantized [B, D, T] (straight-through), codes int64 [B, n, T], per_codebook [B, n, D, T] (straight-through),
    commitment_loss 0-dim; n = K, or fewer under quantizer dropout."""

    quantized: torch.Tensor
    codes: torch.Tensor
    per_codebook: torch.Tensor
    commitment_loss: torch.Tensor


def kmeans_plus_plus_seeds(samples: torch.Tensor, num_clusters: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding: each next seed drawn with probability proportional to its squared distance to the nearest
    seed so far (one O(N D) pass per seed). samples [N, D] -> [num_clusters, D]."""
    n = samples.shape[0]
    first = int(torch.randint(0, n, (1,), generator=generator, device=samples.device))
    seeds = [samples[first]]
    nearest = ((samples - samples[first]) ** 2).sum(-1)
    for _ in range(1, num_clusters):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        seeds.append(samples[pick])
        nearest = torch.minimum(nearest, ((samples - samples[pick]) ** 2).sum(-1))
    return torch.stack(seeds)


def kmeans(
    samples: torch.Tensor, num_clusters: int, iters: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding then Lloyd iterations. samples [N, D] -> (centroids [num_clusters, D], cluster sizes
    [num_clusters]); empty clusters keep their previous centroid."""
    centroids = kmeans_plus_plus_seeds(samples, num_clusters, generator)
    for _ in range(iters):
        assign = torch.cdist(samples, centroids).argmin(dim=1)
        counts = torch.bincount(assign, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, samples)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    counts = torch.bincount(torch.cdist(samples, centroids).argmin(dim=1), minlength=num_clusters)
    return centroids, counts.to(samples.dtype)


class ResidualVQ(torch.nn.Module):
    """Residual VQ with EMA codebooks, k-means init, dead-code reset, commitment loss, quantizer dropout.

    Args:
        dim: D, the latent size.
        num_codebooks: K.
        codebook_size: C.
        decay: EMA decay of counts and sums.
        epsilon: Laplace smoothing of the counts.
        kmeans_iters: Lloyd iterations of the first-batch initialisation (0: random batch vectors).
        dead_code_threshold: EMA count under which an entry is reset to a random residual of the batch.
        commitment_weight: scale of the commitment loss.
        quantizer_dropout: train with a random number of stages per batch.
        generator: torch.Generator for k-means seeding, dead-code picks and dropout (None: global RNG).
        backend: RVQ kernel backend (None: the fastest available).
    Shape:
        forward(x [B, D, T], num_codebooks=None) -> RVQOutput.
    """

    def __init__(
        self,
        dim: int,
        num_codebooks: int = 4,
        codebook_size: int = 1024,
        *,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 2.0,
        commitment_weight: float = 1.0,
        quantizer_dropout: bool = False,
        generator: torch.Generator | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if dim < 1 or num_codebooks < 1 or codebook_size < 1:
            raise ValueError(
                f"dim, num_codebooks, codebook_size must be >= 1, got {dim}, {num_codebooks}, {codebook_size}"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.epsilon, self.kmeans_iters = decay, epsilon, kmeans_iters
        self.dead_code_threshold, self.commitment_weight = dead_code_threshold, commitment_weight
        self.quantizer_dropout, self.generator, self.backend = quantizer_dropout, generator, backend
        self.register_buffer("codebooks", torch.randn(num_codebooks, codebook_size, dim))
        self.register_buffer("cluster_size", torch.zeros(num_codebooks, codebook_size))
        self.register_buffer("embed_sum", torch.zeros(num_codebooks, codebook_size, dim))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.shape[0]

    def forward(self, x: torch.Tensor, num_codebooks: int | None = None) -> RVQOutput:
        if x.dim() != 3 or x.shape[1] != self.codebooks.shape[2]:
            raise ValueError(f"x must have shape [B, D={self.codebooks.shape[2]}, T], got {tuple(x.shape)}")
        stages = self._num_stages(num_codebooks)
        if self.training and not bool(self.initialized):
            self._kmeans_init(x.detach())
        codebooks = self.codebooks[:stages]
        codes, chosen = rvq_encode(x.detach(), codebooks, return_quantized=True, backend=self.backend)
        chosen = chosen.to(x.dtype)  # [B, n, D, T]
        # residual_k = x - sum_{j<k} chosen_j: values of the encoder's residuals, gradient identity to x
        previous = torch.cumsum(chosen, dim=1) - chosen
        residuals = x.unsqueeze(1) - previous
        per_codebook = residuals + (chosen - residuals).detach()
        quantized = x + (chosen.sum(1) - x).detach()
        commitment = torch.nn.functional.mse_loss(residuals, chosen, reduction="none").mean(dim=(0, 2, 3)).mean()
        if self.training:
            self._ema_update(residuals.detach(), codes)
        return RVQOutput(quantized, codes, per_codebook, self.commitment_weight * commitment)

    def _num_stages(self, requested: int | None) -> int:
        if requested is not None:
            if not 1 <= requested <= self.num_codebooks:
                raise ValueError(f"num_codebooks must be in [1, {self.num_codebooks}], got {requested}")
            return requested
        if self.training and self.quantizer_dropout:
            device = self.generator.device if self.generator is not None else "cpu"
            return int(torch.randint(1, self.num_codebooks + 1, (1,), generator=self.generator, device=device))
        return self.num_codebooks

    @staticmethod
    def _rows(t: torch.Tensor) -> torch.Tensor:
        """[B, D, T] -> [B*T, D]."""
        return t.transpose(1, 2).reshape(-1, t.shape[1])

    @torch.no_grad()
    def _kmeans_init(self, x: torch.Tensor) -> None:
        residual = self._rows(x).float()
        for k in range(self.num_codebooks):
            centroids, sizes = kmeans(residual, self.codebooks.shape[1], self.kmeans_iters, self.generator)
            self.codebooks[k] = centroids
            self.cluster_size[k] = sizes
            self.embed_sum[k] = centroids * sizes[:, None]
            codes = torch.cdist(residual, centroids).argmin(dim=1)
            residual = residual - centroids[codes]
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, residuals: torch.Tensor, codes: torch.Tensor) -> None:
        """residuals [B, n, D, T] (the input of each stage), codes [B, n, T]: EMA of counts and sums, Laplace
        smoothing, then dead-code reset."""
        num_entries = self.codebooks.shape[1]
        for k in range(codes.shape[1]):
            rows = self._rows(residuals[:, k]).float()
            assign = codes[:, k].reshape(-1)
            counts = torch.bincount(assign, minlength=num_entries).float()
            sums = torch.zeros_like(self.embed_sum[k]).index_add_(0, assign, rows)
            self.cluster_size[k].mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_sum[k].mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.cluster_size[k].sum()
            smoothed = (self.cluster_size[k] + self.epsilon) / (total + num_entries * self.epsilon) * total
            self.codebooks[k] = self.embed_sum[k] / smoothed[:, None]
            self._reset_dead_codes(k, rows)

    def _reset_dead_codes(self, k: int, rows: torch.Tensor) -> None:
        dead = self.cluster_size[k] < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        picks = torch.randint(0, rows.shape[0], (num_dead,), generator=self.generator, device=rows.device)
        self.codebooks[k, dead] = rows[picks]
        self.cluster_size[k, dead] = self.dead_code_threshold
        self.embed_sum[k, dead] = rows[picks] * self.dead_code_threshold

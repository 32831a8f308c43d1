"""ResidualVQ (EMA codebooks, k-means init, dead codes, straight-through, commitment, dropout) on the fused kernels."""

import pytest
import torch
from tolerances import assert_codes_near_optimal

import mmdkernels
from mmdkernels.rvq.module import ResidualVQ, kmeans


def clustered(num_clusters=8, dim=6, batch=4, frames=200, seed=0):
    """Latents drawn tightly around `num_clusters` well-separated centres; also returns the true assignment."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(num_clusters, dim, generator=g)
    labels = torch.randint(0, num_clusters, (batch, frames), generator=g)
    x = centres[labels] + 0.01 * torch.randn(batch, frames, dim, generator=g)
    return x.transpose(1, 2).contiguous(), labels


def test_eval_forward_is_the_fused_encode():
    rvq = ResidualVQ(dim=6, num_codebooks=3, codebook_size=16).eval()
    x = torch.randn(2, 6, 50)
    out = rvq(x)
    codes, chosen = mmdkernels.rvq_encode(x, rvq.codebooks, return_quantized=True, backend=rvq.backend)
    assert torch.equal(out.codes, codes)  # the same call: bit for bit (random floats: another backend may break a
    # near-tie another way, so the codes are judged by the rule against the float64 nearest entries)
    rows = x.transpose(1, 2).reshape(-1, 6)
    assert_codes_near_optimal(rows, rvq.codebooks, codes.transpose(1, 2).reshape(-1, 3), name="ResidualVQ codes")
    torch.testing.assert_close(out.per_codebook, chosen)
    torch.testing.assert_close(out.quantized, mmdkernels.rvq_decode(codes, rvq.codebooks))
    assert out.per_codebook.shape == (2, 3, 6, 50)


def test_straight_through_gradient_is_identity():
    rvq = ResidualVQ(dim=4, num_codebooks=2, codebook_size=8).eval()
    x = torch.randn(2, 4, 10, requires_grad=True)
    out = rvq(x)
    (out.quantized.sum() + out.per_codebook.sum()).backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1.0 + 2.0))  # quantized + each of the 2 per-codebook outputs


def test_kmeans_init_recovers_clusters():
    x, labels = clustered()
    rvq = ResidualVQ(dim=6, num_codebooks=1, codebook_size=8, generator=torch.Generator().manual_seed(0)).train()
    out = rvq(x)
    codes = out.codes[:, 0]
    # every true cluster maps to exactly one code and vice versa (k-means++ seeding finds separated clusters)
    pairs = set(zip(labels.flatten().tolist(), codes.flatten().tolist()))
    assert len(pairs) == 8 and len({c for _, c in pairs}) == 8
    assert out.commitment_loss.item() < 1e-3


def test_ema_update_matches_the_formula():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=3, num_codebooks=1, codebook_size=4, decay=0.9, dead_code_threshold=0.0).train()
    rvq.initialized.fill_(True)
    rvq.cluster_size.fill_(5.0)
    rvq.embed_sum.copy_(rvq.codebooks * 5.0)
    before_sum, before_size = rvq.embed_sum.clone(), rvq.cluster_size.clone()
    x = torch.randn(1, 3, 40)
    out = rvq(x)
    rows = x[0].t()
    counts = torch.bincount(out.codes[0, 0], minlength=4).float()
    sums = torch.zeros(4, 3).index_add_(0, out.codes[0, 0], rows)
    size = 0.9 * before_size[0] + 0.1 * counts
    embed_sum = 0.9 * before_sum[0] + 0.1 * sums
    smoothed = (size + 1e-5) / (size.sum() + 4 * 1e-5) * size.sum()
    torch.testing.assert_close(rvq.codebooks[0], embed_sum / smoothed[:, None])


def test_dead_codes_are_reset_to_batch_vectors():
    rvq = ResidualVQ(dim=2, num_codebooks=1, codebook_size=4, generator=torch.Generator().manual_seed(1)).train()
    rvq.initialized.fill_(True)
    rvq.codebooks[0] = torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
    rvq.cluster_size.fill_(10.0)
    rvq.cluster_size[0, 3] = 0.0  # entry 3 has not been used lately
    rvq.embed_sum.copy_(rvq.codebooks * rvq.cluster_size[..., None])
    x = torch.randn(1, 2, 30) * 0.1
    rvq(x)
    rows = x[0].t()
    assert any(torch.equal(rvq.codebooks[0, 3], row) for row in rows)


def test_quantizer_dropout_is_reproducible():
    def stage_counts(seed):
        torch.manual_seed(0)
        rvq = ResidualVQ(4, 4, 8, quantizer_dropout=True, generator=torch.Generator().manual_seed(seed)).train()
        return [rvq(torch.randn(1, 4, 20)).codes.shape[1] for _ in range(8)]

    first = stage_counts(3)
    assert first == stage_counts(3)
    assert len(set(first)) > 1 and all(1 <= n <= 4 for n in first)
    rvq = ResidualVQ(4, 4, 8, quantizer_dropout=True).eval()
    assert rvq(torch.randn(1, 4, 20)).codes.shape[1] == 4  # no dropout in eval


def test_kmeans_handles_fewer_samples_than_clusters():
    centroids, sizes = kmeans(torch.randn(3, 2), 5, 4, torch.Generator().manual_seed(0))
    assert centroids.shape == (5, 2) and sizes.sum() == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"x must have shape \[B, D=4, T\]"):
        ResidualVQ(4, 2, 8)(torch.randn(1, 5, 10))
    with pytest.raises(ValueError, match="num_codebooks must be in"):
        ResidualVQ(4, 2, 8)(torch.randn(1, 4, 10), num_codebooks=3)
    with pytest.raises(ValueError, match="decay"):
        ResidualVQ(4, 2, 8, decay=1.5)

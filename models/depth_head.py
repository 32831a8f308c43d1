"""A small autoregressive depth head over the K codes of one delay-pattern step (a joint model of the step).

The delay LM's K independent heads model one step's codes as a product of marginals given the backbone state h_s.
The depth head (in the spirit of RQ-Transformer's and Moshi's depth transformers, reduced to one residual MLP)
predicts them one after another, codebook k given h_s and the codes c_<k already drawn for that step:

    z_k = h_s + e_pos[k] + sum_{j<k} E_j[c_j],   u_k = LayerNorm(z_k + W2 gelu(W1 LayerNorm(z_k))),
    q(c_k | h_s, c_<k) = softmax(heads[k] u_k)

so q(c_0..c_{K-1} | h_s) = prod_k q(c_k | h_s, c_<k) is a joint model of the step. E_j has C + 1 rows per codebook
(the special token of the pattern's empty positions). Under teacher forcing all K positions run at once (an
exclusive cumulative sum of the code embeddings); decoding runs K small steps per backbone step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DepthHead(nn.Module):
    """hidden(h [B, S, D], step_codes int64 [B, K, S]) -> [B, K, S, D]; step_hidden(h [B, D], codes [B, K], k) ->
    [B, D]: the vectors the K output heads score (logits = u_k @ heads[k].T)."""

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int, hidden: int):
        super().__init__()
        self.code_embedding = nn.Embedding(num_codebooks * (codebook_size + 1), dim)  # K tables of C + 1 rows
        self.position = nn.Embedding(num_codebooks, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.register_buffer("table_offset", torch.arange(num_codebooks) * (codebook_size + 1), persistent=False)

    def _refine(self, z: torch.Tensor) -> torch.Tensor:
        return self.out_norm(z + self.fc2(F.gelu(self.fc1(self.norm(z)))))

    def hidden(self, h: torch.Tensor, step_codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: h [B, S, D], the step's true codes [B, K, S] (special where empty) -> [B, K, S, D]."""
        embedded = self.code_embedding(step_codes + self.table_offset[:, None])  # [B, K, S, D]
        before = torch.cumsum(embedded, dim=1) - embedded  # sum over j < k
        z = h[:, None] + before + self.position.weight[None, :, None]
        return self._refine(z)

    def step_hidden(self, h: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
        """Decoding codebook k of a step: h [B, D], codes [B, K] of which columns < k are drawn -> [B, D]."""
        z = h + self.position.weight[k]
        if k:
            z = z + self.code_embedding(codes[:, :k] + self.table_offset[:k]).sum(1)
        return self._refine(z)

"""A small trainable text encoder for the LM's condition: byte-level tokens -> embedding -> transformer encoder.

No pretrained weights and no tokenizer files: a prompt is its UTF-8 bytes (truncated) after a start token. `None`
is the null condition (one NULL token), the unconditional input of classifier-free guidance and of condition
dropout in training.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

BYTE_VOCAB = 256
START, NULL, PAD = 256, 257, 258  # token ids after the 256 byte values


class Condition(NamedTuple):
    """The encoded prompts one batch of the LM attends to."""

    embeddings: torch.Tensor  # [B, Tc, D] in the LM's width
    mask: torch.Tensor  # bool [B, Tc]: True at real tokens (every row has at least one)


def tokenize(prompts: list[str | None], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens of each prompt, padded to the longest: int64 ids [B, L], bool mask [B, L] (True = token).

    A string becomes [START, bytes...] truncated to max_tokens; None becomes [NULL].
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of str or None, got {prompts!r}")
    rows = []
    for prompt in prompts:
        if prompt is None:
            rows.append([NULL])
        elif isinstance(prompt, str):
            rows.append([START, *prompt.encode("utf-8")][:max_tokens])
        else:
            raise TypeError(f"prompts must hold str or None, got {type(prompt).__name__}")
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, ids != PAD


class TextEncoder(nn.Module):
    """Byte embedding + learned positions + `num_layers` pre-norm transformer encoder layers + projection to the LM
    width. forward(prompts: list[str | None]) -> Condition."""

    def __init__(self, dim: int, out_dim: int, num_layers: int, num_heads: int, max_tokens: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.token_embedding = nn.Embedding(PAD + 1, dim)
        self.position_embedding = nn.Embedding(max_tokens, dim)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.project = nn.Linear(dim, out_dim)

    def forward(self, prompts: list[str | None]) -> Condition:
        """prompts: B strings (or None for the null condition) -> Condition (embeddings [B, Tc, out_dim])."""
        ids, mask = tokenize(prompts, self.max_tokens)
        device = self.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]
        x = self.layers(x, src_key_padding_mask=~mask)
        return Condition(self.project(self.norm(x)), mask)

"""Codebook interleaving patterns: how an LM walks the codes [B, K, T] of K codebooks over T frames.

A pattern maps codes to a step sequence [B, R, S]: S decoding steps, R tokens predicted per step.

- "delay" (MusicGen, product of marginals): R = K, S = T + K - 1; codebook k is delayed by k steps, so step s holds
  codes[:, k, s - k]. The K - 1 corner positions at each end hold no code: they carry the special token.
- "flatten" (joint): R = 1, S = K * T; step s holds codes[:, s % K, s // K] (the K codes of a frame in order).
- "parallel": R = K, S = T; step s holds the K codes of frame s (no delay, no special positions).

The special token (conventionally the codebook size C, one past the last code) fills the empty delay positions;
the LM also feeds it as the start token. `revert_pattern` is the exact inverse of `apply_pattern` on the valid
positions; `valid_mask` says which positions those are.

    seq = apply_pattern(codes, "delay", special=C)                  # [B, K, T + K - 1]
    codes = revert_pattern(seq, "delay", num_codebooks=K, num_frames=T)
"""

from __future__ import annotations

import torch

PATTERNS = ("delay", "flatten", "parallel")


def _check_pattern(pattern) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def num_streams(pattern: str, num_codebooks: int) -> int:
    """R: tokens per step (K for delay and parallel, 1 for flatten)."""
    _check_pattern(pattern)
    _check_positive("num_codebooks", num_codebooks)
    return 1 if pattern == "flatten" else num_codebooks


def num_steps(pattern: str, num_codebooks: int, num_frames: int) -> int:
    """S: decoding steps for num_frames frames (T + K - 1 delay, K * T flatten, T parallel)."""
    _check_pattern(pattern)
    _check_positive("num_codebooks", num_codebooks)
    _check_positive("num_frames", num_frames)
    if pattern == "delay":
        return num_frames + num_codebooks - 1
    if pattern == "flatten":
        return num_frames * num_codebooks
    return num_frames


def frames_done(pattern: str, num_codebooks: int, num_frames: int, steps: int) -> int:
    """How many leading frames are final (all K codes known) once `steps` steps have been decoded."""
    _check_pattern(pattern)
    if pattern == "delay":
        done = steps - num_codebooks + 1
    elif pattern == "flatten":
        done = steps // num_codebooks
    else:
        done = steps
    return max(0, min(num_frames, done))


def _step_index(pattern: str, num_codebooks: int, num_frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position (r, s) of the step sequence: the flat index k * T + t of the code it holds, and whether it
    holds one. Both [R, S]."""
    steps = num_steps(pattern, num_codebooks, num_frames)
    s = torch.arange(steps, device=device)
    if pattern == "flatten":
        k, t = (s % num_codebooks)[None], (s // num_codebooks)[None]
    else:
        k = torch.arange(num_codebooks, device=device)[:, None]
        t = s[None] - k if pattern == "delay" else s[None].expand(num_codebooks, steps)
    valid = (t >= 0) & (t < num_frames)
    return k * num_frames + t.clamp(0, num_frames - 1), valid


def valid_mask(pattern: str, num_codebooks: int, num_frames: int, device=None) -> torch.Tensor:
    """bool [R, S]: True where the step sequence holds a code, False at special positions.

    Example:
        >>> valid_mask("delay", 2, 3)
        tensor([[ True,  True,  True, False],
                [False,  True,  True,  True]])
    """
    return _step_index(pattern, num_codebooks, num_frames, device)[1]


def codebook_of_step(pattern: str, num_codebooks: int, num_frames: int, device=None) -> torch.Tensor:
    """int64 [R, S]: the codebook each position of the step sequence belongs to."""
    index, _ = _step_index(pattern, num_codebooks, num_frames, device)
    return index // num_frames


def _check_codes(codes) -> None:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor of shape [B, K, T], got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor [B, K, T], got {codes.dtype}")
    if codes.dim() != 3 or min(codes.shape) < 1:
        raise ValueError(f"codes must have shape [B, K, T] with B, K, T >= 1, got shape {tuple(codes.shape)}")


def apply_pattern(codes: torch.Tensor, pattern: str, special: int) -> torch.Tensor:
    """Interleave codes into the pattern's step sequence.

    Args:
        codes: integer [B, K, T] codes (any integer dtype, any strides).
        pattern: "delay", "flatten" or "parallel".
        special: the token written where the sequence holds no code (delay corners), e.g. the codebook size C.
    Returns:
        sequence [B, R, S] of codes' dtype: R = num_streams(pattern, K), S = num_steps(pattern, K, T).

    Example:
        >>> apply_pattern(torch.tensor([[[1, 2], [3, 4]]]), "delay", special=9)
        tensor([[[1, 2, 9],
                 [9, 3, 4]]])
    """
    _check_codes(codes)
    _check_pattern(pattern)
    if not isinstance(special, int) or isinstance(special, bool):
        raise TypeError(f"special must be an int token id, got {special!r}")
    batch, num_codebooks, num_frames = codes.shape
    index, valid = _step_index(pattern, num_codebooks, num_frames, codes.device)
    flat = codes.reshape(batch, num_codebooks * num_frames)
    sequence = flat[:, index.reshape(-1)].reshape(batch, *index.shape)
    return sequence.masked_fill(~valid, special)


def _frame_positions(pattern: str, num_codebooks: int, first: int, last: int, device) -> tuple[torch.Tensor, ...]:
    """Where codebook k of frame t sits in the step sequence, for frames first <= t < last: (stream, step), [K, n]."""
    k = torch.arange(num_codebooks, device=device)[:, None]
    t = torch.arange(first, last, device=device)[None]
    if pattern == "delay":
        return k.expand(-1, t.shape[1]), t + k
    if pattern == "flatten":
        return torch.zeros_like(t + k), t * num_codebooks + k
    return k.expand(-1, t.shape[1]), t.expand(num_codebooks, -1)


def _check_sequence(sequence, pattern: str, num_codebooks: int, num_frames: int) -> None:
    _check_pattern(pattern)
    _check_positive("num_codebooks", num_codebooks)
    _check_positive("num_frames", num_frames)
    if not isinstance(sequence, torch.Tensor):
        raise TypeError(f"sequence must be a torch.Tensor of shape [B, R, S], got {type(sequence).__name__}")
    streams, steps = num_streams(pattern, num_codebooks), num_steps(pattern, num_codebooks, num_frames)
    if sequence.dim() != 3 or sequence.shape[1] != streams or sequence.shape[2] < steps:
        raise ValueError(
            f"sequence must have shape [B, {streams}, S >= {steps}] for pattern {pattern!r} with K = {num_codebooks},"
            f" T = {num_frames}, got shape {tuple(sequence.shape)}"
        )


def revert_pattern(sequence: torch.Tensor, pattern: str, num_codebooks: int, num_frames: int) -> torch.Tensor:
    """Inverse of apply_pattern: gather the codes back from the valid positions of a step sequence.

    Args:
        sequence: [B, R, S'] step sequence (or per-position values of any dtype, e.g. log-probabilities), with
            S' >= num_steps(pattern, K, T); positions past S are ignored.
        pattern: the pattern that produced it.
        num_codebooks: K.
        num_frames: T.
    Returns:
        [B, K, T] of sequence's dtype.

    Example:
        >>> codes = revert_pattern(apply_pattern(codes, "flatten", special=C), "flatten", K, T)
    """
    return revert_frames(sequence, pattern, num_codebooks, num_frames, 0, num_frames)


def revert_frames(
    sequence: torch.Tensor, pattern: str, num_codebooks: int, num_frames: int, first: int, last: int
) -> torch.Tensor:
    """Frames first <= t < last of revert_pattern(sequence, ...), reading only their positions: streaming
    generation hands out each run of newly final frames in O(K * (last - first)), not O(K * T).

    Args:
        sequence, pattern, num_codebooks, num_frames: as for revert_pattern (the sequence may be partly decoded:
            only the positions of the requested frames are read).
        first, last: the frame range, 0 <= first <= last <= num_frames.
    Returns:
        [B, K, last - first] of sequence's dtype.
    """
    _check_sequence(sequence, pattern, num_codebooks, num_frames)
    if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last <= num_frames):
        raise ValueError(f"first, last must satisfy 0 <= first <= last <= T = {num_frames}, got {first}, {last}")
    stream, step = _frame_positions(pattern, num_codebooks, first, last, sequence.device)
    return sequence[:, stream, step]

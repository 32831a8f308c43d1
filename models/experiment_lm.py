"""The main job's LM stages (models/experiment.py): train one LM variant on one codec's tokens, measure its held-out
NLL per frame (and per window, for intervals over pieces), generate audio from it and time the decoding.

Variants: "delay" (delay pattern, K independent heads: the product of marginals), "depth" (the same delay backbone
with the autoregressive depth head of models/depth_head.py: a joint model of each step) and "flatten" (the joint
by flattening, K steps per frame; kept for the decoding-speed comparison)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import soundfile
import torch

from models.generate import generate
from models.lm import LMConfig, MusicLM, code_log_likelihoods
from models.train_lm import train_lm

TOP_K = 250  # MusicGen's default sampling
CFG_COEF = 3.0
VARIANTS = {"delay": ("delay", "independent"), "depth": ("delay", "depth"), "flatten": ("flatten", "independent")}


def code_windows(
    pieces: list[torch.Tensor], prompts: list[str], frames: int, piece_ids: list[int] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Non-overlapping windows of `frames` frames from every piece's codes [K, T]: ([N, K, frames], N prompts).
    piece_ids, if given (a list), receives the index of each window's piece."""
    windows, window_prompts = [], []
    for index, (codes, prompt) in enumerate(zip(pieces, prompts)):
        for start in range(0, codes.shape[-1] - frames + 1, frames):
            windows.append(codes[:, start : start + frames])
            window_prompts.append(prompt)
            if piece_ids is not None:
                piece_ids.append(index)
    if not windows:
        longest = max(codes.shape[-1] for codes in pieces)
        raise ValueError(f"no piece holds a window of {frames} frames (longest: {longest}): lower lm_frames")
    return torch.stack(windows), window_prompts


def lm_config(token_sets: dict, variant: str, sizes) -> LMConfig:
    pattern, head = VARIANTS[variant]
    return LMConfig(
        num_codebooks=token_sets["train"]["codes"][0].shape[0],
        codebook_size=token_sets["codebook_size"],
        pattern=pattern,
        head=head,
        dim=sizes.lm_dim,
        num_layers=sizes.lm_layers,
        num_heads=sizes.lm_heads,
        ffn_dim=4 * sizes.lm_dim,
    )


@torch.no_grad()
def window_nll(model: MusicLM, codes: torch.Tensor, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Held-out NLL of every window, summed over its K x T codes: codes [N, K, T] -> float64 [N] (nats)."""
    model.eval()
    totals = []
    for i in range(0, codes.shape[0], batch_size):
        condition = model.encode_condition(prompts[i : i + batch_size])
        rows = codes[i : i + batch_size].to(model.heads.device)
        totals.append(-code_log_likelihoods(model, rows, condition).double().sum(dim=(1, 2)).cpu())
    return torch.cat(totals)


def train_and_evaluate(token_sets: dict, variant: str, sizes, out: Path, *, seed: int, device, progress: bool) -> dict:
    """Trains one LM variant (saved to out/lm.pt); returns {"nll_per_frame", "window_nll", "window_piece",
    "train_log", "config", ...} (window_nll: per held-out window, nats summed over its frames)."""
    train_codes, train_prompts = code_windows(
        token_sets["train"]["codes"], token_sets["train"]["conditions"], sizes.lm_frames
    )
    pieces: list[int] = []
    valid_codes, valid_prompts = code_windows(
        token_sets["valid"]["codes"], token_sets["valid"]["conditions"], sizes.lm_frames, pieces
    )
    config = lm_config(token_sets, variant, sizes)
    started = time.perf_counter()
    model, log = train_lm(
        train_codes,
        train_prompts,
        config=config,
        steps=sizes.lm_steps,
        batch_size=sizes.lm_batch,
        lr=sizes.lm_lr,
        warmup=sizes.lm_warmup,
        seed=seed,
        progress=progress,
        **({"device": device} if str(device) != "cpu" else {}),
    )
    train_seconds = time.perf_counter() - started
    torch.save({"config": dataclasses.asdict(config), "model": model.state_dict()}, out / "lm.pt")
    num_codebooks = config.num_codebooks
    per_window = window_nll(model, valid_codes, valid_prompts)
    return {
        "variant": variant,
        "pattern": config.pattern,
        "head": config.head,
        "nll_per_frame": float(per_window.sum()) / (valid_codes.shape[0] * valid_codes.shape[2]),
        "window_nll": per_window.tolist(),
        "window_piece": pieces,
        "window_frames": int(valid_codes.shape[2]),
        "valid_windows": int(valid_codes.shape[0]),
        "train_windows": int(train_codes.shape[0]),
        "train_seconds": train_seconds,
        # lm_loss is nats per code; a frame holds K codes
        "train_log": [{"step": r["step"], "nll_per_frame": r["loss"] * num_codebooks} for r in log if "loss" in r],
        "config": dataclasses.asdict(config),
    }


def load_lm(path: Path, device) -> MusicLM:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = MusicLM(LMConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


@torch.inference_mode()
def generate_audio(out: Path, codec, conditions: list[str], sizes, *, seed: int, device) -> dict:
    """Generates sizes.generate_seconds of codes per prompt with out/lm.pt, decodes them to out/sample<i>.wav, times
    the decoding."""
    model = load_lm(out / "lm.pt", device)
    pattern = model.config.pattern
    frame_rate = codec.config.frame_rate
    top_k = min(TOP_K, model.config.codebook_size)
    kwargs = dict(pattern=pattern, frame_rate=frame_rate, top_k=top_k, cfg_coef=CFG_COEF)
    warmup = torch.Generator(device=device).manual_seed(seed)
    generate(model, conditions, min(sizes.generate_seconds, 4 / frame_rate), generator=warmup, **kwargs)
    generator = torch.Generator(device=device).manual_seed(seed)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    codes = generate(model, conditions, sizes.generate_seconds, generator=generator, **kwargs)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    waveforms = codec.decode(codes.to(device)).cpu()
    wavs = []
    for i, waveform in enumerate(waveforms):
        path = out / f"sample{i}.wav"
        soundfile.write(str(path), waveform[0].clamp(-1, 1).numpy(), codec.config.sample_rate)
        wavs.append(str(path))
    frames = codes.shape[-1]
    return {
        "pattern": pattern,
        "head": model.config.head,
        "batch": len(conditions),
        "frames": frames,
        "conditions": conditions,
        "decode_seconds": elapsed,
        "ms_per_audio_second": 1000 * elapsed / (frames / frame_rate),
        "ms_per_frame": 1000 * elapsed / frames,
        "wavs": wavs,
    }

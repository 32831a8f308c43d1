"""Batched, KV-cached generation of codes [B, K, T] from text prompts with a MusicLM (models/lm.py).

    codes = generate(model, ["calm piano", "fast drums"], seconds=5, top_k=250, cfg_coef=3.0,
                     generator=torch.Generator().manual_seed(0))

The loop, one step per pattern step (T + K - 1 for delay, K * T for flatten): feed the previous step's tokens, take
logits [rows, R, C] from `model.decode_step`, draw the next tokens with `mmdkernels.sample` (classifier-free
guidance: the B conditional and B unconditional rows run as one batch of 2B), force the special token where the
pattern holds no code, hand newly final frames to `on_frames`. All uniforms are drawn from `generator` up front,
so a seeded generator reproduces the output. On CUDA the one-step decode is captured once in a CUDA graph (static
token/step buffers, the whole cache under a length mask) and replayed at every step. A depth-head model
(LMConfig(head="depth")) runs its backbone once per step and then draws the step's K codes one after another
(`_depth_step`, no CUDA graph).

Profiling (per-step latency, ms per audio second, optional torch.profiler trace):

    python -m models.generate profile --pattern delay --batch 1 --seconds 5 --preset small --device cpu --trace DIR
    python -m models.generate profile --preset musicgen-small --batch 1 --weights int8   # bf16 / int8 weights
    python -m models.generate profile --preset musicgen-small --seconds 30 --weights int8 --cache bf16  # long runs
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from mmdkernels import check_sample_args, sample
from mmdkernels.linear import PRECISIONS
from mmdkernels.patterns import PATTERNS, frames_done, num_steps, revert_frames, revert_pattern, valid_mask
from models.lm import KVCache, LMConfig, MusicLM, decode_weight_bytes, quantize_for_decode

CUDA_GRAPH = ("auto", True, False)
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # profile --cache


class GraphedStep:
    """model.decode_step captured in a CUDA graph: call(tokens [rows, R], step: int) -> logits [rows, R, C] (a
    static buffer, overwritten by the next call). The step is a device tensor: MusicLM.decode_step's fixed-shape
    variant (attention over the whole cache under a length mask)."""

    def __init__(self, model: MusicLM, cache: KVCache, rows: int):
        device = cache.self_k.device
        self.tokens = torch.full((rows, model.streams), model.config.special, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture (allocations, lazy inits); writes only step 0
            for _ in range(2):
                model.decode_step(self.tokens, self.step, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.tokens, self.step, cache)

    def __call__(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.step.fill_(step)
        self.graph.replay()
        return self.logits


def _check_args(model, conditions, seconds, pattern, frame_rate, temperature, top_k, top_p, cfg_coef, generator,
                cuda_graph):  # fmt: skip
    if not isinstance(model, MusicLM):
        raise TypeError(f"model must be a models.lm.MusicLM, got {type(model).__name__}")
    if not isinstance(conditions, (list, tuple)) or not conditions:
        raise ValueError(f"conditions must be a non-empty list of prompts (str or None), got {conditions!r}")
    if any(c is not None and not isinstance(c, str) for c in conditions):
        raise TypeError(f"conditions must hold str or None, got {[type(c).__name__ for c in conditions]}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    if pattern is not None and pattern != model.config.pattern:
        raise ValueError(f"pattern must be None or the model's pattern {model.config.pattern!r}, got {pattern!r}")
    if isinstance(frame_rate, bool) or not isinstance(frame_rate, (int, float)) or not frame_rate > 0:
        raise ValueError(f"frame_rate must be a positive number, got {frame_rate!r}")
    if round(seconds * frame_rate) < 1:
        raise ValueError(f"seconds * frame_rate must give at least one frame, got {seconds} * {frame_rate}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if cfg_coef is not None and (isinstance(cfg_coef, bool) or not isinstance(cfg_coef, (int, float))):
        raise TypeError(f"cfg_coef must be a float or None, got {cfg_coef!r}")
    if cuda_graph not in CUDA_GRAPH:
        raise ValueError(f"cuda_graph must be one of {CUDA_GRAPH}, got {cuda_graph!r}")
    if cuda_graph is True and model.heads.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {model.heads.device}")
    # temperature, top_k, top_p: mmdkernels.sample's own checks, run once before any work
    check_sample_args(torch.zeros(1, 1, 2), temperature, top_k, top_p, None, None, None)


@torch.inference_mode()
def generate(
    model: MusicLM,
    conditions: list[str | None],
    seconds: float,
    *,
    pattern: str | None = None,
    frame_rate: float = 50,
    temperature: float = 1.0,
    top_k: int = 250,
    top_p: float = 1.0,
    cfg_coef: float | None = 3.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_frames: Callable[[torch.Tensor], None] | None = None,
    cuda_graph: str | bool = "auto",
    on_step: Callable[[int], None] | None = None,
    cache_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate round(seconds * frame_rate) frames of codes for each prompt.

    Args:
        model: a MusicLM (its pattern decides the decoding order); put it in eval mode.
        conditions: B prompts; None is the null (unconditional) prompt.
        seconds, frame_rate: T = round(seconds * frame_rate) frames.
        pattern: None or the model's pattern (a guard).
        temperature: 0 is greedy (argmax); top_k: 0 keeps all; top_p: 1.0 disables (mmdkernels.sample).
        cfg_coef: classifier-free guidance coefficient (uncond + coef * (cond - uncond), 2B rows); None disables.
        generator: draws every uniform (torch.Generator on any device); None uses torch's global generator.
        progress: tqdm bar over the steps.
        on_frames: called with each run of newly final frames, int64 [B, K, n], in order, each frame exactly once.
        cuda_graph: "auto" (on when the model is on CUDA), True or False.
        on_step: called with the step index after every step (profiling hooks).
        cache_dtype: the self-attention cache's dtype (MusicLM.new_cache): None keeps the model's; torch.bfloat16
            under a float32 model halves the bytes a step reads from the cache (long generations).
    Returns:
        int64 codes [B, K, T] on the model's device, values in [0, C).

    Example:
        >>> chunks = []
        >>> codes = generate(model, ["calm piano", None], 2.0, cfg_coef=3.0, on_frames=chunks.append,
        ...                  generator=torch.Generator().manual_seed(0))  # [2, K, 100]; chunks concatenate to it
    """
    _check_args(model, conditions, seconds, pattern, frame_rate, temperature, top_k, top_p, cfg_coef, generator,
                cuda_graph)  # fmt: skip
    cfg = model.config
    device = model.heads.device
    batch, streams = len(conditions), model.streams
    num_frames = round(seconds * frame_rate)
    total_steps = num_steps(cfg.pattern, cfg.num_codebooks, num_frames)
    prompts = list(conditions) + ([None] * batch if cfg_coef is not None else [])
    cache = model.new_cache(model.encode_condition(prompts), total_steps, dtype=cache_dtype)
    # a depth-head model draws the K codes of a step one after another: no single captured step (yet)
    use_graph = model.depth_head is None and (cuda_graph is True or (cuda_graph == "auto" and device.type == "cuda"))
    step_fn = GraphedStep(model, cache, len(prompts)) if use_graph else None

    gen_device = generator.device if generator is not None else torch.device("cpu")
    uniforms = torch.rand(total_steps, batch, streams, generator=generator, dtype=torch.float64, device=gen_device)
    uniforms = uniforms.to(device)
    valid = valid_mask(cfg.pattern, cfg.num_codebooks, num_frames, device)  # [R, S]
    sequence = torch.full((batch, streams, total_steps), cfg.special, dtype=torch.long, device=device)
    tokens = torch.full((len(prompts), streams), cfg.special, dtype=torch.long, device=device)
    emitted = 0
    for step in tqdm(range(total_steps), disable=not progress, desc=f"{cfg.pattern} decode", unit="step"):
        draw = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg_coef)
        if model.depth_head is not None:
            new = _depth_step(model, tokens, step, cache, uniforms[step], valid[:, step], draw)
        else:
            logits = step_fn(tokens, step) if step_fn is not None else model.decode_step(tokens, step, cache)
            new = sample(logits, uniforms=uniforms[step], **draw)
        new = torch.where(valid[:, step], new, cfg.special)
        sequence[:, :, step] = new
        tokens = new.repeat(len(prompts) // batch, 1)
        if on_frames is not None:
            done = frames_done(cfg.pattern, cfg.num_codebooks, num_frames, step + 1)
            if done > emitted:
                on_frames(revert_frames(sequence, cfg.pattern, cfg.num_codebooks, num_frames, emitted, done))
                emitted = done
        if on_step is not None:
            on_step(step)
    return revert_pattern(sequence, cfg.pattern, cfg.num_codebooks, num_frames)


def _depth_step(model: MusicLM, tokens, step: int, cache, uniforms, valid, draw: dict) -> torch.Tensor:
    """One step of a depth-head model: the backbone once, then codebook k drawn given the step's codes < k (the same
    drawn codes feed the conditional and unconditional rows). uniforms [B, K], valid bool [K] -> codes [B, K]."""
    h = model.decode_hidden(tokens, step, cache)  # [rows, D]
    rows, batch = h.shape[0], uniforms.shape[0]
    special = model.config.special
    codes = torch.full((rows, model.config.num_codebooks), special, dtype=torch.long, device=h.device)
    for k in range(model.config.num_codebooks):
        drawn = sample(model.depth_logits(h, codes, k)[:, None], uniforms=uniforms[:, k : k + 1], **draw)[:, 0]
        codes[:, k] = torch.where(valid[k], drawn, special).repeat(rows // batch)
    return codes[:batch]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(args) -> dict:
    """Time every decode step of one generation with a random model; print mean, p50, p99 and ms per audio second."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LMConfig.preset(args.preset, pattern=args.pattern)
    model = quantize_for_decode(MusicLM(config).to(device).eval(), args.weights)
    prompts = [f"prompt {i}" for i in range(args.batch)]
    kwargs = dict(seconds=args.seconds, top_k=250, cfg_coef=args.cfg_coef, cuda_graph="auto")
    kwargs["cache_dtype"] = CACHE_DTYPES[args.cache] if args.cache != "model" else None
    generate(model, prompts, **(kwargs | {"seconds": min(args.seconds, 0.2)}))  # warm-up
    marks = []

    def mark(step):
        _synchronize(device)
        marks.append(time.perf_counter())

    _synchronize(device)
    start = time.perf_counter()
    if args.trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        handler = torch.profiler.tensorboard_trace_handler(args.trace)
        with torch.profiler.profile(activities=activities, on_trace_ready=handler, record_shapes=True):
            generate(model, prompts, on_step=mark, **kwargs)
    else:
        generate(model, prompts, on_step=mark, **kwargs)
    total = time.perf_counter() - start
    step_ms = sorted(1e3 * (b - a) for a, b in zip(marks[:-1], marks[1:]))  # step 0 also pays the set-up
    result = {
        "pattern": args.pattern,
        "preset": args.preset,
        "batch": args.batch,
        "device": str(device),
        "weights": args.weights,
        "cache": args.cache,
        "weight_mib_per_step": decode_weight_bytes(model) / 2**20,
        "steps": len(marks),
        "step_ms_mean": statistics.fmean(step_ms),
        "step_ms_p50": step_ms[len(step_ms) // 2],
        "step_ms_p99": step_ms[min(len(step_ms) - 1, math.ceil(0.99 * len(step_ms)) - 1)],
        "ms_per_audio_second": 1e3 * total / args.seconds,
        "real_time_factor": total / args.seconds,
    }
    for key, value in result.items():
        print(f"{key:>20}: {value:.3f}" if isinstance(value, float) else f"{key:>20}: {value}")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("profile", help="per-step decode latency of a random model")
    p.add_argument("--pattern", choices=PATTERNS, default="delay")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--preset", choices=("small", "musicgen-small"), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--weights",
        choices=PRECISIONS,
        default="fp32",
        help="the decode weights' stored precision (models.lm.quantize_for_decode; activations stay float32)",
    )
    p.add_argument(
        "--cache",
        choices=("model", *CACHE_DTYPES),
        default="model",
        help="the self-attention cache's dtype (MusicLM.new_cache); model: the model's own (float32 on the CPU)",
    )
    p.add_argument("--cfg-coef", type=float, default=None, help="classifier-free guidance (2B rows); off by default")
    p.add_argument(
        "--attention",
        choices=("auto", "sdpa", "cpp", "cuda", "triton"),
        default="auto",
        help="force the decode attention kernel of the per-layer path (sets MMDKERNELS_BACKEND_DECODE_ATTENTION and "
        "DECODE_LAYERS=reference, since the fused CPU layers have their own attention; auto: the dispatcher)",
    )
    p.add_argument("--trace", default=None, help="write a torch.profiler trace (TensorBoard/Perfetto) to this folder")
    args = parser.parse_args(argv)
    if args.attention != "auto":
        os.environ["MMDKERNELS_BACKEND_DECODE_ATTENTION"] = args.attention
        os.environ["MMDKERNELS_BACKEND_DECODE_LAYERS"] = "reference"
    profile(args)


if __name__ == "__main__":
    main()

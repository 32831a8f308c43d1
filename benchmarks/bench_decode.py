"""Decoding benchmarks on CPU (models.generate with the static KV cache):

(a) joint (flatten, K * T steps) vs product of marginals (delay, T + K - 1 steps): the same model size, the same
    seconds of audio, B = 1 and B = 8, the two generations interleaved round by round. extra_info per pattern: ms
    per step, ms per frame, frames/s, real-time factor; delay_speedup = flatten time / delay time (best rounds).
    Target: delay >= 3.2x faster (K = 4).
(b) against Hugging Face transformers' MusicgenForCausalLM.generate with an identical decoder (ours is loaded with
    HF's random weights, `models.checkpoints.load_hf_musicgen`): d = 512, 8 layers, 8 heads, FFN 2048, K = 4,
    V = 2048, GELU,
    cross-attention to the same condition embeddings on both sides, no CFG, float32, B = 4, 250 steps, top-k 250.
    Our time also includes encoding the prompts with the text encoder (HF is handed the embeddings). Providers:
    "hf" with an explicit EncoderDecoderCache (the fair baseline), "hf-default-cache" as generate() comes (its
    default cache re-appends the cross-attention K/V at every step), "ours-mmdkernels" (the dispatcher's choice: on
    CPU the fused decode_layers op) and "ours-sdpa" (the per-layer path with torch's SDPA attention, forced through
    MMDKERNELS_BACKEND_DECODE_LAYERS / _DECODE_ATTENTION).
    Target: ours >= 2x faster per step.
(c) one decode step vs its memory floor, per weight precision (models.lm.quantize_for_decode): fp32, bf16 and int8
    copies of one model (shared float32 parameters) and the floor (`x.sum()` over a float32 buffer of the step's
    weight bytes, models.lm.decode_weight_bytes) timed in turn, round by round; extra_info: ms per step, each step as a
    multiple of its floor, bf16 / fp32 and int8 / fp32 (best rounds). Cases: the benchmark decoder of (b) at B = 4 and
    MusicGen-small (d = 1024, 24 layers, 16 heads, K = 4, V = 2048) at B = 1 under MMDKERNELS_BENCH=full; a d = 128
    stand-in by default. MMDKERNELS_BENCH_WEIGHTS=fp32,int8 (say) times only those precisions.
    Targets: fp32 <= 1.3x its floor, bf16 <= 0.55x fp32, int8 <= 0.35x fp32.
(d) a long generation's step: float32 vs bfloat16 self-attention cache (MusicLM.new_cache(dtype=...)), the same
    model and weights, at cache position LONG_POSITION (1500 = 30 s of audio at 50 frames/s under
    MMDKERNELS_BENCH=full, MusicGen-small at B = 1; a stand-in by default), the two caches timed in turn, round by
    round; per weight precision (fp32, int8). extra_info: ms per step for each cache, bf16 / fp32, and the cache's
    MiB read per step. No target in the issue: what a bf16 cache buys where the cache outweighs the weights.

CI sizes by default, the issue's sizes with MMDKERNELS_BENCH=full. Threads: MMDKERNELS_BENCH_THREADS (default 1:
batch-4 decode steps are too small to share across cores, and on a busy machine extra threads only wait).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import time
import warnings

import pytest
import torch

from benchmarks.conftest import FULL
from models.checkpoints import load_hf_musicgen
from models.generate import generate
from models.lm import LMConfig, MusicLM, decode_weight_bytes, quantize_for_decode

THREADS = int(os.environ.get("MMDKERNELS_BENCH_THREADS", "1"))
FRAME_RATE = 50
ROUNDS = 3 if FULL else 2

# (a) pattern comparison
PATTERN_MODEL = dict(dim=512, num_layers=8, num_heads=8, ffn_dim=2048, codebook_size=2048) if FULL else {}
PATTERN_SECONDS = 2.0 if FULL else 0.2

# (b) the Hugging Face comparison
HF_SIZES = (
    dict(dim=512, layers=8, heads=8, codebooks=4, vocab=2048, batch=4, steps=250)
    if FULL
    else dict(dim=64, layers=2, heads=4, codebooks=4, vocab=256, batch=4, steps=12)
)
TOP_K = 250

# (c) step vs floor
WEIGHTS = tuple(os.environ.get("MMDKERNELS_BENCH_WEIGHTS", "fp32,bf16,int8").split(","))
FLOOR_CASES = (
    {
        "benchmark-decoder-B4": (dict(dim=512, num_layers=8, num_heads=8, ffn_dim=2048, codebook_size=2048), 4),
        "musicgen-small-B1": (dict(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, codebook_size=2048), 1),
    }
    if FULL
    else {"stand-in-B4": (dict(dim=128, num_layers=2, num_heads=4, ffn_dim=512, codebook_size=256), 4)}
)
FLOOR_STEPS = 16 if FULL else 4


@pytest.fixture(autouse=True)
def bench_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _info(benchmark, **extra) -> None:
    benchmark.extra_info.update(threads=THREADS, device="cpu", torch=torch.__version__, **extra)


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_delay_vs_flatten(benchmark, batch):
    """Each timed round generates with the delay model, then the flatten model (same size, same seconds): the two
    see the same machine load, so their ratio holds on a busy machine. The benchmark's own time is the pair."""
    models = {}
    for pattern in ("delay", "flatten"):
        torch.manual_seed(0)
        models[pattern] = MusicLM(LMConfig(pattern=pattern, **PATTERN_MODEL)).eval()
    config = models["delay"].config
    benchmark.group = f"decode-delay-vs-flatten-B{batch}-{PATTERN_SECONDS}s-d{config.dim}-L{config.num_layers}"
    prompts = [f"prompt {i}" for i in range(batch)]
    seconds_taken = {"delay": [], "flatten": []}

    def run():
        for pattern, model in models.items():
            g = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            codes = generate(model, prompts, PATTERN_SECONDS, top_k=TOP_K, cfg_coef=None, generator=g)
            seconds_taken[pattern].append(time.perf_counter() - start)
        return codes

    frames = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1).shape[2]
    info = {}
    for pattern, times in seconds_taken.items():
        best = min(times[1:])  # the min over the timed rounds (the first entry is the warm-up)
        steps = {"delay": frames + config.num_codebooks - 1, "flatten": frames * config.num_codebooks}[pattern]
        info |= {
            f"{pattern}_steps": steps,
            f"{pattern}_ms_per_step": 1e3 * best / steps,
            f"{pattern}_ms_per_frame": 1e3 * best / frames,
            f"{pattern}_frames_per_s": batch * frames / best,
            f"{pattern}_real_time_factor": best / PATTERN_SECONDS,
        }
    info["delay_speedup"] = min(seconds_taken["flatten"][1:]) / min(seconds_taken["delay"][1:])
    _info(benchmark, batch=batch, seconds_of_audio=PATTERN_SECONDS, **info)


def _hf_model():
    import transformers

    s = HF_SIZES
    config = transformers.MusicgenDecoderConfig(
        vocab_size=s["vocab"],
        num_codebooks=s["codebooks"],
        hidden_size=s["dim"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        ffn_dim=4 * s["dim"],
        activation_function="gelu",
        pad_token_id=s["vocab"],
        bos_token_id=s["vocab"],
        decoder_start_token_id=s["vocab"],
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return transformers.MusicgenForCausalLM(config).eval()


@pytest.mark.parametrize("provider", ["hf", "hf-default-cache", "ours-sdpa", "ours-mmdkernels"])
def test_decode_vs_hf(benchmark, provider, monkeypatch):
    pytest.importorskip("transformers", reason="transformers is not installed")
    import transformers

    s = HF_SIZES
    benchmark.group = f"decode-vs-hf-d{s['dim']}-L{s['layers']}-V{s['vocab']}-B{s['batch']}-{s['steps']}steps"
    hf = _hf_model()
    ours = MusicLM(
        LMConfig(
            pattern="delay",
            num_codebooks=s["codebooks"],
            codebook_size=s["vocab"],
            dim=s["dim"],
            num_layers=s["layers"],
            num_heads=s["heads"],
            ffn_dim=4 * s["dim"],
        )
    ).eval()
    load_hf_musicgen(ours, hf)
    prompts = [f"an upbeat jazz tune, take {i}" for i in range(s["batch"])]
    with torch.inference_mode():
        condition = ours.encode_condition(prompts)
    start_ids = torch.full((s["batch"] * s["codebooks"], 1), s["vocab"])
    frames = s["steps"] - s["codebooks"] + 1  # delay: T + K - 1 steps

    rounds, warmup = ROUNDS, 1
    if provider.startswith("hf"):
        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", module="transformers")
        if provider == "hf-default-cache" and FULL:
            rounds, warmup = 1, 0  # minutes per run

        def run():
            # "hf" gets an explicit encoder-decoder cache; "hf-default-cache" is generate() as it comes: in
            # transformers 5.24 its plain DynamicCache takes the cross-attention K/V appended at every step (the
            # cache grows by Tc + 1 entries a step, O(S) work per step)
            cache = {}
            if provider == "hf":
                cache["cache"] = transformers.EncoderDecoderCache(
                    transformers.DynamicCache(), transformers.DynamicCache()
                )
            with torch.inference_mode():
                return hf.generate(
                    input_ids=start_ids,
                    **cache,
                    encoder_hidden_states=condition.embeddings,
                    encoder_attention_mask=condition.mask.long(),
                    do_sample=True,
                    top_k=TOP_K,
                    num_return_sequences=1,
                    max_new_tokens=s["steps"],
                    min_new_tokens=s["steps"],
                )
    else:
        if provider == "ours-sdpa":
            monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LAYERS", "reference")
            monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_ATTENTION", "sdpa")

        def run():
            g = torch.Generator().manual_seed(0)
            seconds = frames / FRAME_RATE
            return generate(ours, prompts, seconds, top_k=TOP_K, cfg_coef=None, generator=g)

    codes = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup)
    assert tuple(codes.shape) == (s["batch"], s["codebooks"], frames)
    seconds = benchmark.stats.stats.mean
    _info(
        benchmark,
        provider=provider,
        ms_per_step=1e3 * seconds / s["steps"],
        ms_per_step_min=1e3 * benchmark.stats.stats.min / s["steps"],
        transformers=importlib.metadata.version("transformers"),
        **{f"config_{k}": v for k, v in s.items()},
    )


def _best_seconds(fn, rounds_out: list) -> None:
    start = time.perf_counter()
    fn()
    rounds_out.append(time.perf_counter() - start)


@pytest.mark.parametrize("case", FLOOR_CASES)
def test_decode_step_vs_floor(benchmark, case):
    """FLOOR_STEPS decode steps of each precision, then each floor, in turn per round; min over rounds per step."""
    for precision in WEIGHTS:
        if precision not in ("fp32", "bf16", "int8"):
            raise ValueError(f"MMDKERNELS_BENCH_WEIGHTS must list fp32, bf16 or int8, got {precision!r}")
    sizes, batch = FLOOR_CASES[case]
    torch.manual_seed(0)
    base = MusicLM(LMConfig(pattern="delay", num_codebooks=4, **sizes)).eval()
    shared = {id(p): p for p in base.parameters()}  # the copies share the float32 parameters
    models = {w: quantize_for_decode(copy.deepcopy(base, dict(shared)), w) for w in WEIGHTS}
    weight_bytes = {w: decode_weight_bytes(m) for w, m in models.items()}
    buffers = {w: torch.rand(n // 4) for w, n in weight_bytes.items()}
    benchmark.group = f"decode-step-vs-floor-{case}"
    tokens = torch.full((batch, 4), base.config.special)
    with torch.inference_mode():
        condition = base.encode_condition([f"prompt {i}" for i in range(batch)])
        caches = {w: m.new_cache(condition, 1024) for w, m in models.items()}
    times = {key: [] for w in WEIGHTS for key in (w, f"floor_{w}")}
    position = [0]

    def run():
        with torch.inference_mode():
            for w, model in models.items():
                step = position[0]
                _best_seconds(lambda: [model.decode_step(tokens, step + i, caches[w]) for i in range(FLOOR_STEPS)],
                              times[w])  # fmt: skip
                _best_seconds(lambda: [buffers[w].sum() for _ in range(FLOOR_STEPS)], times[f"floor_{w}"])
            position[0] += FLOOR_STEPS

    benchmark.pedantic(run, rounds=ROUNDS + 2, warmup_rounds=1)
    best = {key: min(values[1:]) / FLOOR_STEPS for key, values in times.items()}  # the first entry: warm-up
    info = {}
    for w in WEIGHTS:
        info |= {
            f"{w}_ms_per_step": 1e3 * best[w],
            f"{w}_floor_ms": 1e3 * best[f"floor_{w}"],
            f"{w}_weight_mib": weight_bytes[w] / 2**20,
            f"{w}_vs_floor": best[w] / best[f"floor_{w}"],
            f"{w}_floor_gb_per_s": weight_bytes[w] / best[f"floor_{w}"] / 1e9,
        }
        if w != "fp32" and "fp32" in WEIGHTS:
            info[f"{w}_vs_fp32"] = best[w] / best["fp32"]
    _info(benchmark, case=case, batch=batch, **info)


# (d) a long generation's step, float32 vs bfloat16 cache
LONG_POSITION = 1500 if FULL else 200
LONG_MODEL = FLOOR_CASES["musicgen-small-B1" if FULL else "stand-in-B4"][0]


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_decode_step_cache_precision(benchmark, weights):
    """FLOOR_STEPS steps at LONG_POSITION with each cache in turn per round; min over rounds per step."""
    torch.manual_seed(0)
    model = quantize_for_decode(MusicLM(LMConfig(pattern="delay", num_codebooks=4, **LONG_MODEL)).eval(), weights)
    benchmark.group = f"decode-step-cache-precision-{weights}"
    tokens = torch.full((1, 4), model.config.special)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    with torch.inference_mode():
        condition = model.encode_condition(["a prompt"])
        caches = {name: model.new_cache(condition, LONG_POSITION + FLOOR_STEPS, dtype=d) for name, d in dtypes.items()}
    times = {name: [] for name in caches}

    def run():
        with torch.inference_mode():
            for name, cache in caches.items():
                steps = range(LONG_POSITION, LONG_POSITION + FLOOR_STEPS)
                _best_seconds(lambda: [model.decode_step(tokens, s, cache) for s in steps], times[name])

    benchmark.pedantic(run, rounds=ROUNDS + 2, warmup_rounds=1)
    best = {name: min(values[1:]) / FLOOR_STEPS for name, values in times.items()}  # the first entry: warm-up
    cache_bytes = {name: 2 * c.self_k[:, :, :, :LONG_POSITION].numel() * c.self_k.element_size()
                   for name, c in caches.items()}  # fmt: skip
    _info(
        benchmark,
        weights=weights,
        position=LONG_POSITION,
        **{f"{name}_cache_ms_per_step": 1e3 * best[name] for name in caches},
        **{f"{name}_cache_mib_per_step": cache_bytes[name] / 2**20 for name in caches},
        bf16_vs_fp32_cache=best["bf16"] / best["fp32"],
    )

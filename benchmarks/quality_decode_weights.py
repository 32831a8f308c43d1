"""What bf16 and int8 decode weights (models.lm.quantize_for_decode) and a bf16 self-attention cache
(MusicLM.new_cache(dtype=torch.bfloat16)) cost in quality, against fp32 weights and cache, on a trained LM.

    .venv/bin/python -m benchmarks.quality_decode_weights             # trains a small LM on synthetic codes (~1 min)
    .venv/bin/python -m benchmarks.quality_decode_weights --lm runs/lm-delay/lm.pt --codes valid_codes.pt

Without --lm it trains a small delay LM (models.train_lm, LMConfig "small": d = 128, 2 layers, K = 4, C = 256) on
synthetic codes with structure a model can learn (each codebook a Markov chain on its own previous code,
`synthetic_codes`), and holds out a share of them. For each weight precision, with a float32 cache and then with a
bfloat16 one:

- held-out NLL per frame (nats, `models.lm.nll_per_frame`; teacher-forced through the packed weights, no cache:
  the same for both caches);
- held-out NLL per frame of the KV-cached decode steps (teacher-forced inputs, one step at a time through the
  cache: what the cache's precision changes), over the rows decoded, and its change against fp32 weights and cache:
  the mean paired difference over those rows with its 95 % t interval (models.stats.paired_difference) and whether
  the interval excludes zero;
- max |logit error| vs fp32 over every KV-cached decode step of the held-out rows (and that error relative to the
  largest fp32 logit);
- identical tokens, same context: every teacher-forced decode step of the held-out rows sampled (top-k 250) with
  the same uniforms as fp32's: the fraction of identical draws (the quantisation's own effect, step by step);
- identical tokens, whole generations: generate() with the same seeded generator (the same uniforms) as the fp32
  run, with CFG (2B rows): the fraction of codes equal to fp32's, and the mean frame of the first difference per row
  (one flipped draw changes the whole continuation after it, so this fraction is far below the per-step one).
Prints one JSON object per (weights, cache).
"""

from __future__ import annotations

import argparse
import json

import torch

from mmdkernels import sample
from models.generate import generate
from models.lm import LMConfig, MusicLM, nll_per_frame, quantize_for_decode, teacher_forcing
from models.stats import paired_difference
from models.train_lm import load_lm, train_lm

PRECISIONS = ("fp32", "bf16", "int8")
CACHES = {"fp32": None, "bf16": torch.bfloat16}  # the self-attention cache's dtype (None: the model's float32)


def synthetic_codes(rows: int, codebooks: int, frames: int, size: int, seed: int) -> torch.Tensor:
    """int64 [rows, K, T]: each codebook a Markov chain: code k at frame t = perm_k[code k at t - 1] with probability
    0.9, else uniform (one fixed random permutation per codebook). Learnable (a bigram per codebook: about
    0.1 log(C / 0.1) + H(0.9) ~ 1.1 nats per code at C = 256 once learned), not trivial."""
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(size, generator=g) for _ in range(codebooks)])  # [K, C]
    codes = torch.empty(rows, codebooks, frames, dtype=torch.long)
    codes[:, :, 0] = torch.randint(0, size, (rows, codebooks), generator=g)
    for t in range(1, frames):
        follow = perms.gather(1, codes[:, :, t - 1].t()).t()  # [rows, K]
        keep = torch.rand(rows, codebooks, generator=g) < 0.9
        codes[:, :, t] = torch.where(keep, follow, torch.randint(0, size, (rows, codebooks), generator=g))
    return codes


@torch.inference_mode()
def decode_logits(model: MusicLM, codes: torch.Tensor, cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every KV-cached decode step's logits [B, K, S, C] on the teacher-forced inputs of codes [B, K, T]."""
    inputs, _, _ = teacher_forcing(codes, model.config.pattern, model.config.special)
    cache = model.new_cache(model.encode_condition([None] * codes.shape[0]), inputs.shape[2], dtype=cache_dtype)
    return torch.stack([model.decode_step(inputs[:, :, s], s, cache) for s in range(inputs.shape[2])], 2)


def decoded_nll_per_row(model: MusicLM, logits: torch.Tensor, codes: torch.Tensor) -> list[float]:
    """Nats per frame of each row of codes [B, K, T] under the decode steps' logits [B, K, S, C] (the pattern's
    valid steps)."""
    _, targets, valid = teacher_forcing(codes, model.config.pattern, model.config.special)
    targets = torch.where(valid, targets, 0)  # the special token where the pattern holds no code: not scored
    picked = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]  # [B, K, S]
    return (-picked[:, valid].sum(1) / codes.shape[2]).tolist()


def same_context_draws(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """logits [B, K, S, C] -> the tokens [B, K, S] drawn at each step with uniforms [S, B, K] (top-k 250)."""
    return torch.stack([sample(logits[:, :, s], top_k=250, uniforms=uniforms[s]) for s in range(logits.shape[2])], 2)


def measure(model: MusicLM, valid: torch.Tensor, rows: int, seconds: float) -> list[dict]:
    reference_logits = reference_codes = reference_draws = reference_rows = None
    results, valid_nll = [], {}  # valid_nll: the teacher-forced NLL per weight precision (no cache: once each)
    for cache, precision in ((c, p) for c in CACHES for p in PRECISIONS):
        quantize_for_decode(model, precision)
        logits = decode_logits(model, valid[:rows], CACHES[cache])
        codes = generate(model, [None] * rows, seconds, cfg_coef=3.0, cache_dtype=CACHES[cache],
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
        if reference_logits is None:
            uniforms = torch.rand(logits.shape[2], rows, logits.shape[1], generator=torch.Generator().manual_seed(1))
        draws = same_context_draws(logits, uniforms)
        rows_nll = decoded_nll_per_row(model, logits, valid[:rows])
        if reference_logits is None:  # fp32 weights and cache: the reference of every other row
            reference_logits, reference_codes, reference_draws, reference_rows = logits, codes, draws, rows_nll
        change = paired_difference(reference_rows, rows_nll)  # paired over the held-out rows, t interval
        if precision not in valid_nll:
            valid_nll[precision] = nll_per_frame(model, valid)
        same = codes == reference_codes
        differs = (~same).any(1)  # [B, T]: frames where any codebook differs
        first_diff = [int(row.nonzero().min()) if row.any() else row.numel() for row in differs]
        error = float((logits - reference_logits).abs().max())
        results.append(
            {
                "precision": precision,
                "cache": cache,
                "valid_nll_per_frame": valid_nll[precision],
                "decoded_nll_per_frame": sum(rows_nll) / len(rows_nll),
                "decoded_nll_change": {key: change[key] for key in ("mean", "low", "high", "excludes_zero")},
                "max_abs_logit_error": error,
                "max_abs_logit_error_relative": error / float(reference_logits.abs().max()),
                "identical_draws_same_context": float((draws == reference_draws).double().mean()),
                "identical_token_fraction": float(same.double().mean()),
                "mean_first_differing_frame": sum(first_diff) / len(first_diff),
                "frames_per_row": same.shape[2],
            }
        )
    quantize_for_decode(model, "fp32")
    return results


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", default=None, help="a trained lm.pt (models.train_lm); default: train one here")
    parser.add_argument("--codes", default=None, help="held-out codes, int [N, K, T] (a .pt tensor), with --lm")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the synthetic LM")
    parser.add_argument("--rows", type=int, default=32, help="held-out rows decoded and generated")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds generated per row (50 frames/s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.lm is not None:
        if args.codes is None:
            parser.error("--lm needs --codes (held-out codes)")
        model, valid = load_lm(args.lm), torch.load(args.codes)
    else:
        codes = synthetic_codes(288, 4, 50, 256, seed=0)
        config = LMConfig.preset("small", codebook_size=256, num_codebooks=4)
        model, log = train_lm(codes[:256], config=config, steps=args.steps, batch_size=16, lr=3e-3, warmup=20,
                              valid_codes=codes[256:], progress=False)  # fmt: skip
        valid = codes[256:]
        print(json.dumps({"trained": "synthetic", "steps": args.steps, "final": log[-1]}))
    results = measure(model.eval(), valid, args.rows, args.seconds)
    for result in results:
        print(json.dumps(result))
    return results


if __name__ == "__main__":
    main()

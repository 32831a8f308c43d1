"""Train the MusicGen-style LM (models/lm.py) on codes [N, K, T] with text prompts.

    python -m models.train_lm --out runs/lm-delay --pattern delay --codes codes/*.pt --frames 250 --steps 2000
    python -m models.train_lm --out runs/lm-smoke --random 64 --frames 50 --steps 20     # random codes (smoke test)

Code files are those written by `python -m models.train_codec encode` ({"codes": [1, K, T], ...}); each is cut into
windows of --frames frames and its file name (without the suffix) is the prompt. A held-out share of the windows
(--valid-fraction) gives the final NLL in nats per frame (`models.lm.nll_per_frame`). Writes lm.pt (config + weights)
and log.jsonl to --out.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from mmdkernels.patterns import PATTERNS
from models.lm import HEADS, LMConfig, MusicLM, lm_loss, nll_per_frame


def _check_data(codes, conditions) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype.is_floating_point:
        got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes must be an integer tensor [N, K, T], got {got}")
    if conditions is not None and len(conditions) != codes.shape[0]:
        raise ValueError(f"conditions must hold N = {codes.shape[0]} prompts, got {len(conditions)}")


def learning_rate_factor(step: int, steps: int, warmup: int) -> float:
    """The multiplier of the peak learning rate at `step` (0-based): linear warm-up over `warmup` steps, then cosine
    decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_lm(
    codes: torch.Tensor,
    conditions: list[str | None] | None = None,
    *,
    config: LMConfig | None = None,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    warmup: int = 0,
    seed: int = 0,
    condition_dropout: float = 0.1,
    valid_codes: torch.Tensor | None = None,
    valid_conditions: list[str | None] | None = None,
    log_every: int = 10,
    progress: bool = True,
) -> tuple[MusicLM, list[dict]]:
    """Teacher-forced training with AdamW (linear warm-up, cosine decay, gradient clipping at 1).

    Args:
        codes: int [N, K, T] training windows, values in [0, config.codebook_size).
        conditions: N prompts (None = the null condition), or None for all-null.
        config: the model (default LMConfig() with K and C = codes.max() + 1 rounded to the codes).
        steps, batch_size, lr: optimisation; batches are drawn without replacement within an epoch.
        warmup: steps of linear learning-rate warm-up before the cosine decay.
        seed: seeds the weights, the batch order and the condition dropout (explicit torch.Generators).
        condition_dropout: probability of replacing a prompt by the null condition (for classifier-free guidance).
        valid_codes, valid_conditions: held-out windows; their NLL per frame is logged at the end.
        log_every: steps between log records.
    Returns:
        (model in eval mode, log: list of {"step", "loss"} records, plus {"valid_nll_per_frame"} at the end).
    """
    _check_data(codes, conditions)
    if config is None:
        config = LMConfig(num_codebooks=codes.shape[1], codebook_size=max(2, int(codes.max()) + 1))
    conditions = list(conditions) if conditions is not None else [None] * codes.shape[0]
    torch.manual_seed(seed)
    model = MusicLM(config).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, steps, warmup))
    order = torch.empty(0, dtype=torch.long)
    log = []
    for step in tqdm(range(1, steps + 1), disable=not progress, desc=f"lm {config.pattern}"):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(codes.shape[0], generator=generator)])
        rows, order = order[:batch_size], order[batch_size:]
        dropped = torch.rand(len(rows), generator=generator) < condition_dropout
        prompts = [None if drop else conditions[i] for i, drop in zip(rows.tolist(), dropped.tolist())]
        loss = lm_loss(model, codes[rows], model.encode_condition(prompts))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            log.append({"step": step, "loss": round(loss.item(), 6)})
    model.eval()
    if valid_codes is not None:
        _check_data(valid_codes, valid_conditions)
        log.append({"step": steps, "valid_nll_per_frame": nll_per_frame(model, valid_codes, valid_conditions)})
    return model, log


def load_code_windows(paths: list[str], frames: int) -> tuple[torch.Tensor, list[str]]:
    """Cut every code file ({"codes": [1, K, T]}) into windows of `frames` frames: ([N, K, frames], N prompts)."""
    windows, prompts = [], []
    for path in paths:
        codes = torch.load(path, map_location="cpu")["codes"]
        for start in range(0, codes.shape[-1] - frames + 1, frames):
            windows.append(codes[0, :, start : start + frames])
            prompts.append(Path(path).stem)
    if not windows:
        raise ValueError(f"no window of {frames} frames in {len(paths)} code file(s): use a smaller --frames")
    return torch.stack(windows), prompts


def load_lm(path: str | Path) -> MusicLM:
    """A model saved by this script's CLI (lm.pt), in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = MusicLM(LMConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return model.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--codes", nargs="+", help="code files written by `models.train_codec encode`")
    source.add_argument("--random", type=int, metavar="N", help="N windows of uniformly random codes (smoke test)")
    parser.add_argument("--frames", type=int, default=250, help="frames per training window")
    parser.add_argument("--codebooks", type=int, default=4, help="K for --random")
    parser.add_argument("--codebook-size", type=int, default=256, help="C (codes must lie below it)")
    parser.add_argument("--pattern", choices=PATTERNS, default="delay")
    parser.add_argument(
        "--head", choices=HEADS, default="independent", help="depth: a joint model of each step (delay/parallel only)"
    )
    parser.add_argument("--preset", choices=("small", "musicgen-small"), default="small")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--condition-dropout", type=float, default=0.1)
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(args.seed)
    if args.codes:
        codes, prompts = load_code_windows(args.codes, args.frames)
    else:
        codes = torch.randint(0, args.codebook_size, (args.random, args.codebooks, args.frames), generator=generator)
        prompts = [f"random {i % 4}" for i in range(args.random)]
    order = torch.randperm(codes.shape[0], generator=generator)
    num_valid = min(codes.shape[0] - 1, math.ceil(args.valid_fraction * codes.shape[0]))
    valid, train = order[:num_valid], order[num_valid:]
    config = LMConfig.preset(
        args.preset,
        pattern=args.pattern,
        head=args.head,
        num_codebooks=codes.shape[1],
        codebook_size=args.codebook_size,
    )
    model, log = train_lm(
        codes[train],
        [prompts[i] for i in train.tolist()],
        config=config,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        condition_dropout=args.condition_dropout,
        valid_codes=codes[valid] if num_valid else None,
        valid_conditions=[prompts[i] for i in valid.tolist()] if num_valid else None,
        progress=not args.quiet,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(config), "model": model.state_dict()}, out / "lm.pt")
    with (out / "log.jsonl").open("w") as f:
        f.writelines(json.dumps(record) + "\n" for record in log)
    print(json.dumps(log[-1]))
    return log[-1]


if __name__ == "__main__":
    main()

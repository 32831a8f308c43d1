"""The main job: from music to measured codebook independence and decoding speed, with a report.

    python -m models.experiment                 # the embedded default, ~15 min on a 2-core CPU
    python -m models.experiment --quick         # smoke size, < 3 min
    python -m models.experiment --full --device cuda

Stages (each one's result is saved under --out and reused by a rerun, so an interrupted run resumes):
1. render the music21 corpus to 32 kHz audio (models/data.py, cached; or --audio-dir with your own files);
2. train the reference codec twice on the same data, seed and steps: lambda_MMD = 0 and lambda_MMD > 0;
3. measure codebook dependence (MI matrix, total correlation, plain and delay-aligned) on held-out pieces;
4. encode every piece with both codecs and train two small LMs on each codec's tokens, one with the delay pattern
   (product of marginals) and one flattened (joint), and measure their held-out NLL per frame;
5. generate audio from each LM (WAV files) and time delay vs flatten decoding;
6. write report.md with PNG figures and print the summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from models import data, train_codec


@dataclasses.dataclass
class Sizes:
    """Everything that sets the run's cost. Presets: quick (CI smoke test), default (this CPU), full (a GPU)."""

    pieces: int = 60
    piece_seconds: float = 20.0
    codec_steps: int = 1000
    codec_batch: int = 8
    codec_channels: int = 8
    latent_dim: int = 64
    codebook_size: int = 256
    num_codebooks: int = 4
    lm_dim: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    lm_steps: int = 2000
    lm_batch: int = 16
    lm_frames: int = 25  # training context in frames (0.5 s at 50 Hz); flatten sees K times as many tokens
    lm_lr: float = 3e-3  # peak learning rate, after lm_warmup steps of linear warm-up, then cosine decay
    lm_warmup: int = 50
    generate_seconds: float = 4.0
    generate_batch: int = 2


PRESETS = {
    "quick": Sizes(
        pieces=6,
        piece_seconds=4.0,
        codec_steps=30,
        codec_batch=4,
        codec_channels=4,
        latent_dim=16,
        codebook_size=32,
        lm_dim=32,
        lm_layers=1,
        lm_heads=2,
        lm_steps=20,
        lm_batch=4,
        lm_frames=25,
        lm_warmup=5,
        generate_seconds=0.5,
        generate_batch=1,
    ),
    "default": Sizes(),
    "full": Sizes(
        pieces=400,
        piece_seconds=30.0,
        codec_steps=20000,
        codec_batch=32,
        codec_channels=32,
        latent_dim=128,
        codebook_size=1024,
        lm_dim=512,
        lm_layers=8,
        lm_heads=8,
        lm_steps=20000,
        lm_batch=32,
        lm_frames=500,
        lm_lr=1e-3,
        lm_warmup=500,
        generate_seconds=10.0,
        generate_batch=4,
    ),
}
PATTERNS = ("delay", "flatten")
# The sizes each stage's result depends on: a cached result made with other values is not reused.
CODEC_FIELDS = (
    "pieces",
    "piece_seconds",
    "codec_steps",
    "codec_batch",
    "codec_channels",
    "latent_dim",
    "codebook_size",
    "num_codebooks",
)
LM_FIELDS = ("lm_dim", "lm_layers", "lm_heads", "lm_steps", "lm_batch", "lm_frames", "lm_lr", "lm_warmup")


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def codec_key(args, sizes: Sizes, lambda_mmd: float) -> dict:
    """Everything a codec run (and its tokens) depends on."""
    key = {"seed": args.seed, "lambda_mmd": lambda_mmd, "codec_lr": args.codec_lr, "audio_dir": args.audio_dir}
    return key | {field: getattr(sizes, field) for field in CODEC_FIELDS}


def lm_key(args, sizes: Sizes, lambda_mmd: float, pattern: str) -> dict:
    return codec_key(args, sizes, lambda_mmd) | {"pattern": pattern} | {f: getattr(sizes, f) for f in LM_FIELDS}


def stage_folder(path: Path, key: dict) -> Path:
    """The folder of a stage made with `key`: one left by a run with other settings is emptied first (a resumed run
    with the same settings keeps its checkpoints)."""
    key_file = path / "key.json"
    if path.exists() and _read_json(key_file) != json.loads(json.dumps(key)):
        print(f"{path}: made with other settings, starting this stage again")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(key_file, key)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------


def audio_files(args, sizes: Sizes) -> tuple[list[Path], list[Path]]:
    """Stage 1: the rendered (or user's) audio, split into train and held-out pieces."""
    if args.audio_dir:
        paths = data.load_audio_folder(args.audio_dir)
    else:
        paths = data.render_corpus(
            args.cache_dir, sizes.pieces, seconds_per_piece=sizes.piece_seconds, seed=args.seed, progress=args.progress
        )
    train, valid = data.split_by_piece(paths, valid_fraction=args.valid_fraction, seed=args.seed)
    if not valid:
        raise ValueError(f"no held-out piece among {len(paths)}: raise --pieces or --valid-fraction")
    return train, valid


def codec_run_name(lambda_mmd: float) -> str:
    return f"codec-lambda{lambda_mmd:g}"


def train_codec_run(args, sizes: Sizes, lambda_mmd: float) -> dict:
    """Stage 2 + 3: one codec trained (resumed if interrupted) and evaluated on held-out pieces (eval.json)."""
    out = stage_folder(Path(args.out) / codec_run_name(lambda_mmd), codec_key(args, sizes, lambda_mmd))
    finished = _read_json(out / "eval.json")
    if finished is not None:
        return finished
    argv = ["train", "--out", str(out), "--steps", str(sizes.codec_steps), "--batch-size", str(sizes.codec_batch)]
    argv += ["--lr", str(args.codec_lr), "--lambda-mmd", str(lambda_mmd), "--seed", str(args.seed)]
    argv += ["--channels", str(sizes.codec_channels), "--latent-dim", str(sizes.latent_dim)]
    argv += ["--codebooks", str(sizes.num_codebooks), "--codebook-size", str(sizes.codebook_size)]
    argv += ["--pieces", str(sizes.pieces), "--piece-seconds", str(sizes.piece_seconds), "--cache-dir", args.cache_dir]
    argv += ["--valid-fraction", str(args.valid_fraction), "--checkpoint-every", str(max(1, sizes.codec_steps // 10))]
    if args.audio_dir:
        argv += ["--audio-dir", args.audio_dir]
    if args.device != "cpu":
        argv += ["--device", args.device]
    if not args.progress:
        argv += ["--quiet"]
    report = train_codec.main(argv)
    report["steps"] = sizes.codec_steps
    _write_json(out / "eval.json", report)
    return report


def piece_condition(path: Path) -> str:
    """The text condition of a piece: its corpus collection (composer) from the cache name, e.g. 'bach'."""
    stem = path.name.split(".")[0]
    return stem.split("__")[0] if "__" in stem else path.parent.name


@torch.no_grad()
def encode_pieces(codec, files: list[Path], device: torch.device) -> list[torch.Tensor]:
    """Every file's codes [K, T] (whole files, zero-padded to the hop)."""
    codes = []
    for path in files:
        waveform = train_codec.read_waveform(path, codec.config.sample_rate)
        waveform = torch.nn.functional.pad(waveform, (0, (-waveform.shape[-1]) % codec.config.hop_length))
        codes.append(codec.encode(waveform[None].to(device))[0].cpu())
    return codes


def tokens(args, lambda_mmd: float, train_files: list[Path], valid_files: list[Path]) -> dict:
    """Stage 4a: both splits encoded by one codec, cached in tokens.pt."""
    run = Path(args.out) / codec_run_name(lambda_mmd)
    path = run / "tokens.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    device = torch.device(args.device)
    codec = train_codec.load_codec(run / "last.pt").to(device)
    result = {
        split: {"codes": encode_pieces(codec, files, device), "conditions": [piece_condition(p) for p in files]}
        for split, files in (("train", train_files), ("valid", valid_files))
    }
    result["codebook_size"] = codec.config.codebook_size
    result["frame_rate"] = codec.config.frame_rate
    torch.save(result, path)
    return result


def lm_run(args, sizes: Sizes, lambda_mmd: float, pattern: str, token_sets: dict) -> dict:
    """Stage 4b: one LM trained on one codec's tokens with one pattern; held-out NLL per frame (lm.json)."""
    from models import experiment_lm

    out = stage_folder(
        Path(args.out) / f"lm-{codec_run_name(lambda_mmd)}-{pattern}", lm_key(args, sizes, lambda_mmd, pattern)
    )
    finished = _read_json(out / "lm.json")
    if finished is not None:
        return finished
    result = experiment_lm.train_and_evaluate(
        token_sets, pattern, sizes, out, seed=args.seed, device=args.device, progress=args.progress
    )
    result["steps"] = sizes.lm_steps
    _write_json(out / "lm.json", result)
    return result


def generation_run(args, sizes: Sizes, lambda_mmd: float, pattern: str, conditions: list[str]) -> dict:
    """Stage 5: audio generated by one LM, decoded by its codec to WAV, with the decoding time."""
    from models import experiment_lm

    run = Path(args.out) / codec_run_name(lambda_mmd)
    out = Path(args.out) / f"lm-{codec_run_name(lambda_mmd)}-{pattern}"
    finished = _read_json(out / "generation.json")
    if finished is not None and (finished.get("seconds"), finished.get("batch")) == (
        sizes.generate_seconds,
        sizes.generate_batch,
    ):
        return finished
    codec = train_codec.load_codec(run / "last.pt").to(args.device)
    result = experiment_lm.generate_audio(out, codec, pattern, conditions, sizes, seed=args.seed, device=args.device)
    result["seconds"] = sizes.generate_seconds
    _write_json(out / "generation.json", result)
    return result


def run(args) -> dict:
    """All stages; returns the summary written to summary.json."""
    sizes = dataclasses.replace(PRESETS[args.preset], **args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train_files, valid_files = audio_files(args, sizes)
    lambdas = (0.0, args.lambda_mmd)
    codecs = {lam: train_codec_run(args, sizes, lam) for lam in lambdas}
    lms, generations = {}, {}
    for lam in lambdas:
        token_sets = tokens(args, lam, train_files, valid_files)
        conditions = sorted(set(token_sets["valid"]["conditions"]))[: sizes.generate_batch]
        conditions += conditions[:1] * (sizes.generate_batch - len(conditions))
        for pattern in PATTERNS:
            lms[lam, pattern] = lm_run(args, sizes, lam, pattern, token_sets)
            generations[lam, pattern] = generation_run(args, sizes, lam, pattern, conditions)
    summary = {
        "preset": args.preset,
        "sizes": dataclasses.asdict(sizes),
        "seed": args.seed,
        "device": str(args.device),
        "train_pieces": len(train_files),
        "valid_pieces": len(valid_files),
        "codecs": {codec_run_name(lam): codecs[lam] for lam in lambdas},
        "lms": {f"{codec_run_name(lam)}/{pattern}": lms[lam, pattern] for lam in lambdas for pattern in PATTERNS},
        "generation": {
            f"{codec_run_name(lam)}/{pattern}": generations[lam, pattern] for lam in lambdas for pattern in PATTERNS
        },
        "wall_seconds": time.perf_counter() - started,
    }
    _write_json(out / "summary.json", summary)
    from models import report

    table = report.write_report(out, summary)
    print(table)
    print(f"report: {out / 'report.md'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.experiment", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick", help="smoke size (< 3 min)")
    size.add_argument("--full", dest="preset", action="store_const", const="full", help="GPU size")
    parser.set_defaults(preset="default")
    parser.add_argument("--out", default="outputs/experiment")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambda-mmd", type=float, default=0.1, help="weight of the MMD loss in the second codec")
    parser.add_argument("--codec-lr", type=float, default=1e-3)
    parser.add_argument("--audio-dir", default=None, help="your own WAV/FLAC files instead of the rendered corpus")
    parser.add_argument("--cache-dir", default="outputs/audio-cache")
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    for field in dataclasses.fields(Sizes):
        kind = float if field.type == "float" else int
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None, help="override the preset")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    names = [field.name for field in dataclasses.fields(Sizes)]
    args.overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.lambda_mmd <= 0:
        raise SystemExit(f"--lambda-mmd must be positive (the second codec's MMD weight), got {args.lambda_mmd}")
    return run(args)


if __name__ == "__main__":
    main()

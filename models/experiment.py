"""The main job: does the MMD loss make a codec's codebooks more independent, and what does the delay pattern lose?

    python -m models.experiment                 # the embedded default on a 2-core CPU
    python -m models.experiment --quick         # smoke size, < 3 min
    python -m models.experiment --full --device cuda   # GPU sizes, adversarial losses on (--adversarial)

Paired seeds: for each of --seeds model seeds (--seed, --seed + 1, ...) a codec is trained without (lambda 0) and
with the MMD loss (--lambda-mmd, the published recipe of models/codec.py) on the *same* pieces (--data-seed picks and
splits them), and every measure below is taken for both; the report gives each per seed and as the mean paired
difference (lambda > 0 minus lambda 0) with a 95 % t interval, stating whether it excludes zero.

Stages per seed and codec (each one's result is saved under --out/seed<s>/ and reused by a rerun):
1. render the music21 corpus to 32 kHz audio (models/data.py, cached; or --audio-dir with your own files);
2. train the codec; reconstruction on held-out pieces (mel distance, SI-SNR);
3. encode every piece; held-out mutual information between codebooks (delay-aligned,
   `mmdkernels.metrics.heldout_mutual_information`, bootstrap interval over held-out pieces);
4. train three LMs on the codec's tokens: delay with K independent heads (product of marginals), the same delay
   backbone with an autoregressive depth head (a joint model of each step), and flatten (joint, K steps per frame);
   held-out NLL per frame, and the independent - depth gap with a bootstrap interval over held-out pieces;
5. generate audio from each LM (WAV files) and time delay, depth-head and flatten decoding;
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

from models import data, stats, train_codec
from models.codec import CodecConfig


@dataclasses.dataclass
class Sizes:
    """Everything that sets the run's cost. Presets: quick (CI smoke test), default (this CPU), full (a GPU)."""

    pieces: int = 60
    piece_seconds: float = 20.0
    codec_steps: int = 500
    codec_batch: int = 8
    codec_segment_seconds: float = 0.5  # training clip length; the MMD macro-batch holds mmd_every x codec_batch clips
    codec_channels: int = 8
    latent_dim: int = 64
    codebook_size: int = 256
    num_codebooks: int = 4
    lm_dim: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    lm_steps: int = 1000
    lm_batch: int = 16
    lm_frames: int = 25  # training context in frames (0.5 s at 50 Hz); flatten sees K times as many tokens
    lm_lr: float = 3e-3  # peak learning rate, after lm_warmup steps of linear warm-up, then cosine decay
    lm_warmup: int = 30
    generate_seconds: float = 2.0
    generate_batch: int = 2
    seeds: int = 3  # paired model seeds (each trains both codecs and their LMs)
    mmd_every: int = 32  # the published recipe's macro-batch period (models/codec.py)
    adversarial: bool = False  # the published codec's STFT discriminator losses (train_codec --adversarial)


PRESETS = {
    "quick": Sizes(
        pieces=6,
        piece_seconds=4.0,
        codec_steps=8,
        codec_batch=2,
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
        seeds=2,
        mmd_every=4,
    ),
    "default": Sizes(),
    "full": Sizes(
        pieces=400,
        piece_seconds=30.0,
        codec_steps=20000,
        codec_batch=32,
        codec_segment_seconds=1.0,
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
        adversarial=True,
    ),
}
VARIANTS = ("delay", "depth", "flatten")
# The sizes each stage's result depends on: a cached result made with other values is not reused.
CODEC_FIELDS = (
    "pieces",
    "piece_seconds",
    "codec_steps",
    "codec_batch",
    "codec_segment_seconds",
    "codec_channels",
    "latent_dim",
    "codebook_size",
    "num_codebooks",
    "mmd_every",
    "adversarial",
)
LM_FIELDS = ("lm_dim", "lm_layers", "lm_heads", "lm_steps", "lm_batch", "lm_frames", "lm_lr", "lm_warmup")


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def codec_key(args, sizes: Sizes, lambda_mmd: float, seed: int) -> dict:
    """Everything a codec run (and its tokens and MI) depends on."""
    key = {"seed": seed, "data_seed": args.data_seed, "lambda_mmd": lambda_mmd, "codec_lr": args.codec_lr}
    key |= {"audio_dir": args.audio_dir, "mmd_input": args.mmd_input, "loss_weights": CodecConfig().loss_weights}
    return key | {field: getattr(sizes, field) for field in CODEC_FIELDS}


def lm_key(args, sizes: Sizes, lambda_mmd: float, seed: int, variant: str) -> dict:
    key = codec_key(args, sizes, lambda_mmd, seed) | {"variant": variant}
    return key | {f: getattr(sizes, f) for f in LM_FIELDS}


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
    """Stage 1: the rendered (or user's) audio, split into train and held-out pieces by --data-seed."""
    if args.audio_dir:
        paths = data.load_audio_folder(args.audio_dir)
    else:
        paths = data.render_corpus(
            args.cache_dir,
            sizes.pieces,
            seconds_per_piece=sizes.piece_seconds,
            seed=args.data_seed,
            progress=args.progress,
        )
    train, valid = data.split_by_piece(paths, valid_fraction=args.valid_fraction, seed=args.data_seed)
    if not valid:
        raise ValueError(f"no held-out piece among {len(paths)}: raise --pieces or --valid-fraction")
    return train, valid


def codec_run_name(lambda_mmd: float) -> str:
    return f"codec-lambda{lambda_mmd:g}"


def seed_folder(args, seed: int) -> Path:
    return Path(args.out) / f"seed{seed}"


def train_codec_run(args, sizes: Sizes, lambda_mmd: float, seed: int) -> dict:
    """Stage 2: one codec trained (resumed if interrupted) and evaluated on held-out pieces (eval.json)."""
    key = codec_key(args, sizes, lambda_mmd, seed)
    out = stage_folder(seed_folder(args, seed) / codec_run_name(lambda_mmd), key)
    finished = _read_json(out / "eval.json")
    if finished is not None:
        return finished
    argv = ["train", "--out", str(out), "--steps", str(sizes.codec_steps), "--batch-size", str(sizes.codec_batch)]
    argv += ["--segment-seconds", str(sizes.codec_segment_seconds)]
    argv += ["--lr", str(args.codec_lr), "--lambda-mmd", str(lambda_mmd), "--seed", str(seed)]
    argv += ["--data-seed", str(args.data_seed), "--mmd-every", str(sizes.mmd_every), "--mmd-input", args.mmd_input]
    argv += ["--channels", str(sizes.codec_channels), "--latent-dim", str(sizes.latent_dim)]
    argv += ["--codebooks", str(sizes.num_codebooks), "--codebook-size", str(sizes.codebook_size)]
    argv += ["--pieces", str(sizes.pieces), "--piece-seconds", str(sizes.piece_seconds), "--cache-dir", args.cache_dir]
    argv += ["--valid-fraction", str(args.valid_fraction), "--checkpoint-every", str(max(1, sizes.codec_steps // 10))]
    argv += ["--log-every", str(max(1, sizes.codec_steps // 100))]
    if args.audio_dir:
        argv += ["--audio-dir", args.audio_dir]
    if sizes.adversarial:
        argv += ["--adversarial"]
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


def tokens(args, lambda_mmd: float, seed: int, train_files: list[Path], valid_files: list[Path]) -> dict:
    """Stage 3a: both splits encoded by one codec, cached in tokens.pt."""
    run = seed_folder(args, seed) / codec_run_name(lambda_mmd)
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


def heldout_mi_run(args, lambda_mmd: float, seed: int, token_sets: dict) -> dict:
    """Stage 3b: held-out MI between codebooks, delay-aligned (mi.json): fitted on the training pieces' codes, scored
    on the held-out pieces' (all cut to the shortest piece, so each held-out piece is one bootstrap unit)."""
    from mmdkernels.metrics import heldout_mutual_information

    path = seed_folder(args, seed) / codec_run_name(lambda_mmd) / "mi.json"
    finished = _read_json(path)
    if finished is not None:
        return finished
    pieces = token_sets["train"]["codes"] + token_sets["valid"]["codes"]
    frames = min(codes.shape[-1] for codes in pieces)
    train = torch.stack([codes[:, :frames] for codes in token_sets["train"]["codes"]])
    valid = torch.stack([codes[:, :frames] for codes in token_sets["valid"]["codes"]])
    result = heldout_mutual_information(
        train,
        valid,
        num_entries=token_sets["codebook_size"],
        delay=True,
        generator=torch.Generator().manual_seed(seed),
    ).to_dict()
    _write_json(path, result)
    return result


def lm_run(args, sizes: Sizes, lambda_mmd: float, seed: int, variant: str, token_sets: dict) -> dict:
    """Stage 4: one LM variant trained on one codec's tokens; held-out NLL per frame and per window (lm.json)."""
    from models import experiment_lm

    folder = seed_folder(args, seed) / f"lm-{codec_run_name(lambda_mmd)}-{variant}"
    out = stage_folder(folder, lm_key(args, sizes, lambda_mmd, seed, variant))
    finished = _read_json(out / "lm.json")
    if finished is not None:
        return finished
    result = experiment_lm.train_and_evaluate(
        token_sets, variant, sizes, out, seed=seed, device=args.device, progress=args.progress
    )
    result["steps"] = sizes.lm_steps
    _write_json(out / "lm.json", result)
    return result


def generation_run(args, sizes: Sizes, lambda_mmd: float, seed: int, variant: str, conditions: list[str]) -> dict:
    """Stage 5: audio generated by one LM, decoded by its codec to WAV, with the decoding time."""
    from models import experiment_lm

    run = seed_folder(args, seed) / codec_run_name(lambda_mmd)
    out = seed_folder(args, seed) / f"lm-{codec_run_name(lambda_mmd)}-{variant}"
    finished = _read_json(out / "generation.json")
    if finished is not None and (finished.get("seconds"), finished.get("batch")) == (
        sizes.generate_seconds,
        sizes.generate_batch,
    ):
        return finished
    codec = train_codec.load_codec(run / "last.pt").to(args.device)
    result = experiment_lm.generate_audio(out, codec, conditions, sizes, seed=seed, device=args.device)
    result["seconds"] = sizes.generate_seconds
    _write_json(out / "generation.json", result)
    return result


def depth_gap(lms: dict, seed: int) -> dict:
    """NLL per frame of the independent heads minus the depth head's on the same held-out windows: the dependence the
    delay pattern ignores, with a bootstrap interval over held-out pieces."""
    independent, depth = lms["delay"], lms["depth"]
    pieces = torch.tensor(independent["window_piece"])
    difference = torch.tensor(independent["window_nll"]) - torch.tensor(depth["window_nll"])
    num_pieces = int(pieces.max()) + 1
    numerators = torch.zeros(num_pieces, dtype=torch.float64).index_add_(0, pieces, difference.double())
    frames = torch.zeros(num_pieces, dtype=torch.float64).index_add_(
        0, pieces, torch.full_like(difference, float(independent["window_frames"]), dtype=torch.float64)
    )
    used = frames > 0
    estimate, low, high = stats.bootstrap_ratio(
        numerators[used], frames[used], torch.Generator().manual_seed(seed)
    )
    return {"estimate": estimate, "low": low, "high": high, "pieces": int(used.sum())}


def run_seed(args, sizes: Sizes, seed: int, lambdas, train_files, valid_files) -> dict:
    """Every stage of one model seed, for both codecs: {codec name: {"codec", "mi", "lms", "generation", "gap"}}."""
    results = {}
    for lam in lambdas:
        codec = train_codec_run(args, sizes, lam, seed)
        token_sets = tokens(args, lam, seed, train_files, valid_files)
        mi = heldout_mi_run(args, lam, seed, token_sets)
        conditions = sorted(set(token_sets["valid"]["conditions"]))[: sizes.generate_batch]
        conditions += conditions[:1] * (sizes.generate_batch - len(conditions))
        lms = {variant: lm_run(args, sizes, lam, seed, variant, token_sets) for variant in VARIANTS}
        generation = {variant: generation_run(args, sizes, lam, seed, variant, conditions) for variant in VARIANTS}
        results[codec_run_name(lam)] = {
            "lambda_mmd": lam,
            "codec": codec,
            "mi": mi,
            "lms": lms,
            "generation": generation,
            "gap": depth_gap(lms, seed),
        }
    return results


def run(args) -> dict:
    """All stages for every seed; returns the summary written to summary.json."""
    from models import report

    sizes = dataclasses.replace(PRESETS[args.preset], **args.overrides)
    if sizes.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {sizes.seeds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_files, valid_files = audio_files(args, sizes)
    lambdas = (0.0, args.lambda_mmd)
    seeds = [args.seed + i for i in range(sizes.seeds)]
    runs = {}
    for seed in seeds:
        runs[str(seed)] = run_seed(args, sizes, seed, lambdas, train_files, valid_files)
        print(f"seed {seed} done, {(time.perf_counter() - started) / 60:.1f} min")
    summary = {
        "preset": args.preset,
        "sizes": dataclasses.asdict(sizes),
        "seeds": seeds,
        "data_seed": args.data_seed,
        "lambda_mmd": args.lambda_mmd,
        "mmd_input": args.mmd_input,
        "codec_names": [codec_run_name(lam) for lam in lambdas],
        "device": str(args.device),
        "train_pieces": len(train_files),
        "valid_pieces": len(valid_files),
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    summary["paired"] = report.paired_effects(summary)
    _write_json(out / "summary.json", summary)
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
    parser.add_argument("--seed", type=int, default=0, help="the first model seed (then seed + 1, ...)")
    parser.add_argument("--data-seed", type=int, default=0, help="picks and splits the pieces, the same for all seeds")
    parser.add_argument(
        "--lambda-mmd", type=float, default=1000.0, help="the second codec's MMD weight (published: 1000)"
    )
    parser.add_argument(
        "--mmd-input",
        choices=("pre_quantization", "quantized"),
        default="pre_quantization",
        help="the quantizer streams the MMD loss takes (published: pre_quantization)",
    )
    parser.add_argument("--codec-lr", type=float, default=1e-3)
    parser.add_argument("--audio-dir", default=None, help="your own WAV/FLAC files instead of the rendered corpus")
    parser.add_argument("--cache-dir", default="outputs/audio-cache")
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    for field in dataclasses.fields(Sizes):
        flag = f"--{field.name.replace('_', '-')}"
        if field.type == "bool":
            parser.add_argument(flag, action="store_const", const=True, default=None, help="override the preset (on)")
            continue
        kind = float if field.type == "float" else int
        parser.add_argument(flag, type=kind, default=None, help="override the preset")
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

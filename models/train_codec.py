"""Train, evaluate and use the reference codec (models/codec.py).

    python -m models.train_codec train --out runs/codec --steps 2000 --lambda-mmd 0.0
    python -m models.train_codec train --out runs/codec-mmd --steps 2000 --lambda-mmd 1000  # same seed and data
    python -m models.train_codec encode --checkpoint runs/codec/last.pt song.wav codes.pt
    python -m models.train_codec decode --checkpoint runs/codec/last.pt codes.pt song-decoded.wav
    python -m models.train_codec compare runs/codec runs/codec-mmd
    torchrun --standalone --nproc-per-node 2 -m models.train_codec train --out runs/codec-ddp --lambda-mmd 1.0

Under torchrun (or with --distributed) training runs on every process with DistributedDataParallel (NCCL on
GPUs, gloo on CPUs): --batch-size is per process, each process takes its own slice of every epoch's order, and the
MMD term is estimated over the union of all processes' batches (mmd_loss(process_group=...)). Only rank 0 logs,
checkpoints and evaluates; a rerun resumes on every rank from rank 0's checkpoint.

The MMD loss follows the published recipe by default (models/codec.py): every --mmd-every steps (32) the last 32
batches are re-encoded, encoder checkpointed, and lambda x MMDLoss of their per-stage pre-quantization streams (the
published normalisation by the macro-batch size; the published weight is 1000) is back-propagated and applied as an
update of its own; the run prints that update's share of the training time and eval.json records it. The macro-batch
is the batches seen since the last MMD update, so a resumed run's first one may hold fewer. The MMD update has an
Adam optimizer (moments) of its own over the encoder: sharing the reconstruction's would let its gradients, ~1e4 times
larger, swamp the encoder's second moments and stall its reconstruction updates. log.jsonl's "mmd" is
then a monitor (the term on the logged step's batch, no gradient); mmd_log.jsonl holds the macro-batch values.
--mmd-every 0 puts the term into every step's loss instead, on the batch alone.

--adversarial adds the published codec's adversarial training (models/discriminator.py: multi-scale STFT
discriminator, hinge losses, feature matching) with its weights (adv 4, feat 4, l1 0.1, mel 2), without audiocraft's
loss balancer (the weights scale the losses directly); single process only.

Training data: the music21 corpus rendered to 32 kHz (models/data.py, cached), or `--audio-dir` with your own WAV/FLAC
files; train/valid split by piece. Checkpoints every `--checkpoint-every` steps and at the end (`last.pt`, with the
optimiser and RNG states); a rerun with the same `--out` resumes. Every logged step goes to `log.jsonl` and `log.csv`.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.distributed as dist
import torchaudio
from tqdm import tqdm

import mmdkernels
from mmdkernels.metrics import dependence_report
from models import data
from models.codec import MMD_INPUTS, Codec, CodecConfig
from models.discriminator import MultiScaleSTFTDiscriminator, discriminator_loss, generator_losses


def si_snr(estimate: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB per item: estimate, target [B, 1, S] -> [B]."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    target = target - target.mean(-1, keepdim=True)
    projection = (estimate * target).sum(-1, keepdim=True) / ((target * target).sum(-1, keepdim=True) + eps) * target
    noise = estimate - projection
    ratio = (projection.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps)
    return 10 * torch.log10(ratio).squeeze(1)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def evaluate(codec: Codec, clips: torch.utils.data.Dataset, batch_size: int = 8) -> dict:
    """Reconstruction (mel distance, SI-SNR) and codebook dependence (MI matrix, total correlation, plain and
    delay-aligned) on held-out clips."""
    codec.eval()
    device = next(codec.parameters()).device
    mel, snr, codes = [], [], []
    loader = torch.utils.data.DataLoader(clips, batch_size=batch_size, shuffle=False)
    for waveform in loader:
        waveform = waveform.to(device)
        out = codec(waveform)
        mel.append(out.losses["mel"].item())
        snr.append(si_snr(out.reconstruction, waveform).cpu())
        codes.append(out.codes.cpu())
    codec.train()
    all_codes = torch.cat(codes)
    return {
        "mel_distance": float(np.mean(mel)),
        "si_snr_db": float(torch.cat(snr).mean()),
        "dependence": dependence_report(all_codes, codec.config.codebook_size),
        "dependence_delay": dependence_report(all_codes, codec.config.codebook_size, delay=True)
        if all_codes.shape[-1] > all_codes.shape[1]
        else None,
    }


def _segment_seconds(args) -> float:
    """--segment-seconds rounded to whole codec frames (the codec needs a multiple of the hop)."""
    hop = math.prod(CodecConfig.strides)
    frames = max(1, round(args.segment_seconds * args.sample_rate / hop))
    return frames * hop / args.sample_rate


# the published EnCodec's weights with the adversarial losses (audiocraft encodec config; no loss balancer here)
PUBLISHED_RECONSTRUCTION_WEIGHTS = {"l1": 0.1, "mel": 2.0, "commitment": 1.0}
ADVERSARIAL_WEIGHTS = {"adv": 4.0, "feat": 4.0}


def _data_seed(args) -> int:
    """The seed that picks and splits the pieces: --data-seed, else --seed."""
    return args.seed if args.data_seed is None else args.data_seed


def _datasets(args):
    if args.audio_dir:
        paths = data.load_audio_folder(args.audio_dir)
    else:
        paths = data.render_corpus(
            args.cache_dir,
            args.pieces,
            seconds_per_piece=args.piece_seconds,
            sample_rate=args.sample_rate,
            renderer=args.renderer,
            seed=_data_seed(args),
            progress=not args.quiet,
        )
    train_paths, valid_paths = data.split_by_piece(paths, valid_fraction=args.valid_fraction, seed=_data_seed(args))
    if not valid_paths:
        raise ValueError(f"no held-out piece: {len(paths)} piece(s) with --valid-fraction {args.valid_fraction}")
    seconds = _segment_seconds(args)
    train = data.AudioClips(train_paths, seconds, args.sample_rate, random_offsets=True, seed=args.seed)
    valid = data.AudioClips(valid_paths, seconds, args.sample_rate, random_offsets=False)
    return train, valid


def _batches(
    clips: data.AudioClips, batch_size: int, generator: torch.Generator, first_epoch: int, rank: int = 0, world: int = 1
):
    """Endless batches [batch_size, 1, S]: each epoch draws new clip offsets and a new order (from generator).

    With `world` processes (DistributedSampler-style) every process draws the same order and takes slice `rank` of
    each global batch of world * batch_size clips, so the processes see disjoint clips and their generators stay equal.
    """
    epoch = first_epoch
    global_batch = batch_size * world
    while True:
        clips.set_epoch(epoch)
        order = torch.randperm(len(clips), generator=generator).tolist()
        while len(order) < global_batch:  # fewer pieces than a batch: repeat them
            order += torch.randperm(len(clips), generator=generator).tolist()
        for start in range(0, len(order) - global_batch + 1, global_batch):
            mine = order[start + rank * batch_size : start + (rank + 1) * batch_size]
            yield torch.stack([clips[i] for i in mine]), epoch
        epoch += 1


def _config(args) -> CodecConfig:
    return CodecConfig(
        sample_rate=args.sample_rate,
        channels=args.channels,
        latent_dim=args.latent_dim,
        num_codebooks=args.codebooks,
        codebook_size=args.codebook_size,
        lambda_mmd=args.lambda_mmd,
        mmd_estimator=args.mmd_estimator,
        mmd_every=args.mmd_every,
        mmd_input=args.mmd_input,
        quantizer_dropout=args.quantizer_dropout,
        **({"loss_weights": dict(PUBLISHED_RECONSTRUCTION_WEIGHTS)} if args.adversarial else {}),
    )


class RunLog:
    """Appends one record per logged step to log.jsonl and log.csv in the run folder."""

    def __init__(self, out: Path):
        self.jsonl, self.csv = out / "log.jsonl", out / "log.csv"

    def write(self, record: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        fresh = not self.csv.exists()
        with self.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(record))
            if fresh:
                writer.writeheader()
            writer.writerow(record)


def save_checkpoint(
    path: Path, codec: Codec, optimizer, step: int, epoch: int, generator: torch.Generator, extra: dict | None = None
) -> None:
    """Model, optimiser, step, the epoch to resume from, the RNG states and `extra` (e.g. the discriminator's
    states), written atomically."""
    torch.save(
        (extra or {})
        | {
            "config": codec.config.to_dict(),
            "model": codec.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": epoch,
            "torch_rng": torch.get_rng_state(),
            "generator": generator.get_state(),
        },
        path.with_suffix(".tmp"),
    )
    path.with_suffix(".tmp").replace(path)


def load_codec(path: str | Path) -> Codec:
    """A codec from a checkpoint written by `train`, in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = CodecConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
    codec = Codec(config)
    codec.load_state_dict(state["model"])
    return codec.eval()


@dataclasses.dataclass
class World:
    """This process's place in the training job: rank 0 of 1 without torch.distributed."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(args) -> World:
    """Joins the torch.distributed job when asked (--distributed) or launched by torchrun (WORLD_SIZE > 1)."""
    if not (args.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        return World(device=device)
    backend = args.dist_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
    return World(dist.get_rank(), dist.get_world_size(), device)


class GlobalBatchCodec(Codec):
    """The codec whose training MMD term is estimated over every process's batch together.

    In training mode the MMD term comes from mmd_loss(process_group=WORLD) (a collective: every rank calls it); the
    permutations use a seed shared by rank 0. In eval mode it is the plain codec (no collective), so rank 0 can
    evaluate alone.
    """

    def step_mmd(self, streams: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().step_mmd(streams)
        return mmdkernels.mmd_loss(
            streams,
            delay=self.config.mmd_delay and streams.shape[-1] > streams.shape[1],
            estimator=self.config.mmd_estimator,
            process_group=dist.group.WORLD,
        )


def _averaged(losses: dict, world: World) -> dict:
    """Each loss averaged over the processes (the MMD term is already global), as floats."""
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    if world.size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world.size
    return {name: round(float(v), 6) for name, v in zip(losses, values.cpu())}


def train(args) -> dict | None:
    """The training loop; returns the final evaluation (also written to eval.json), None on ranks other than 0."""
    world = init_world(args)
    try:
        report = _train(args, world)
        if world.size > 1:
            dist.barrier()  # rank 0 evaluates alone; the others wait so no rank tears gloo down under a peer
        return report
    finally:
        if world.size > 1:
            dist.destroy_process_group()


def _train(args, world: World) -> dict | None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(args.seed)
    train_clips, valid_clips = _datasets(args)
    # the codec's own draws (k-means seeds, dead codes, MMD permutations) need a generator on its device
    codec_generator = generator if world.device.type == "cpu" else torch.Generator(world.device).manual_seed(args.seed)
    codec = (GlobalBatchCodec if world.size > 1 else Codec)(_config(args), generator=codec_generator)
    optimizer = torch.optim.Adam(codec.parameters(), lr=args.lr, betas=(0.5, 0.9))
    macro = args.lambda_mmd > 0 and args.mmd_every > 0 and args.codebooks >= 2
    # the MMD update keeps Adam moments of its own: its gradients (lambda 1000 x MMD) are ~1e4 times the
    # reconstruction's, and shared second moments would shrink the encoder's reconstruction steps as much for
    # ~100 steps after every MMD update (README, main job)
    mmd_optimizer = torch.optim.Adam(codec.encoder.parameters(), lr=args.lr, betas=(0.5, 0.9)) if macro else None
    step, epoch = 0, 0
    last = out / "last.pt"
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        codec.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if mmd_optimizer is not None and "mmd_optimizer" in state:
            mmd_optimizer.load_state_dict(state["mmd_optimizer"])
        step, epoch = state["step"], state["epoch"]
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["generator"])
        if world.is_main:
            print(f"resumed from {last} at step {step}")
    discriminator = discriminator_optimizer = None
    if args.adversarial:
        if world.size > 1:
            raise ValueError("--adversarial trains in a single process (the discriminator is not distributed yet)")
        discriminator = MultiScaleSTFTDiscriminator(filters=args.disc_filters).to(world.device)
        discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=args.lr, betas=(0.5, 0.9))
        if last.exists():
            discriminator.load_state_dict(state["discriminator"])
            discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
    model = codec.to(world.device)
    if world.size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            codec,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            find_unused_parameters=args.quantizer_dropout,  # dropped codebooks get no gradient
        )
    log = RunLog(out)
    batches = _batches(train_clips, args.batch_size, generator, epoch, world.rank, world.size)
    codec.train()
    show = not args.quiet and world.is_main
    recent = collections.deque(maxlen=max(1, args.mmd_every))  # the macro-batch: the last mmd_every batches
    mmd_seconds, started = 0.0, time.perf_counter()
    with tqdm(total=args.steps, initial=step, desc=f"codec lambda_mmd={args.lambda_mmd}", disable=not show) as bar:
        while step < args.steps:
            waveform, epoch = next(batches)
            waveform = waveform.to(world.device)
            result = model(waveform)
            loss = result.losses["total"]
            if discriminator is not None:
                loss = loss + _adversarial_losses(discriminator, discriminator_optimizer, waveform, result)
            if "mmd" in result.losses and world.size > 1:
                # DDP averages the ranks' gradients, but each rank's MMD gradient is only its own samples' share of
                # the global term's gradient: scale it back to the sum.
                loss = loss + (world.size - 1) * args.lambda_mmd * result.losses["mmd"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            if macro:
                recent.append(waveform)
                if step % args.mmd_every == 0:
                    seconds, value = _macro_mmd_step(codec, list(recent), mmd_optimizer, args.lambda_mmd, world)
                    mmd_seconds += seconds
                    if world.is_main:
                        clips = sum(w.shape[0] for w in recent) * world.size
                        record = {"step": step, "mmd": value, "batches": len(recent), "clips": clips}
                        with (out / "mmd_log.jsonl").open("a") as f:
                            f.write(json.dumps(record | {"seconds": round(seconds, 4)}) + "\n")
            if step % args.log_every == 0 or step == args.steps:
                losses = dict(result.losses)
                if macro:  # a monitor: the MMD term on this step's batch alone, no gradient
                    with torch.no_grad():
                        streams = result.mmd_streams.detach()
                        losses["mmd"] = codec.mmd_criterion(streams)(streams)
                record = {"step": step, **_averaged(losses, world)}
                if world.is_main:
                    log.write(record)
                bar.set_postfix(total=record["total"], mel=record["mel"])
            if world.is_main and (step % args.checkpoint_every == 0 or step == args.steps):
                extra = {"mmd_optimizer": mmd_optimizer.state_dict()} if mmd_optimizer is not None else {}
                if discriminator is not None:
                    extra |= {
                        "discriminator": discriminator.state_dict(),
                        "discriminator_optimizer": discriminator_optimizer.state_dict(),
                    }
                save_checkpoint(last, codec, optimizer, step, epoch + 1, generator, extra)
    train_seconds = time.perf_counter() - started
    if not world.is_main:
        return None
    if macro and train_seconds > 0:
        print(
            f"MMD steps (macro-batch of {args.mmd_every} batches every {args.mmd_every} steps): {mmd_seconds:.1f} s of "
            f"{train_seconds:.1f} s training, {100 * mmd_seconds / train_seconds:.1f} %"
        )
    report = evaluate(codec, valid_clips)
    report["train_seconds"] = train_seconds
    report["mmd_seconds"] = mmd_seconds
    report["mmd_time_share"] = mmd_seconds / train_seconds if train_seconds > 0 else 0.0
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def _adversarial_losses(discriminator, discriminator_optimizer, waveform: torch.Tensor, result) -> torch.Tensor:
    """One discriminator update (hinge, on the real batch and the detached reconstruction), then the generator's
    weighted adversarial and feature-matching losses (added to result.losses, "total" included); returns their sum."""
    real_logits, _ = discriminator(waveform)
    fake_logits, _ = discriminator(result.reconstruction.detach())
    critic = discriminator_loss(real_logits, fake_logits)
    discriminator_optimizer.zero_grad(set_to_none=True)
    critic.backward()
    discriminator_optimizer.step()
    fake_logits, fake_features = discriminator(result.reconstruction)
    with torch.no_grad():
        _, real_features = discriminator(waveform)
    adversarial, matching = generator_losses(fake_logits, real_features, fake_features)
    added = ADVERSARIAL_WEIGHTS["adv"] * adversarial + ADVERSARIAL_WEIGHTS["feat"] * matching
    result.losses |= {"adv": adversarial, "feat": matching, "disc": critic.detach()}
    result.losses["total"] = result.losses.pop("total") + added
    return added


def _macro_mmd_step(codec: Codec, waveforms: list, optimizer, lambda_mmd: float, world: World) -> tuple[float, float]:
    """The published recipe's MMD update: lambda_mmd x MMD of the re-encoded macro-batch, back-propagated and applied
    on its own (outside the reconstruction losses) by `optimizer`, the encoder's Adam of the MMD updates alone. Over
    several processes the loss is global (every rank's batches) and each rank's gradient is its own rows' share, so
    the ranks' gradients are summed. Returns (seconds, loss)."""
    started = time.perf_counter()
    group = dist.group.WORLD if world.size > 1 else None
    loss = codec.macro_batch_mmd(waveforms, process_group=group)
    optimizer.zero_grad(set_to_none=True)
    (lambda_mmd * loss).backward()
    if world.size > 1:
        for parameter in codec.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
    optimizer.step()
    return time.perf_counter() - started, float(loss.detach())


def read_waveform(path: str | Path, sample_rate: int) -> torch.Tensor:
    """A whole audio file as mono float32 [1, S] at sample_rate."""
    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = torch.from_numpy(samples.mean(axis=1))
    if rate != sample_rate:
        mono = torchaudio.functional.resample(mono, rate, sample_rate)
    return mono.unsqueeze(0)


def encode_file(args) -> None:
    codec = load_codec(args.checkpoint)
    waveform = read_waveform(args.audio, codec.config.sample_rate)
    hop = codec.config.hop_length
    padded = torch.nn.functional.pad(waveform, (0, (-waveform.shape[-1]) % hop))
    with torch.no_grad():
        codes = codec.encode(padded[None])
    torch.save({"codes": codes, "num_samples": waveform.shape[-1]}, args.codes)
    print(f"{args.audio}: {codes.shape[-1]} frames x {codes.shape[1]} codebooks -> {args.codes}")


def decode_file(args) -> None:
    codec = load_codec(args.checkpoint)
    saved = torch.load(args.codes, map_location="cpu")
    with torch.no_grad():
        waveform = codec.decode(saved["codes"])[0, :, : saved["num_samples"]]
    soundfile.write(str(args.audio), waveform[0].numpy(), codec.config.sample_rate)
    print(f"{args.codes} -> {args.audio}")


def compare_runs(args) -> str:
    """A Markdown table of the runs' held-out evaluations (eval.json), side by side."""
    rows = [
        ("mel distance (lower is better)", lambda r: r["mel_distance"]),
        ("SI-SNR, dB (higher is better)", lambda r: r["si_snr_db"]),
        ("mean pairwise MI, nats", lambda r: r["dependence"]["mean_offdiag_mutual_information"]),
        ("mean pairwise NMI", lambda r: r["dependence"]["mean_offdiag_normalized_mutual_information"]),
        ("total correlation, nats", lambda r: r["dependence"]["total_correlation"]),
        ("mean pairwise MI, delay-aligned", lambda r: r["dependence_delay"]["mean_offdiag_mutual_information"]),
        ("total correlation, delay-aligned", lambda r: r["dependence_delay"]["total_correlation"]),
    ]
    reports = {Path(run).name: json.loads((Path(run) / "eval.json").read_text()) for run in args.runs}
    lines = ["| measure | " + " | ".join(reports) + " |", "| --- |" + " ---: |" * len(reports)]
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(f"{get(r):.4f}" for r in reports.values()) + " |")
    table = "\n".join(lines)
    print(table)
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train (or resume) a codec")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--segment-seconds", type=float, default=1.0)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--lambda-mmd", type=float, default=0.0, help="MMD weight (the published recipe: 1000)")
    t.add_argument("--mmd-estimator", choices=("shuffle", "dhsic"), default="shuffle")
    t.add_argument(
        "--mmd-every",
        type=int,
        default=32,
        help="the published recipe: every N steps, the MMD loss on the last N batches re-encoded (default 32); "
        "0: the MMD term in every step's loss, on the batch alone",
    )
    t.add_argument("--mmd-input", choices=MMD_INPUTS, default="pre_quantization", help="the streams the MMD takes")
    t.add_argument("--quantizer-dropout", action="store_true")
    t.add_argument(
        "--adversarial",
        action="store_true",
        help="the published EnCodec losses: multi-scale STFT discriminator (adv 4, feat 4, l1 0.1, mel 2; no balancer)",
    )
    t.add_argument("--disc-filters", type=int, default=32, help="the discriminator's channels (published: 32)")
    t.add_argument("--channels", type=int, default=8)
    t.add_argument("--latent-dim", type=int, default=64)
    t.add_argument("--codebooks", type=int, default=4)
    t.add_argument("--codebook-size", type=int, default=256)
    t.add_argument("--sample-rate", type=int, default=32000)
    t.add_argument("--audio-dir", default=None, help="your own WAV/FLAC files instead of the rendered corpus")
    t.add_argument("--cache-dir", default="outputs/audio-cache")
    t.add_argument("--pieces", type=int, default=60)
    t.add_argument("--piece-seconds", type=float, default=20.0)
    t.add_argument("--renderer", choices=("auto", "builtin", "fluidsynth"), default="auto")
    t.add_argument("--valid-fraction", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0, help="the model's seed (weights, batches, MMD permutations)")
    t.add_argument("--data-seed", type=int, default=None, help="picks and splits the pieces (default: --seed)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--device", default="cpu", help="cpu or cuda (single process; torchrun ranks use LOCAL_RANK)")
    t.add_argument("--distributed", action="store_true", help="join a torch.distributed job (automatic under torchrun)")
    t.add_argument("--dist-backend", choices=("auto", "nccl", "gloo"), default="auto", help="auto: nccl on GPUs")
    t.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds a collective may wait for a rank")
    t.set_defaults(run=train)
    e = commands.add_parser("encode", help="audio file -> codes (.pt)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("audio")
    e.add_argument("codes")
    e.set_defaults(run=encode_file)
    d = commands.add_parser("decode", help="codes (.pt) -> audio file")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("codes")
    d.add_argument("audio")
    d.set_defaults(run=decode_file)
    c = commands.add_parser("compare", help="Markdown table of several runs' eval.json")
    c.add_argument("runs", nargs="+")
    c.set_defaults(run=compare_runs)
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()

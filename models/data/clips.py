"""Audio files, fixed-length clips and the train/valid split by piece."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

AUDIO_SUFFIXES = (".wav", ".flac")


# Audio files, clips and the train/valid split


def write_wav_atomically(out_wav: Path, waveform: np.ndarray, sample_rate: int) -> None:
    """Write via a temporary name so an interrupted run never leaves a truncated file that looks cached."""
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    partial = out_wav.with_name(f"{out_wav.name}.{os.getpid()}.partial")
    soundfile.write(partial, waveform, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(partial, out_wav)


def load_audio_folder(folder: str | os.PathLike) -> list[Path]:
    """All ``.wav`` and ``.flac`` files under ``folder`` (recursive, any letter case), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {folder} is not a directory")
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"folder {folder} holds no {'/'.join(AUDIO_SUFFIXES)} files")
    return files


class AudioClips(torch.utils.data.Dataset):
    """Fixed-length mono clips from audio files, resampled to ``sample_rate``.

    With ``random_offsets`` each item is one clip per file at an offset drawn from (seed, epoch, index): call
    ``set_epoch`` to draw new offsets. Otherwise the items are every whole consecutive segment of every file, in
    order. A file shorter than one segment gives one clip padded with zeros at the end.

    Args:
        files: audio files soundfile can read (WAV, FLAC, ...); channels are averaged.
        segment_seconds: clip length.
        sample_rate: rate of the returned clips in Hz.
        random_offsets: random clips (True) or sequential segments (False).
        seed: seed of the random offsets.
    """

    def __init__(
        self,
        files: list[str | os.PathLike],
        segment_seconds: float,
        sample_rate: int = 32000,
        random_offsets: bool = True,
        seed: int = 0,
    ) -> None:
        if not files:
            raise ValueError("files must list at least one audio file")
        if segment_seconds <= 0:
            raise ValueError(f"segment_seconds must be positive, got {segment_seconds}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.files = [Path(file) for file in files]
        self.segment_seconds = segment_seconds
        self.sample_rate = sample_rate
        self.segment_samples = round(segment_seconds * sample_rate)
        self.random_offsets = random_offsets
        self.seed = seed
        self.epoch = 0
        infos = [soundfile.info(str(file)) for file in self.files]
        self.file_rates = [info.samplerate for info in infos]
        self.file_frames = [info.frames for info in infos]
        self.segments = [] if random_offsets else self._sequential_segments()

    def _source_frames_per_segment(self, file_index: int) -> int:
        return math.ceil(self.segment_seconds * self.file_rates[file_index])

    def _sequential_segments(self) -> list[tuple[int, int]]:
        """(file index, start frame in the file's own rate) of every whole segment."""
        segments = []
        for file_index, frames in enumerate(self.file_frames):
            step = self._source_frames_per_segment(file_index)
            segments.extend((file_index, start) for start in range(0, max(frames - step, 0) + 1, step))
        return segments

    def set_epoch(self, epoch: int) -> None:
        """Draw the random offsets of this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files) if self.random_offsets else len(self.segments)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Clip number ``index``, float32 tensor of shape [1, segment_samples]."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        if self.random_offsets:
            file_index = index
            last_start = max(self.file_frames[index] - self._source_frames_per_segment(index), 0)
            start = int(np.random.default_rng((self.seed, self.epoch, index)).integers(0, last_start + 1))
        else:
            file_index, start = self.segments[index]
        return self._read_clip(file_index, start)

    def _read_clip(self, file_index: int, start: int) -> torch.Tensor:
        file_rate = self.file_rates[file_index]
        data, _ = soundfile.read(
            self.files[file_index],
            start=start,
            frames=self._source_frames_per_segment(file_index),
            dtype="float32",
            always_2d=True,
        )
        mono = torch.from_numpy(data.mean(axis=1))
        if file_rate != self.sample_rate:
            mono = torchaudio.functional.resample(mono, file_rate, self.sample_rate)
        mono = mono[: self.segment_samples]
        mono = torch.nn.functional.pad(mono, (0, self.segment_samples - len(mono)))
        return mono.unsqueeze(0)


def split_by_piece(
    paths: list[str | os.PathLike], valid_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """Seeded train/valid split in which all files of one piece land on the same side.

    A piece is a file stem, so renders of one piece in different cache folders (builtin, fluidsynth) stay together.

    Args:
        paths: audio files.
        valid_fraction: share of pieces for validation, in [0, 1); when positive and there are two or more pieces,
            at least one piece and never all of them (a single piece goes to train).
        seed: seed of the split.

    Returns:
        (train, valid) paths, each in input order.
    """
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    paths = [Path(path) for path in paths]
    pieces = sorted({path.stem for path in paths})
    num_valid = 0
    if valid_fraction > 0 and len(pieces) >= 2:
        num_valid = min(max(round(valid_fraction * len(pieces)), 1), len(pieces) - 1)
    order = np.random.default_rng(seed).permutation(len(pieces))
    valid_pieces = {pieces[i] for i in order[:num_valid]}
    train = [path for path in paths if path.stem not in valid_pieces]
    valid = [path for path in paths if path.stem in valid_pieces]
    return train, valid

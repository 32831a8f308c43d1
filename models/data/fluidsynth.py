"""Optional rendering through FluidSynth with a General MIDI soundfont, when both are installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

from models.data import corpus
from models.data.clips import write_wav_atomically
from models.data.synth import _normalise_peak

SOUNDFONT_DIRS = (Path("/usr/share/sounds/sf2"), Path("/usr/share/soundfonts"))
# Fuller General MIDI sets first; any other .sf2 found in SOUNDFONT_DIRS comes after these.
PREFERRED_SOUNDFONTS = ("FluidR3_GM.sf2", "TimGM6mb.sf2")


# FluidSynth (optional)


def find_soundfont() -> Path | None:
    """A General MIDI ``.sf2`` under the Debian soundfont folders, preferring the fuller sets; None if none."""
    found = sorted(path for folder in SOUNDFONT_DIRS if folder.is_dir() for path in folder.rglob("*.sf2"))
    preferred = [path for name in PREFERRED_SOUNDFONTS for path in found if path.name == name]
    candidates = preferred + found
    return candidates[0] if candidates else None


def fluidsynth_available() -> str | None:
    """Path of the ``fluidsynth`` binary when both it and a soundfont (``find_soundfont``) are installed, else None."""
    binary = shutil.which("fluidsynth")
    return binary if binary and find_soundfont() else None


def render_with_fluidsynth(
    path: str | os.PathLike, out_wav: str | os.PathLike, sample_rate: int = 32000, seconds: float | None = None
) -> np.ndarray:
    """Render a score through FluidSynth: music21 writes MIDI, FluidSynth plays it with a General MIDI soundfont.

    Args:
        path: score file (see ``score_to_notes``).
        out_wav: where to write the mono result.
        sample_rate: output rate in Hz.
        seconds: keep only the first this many seconds (whole piece when None).

    Returns:
        The mono float32 waveform written, shape [samples], peak ``OUTPUT_PEAK``.
    """
    binary, soundfont = fluidsynth_available(), find_soundfont()
    if binary is None:
        raise ValueError(f"render_with_fluidsynth needs the fluidsynth binary and a .sf2 under {SOUNDFONT_DIRS}")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds must be positive or None, got {seconds}")
    score = corpus._parse_score(path)
    with tempfile.TemporaryDirectory() as tmp:
        midi_path, stereo_path = Path(tmp) / "piece.mid", Path(tmp) / "piece.wav"
        score.write("midi", fp=midi_path)
        options = ["-ni", "-T", "wav", "-F", str(stereo_path), "-r", str(sample_rate)]
        subprocess.run([binary, *options, str(soundfont), str(midi_path)], check=True, capture_output=True, timeout=600)
        data, file_rate = soundfile.read(stereo_path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(data.mean(axis=1))
    if file_rate != sample_rate:
        mono = torchaudio.functional.resample(mono, file_rate, sample_rate)
    if seconds is not None:
        mono = mono[: round(seconds * sample_rate)]
    waveform = _normalise_peak(mono.numpy())
    write_wav_atomically(Path(out_wav), waveform, sample_rate)
    return waveform

"""Real-music training data without a download: the music21 corpus rendered to audio, or the user's own files.

The music21 package ships about 3,000 scores (Bach chorales, Palestrina, fiddle tunes, Beethoven, ...). They are
parsed to note lists, rendered to mono audio by a built-in additive synthesiser (or FluidSynth with a General MIDI
soundfont when one is installed), cached as WAV files, cut into fixed-length clips and split train/valid by piece.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile
import torch
import torchaudio
from tqdm import tqdm

logger = logging.getLogger(__name__)

DEFAULT_BPM = 100.0
DEFAULT_VELOCITY = 80
OUTPUT_PEAK = 0.9
RENDERERS = ("auto", "builtin", "fluidsynth")
AUDIO_SUFFIXES = (".wav", ".flac")
SOUNDFONT_DIRS = (Path("/usr/share/sounds/sf2"), Path("/usr/share/soundfonts"))
# Fuller General MIDI sets first; any other .sf2 found in SOUNDFONT_DIRS comes after these.
PREFERRED_SOUNDFONTS = ("FluidR3_GM.sf2", "TimGM6mb.sf2")
# When one piece exists in several formats (e.g. a madrigal as MusicXML and as a Roman-numeral analysis), the
# earliest format here is kept: full scores before Humdrum, ABC tunes and chord-only analyses.
FORMAT_PREFERENCE = (".mxl", ".musicxml", ".xml", ".krn", ".abc", ".rntxt")
INDEX_FLUSH_EVERY = 20
# The render cache's lock file. Its holder touches it after every piece; a run waiting for it gives up (TimeoutError)
# after LOCK_TIMEOUT_ENV seconds (default DEFAULT_LOCK_TIMEOUT_S) without that sign of progress, so a hung render
# fails the runs behind it instead of stalling them, while a long but progressing render (--full: 400 pieces) does not.
LOCK_FILE_NAME = ".lock"
LOCK_TIMEOUT_ENV = "MMDKERNELS_RENDER_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 600.0
LOCK_POLL_S = 0.1


class Note(NamedTuple):
    """One sounding note of a score, in seconds."""

    start_s: float
    duration_s: float
    midi_pitch: float
    velocity: int
    part_index: int


# ----------------------------------------------------------------------------------------------------------------
# Corpus listing and parsing
# ----------------------------------------------------------------------------------------------------------------


def _corpus_root() -> Path:
    from music21 import common

    return Path(common.getCorpusFilePath())


def piece_name(path: str | os.PathLike) -> str:
    """Corpus-relative path without the format suffix, e.g. ``"bach/bwv66.6"``; the file stem outside the corpus."""
    path = Path(path)
    try:
        return path.relative_to(_corpus_root()).with_suffix("").as_posix()
    except ValueError:
        return path.stem


def _all_corpus_pieces() -> list[str]:
    """Every corpus piece once (the preferred format where a piece has several), sorted by path."""
    from music21 import corpus

    best_by_piece: dict[str, Path] = {}
    for path in corpus.getPaths():
        path = Path(path)
        if path.suffix not in FORMAT_PREFERENCE:
            continue
        name = piece_name(path)
        kept = best_by_piece.get(name)
        if kept is None or FORMAT_PREFERENCE.index(path.suffix) < FORMAT_PREFERENCE.index(kept.suffix):
            best_by_piece[name] = path
    return sorted(str(path) for path in best_by_piece.values())


def _shuffled_corpus_pieces(seed: int) -> list[str]:
    pieces = _all_corpus_pieces()
    order = np.random.default_rng(seed).permutation(len(pieces))
    return [pieces[i] for i in order]


def list_corpus_pieces(limit: int | None = None, seed: int = 0) -> list[str]:
    """Paths of the music21 corpus scores, sorted.

    Args:
        limit: keep a seeded random subset of this many pieces (all pieces when None).
        seed: seed of the subset; the subset for ``limit=k`` is contained in the one for any larger limit.

    Returns:
        Sorted list of file paths, one per piece.
    """
    if limit is None:
        return _all_corpus_pieces()
    if limit <= 0:
        raise ValueError(f"limit must be a positive number of pieces or None, got {limit}")
    return sorted(_shuffled_corpus_pieces(seed)[:limit])


def _first_abc_tune_number(path: Path) -> int | None:
    match = re.search(r"^X:\s*(\d+)", path.read_text(errors="replace"), flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def _parse_score(path: str | os.PathLike):
    """Parse one score with music21; of an ABC book or any other multi-score Opus only the first score."""
    from music21 import converter, stream

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {path} is not a file")
    # Parsing a whole ABC book takes up to half a minute; asking for the first tune's number parses only that tune.
    tune_number = _first_abc_tune_number(path) if path.suffix == ".abc" else None
    parsed = converter.parse(path, number=tune_number) if tune_number is not None else converter.parse(path)
    if isinstance(parsed, stream.Opus):
        if not parsed.scores:
            raise ValueError(f"path {path} holds an empty Opus")
        return parsed.scores[0]
    return parsed


def _seconds_per_quarter(score) -> float:
    """From the score's first metronome mark, else ``DEFAULT_BPM``."""
    from music21 import tempo

    for mark in score.recurse().getElementsByClass(tempo.MetronomeMark):
        bpm = mark.getQuarterBPM()
        if bpm:
            return 60.0 / bpm
    return 60.0 / DEFAULT_BPM


def _part_notes(part, part_index: int, seconds_per_quarter: float) -> list[Note]:
    from music21 import chord, note

    notes = []
    for element in part.stripTies().flatten().getElementsByClass((note.Note, chord.Chord)):
        duration_s = float(element.quarterLength) * seconds_per_quarter
        if duration_s <= 0:
            continue  # grace notes have no length of their own
        start_s = float(element.offset) * seconds_per_quarter
        velocity = element.volume.velocity or DEFAULT_VELOCITY
        notes.extend(Note(start_s, duration_s, float(pitch.ps), velocity, part_index) for pitch in element.pitches)
    return notes


def _excerpt(notes: list[Note], max_seconds: float | None) -> list[Note]:
    """Shift the notes so the first one starts at 0 s, then keep what starts before ``max_seconds``, cut there."""
    first_start_s = min((note.start_s for note in notes), default=0.0)
    shifted = [note._replace(start_s=note.start_s - first_start_s) for note in notes]
    if max_seconds is None:
        return shifted
    return [
        note._replace(duration_s=min(note.duration_s, max_seconds - note.start_s))
        for note in shifted
        if note.start_s < max_seconds
    ]


def score_to_notes(path: str | os.PathLike, max_seconds: float | None = None) -> list[Note]:
    """Notes of a score (chords split into notes, rests dropped, tied notes merged), timed in seconds.

    Args:
        path: a score file music21 can parse (MusicXML, Humdrum, ABC, RomanText, ...); for an ABC book or other
            collection only its first tune.
        max_seconds: keep only notes starting before this time and cut them off there (whole piece when None).

    Returns:
        Notes sorted by start time then part, timed from the first note (a silent opening is skipped);
        ``part_index`` numbers the score's parts from 0.
    """
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")
    score = _parse_score(path)
    seconds_per_quarter = _seconds_per_quarter(score)
    parts = list(score.parts) or [score]
    notes = [note for index, part in enumerate(parts) for note in _part_notes(part, index, seconds_per_quarter)]
    return sorted(_excerpt(notes, max_seconds), key=lambda note: (note.start_s, note.part_index, note.midi_pitch))


# ----------------------------------------------------------------------------------------------------------------
# Built-in additive synthesiser
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timbre:
    """Harmonic amplitude profile and envelope of one synthetic instrument.

    Attributes:
        harmonics: relative amplitude of harmonics 1, 2, 3, ... of the fundamental.
        attack_s: linear rise time from silence to full level.
        decay_s: time constant of the exponential fall from full level towards ``sustain_level``.
        sustain_level: level held while the note lasts (0: the note dies away like a plucked string).
        release_s: linear fade after the note ends.
        vibrato_depth: peak frequency deviation as a fraction of the frequency.
        vibrato_hz: vibrato rate.
        harmonic_damping: extra decay rate (1/s) per harmonic above the fundamental; upper partials die first.
        gain: loudness relative to the other timbres.
    """

    harmonics: tuple[float, ...]
    attack_s: float
    decay_s: float
    sustain_level: float
    release_s: float
    vibrato_depth: float = 0.0
    vibrato_hz: float = 5.0
    harmonic_damping: float = 0.0
    gain: float = 1.0


STRING = Timbre(
    harmonics=(1.0, 0.55, 0.4, 0.3, 0.22, 0.16, 0.12, 0.09, 0.06, 0.04),
    attack_s=0.06,
    decay_s=0.3,
    sustain_level=0.8,
    release_s=0.12,
    vibrato_depth=0.004,
    vibrato_hz=5.5,
    gain=0.8,
)
FLUTE = Timbre(
    harmonics=(1.0, 0.3, 0.1, 0.05),
    attack_s=0.05,
    decay_s=0.2,
    sustain_level=0.85,
    release_s=0.08,
    vibrato_depth=0.005,
    vibrato_hz=5.0,
)
PLUCKED = Timbre(
    harmonics=(1.0, 0.7, 0.45, 0.3, 0.2, 0.12, 0.08, 0.05),
    attack_s=0.003,
    decay_s=0.6,
    sustain_level=0.0,
    release_s=0.05,
    harmonic_damping=2.5,
    gain=1.2,
)
ORGAN = Timbre(
    harmonics=(1.0, 0.6, 0.0, 0.45, 0.0, 0.25, 0.0, 0.2),
    attack_s=0.01,
    decay_s=0.1,
    sustain_level=0.9,
    release_s=0.05,
    gain=0.7,
)
# Chosen by part index modulo 4: a melody (part 0) is a string, a chorale's bass (part 3) an organ.
TIMBRES = (STRING, FLUTE, PLUCKED, ORGAN)


def _part_detune_cents(part_index: int) -> float:
    """A few cents up or down, different for neighbouring parts, so unisons beat slightly as real ensembles do."""
    return float((part_index * 5) % 7 - 3)


def _envelope(num_held: int, num_total: int, timbre: Timbre, sample_rate: int) -> np.ndarray:
    """Attack-decay-sustain-release gain curve, shape [num_total]; the note ends after ``num_held`` samples."""
    t = np.arange(num_total) / sample_rate
    attack = np.minimum(t / timbre.attack_s, 1.0)
    decay = timbre.sustain_level + (1.0 - timbre.sustain_level) * np.exp(
        -np.maximum(t - timbre.attack_s, 0.0) / timbre.decay_s
    )
    release = np.clip(1.0 - (t - num_held / sample_rate) / timbre.release_s, 0.0, 1.0)
    return attack * decay * release


def _render_note(note: Note, sample_rate: int) -> np.ndarray:
    """One note with its release tail, shape [samples]."""
    timbre = TIMBRES[note.part_index % len(TIMBRES)]
    num_held = max(1, round(note.duration_s * sample_rate))
    num_total = num_held + round(timbre.release_s * sample_rate)
    t = np.arange(num_total) / sample_rate
    frequency = 440.0 * 2.0 ** ((note.midi_pitch - 69.0 + _part_detune_cents(note.part_index) / 100.0) / 12.0)
    vibrato_hz = timbre.vibrato_hz * (1.0 + 0.04 * (note.part_index % 3))
    # Phase of a sine whose frequency swings by vibrato_depth: the integral of f (1 + d sin(2 pi r t)).
    vibrato_angular = 2.0 * np.pi * vibrato_hz
    time_warp_s = timbre.vibrato_depth * (1.0 - np.cos(vibrato_angular * t)) / vibrato_angular
    phase = 2.0 * np.pi * frequency * (t + time_warp_s)
    harmonic_numbers = np.arange(1, len(timbre.harmonics) + 1)
    below_nyquist = harmonic_numbers * frequency * (1.0 + timbre.vibrato_depth) < sample_rate / 2
    amplitudes = np.asarray(timbre.harmonics)[below_nyquist, None]
    numbers = harmonic_numbers[below_nyquist, None]
    partials = amplitudes * np.sin(numbers * phase)  # [harmonics, samples]
    if timbre.harmonic_damping:
        partials *= np.exp(-timbre.harmonic_damping * (numbers - 1) * t)
    envelope = _envelope(num_held, num_total, timbre, sample_rate)
    return partials.sum(axis=0) * envelope * (timbre.gain * note.velocity / 127.0)


def synthesize(notes: list[Note], sample_rate: int = 32000, seconds: float | None = None) -> np.ndarray:
    """Render notes with the built-in additive synthesiser.

    Each part gets a timbre (string, flute, plucked, organ by ``part_index`` modulo 4), an envelope, a slight
    detune and its own vibrato rate. The output is deterministic.

    Args:
        notes: notes as returned by ``score_to_notes``.
        sample_rate: output rate in Hz.
        seconds: output length; None ends it after the last note's release.

    Returns:
        Mono float32 waveform, shape [samples], peak ``OUTPUT_PEAK`` (all zeros when nothing sounds).
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds must be positive or None, got {seconds}")
    rendered = [(round(note.start_s * sample_rate), _render_note(note, sample_rate)) for note in notes]
    if seconds is not None:
        num_samples = round(seconds * sample_rate)
    else:
        num_samples = max((start + len(wave) for start, wave in rendered), default=0)
    mix = np.zeros(num_samples)
    for start, wave in rendered:
        end = min(start + len(wave), num_samples)
        if end > start:
            mix[start:end] += wave[: end - start]
    return _normalise_peak(mix)


def _normalise_peak(waveform: np.ndarray) -> np.ndarray:
    peak = np.abs(waveform).max(initial=0.0)
    scaled = waveform * (OUTPUT_PEAK / peak) if peak > 0 else waveform
    return scaled.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# FluidSynth (optional)
# ----------------------------------------------------------------------------------------------------------------


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
    score = _parse_score(path)
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
    _write_wav_atomically(Path(out_wav), waveform, sample_rate)
    return waveform


# ----------------------------------------------------------------------------------------------------------------
# Rendering the corpus to a cache
# ----------------------------------------------------------------------------------------------------------------


def _resolve_renderer(renderer: str) -> str:
    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
    if renderer == "auto":
        return "fluidsynth" if fluidsynth_available() else "builtin"
    if renderer == "fluidsynth" and not fluidsynth_available():
        raise ValueError(f"renderer='fluidsynth' needs the fluidsynth binary and a .sf2 under {SOUNDFONT_DIRS}")
    return renderer


def _cache_file_name(name: str, seconds: float) -> str:
    """One file per (piece, excerpt length): runs asking for different lengths share a cache without clobbering."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "__")) + f".{seconds:g}s.wav"


def _write_wav_atomically(out_wav: Path, waveform: np.ndarray, sample_rate: int) -> None:
    """Write via a temporary name so an interrupted run never leaves a truncated file that looks cached."""
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    partial = out_wav.with_name(f"{out_wav.name}.{os.getpid()}.partial")
    soundfile.write(partial, waveform, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(partial, out_wav)


def _render_piece(path: str, renderer: str, out_wav: Path, sample_rate: int, seconds: float) -> float:
    """Render one piece to ``out_wav``; returns its duration in seconds."""
    if renderer == "fluidsynth":
        waveform = render_with_fluidsynth(path, out_wav, sample_rate, seconds)
    else:
        notes = score_to_notes(path, max_seconds=seconds)
        if not notes:
            raise ValueError("no pitched notes")
        waveform = synthesize(notes, sample_rate)[: round(seconds * sample_rate)]
        _write_wav_atomically(out_wav, waveform, sample_rate)
    return len(waveform) / sample_rate


def _read_index(index_path: Path) -> dict:
    if index_path.exists():
        return json.loads(index_path.read_text())
    return {"pieces": {}, "failed": {}}


def _write_index(index_path: Path, index: dict) -> None:
    partial = index_path.with_name(f"{index_path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(partial, index_path)


def _render_into_cache(
    path: str, out_dir: Path, index: dict, renderer: str, sample_rate: int, seconds: float
) -> Path | None:
    """The WAV of one piece, rendered unless already cached; None if the piece cannot be rendered.

    Renders and failures are recorded in ``index``; a failure is not retried for the same ``seconds`` (delete its
    entry "<piece>@<seconds>s" under "failed" in index.json to retry).
    """
    name = piece_name(path)
    key = f"{name}@{seconds:g}s"
    if key in index["failed"]:
        return None
    entry = index["pieces"].get(key)
    if entry is not None and (out_dir / entry["path"]).exists():
        return out_dir / entry["path"]
    file_name = _cache_file_name(name, seconds)
    try:
        duration_s = _render_piece(path, renderer, out_dir / file_name, sample_rate, seconds)
    except Exception as error:  # music21 raises many exception types on unsupported score content
        logger.warning("skipping %s: %s", path, error)
        index["failed"][key] = {"error": repr(error), "max_seconds": seconds}
        return None
    index["pieces"][key] = {"path": file_name, "duration_s": duration_s, "max_seconds": seconds}
    return out_dir / file_name


def render_corpus(
    cache_dir: str | os.PathLike,
    num_pieces: int,
    seconds_per_piece: float = 20.0,
    sample_rate: int = 32000,
    renderer: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> list[Path]:
    """Render the opening of ``num_pieces`` corpus pieces to ``cache_dir/<renderer>-<sample_rate>/*.wav``.

    Pieces are taken in a seeded random order; ones that fail to parse or hold no notes are logged, remembered in
    the index and replaced by the next piece. Pieces already rendered with the same ``seconds_per_piece`` are not
    rendered again, so an interrupted run resumes and a larger ``num_pieces`` only adds pieces. ``index.json`` in
    the same folder lists each piece's name, WAV file (relative) and duration.

    Args:
        cache_dir: root folder of the cache.
        num_pieces: how many pieces to return.
        seconds_per_piece: length of the excerpt rendered from the start of each piece (shorter pieces are shorter).
        sample_rate: output rate in Hz.
        renderer: "builtin" (additive synthesiser), "fluidsynth", or "auto" (FluidSynth when installed).
        seed: seed of the piece order.
        progress: show a tqdm progress bar.

    Returns:
        Paths of the mono 16-bit WAV files, in the seeded order; fewer than ``num_pieces`` only if the corpus runs out.

    Raises:
        TimeoutError: another process rendering into the same folder holds its lock and has made no progress for
            ``$MMDKERNELS_RENDER_LOCK_TIMEOUT`` seconds (default 600).
    """
    if num_pieces <= 0:
        raise ValueError(f"num_pieces must be positive, got {num_pieces}")
    if seconds_per_piece <= 0:
        raise ValueError(f"seconds_per_piece must be positive, got {seconds_per_piece}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    renderer = _resolve_renderer(renderer)
    out_dir = Path(cache_dir) / f"{renderer}-{sample_rate}"
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "index.json"
    with _exclusive_lock(out_dir / LOCK_FILE_NAME):  # concurrent runs (a sweep) render each piece once, in turn
        return _render_locked(out_dir, index_path, num_pieces, seconds_per_piece, sample_rate, renderer, seed, progress)


def _lock_timeout_s() -> float:
    value = os.environ.get(LOCK_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        timeout_s = float(value)
    except ValueError:
        timeout_s = math.nan
    if not timeout_s > 0:
        raise ValueError(f"{LOCK_TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return timeout_s


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path):
    """Holds an exclusive flock on `lock_path`, waiting while its holder makes progress (touches the file).

    Raises TimeoutError after $MMDKERNELS_RENDER_LOCK_TIMEOUT seconds (default 600) in which the file's modification
    time did not change. The kernel drops a flock when its holder exits, so a lock that stays held belongs to a live
    process: a hung render.
    """
    timeout_s = _lock_timeout_s()
    with open(lock_path, "a") as handle:
        last_progress, deadline = None, 0.0
        while not _try_lock(handle):
            progress = os.fstat(handle.fileno()).st_mtime_ns
            if progress != last_progress:
                last_progress, deadline = progress, time.monotonic() + timeout_s
            elif time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the render cache lock {lock_path} is held by another process that has made no progress for "
                    f"{timeout_s:g} s (a hung render?): stop that process, or set {LOCK_TIMEOUT_ENV} to wait longer"
                )
            time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _render_locked(
    out_dir: Path,
    index_path: Path,
    num_pieces: int,
    seconds_per_piece: float,
    sample_rate: int,
    renderer: str,
    seed: int,
    progress: bool,
) -> list[Path]:
    index = _read_index(index_path)
    wav_paths: list[Path] = []
    with tqdm(total=num_pieces, disable=not progress, unit="piece", desc=f"render {renderer}") as bar:
        try:
            for position, path in enumerate(_shuffled_corpus_pieces(seed)):
                if len(wav_paths) == num_pieces:
                    break
                wav_path = _render_into_cache(path, out_dir, index, renderer, sample_rate, seconds_per_piece)
                os.utime(out_dir / LOCK_FILE_NAME)  # progress: runs waiting for the lock keep waiting
                if wav_path is not None:
                    wav_paths.append(wav_path)
                    bar.update(1)
                if position % INDEX_FLUSH_EVERY == INDEX_FLUSH_EVERY - 1:
                    _write_index(index_path, index)
        finally:
            _write_index(index_path, index)
    if len(wav_paths) < num_pieces:
        logger.warning("the corpus ran out: %d of %d pieces rendered", len(wav_paths), num_pieces)
    return wav_paths


# ----------------------------------------------------------------------------------------------------------------
# Audio files, clips and the train/valid split
# ----------------------------------------------------------------------------------------------------------------


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

"""Rendering the corpus into a WAV cache shared by concurrent runs (a lock, an index, atomic writes)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import time
from pathlib import Path

from tqdm import tqdm

from models.data import corpus, fluidsynth
from models.data.clips import write_wav_atomically
from models.data.corpus import piece_name, score_to_notes
from models.data.synth import synthesize

logger = logging.getLogger(__name__)

RENDERERS = ("auto", "builtin", "fluidsynth")
INDEX_FLUSH_EVERY = 20
# The render cache's lock file. Its holder touches it after every piece; a run waiting for it gives up (TimeoutError)
# after LOCK_TIMEOUT_ENV seconds (default DEFAULT_LOCK_TIMEOUT_S) without that sign of progress, so a hung render
# fails the runs behind it instead of stalling them, while a long but progressing render (--full: 400 pieces) does not.
LOCK_FILE_NAME = ".lock"
LOCK_TIMEOUT_ENV = "MMDKERNELS_RENDER_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 600.0
LOCK_POLL_S = 0.1


# Rendering the corpus to a cache


def _resolve_renderer(renderer: str) -> str:
    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
    if renderer == "auto":
        return "fluidsynth" if fluidsynth.fluidsynth_available() else "builtin"
    if renderer == "fluidsynth" and not fluidsynth.fluidsynth_available():
        raise ValueError(
            f"renderer='fluidsynth' needs the fluidsynth binary and a .sf2 under {fluidsynth.SOUNDFONT_DIRS}"
        )
    return renderer


def _cache_file_name(name: str, seconds: float) -> str:
    """One file per (piece, excerpt length): runs asking for different lengths share a cache without clobbering."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "__")) + f".{seconds:g}s.wav"


def _render_piece(path: str, renderer: str, out_wav: Path, sample_rate: int, seconds: float) -> float:
    """Render one piece to ``out_wav``; returns its duration in seconds."""
    if renderer == "fluidsynth":
        waveform = fluidsynth.render_with_fluidsynth(path, out_wav, sample_rate, seconds)
    else:
        notes = score_to_notes(path, max_seconds=seconds)
        if not notes:
            raise ValueError("no pitched notes")
        waveform = synthesize(notes, sample_rate)[: round(seconds * sample_rate)]
        write_wav_atomically(out_wav, waveform, sample_rate)
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
            for position, path in enumerate(corpus._shuffled_corpus_pieces(seed)):
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

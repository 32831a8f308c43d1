"""The music21 score corpus: listing (seeded order, one format per piece) and parsing scores to note lists."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_BPM = 100.0
DEFAULT_VELOCITY = 80
# When one piece exists in several formats (e.g. a madrigal as MusicXML and as a Roman-numeral analysis), the
# earliest format here is kept: full scores before Humdrum, ABC tunes and chord-only analyses.
FORMAT_PREFERENCE = (".mxl", ".musicxml", ".xml", ".krn", ".abc", ".rntxt")


class Note(NamedTuple):
    """One sounding note of a score, in seconds."""

    start_s: float
    duration_s: float
    midi_pitch: float
    velocity: int
    part_index: int


# Corpus listing and parsing


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

"""The built-in additive synthesiser: note lists to mono audio, one timbre per part."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.data.corpus import Note

OUTPUT_PEAK = 0.9


# Built-in additive synthesiser


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

"""Real-music data pipeline: corpus parsing, the built-in synthesiser, the render cache, clips and the split."""

import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch
from subprocess_util import running

from models import data

SR = 32000
CHORALE = "bach/bwv66.6"
POOL_TIMEOUT_S = 120  # two spawned processes import torch and render 2 s of audio: 25 s on 2 cores at load 9


@pytest.fixture(scope="module")
def chorale_path():
    from music21 import corpus

    return corpus.getWork(CHORALE)


@pytest.fixture(scope="module")
def chorale_notes(chorale_path):
    return data.score_to_notes(chorale_path, max_seconds=6.0)


def dominant_frequency(clip, sample_rate):
    spectrum = torch.fft.rfft(clip.flatten()).abs()
    return spectrum.argmax().item() * sample_rate / clip.numel()


def write_sine(path, seconds, sample_rate, frequency=440.0, channels=1):
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    wave = 0.5 * np.sin(2 * np.pi * frequency * t)
    soundfile.write(path, np.stack([wave] * channels, axis=1), sample_rate)


def test_chorale_notes_are_timed_in_seconds(chorale_notes):
    assert {note.part_index for note in chorale_notes} == {0, 1, 2, 3}
    assert all(0 <= note.start_s < 6.0 and 0 < note.duration_s for note in chorale_notes)
    assert max(note.start_s + note.duration_s for note in chorale_notes) <= 6.0 + 1e-9
    assert all(36 <= note.midi_pitch <= 84 for note in chorale_notes)
    assert chorale_notes == sorted(chorale_notes, key=lambda note: (note.start_s, note.part_index, note.midi_pitch))
    # The chorale is marked quarter = 96, so an eighth note lasts 0.3125 s.
    assert chorale_notes[0].duration_s == pytest.approx(0.5 * 60 / 96)


def test_rests_ties_chords_and_tempo(tmp_path):
    tune = tmp_path / "tune.abc"
    tune.write_text("X:1\nT:test\nM:4/4\nL:1/4\nQ:1/4=120\nK:C\nz4 | C2- C2 | [CEG]2 z2 |\n")
    notes = data.score_to_notes(tune)
    # The silent opening bar is skipped, the tied C is one 2 s note, the chord is three notes.
    assert [(note.start_s, note.duration_s, note.midi_pitch) for note in notes] == [
        (0.0, 2.0, 60.0),
        (2.0, 1.0, 60.0),
        (2.0, 1.0, 64.0),
        (2.0, 1.0, 67.0),
    ]
    cut_chord = data.score_to_notes(tune, max_seconds=2.5)[1:]
    assert [(note.start_s, note.duration_s) for note in cut_chord] == [(2.0, 0.5)] * 3


def test_abc_book_gives_its_first_tune():
    book = data.corpus._corpus_root() / "airdsAirs" / "book1.abc"
    notes = data.score_to_notes(book, max_seconds=4.0)
    assert notes and {note.part_index for note in notes} == {0}


def test_synthesize_chorale(chorale_notes):
    waveform = data.synthesize(chorale_notes, SR, seconds=6.0)
    assert waveform.dtype == np.float32 and waveform.shape == (6 * SR,)
    assert np.isfinite(waveform).all()
    assert np.abs(waveform).max() <= 1.0
    assert np.sqrt(np.mean(waveform**2)) > 0.05
    assert np.array_equal(waveform, data.synthesize(chorale_notes, SR, seconds=6.0))


def test_synthesize_plays_the_pitch_and_plucks_decay():
    a440 = [data.Note(0.0, 2.0, 69.0, 100, part_index) for part_index in range(4)]
    for note in a440:
        waveform = data.synthesize([note], SR)
        assert len(waveform) == round((2.0 + data.TIMBRES[note.part_index].release_s) * SR)
        assert dominant_frequency(torch.from_numpy(waveform[:SR]), SR) == pytest.approx(440, abs=3)
    plucked, organ = (data.synthesize([a440[index]], SR) for index in (2, 3))
    late_over_early = [
        np.abs(wave[3 * SR // 2 : 2 * SR]).max() / np.abs(wave[: SR // 2]).max() for wave in (plucked, organ)
    ]
    assert late_over_early[0] < 0.5 < late_over_early[1]


def test_synthesize_rejects_bad_arguments(chorale_notes):
    with pytest.raises(ValueError, match="seconds"):
        data.synthesize(chorale_notes, SR, seconds=0)
    with pytest.raises(ValueError, match="sample_rate"):
        data.synthesize(chorale_notes, 0)
    with pytest.raises(ValueError, match="max_seconds"):
        data.score_to_notes("unused.mxl", max_seconds=-1.0)


def test_list_corpus_pieces_is_sorted_seeded_and_one_file_per_piece():
    everything = data.list_corpus_pieces()
    assert everything == sorted(everything) and len(everything) > 2500
    names = [data.piece_name(path) for path in everything]
    assert len(set(names)) == len(names)
    subset = data.list_corpus_pieces(limit=5, seed=3)
    assert subset == sorted(subset) and len(subset) == 5 and set(subset) <= set(everything)
    assert subset == data.list_corpus_pieces(limit=5, seed=3)
    assert set(subset) <= set(data.list_corpus_pieces(limit=20, seed=3))
    with pytest.raises(ValueError, match="limit"):
        data.list_corpus_pieces(limit=0)


def test_render_corpus_caches_and_indexes(tmp_path):
    paths = data.render_corpus(tmp_path, num_pieces=3, seconds_per_piece=3.0, renderer="builtin", progress=False)
    assert len(paths) == 3 and all(path.parent == tmp_path / f"builtin-{SR}" for path in paths)
    for path in paths:
        info = soundfile.info(path)
        assert info.samplerate == SR and info.channels == 1 and 0 < info.duration <= 3.0
    index = json.loads((tmp_path / f"builtin-{SR}" / "index.json").read_text())
    assert sorted(entry["path"] for entry in index["pieces"].values()) == sorted(path.name for path in paths)
    assert all(0 < entry["duration_s"] <= 3.0 for entry in index["pieces"].values())

    modified = {path: path.stat().st_mtime_ns for path in paths}
    again = data.render_corpus(tmp_path, num_pieces=3, seconds_per_piece=3.0, renderer="builtin", progress=False)
    assert again == paths
    assert {path: path.stat().st_mtime_ns for path in paths} == modified


def test_render_corpus_skips_and_remembers_unparsable_pieces(chorale_path, tmp_path, monkeypatch):
    broken = tmp_path / "broken.mxl"
    broken.write_bytes(b"not a zip archive")
    monkeypatch.setattr(data.corpus, "_shuffled_corpus_pieces", lambda seed: [str(broken), str(chorale_path)])
    paths = data.render_corpus(tmp_path / "cache", 2, seconds_per_piece=1.0, renderer="builtin", progress=False)
    assert [path.name for path in paths] == ["bach__bwv66.6.1s.wav"]
    index = json.loads((tmp_path / "cache" / f"builtin-{SR}" / "index.json").read_text())
    assert list(index["failed"]) == ["broken@1s"] and list(index["pieces"]) == [f"{CHORALE}@1s"]


def test_render_corpus_keeps_one_file_per_excerpt_length(chorale_path, tmp_path, monkeypatch):
    monkeypatch.setattr(data.corpus, "_shuffled_corpus_pieces", lambda seed: [str(chorale_path)])
    short = data.render_corpus(tmp_path, 1, seconds_per_piece=1.0, renderer="builtin", progress=False)
    long = data.render_corpus(tmp_path, 1, seconds_per_piece=2.0, renderer="builtin", progress=False)
    assert short != long
    modified = short[0].stat().st_mtime_ns
    assert data.render_corpus(tmp_path, 1, seconds_per_piece=1.0, renderer="builtin", progress=False) == short
    assert short[0].stat().st_mtime_ns == modified
    assert soundfile.info(short[0]).duration == pytest.approx(1.0) and soundfile.info(long[0]).duration > 1.5


def _render_one_second(cache):
    return [
        str(path) for path in data.render_corpus(cache, 2, seconds_per_piece=1.0, renderer="builtin", progress=False)
    ]


def test_render_corpus_concurrent_runs_agree(tmp_path):
    """Two processes rendering into one cache (a sweep started side by side) get the same files, none skipped."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # leaving the block terminates the workers
        try:
            first, second = pool.map_async(_render_one_second, [tmp_path, tmp_path]).get(timeout=POOL_TIMEOUT_S)
        except multiprocessing.TimeoutError:
            pytest.fail(f"the two rendering processes did not finish within {POOL_TIMEOUT_S} s: a worker hung")
    assert first == second and len(first) == 2
    assert not list((tmp_path / f"builtin-{SR}").glob("*.partial"))


HOLD_LOCK = """
import fcntl, os, sys, time
lock_path, progress_s = sys.argv[1], float(sys.argv[2])
handle = open(lock_path, "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
start = time.monotonic()
while time.monotonic() - start < progress_s:  # touches the lock as a renderer does after each piece
    time.sleep(0.1)
    os.utime(lock_path)
if progress_s == 0:
    time.sleep(600)  # hung, holding the lock
"""


@contextlib.contextmanager
def render_lock_held_elsewhere(cache, progress_s: float):
    """Another process holds the render-cache lock: it shows progress for `progress_s` and exits, or with 0 it hangs
    holding the lock until the with-block ends (and kills it with its process group). Yields the lock's path."""
    lock = cache / f"builtin-{SR}" / data.LOCK_FILE_NAME
    lock.parent.mkdir(parents=True)
    command = [sys.executable, "-c", HOLD_LOCK, str(lock), str(progress_s)]
    with running(command, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout.readline() == "locked\n"
        yield lock


def test_render_lock_held_by_a_hung_process_times_out(chorale_path, tmp_path, monkeypatch):
    monkeypatch.setattr(data.corpus, "_shuffled_corpus_pieces", lambda seed: [str(chorale_path)])
    monkeypatch.setenv(data.LOCK_TIMEOUT_ENV, "0.5")
    with render_lock_held_elsewhere(tmp_path, progress_s=0) as lock:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=re.escape(str(lock))):
            data.render_corpus(tmp_path, 1, seconds_per_piece=1.0, renderer="builtin", progress=False)
        assert time.monotonic() - start < 5.0
    # the holder is gone with its group: the lock is free again
    assert len(data.render_corpus(tmp_path, 1, seconds_per_piece=1.0, renderer="builtin", progress=False)) == 1


def test_render_lock_waits_while_its_holder_makes_progress(chorale_path, tmp_path, monkeypatch):
    monkeypatch.setattr(data.corpus, "_shuffled_corpus_pieces", lambda seed: [str(chorale_path)])
    monkeypatch.setenv(data.LOCK_TIMEOUT_ENV, "1")
    with render_lock_held_elsewhere(tmp_path, progress_s=3.0):
        start = time.monotonic()
        paths = data.render_corpus(tmp_path, 1, seconds_per_piece=1.0, renderer="builtin", progress=False)
        assert len(paths) == 1 and time.monotonic() - start > 2.0  # waited past its 1 s timeout: the holder progressed


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_render_lock_timeout_must_be_positive(tmp_path, monkeypatch, value):
    monkeypatch.setenv(data.LOCK_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=data.LOCK_TIMEOUT_ENV):
        data.render_corpus(tmp_path, 1, renderer="builtin", progress=False)


def test_render_corpus_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="renderer"):
        data.render_corpus(tmp_path, 1, renderer="midi")
    with pytest.raises(ValueError, match="seconds_per_piece"):
        data.render_corpus(tmp_path, 1, seconds_per_piece=0)
    with pytest.raises(ValueError, match="num_pieces"):
        data.render_corpus(tmp_path, 0)


@pytest.mark.skipif(data.fluidsynth_available() is None, reason="no fluidsynth binary or no GM .sf2 soundfont")
def test_render_with_fluidsynth(chorale_path, tmp_path):
    waveform = data.render_with_fluidsynth(chorale_path, tmp_path / "chorale.wav", SR, seconds=3.0)
    assert waveform.dtype == np.float32 and 0 < len(waveform) <= 3 * SR
    assert np.isfinite(waveform).all() and 0.01 < np.abs(waveform).max() <= 1.0
    assert soundfile.info(tmp_path / "chorale.wav").samplerate == SR


FAKE_FLUIDSYNTH = """#!{python}
import sys
import numpy
import soundfile
out_wav = sys.argv[sys.argv.index("-F") + 1]
t = numpy.arange(44100) / 44100
soundfile.write(out_wav, 0.3 * numpy.stack([numpy.sin(2 * numpy.pi * 440 * t)] * 2, axis=1), 44100)
"""


def test_fluidsynth_output_is_read_back_mono_and_resampled(tmp_path, monkeypatch):
    """A stand-in binary that ignores -r and writes 1 s of stereo 44.1 kHz: the pipeline around FluidSynth."""
    bin_dir, soundfont_dir = tmp_path / "bin", tmp_path / "sf2"
    bin_dir.mkdir(), soundfont_dir.mkdir()
    (bin_dir / "fluidsynth").write_text(FAKE_FLUIDSYNTH.format(python=sys.executable))
    (bin_dir / "fluidsynth").chmod(0o755)
    (soundfont_dir / "TimGM6mb.sf2").write_bytes(b"")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(data.fluidsynth, "SOUNDFONT_DIRS", (soundfont_dir,))
    assert data.fluidsynth_available() == str(bin_dir / "fluidsynth")

    [wav] = data.render_corpus(tmp_path / "cache", num_pieces=1, seconds_per_piece=0.5, progress=False)
    assert wav.parent.name == f"fluidsynth-{SR}"
    waveform, sample_rate = soundfile.read(wav, dtype="float32")
    assert sample_rate == SR and waveform.shape == (SR // 2,)
    assert dominant_frequency(torch.from_numpy(waveform), SR) == pytest.approx(440, abs=3)


@pytest.fixture
def audio_folder(tmp_path):
    (tmp_path / "album").mkdir()
    write_sine(tmp_path / "album" / "low_rate.wav", 2.0, 16000, channels=2)
    write_sine(tmp_path / "full_rate.flac", 2.0, SR, frequency=880.0)
    write_sine(tmp_path / "short.WAV", 0.25, SR)
    (tmp_path / "notes.txt").write_text("not audio")
    return tmp_path


def test_load_audio_folder(audio_folder, tmp_path_factory):
    files = data.load_audio_folder(audio_folder)
    assert [path.name for path in files] == ["low_rate.wav", "full_rate.flac", "short.WAV"]
    with pytest.raises(ValueError, match="folder"):
        data.load_audio_folder(tmp_path_factory.mktemp("empty"))
    with pytest.raises(ValueError, match="folder"):
        data.load_audio_folder(audio_folder / "missing")


def test_random_clips_are_seeded_resampled_and_padded(audio_folder):
    clips = data.AudioClips(data.load_audio_folder(audio_folder), segment_seconds=0.5, sample_rate=SR, seed=7)
    assert len(clips) == 3
    low_rate = clips[0]
    assert low_rate.shape == (1, SR // 2) and low_rate.dtype == torch.float32
    assert dominant_frequency(low_rate, SR) == pytest.approx(440, abs=3)
    assert dominant_frequency(clips[1], SR) == pytest.approx(880, abs=3)
    short = clips[2]
    assert short.shape == (1, SR // 2) and short[0, SR // 4 :].abs().max() == 0
    assert torch.equal(clips[0], low_rate)

    starts = set()
    for epoch in range(4):
        clips.set_epoch(epoch)
        starts.add(clips[1][0, :50].numpy().tobytes())
    assert len(starts) > 1
    with pytest.raises(IndexError):
        clips[3]


def test_sequential_clips_cover_each_file(audio_folder):
    clips = data.AudioClips(data.load_audio_folder(audio_folder), segment_seconds=0.5, random_offsets=False)
    assert len(clips) == 4 + 4 + 1
    assert torch.stack([clips[i] for i in range(len(clips))]).shape == (9, 1, SR // 2)
    with pytest.raises(ValueError, match="segment_seconds"):
        data.AudioClips([audio_folder / "full_rate.flac"], segment_seconds=0)
    with pytest.raises(ValueError, match="files"):
        data.AudioClips([], segment_seconds=1.0)


def test_split_by_piece_keeps_pieces_together():
    paths = [f"{renderer}-32000/piece{i}.wav" for i in range(20) for renderer in ("builtin", "fluidsynth")]
    train, valid = data.split_by_piece(paths, valid_fraction=0.2, seed=1)
    train_pieces, valid_pieces = {path.stem for path in train}, {path.stem for path in valid}
    assert len(valid_pieces) == 4 and not train_pieces & valid_pieces
    assert sorted(map(str, train + valid)) == sorted(paths)
    assert (train, valid) == data.split_by_piece(paths, valid_fraction=0.2, seed=1)
    assert valid != data.split_by_piece(paths, valid_fraction=0.2, seed=2)[1]
    assert data.split_by_piece(paths[:2], valid_fraction=0.5)[1] == []
    with pytest.raises(ValueError, match="valid_fraction"):
        data.split_by_piece(paths, valid_fraction=1.0)

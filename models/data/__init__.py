"""Real-music training data without a download: the music21 corpus rendered to audio, or the user's own files.

The music21 package ships about 3,000 scores (Bach chorales, Palestrina, fiddle tunes, Beethoven, ...). They are
parsed to note lists (corpus.py), rendered to mono audio by a built-in additive synthesiser (synth.py) or FluidSynth
with a General MIDI soundfont when one is installed (fluidsynth.py), cached as WAV files (render_cache.py), cut into
fixed-length clips and split train/valid by piece (clips.py).
"""

from models.data.clips import AUDIO_SUFFIXES, AudioClips, load_audio_folder, split_by_piece
from models.data.corpus import Note, list_corpus_pieces, piece_name, score_to_notes
from models.data.fluidsynth import find_soundfont, fluidsynth_available, render_with_fluidsynth
from models.data.render_cache import LOCK_FILE_NAME, LOCK_TIMEOUT_ENV, RENDERERS, render_corpus
from models.data.synth import TIMBRES, Timbre, synthesize

__all__ = [
    "AUDIO_SUFFIXES",
    "AudioClips",
    "LOCK_FILE_NAME",
    "LOCK_TIMEOUT_ENV",
    "Note",
    "RENDERERS",
    "TIMBRES",
    "Timbre",
    "find_soundfont",
    "fluidsynth_available",
    "list_corpus_pieces",
    "load_audio_folder",
    "piece_name",
    "render_corpus",
    "render_with_fluidsynth",
    "score_to_notes",
    "split_by_piece",
    "synthesize",
]

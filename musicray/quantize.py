"""The canonical (quantized) song: what the vocabulary can express of a song, and the bar tempi it writes.

``quantized(song)`` is the song that ``decode(encode(song))`` reproduces (``musicray.encoding``): chords canonical
and merged, notes binned and moved into the representable pitch range, one integer tempo per bar chosen so that the
rebuilt downbeats track the performed ones (docs/tokens.md gives the figures behind that choice).
"""

from __future__ import annotations

import statistics

import numpy as np

from musicray.harmony import NO_CHORD, canonical_key, chord_label, parse_chord
from musicray.song import TRACKS, Chord, Note, Song, Tempo, note_rows, notes_from_rows, one_per_onset_and_pitch_rows
from musicray.streams import DEFAULT_BPM
from musicray.tokens import REPRESENTABLE_PITCHES, Vocabulary

# Version of the canonical song (``quantized``) that prepared data stores: 2 keeps every note inside the form
# and its pitch in the range every language writes. Prepared data of another version is prepared again.
CANONICAL_FORMAT = 2


def bar_tempos(song: Song) -> list[float]:
    """Each bar's mean tempo: beats per bar over the bar's duration, with the tempo sounding at each beat."""
    spec = song.spec
    tempos = sorted(song.tempos)
    result, index, current = [], 0, (tempos[0].bpm if tempos else DEFAULT_BPM)
    for bar in range(song.n_bars):
        seconds = 0.0
        for beat in range(spec.beats_per_bar):
            here = (bar, beat * spec.positions_per_beat)
            while index < len(tempos) and (tempos[index].bar, tempos[index].position) <= here:
                current = tempos[index].bpm
                index += 1
            seconds += 60.0 / current
        result.append(spec.beats_per_bar * 60.0 / seconds)
    return result


def base_tempo(song: Song, vocab: Vocabulary) -> int:
    """The header's tempo: the median bar tempo, robust to a rubato intro and a final ritardando."""
    return vocab.quantize_tempo(statistics.median(bar_tempos(song)))


def canonical_chords(chords: list[Chord]) -> list[Chord]:
    """Sorted, canonical labels, the last of simultaneous changes kept, repeats merged, a chord at the start."""
    by_time: dict[tuple[int, int], str] = {}
    for chord in sorted(chords):
        by_time[(chord.bar, chord.position)] = chord_label(*parse_chord(chord.label))
    if (0, 0) not in by_time:
        by_time[(0, 0)] = NO_CHORD
    merged: list[Chord] = []
    for (bar, position), label in sorted(by_time.items()):
        if not merged or merged[-1].label != label:
            merged.append(Chord(bar, position, label))
    return merged


def representable_pitch(pitch):
    """The pitch moved by octaves into the range every language can write (MIDI 11..116); an int or an array."""
    low, high = REPRESENTABLE_PITCHES
    octaves_up = (low - pitch + 11) // 12      # > 0 only below the range
    octaves_down = (pitch - high + 11) // 12   # > 0 only above it
    return pitch + 12 * (octaves_up * (octaves_up > 0) - octaves_down * (octaves_down > 0))


def canonical_notes(song: Song, track: str, vocab: Vocabulary) -> list[Note]:
    """A track's notes binned (velocity), moved into the representable pitch range, clipped (duration: to the
    vocabulary's longest and to the form's end), one note per (onset, pitch): the longest, then the loudest.
    Computed on arrays: one Python call per note and step was most of the time quantizing took."""
    bar, position, pitch, duration, velocity = note_rows(song.tracks.get(track, [])).T
    steps_to_form_end = (song.n_bars - bar) * song.spec.positions_per_bar - position   # as Song.inside_form
    rows = np.stack([bar, position, representable_pitch(pitch),
                     vocab.quantize_durations(np.minimum(duration, steps_to_form_end)),
                     vocab.quantize_velocities(velocity, TRACKS.index(track))], axis=1)
    return notes_from_rows(one_per_onset_and_pitch_rows(rows))


def one_per_onset_and_pitch(notes: list[Note]) -> list[Note]:
    """The notes, sorted, with one note per (onset, pitch): the longest, then the loudest (MIDI cannot hold two)."""
    return notes_from_rows(one_per_onset_and_pitch_rows(note_rows(notes)))


def quantized(song: Song, vocab: Vocabulary) -> Song:
    """The song as the vocabulary can express it; ``decode(encode(song)) == project(quantized(song), task)``."""
    return Song(
        song_id=song.song_id,
        key=canonical_key(song.key),
        metre=song.metre,
        sections=list(song.sections),
        chords=canonical_chords(song.chords),
        tracks={name: canonical_notes(song, name, vocab) for name in TRACKS},
        tempos=[Tempo(bar, 0, float(bpm)) for bar, bpm in enumerate(bar_tempo_tokens(song, vocab))],
    )


def bar_tempo_tokens(song: Song, vocab: Vocabulary) -> list[int]:
    """Integer bpm per bar whose rebuilt downbeats track the performed ones: each bar's value is rounded from
    the tempo that would reach the *performed* end of the bar from where the rebuilt bars have got to."""
    beats = song.spec.beats_per_bar
    performed = rebuilt = 0.0
    tokens = []
    for bpm in bar_tempos(song):
        performed += beats * 60.0 / bpm
        remaining = performed - rebuilt
        token = vocab.quantize_tempo(beats * 60.0 / remaining) if remaining > 0 else vocab.config.tempo_max
        tokens.append(token)
        rebuilt += beats * 60.0 / token
    return tokens

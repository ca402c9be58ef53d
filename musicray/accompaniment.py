"""The accompaniment musicray writes itself: the chords voiced for the PIANO track (no model involved)."""

from __future__ import annotations

from musicray.harmony import chord_bass_pitch_class, chord_pitch_classes
from musicray.song import Note, Song
from musicray.streams import NEUTRAL_VELOCITY


def voice_piano(song: Song, velocity: int = NEUTRAL_VELOCITY) -> list[Note]:
    """A simple accompaniment: at every chord change, the bass note (octave 2-3) and a close triad above C4."""
    spec = song.spec
    changes = sorted(song.chords)
    notes = []
    for i, chord in enumerate(changes):
        tones = chord_pitch_classes(chord.label)
        if not tones:
            continue
        start = chord.bar * spec.positions_per_bar + chord.position
        end = (changes[i + 1].bar * spec.positions_per_bar + changes[i + 1].position) if i + 1 < len(changes) \
            else song.n_bars * spec.positions_per_bar
        duration = max(1, min(end - start, 64))
        bass = 36 + chord_bass_pitch_class(chord.label)
        upper = sorted({60 + (pc - 60) % 12 for pc in tones})
        for pitch in [bass, *upper]:
            notes.append(Note(chord.bar, chord.position, pitch, duration, velocity))
    return sorted(set(notes))


def revoice_bars(song: Song, bars: tuple[int, ...]) -> None:
    """Voice the PIANO of ``bars`` anew from the song's chords (a given accompaniment there was written for
    chords that have been rewritten); the other bars keep theirs."""
    if song.tracks["PIANO"]:
        span = set(bars)
        song.tracks["PIANO"] = sorted([n for n in song.tracks["PIANO"] if n.bar not in span] +
                                      [n for n in voice_piano(song) if n.bar in span])

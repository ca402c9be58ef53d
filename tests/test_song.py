"""Song invariants and the array forms of notes."""

import pickle
import random
from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from musicray.song import Note, Section, Song, SongError, Tempo, note_rows, notes_from_rows, \
    one_per_onset_and_pitch_rows


def test_notes_from_rows_are_the_notes_themselves():
    notes = [Note(0, 4, 60, 2, 80), Note(3, 0, 127, 64, 1)]
    rebuilt = notes_from_rows(note_rows(notes))
    assert rebuilt == notes and [hash(n) for n in rebuilt] == [hash(n) for n in notes]
    assert all(type(v) is int for n in rebuilt for v in vars(n).values())
    assert pickle.loads(pickle.dumps(rebuilt)) == notes and sorted(rebuilt[::-1]) == notes
    with pytest.raises(FrozenInstanceError):
        rebuilt[0].pitch = 61
    assert note_rows([]).shape == (0, 5) and notes_from_rows(note_rows([])) == []


def test_one_per_onset_and_pitch_keeps_the_longest_then_loudest():
    generator = random.Random(3)
    notes = [Note(generator.randrange(3), generator.randrange(4), generator.randrange(60, 63),
                  generator.randrange(1, 4), generator.randrange(1, 4)) for _ in range(300)]
    best: dict = {}
    for note in notes:   # the rule, one note at a time
        key = (note.bar, note.position, note.pitch)
        if key not in best or (note.duration, note.velocity) > (best[key].duration, best[key].velocity):
            best[key] = note
    assert notes_from_rows(one_per_onset_and_pitch_rows(note_rows(notes))) == sorted(best.values())
    # The onset may be one column (a grid step), as the ingest uses it.
    steps = np.array([[5, 60, 2, 9], [5, 60, 3, 1], [5, 60, 3, 7], [4, 61, 1, 1]])
    assert one_per_onset_and_pitch_rows(steps).tolist() == [[4, 61, 1, 1], [5, 60, 3, 7]]


def test_check_names_the_first_bad_field():
    song = Song("s", "C:maj", "4/4", [Section("A", 2)], tracks={"MELODY": [Note(0, 0, 60, 1, 80)]},
                tempos=[Tempo(0, 0, 120.0)])
    song.check()
    with pytest.raises(SongError, match=r"MELODY note: time \(bar 2, position 0\) outside 2 bars of 16"):
        song.replace(tracks={"MELODY": [Note(2, 0, 60, 1, 80)]}).check()
    with pytest.raises(SongError, match="pitch/duration/velocity out of range"):
        song.replace(tracks={"MELODY": [Note(1, 0, 60, 0, 80)]}).check()
    with pytest.raises(SongError, match=r"tempo: time \(bar 0, position 16\)"):
        song.replace(tempos=[Tempo(0, 16, 120.0)]).check()

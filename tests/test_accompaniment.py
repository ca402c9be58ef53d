"""The accompaniment musicray voices itself from the chords."""

from musicray.accompaniment import voice_piano
from musicray.request import parse_chords
from musicray.song import Song, parse_form


def test_voice_piano_follows_the_chords():
    chords = parse_chords("C:maj G:maj/3", "A2", "4/4")
    song = Song("v", "C:maj", "4/4", parse_form("A2"), chords=chords)
    notes = voice_piano(song)
    assert {n.pitch % 12 for n in notes if n.bar == 0} == {0, 4, 7}
    assert min(n.pitch for n in notes if n.bar == 1) % 12 == 11  # the slash bass B under G

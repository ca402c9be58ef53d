"""The canonical song: quantizing twice changes nothing, and what it keeps every language can write."""

from hypothesis import given, settings
from song_strategies import songs

from musicray.quantize import quantized
from musicray.tokens import Vocabulary

VOCAB = Vocabulary()


@settings(max_examples=60, deadline=None)
@given(song=songs())
def test_quantized_is_a_fixed_point(song):
    once = quantized(song, VOCAB)
    assert quantized(once, VOCAB) == once
    # no note sounds past the form's end, and every pitch is writable in every language
    steps = once.spec.positions_per_bar
    for _, note in once.notes():
        assert (note.bar * steps + note.position + note.duration) <= once.n_bars * steps
        assert 11 <= note.pitch <= 116

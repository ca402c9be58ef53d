"""Section windows: each is a song of its own that encodes and decodes exactly and ends inside its form."""

from hypothesis import given, settings
from hypothesis import strategies as st
from song_strategies import songs

from musicray.encoding import round_trip_song
from musicray.quantize import quantized
from musicray.tokens import TASKS, Vocabulary
from musicray.windows import section_windows

VOCAB = Vocabulary()


@settings(max_examples=40, deadline=None)
@given(song=songs(), max_bars=st.integers(1, 4))
def test_windows_round_trip_and_end_inside_their_form(song, max_bars):
    for window in section_windows(quantized(song, VOCAB), max_bars):
        steps = window.spec.positions_per_bar
        assert all(n.bar * steps + n.position + n.duration <= window.n_bars * steps for _, n in window.notes())
        for task in TASKS:
            expected, decoded = round_trip_song(window, task, VOCAB)
            assert decoded == expected

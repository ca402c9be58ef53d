"""Bar events of the dynamics stage: the velocities a client is sent for a bar are the ones the finished stage
decodes for that bar's notes, in either velocity language."""

import dataclasses

import pytest

from musicray.encoding import SongTokens, decode_body
from musicray.engine.bar_events import BarEvents
from musicray.quantize import quantized
from musicray.song import TRACKS
from musicray.tokens import VocabConfig, Vocabulary


@pytest.mark.parametrize("velocity", ["absolute", "track"])
def test_dynamics_bar_events_carry_the_velocities_the_notes_get(velocity, synthetic_songs):
    vocab = Vocabulary(VocabConfig(velocity=velocity))
    song = quantized(synthetic_songs[3], vocab)
    body = [int(t) for t in SongTokens(song, vocab).body("dynamics")]
    silent = song.replace(tracks={name: [dataclasses.replace(n, velocity=1) for n in notes] for name, notes in song.tracks.items()})
    events = BarEvents(silent, "dynamics", "dynamics", vocab).feed(body + [vocab.token("End")])
    decode_body(body, "dynamics", silent, vocab)
    assert len(events) == song.n_bars
    for event in events:
        bar = event["bar"] - 1
        in_order = sorted((n.position, TRACKS.index(name), n.pitch, n.velocity) for name, n in silent.notes()
                          if n.bar == bar)
        assert event["velocities"] == [v for *_, v in in_order], bar
    assert silent.tracks == song.tracks   # the decoded velocities are the song's own

"""Bars of a stage as they are generated: what streaming sends a client while the engine is still decoding.

``BarEvents`` is fed a stage's music tokens as they arrive; a bar is complete when the token after it opens the
next bar or section or ends the body (``<Bar>``, ``<Sec_..>``, ``<End>``). Each complete bar becomes one event:
its place in the form and what the stage wrote in it (chords, notes, velocities or tempo), read by decoding the
body so far with ``musicray.encoding.decode_body`` into a scratch copy of the song, the same reading the
finished stage gets.
"""

from __future__ import annotations

import dataclasses

from musicray.encoding import decode_body, dynamics_order
from musicray.song import Song
from musicray.tasks import SUBTASK_RECORDS, subtask
from musicray.tokens import Vocabulary

_CLOSES = ("Bar", "Sec", "End")


# What a bar event carries, by ``SubTask.bar_event``: read from the bar's tokens, or from the song with the body
# so far decoded into it (``decoded()``).
def _velocities(bar, content, decoded, task, vocab, song):
    # velocities follow the bar's notes in the dynamics order (the count only holds at the end, so the body is not
    # decoded here); each sounds at its value plus its note's track offset ('track' velocities)
    tracks = [track for track, _, _ in dynamics_order(song, bar)]
    values = [vocab.value[t] for t in content if vocab.family[t] == "Vel"]
    return [vocab.sounding_velocity(value, track) for value, track in zip(values, tracks)]


def _chords(bar, content, decoded, task, vocab, song):
    return [[c.position, c.label] for c in decoded().chords if c.bar == bar]


def _notes(bar, content, decoded, task, vocab, song):
    return [[n.position, n.pitch, n.duration] for n in decoded().tracks[task.track] if n.bar == bar]


def _bpm(bar, content, decoded, task, vocab, song):
    return next((t.bpm for t in decoded().tempos if t.bar == bar), None)


BAR_READERS = {"velocities": _velocities, "chords": _chords, "notes": _notes, "bpm": _bpm}
assert {task.bar_event for task in SUBTASK_RECORDS.values()} <= set(BAR_READERS)


class BarEvents:
    def __init__(self, song: Song, task: str, stream: str, vocab: Vocabulary):
        self.song, self.task, self.stream, self.vocab = song, task, stream, vocab
        self.tokens: list[int] = []
        self.open_bar = -1           # 0-based index of the bar being written, -1 before the first <Bar>
        self.bar_start = 0           # where its tokens start in ``tokens``
        self.bars_seen = 0
        self.places = [(k, section, j) for k, section in enumerate(song.sections) for j in range(section.bars)]

    def feed(self, music_ids: list[int]) -> list[dict]:
        """The events of the bars that ``music_ids`` complete, in order."""
        events = []
        for token in music_ids:
            family = self.vocab.family[token]
            if family in _CLOSES and self.open_bar >= 0:
                events.append(self._event(self.open_bar, self.tokens[self.bar_start:]))
                self.open_bar = -1
            self.tokens.append(token)
            if family == "Bar":
                self.open_bar, self.bars_seen = self.bars_seen, self.bars_seen + 1
                self.bar_start = len(self.tokens)
        return events

    def _event(self, bar: int, content: list[int]) -> dict:
        k, section, j = self.places[min(bar, len(self.places) - 1)]
        event = {"stage": self.task, "bar": bar + 1, "section": f"{section.label}{section.bars}",
                 "section_index": k + 1, "bar_in_section": j + 1, "tokens": self.vocab.describe(content)}
        record = subtask(self.task)
        event[record.bar_event] = BAR_READERS[record.bar_event](bar, content, self._decoded, record, self.vocab,
                                                                 self.song)
        return event

    def _decoded(self) -> Song:
        """A scratch copy of the song with the body so far decoded into it (the finished stage's reading)."""
        scratch = dataclasses.replace(self.song, chords=list(self.song.chords), tempos=list(self.song.tempos),
                                      tracks={name: list(notes) for name, notes in self.song.tracks.items()})
        decode_body(self.tokens, self.stream, scratch, self.vocab)
        return scratch

"""Bars of a stage as they are generated: what streaming sends a client while the engine is still decoding.

``BarEvents`` is fed a stage's music tokens as they arrive; a bar is complete when the token after it opens the
next bar or section or ends the body (``<Bar>``, ``<Sec_..>``, ``<End>``). Each complete bar becomes one event:
its place in the form and what the stage wrote in it (chords, notes, velocities or tempo), read by decoding the
body so far with ``musicray.encoding.decode_body`` into a scratch copy of the song, the same reading the
finished stage gets.
"""

from __future__ import annotations

import dataclasses

from musicray.encoding import decode_body
from musicray.song import Song
from musicray.tokens import Vocabulary

_CLOSES = ("Bar", "Sec", "End")
_TRACK = {"melody": "MELODY", "secondary": "BRIDGE"}


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
        if self.task == "dynamics":   # velocities follow the song's notes in order: the count only holds at the end
            event["velocities"] = [self.vocab.value[t] for t in content if self.vocab.family[t] == "Vel"]
            return event
        scratch = dataclasses.replace(self.song, chords=list(self.song.chords), tempos=list(self.song.tempos),
                                      tracks={name: list(notes) for name, notes in self.song.tracks.items()})
        decode_body(self.tokens, self.stream, scratch, self.vocab)
        if self.task == "chord":
            event["chords"] = [[c.position, c.label] for c in scratch.chords if c.bar == bar]
        elif self.task in _TRACK:
            event["notes"] = [[n.position, n.pitch, n.duration] for n in scratch.tracks[_TRACK[self.task]]
                              if n.bar == bar]
        elif self.task == "tempo":
            event["bpm"] = next((t.bpm for t in scratch.tempos if t.bar == bar), None)
        return event

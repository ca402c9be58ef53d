"""Section windows: a long song cut at section boundaries into windows a short context can train on."""

from __future__ import annotations

import dataclasses

from musicray.song import Chord, Song, Tempo


def section_windows(song: Song, max_bars: int | None) -> list[Song]:
    """The song cut at section boundaries into windows of at most ``max_bars`` bars (a longer section is a
    window of its own), each renumbered from bar 0 with the chord and tempo sounding at its start.

    Windows keep every grammar invariant (whole sections, exact bar counts), so long songs can train a model
    with a short context.
    """
    if not max_bars or song.n_bars <= max_bars:
        return [song]
    groups: list[list[int]] = [[]]
    bars_in_group = 0
    for index, section in enumerate(song.sections):
        if groups[-1] and bars_in_group + section.bars > max_bars:
            groups.append([])
            bars_in_group = 0
        groups[-1].append(index)
        bars_in_group += section.bars
    starts = song.section_starts() + [song.n_bars]
    windows = []
    for n, group in enumerate(groups):
        first, last = starts[group[0]], starts[group[-1] + 1]

        def inside(item) -> bool:
            return first <= item.bar < last

        def shift(item):
            return dataclasses.replace(item, bar=item.bar - first)

        sounding = [c for c in song.chords if (c.bar, c.position) <= (first, 0)]
        chords = ([Chord(0, 0, sounding[-1].label)] if sounding else []) + \
            [shift(c) for c in song.chords if inside(c) and (c.bar, c.position) != (first, 0)]
        tempo_before = [t for t in song.tempos if (t.bar, t.position) <= (first, 0)]
        tempos = ([Tempo(0, 0, tempo_before[-1].bpm)] if tempo_before else []) + \
            [shift(t) for t in song.tempos if inside(t) and (t.bar, t.position) != (first, 0)]
        window = Song(
            f"{song.song_id}#{n}", song.key, song.metre, [song.sections[i] for i in group], chords=chords,
            tracks={name: [shift(x) for x in notes if inside(x)] for name, notes in song.tracks.items()},
            tempos=tempos)
        window.tracks = {name: [window.inside_form(x) for x in notes] for name, notes in window.tracks.items()}
        windows.append(window)
    return windows

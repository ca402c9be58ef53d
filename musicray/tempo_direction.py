"""Tempo directions: how a song's tempo moves at its end ("slowing", "speeding up", "steady"), as a request states it
(``Request.tempo_direction``) or a prompt's plan chooses it (``musicray.prompt_plan``). The tempo stage applies it
through its forced bars (``musicray.tasks.requested_tempo_bars``): the last section's tempi are given, the model
writes the rest.

Light (no numpy): the request and the command line import it.
"""

from __future__ import annotations

from musicray.errors import SongError
from musicray.song import Section

# Each direction as the song's last bar's tempo over its base tempo: the last section moves there in equal steps
# from the base tempo at its first bar (``directed_tempi``), a ritardando or accelerando the listener hears over a
# phrase, not a jump; "steady" leaves every bar but the first to the tempo stage. Also the words a prompt's plan
# chooses among (musicray.prompt_plan).
TEMPO_DIRECTIONS: dict[str, float] = {"steady": 1.0, "slowing": 0.8, "speeding up": 1.2}
TEMPO_DIRECTION_HELP = ("how the tempo moves at the end: 'slowing' (a ritardando over the last section, to 0.8 of the "
                        "tempo), 'speeding up' (to 1.2), 'steady' (the tempo stage decides)")


def directed_tempi(sections: list[Section], tempo: float, direction: str) -> tuple[tuple[int, float], ...]:
    """(bar from 0, bpm) of each bar of the last section under tempo ``direction`` from the base ``tempo`` (the
    tempo stage's forced bars, ``requested_tempo_bars``); () when the direction leaves the tempo to the model."""
    if direction not in TEMPO_DIRECTIONS:
        raise SongError(f"tempo_direction: unknown {direction!r}; known: {', '.join(TEMPO_DIRECTIONS)}")
    share = TEMPO_DIRECTIONS[direction]
    if share == 1:
        return ()
    last = sections[-1].bars
    start = sum(s.bars for s in sections) - last
    return tuple((start + k, tempo * (1 + (share - 1) * (k / (last - 1) if last > 1 else 1))) for k in range(last))

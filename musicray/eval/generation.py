"""Generation for the evaluation: short windows of the real test songs, composed again from their plan.

Each test song gives one *window*, so that composing on a CPU stays fast: the longest run of whole sections of at
most ``max_bars`` bars that carries a melody, or, when every such section is longer, the first ``max_bars`` bars
of the first melodic one (``A8`` becomes ``A4``). The composer is asked for the window's form, key, metre and base
tempo and its songs are compared with the real windows.

Two kinds of generation:

* whole songs (``compose_batch``, ``compose_each``): ``Composer.run_stages``, the stage loop ``Composer.compose`` runs;
  masked decoding runs the whole batch through each stage in one decode call, unmasked decoding one song at a
  time, since an ungrammatical stream ends that song (``SongError``), which is counted, not raised;
* single stages from the real window's inputs (``stage_streams``): the stage's prompt carries the real song's
  earlier streams (its chords for the melody stage...), and the raw generated tokens are kept whatever their
  grammar, so that validity and structure adherence can be measured per stage with and without the mask.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musicray.compose import Composer
from musicray.data.prepare import load_table
from musicray.engine.decode import generate
from musicray.grammar import GrammarError, Plan
from musicray.quantize import base_tempo
from musicray.request import Request
from musicray.sampling import Sampling
from musicray.song import Section, Song, SongError, form_returns, song_from_dict
from musicray.tokens import Vocabulary
from musicray.windows import section_windows

TEST_SPLIT = "test"


@dataclass
class Window:
    """A real test window and the request that asks the composer for the same plan."""

    song: Song
    request: Request
    source_id: str
    cut: bool        # a section was cut to fit max_bars


def split_songs(data_dir: str | Path, split: str = TEST_SPLIT) -> list[Song]:
    """The prepared (quantized) songs of a split, in song-id order."""
    table = load_table(data_dir, "songs", split)
    if table.empty:
        raise SongError(f"--data: {data_dir} has no songs in its {split} split; prepare more songs")
    return [song_from_dict(json.loads(text)) for text in table["song_json"]]


def first_bars(song: Song, bars: int) -> Song:
    """The song's first ``bars`` bars; the section the cut falls in keeps its label with the bars that are left."""
    sections, left = [], bars
    for section in song.sections:
        if left <= 0:
            break
        sections.append(Section(section.label, min(section.bars, left)))
        left -= section.bars
    n_bars = sum(s.bars for s in sections)
    cut = Song(song.song_id, song.key, song.metre, sections,
               chords=[c for c in song.chords if c.bar < n_bars],
               tracks={name: [n for n in notes if n.bar < n_bars] for name, notes in song.tracks.items()},
               tempos=[t for t in song.tempos if t.bar < n_bars])
    cut.tracks = {name: [cut.inside_form(n) for n in notes] for name, notes in cut.tracks.items()}
    return cut


def eval_window(song: Song, max_bars: int) -> tuple[Song, bool] | None:
    """(window, whether a section was cut) of a song for evaluation, or None when it has no melody at all: the
    longest section window of at most ``max_bars`` bars with a melody, else the first ``max_bars`` bars of the
    first window with a melody."""
    windows = [w for w in section_windows(song, max_bars) if w.tracks["MELODY"]]
    if not windows:
        return None
    fitting = [w for w in windows if w.n_bars <= max_bars]
    if fitting:
        # The longest, so that a short transition (POP909's X2) does not stand for a song; the first of equals.
        return max(fitting, key=lambda w: w.n_bars), False
    return first_bars(windows[0], max_bars), True


def form_window(song: Song, max_bars: int) -> tuple[Song, bool] | None:
    """(the song's first ``max_bars`` bars, whether a section was cut) when they hold a melody and a returning
    section, else None: a window in which returns can be heard and measured."""
    window = first_bars(song, max_bars)
    if not window.tracks["MELODY"] or not form_returns(window.sections):
        return None
    return window, sum(s.bars for s in song.sections[:len(window.sections)]) != window.n_bars


WINDOW_PICKERS = {"sections": eval_window, "form": form_window}


def eval_windows(songs: list[Song], count: int, max_bars: int, vocab: Vocabulary, seed: int = 0,
                 stage_sampling: dict[str, Sampling] | None = None, kind: str = "sections",
                 variation: float | None = None) -> list[Window]:
    """Windows of the first ``count`` test songs that have one (``kind``: ``WINDOW_PICKERS``), each with its
    request (seed + i; the stages in ``stage_sampling`` sample with those settings; returns vary by
    ``variation``)."""
    if max_bars < 1:
        raise SongError(f"max_bars: {max_bars}; expected at least 1")
    if kind not in WINDOW_PICKERS:
        raise SongError(f"window: {kind!r}; expected one of {', '.join(WINDOW_PICKERS)}")
    windows = []
    for song in songs:
        if len(windows) == count:
            break
        found = WINDOW_PICKERS[kind](song, max_bars)
        if found is None:
            continue
        window, cut = found
        # A run is evaluated as it is: a stage without its adapter runs on the stage-1 model alone (the report
        # notes which sub-tasks lack one).
        request = Request(window.form, window.key, window.metre, base_tempo(window, vocab), seed=seed + len(windows),
                          stage_sampling=stage_sampling or None, allow_missing_adapters=True,
                          variation=variation)
        windows.append(Window(window, request, song.song_id, cut))
    if not windows:
        raise SongError("test split: no test song has a melody to compare generated songs with")
    return windows


# -- whole songs ---------------------------------------------------------------------------------------------

@dataclass
class Composed:
    request: Request
    song: Song | None                       # None when a stage wrote an ungrammatical stream
    stages: dict[str, dict] = field(default_factory=dict)   # each run stage's info (Composer.run_stage)
    failed_stage: str | None = None
    error: str | None = None
    seconds: float = 0.0


@torch.no_grad()
def compose_batch(composer: Composer, requests: list[Request]) -> list[Composed]:
    """Masked composition of a batch: each stage is one decode call over every song (``Composer.run_stages``)."""
    if any(not r.use_mask for r in requests):
        raise ValueError("compose_batch: unmasked songs fail one by one; use compose_each")
    started = time.perf_counter()
    songs = [request.song() for request in requests]
    done = composer.run_stages(songs, requests)
    seconds = (time.perf_counter() - started) / len(requests)
    return [Composed(request, c.song, c.stages, seconds=seconds) for request, c in zip(requests, done)]


@torch.no_grad()
def compose_each(composer: Composer, requests: list[Request]) -> list[Composed]:
    """Composition one song at a time; a stage that writes an ungrammatical stream ends its song (recorded)."""
    results = []
    for request in requests:
        started = time.perf_counter()
        done = composer.run_stages([request.song()], [request], isolate_failures=True)[0]
        if done.error is not None and not isinstance(done.error, SongError):
            raise done.error
        failed = done.failed_stage is not None
        results.append(Composed(request, None if failed else done.song, done.stages, done.failed_stage,
                                str(done.error) if failed else None, time.perf_counter() - started))
    return results


# -- single stages -------------------------------------------------------------------------------------------

@dataclass
class StageStream:
    task: str
    tokens: list[int]          # music ids as generated (non-music ids dropped, as the composer does)
    plan: Plan
    errors: list[GrammarError]
    finished: bool             # ended with <End> (masked) or <|eot_id|> within the budget


@torch.no_grad()
def stage_streams(composer: Composer, windows: list[Window], task: str, use_mask: bool, adapters: bool = True,
                  sampling: Sampling | None = None) -> list[StageStream]:
    """One stage for every window in one decode call, its prompt built from the real window (the task's own
    inputs only, as a composed song's stage reads them), the raw output kept and validated. Prompts, plans,
    budgets and seeds are the composer's own (``StagePlanner.stage_inputs``: the tempo stage starts at the
    window's tempo as a composed song does); ``sampling`` defaults to the windows' requests' setting for ``task``;
    without ``adapters`` the stage runs on the stage-1 model alone."""
    if not windows:
        return []
    music, grammar = composer.music, composer.grammar
    stages = composer.stage_inputs([w.song for w in windows], task, [w.request for w in windows],
                                   optional=[()] * len(windows))
    with composer.use_adapter(task if adapters else None):
        out = generate(composer.model, music, grammar, [s.prompt for s in stages], [s.stream for s in stages],
                       [s.plan for s in stages], [s.budget for s in stages], [s.seed for s in stages],
                       sampling or windows[0].request.sampling_for(task), use_mask=use_mask)
    tokens = out.tokens if use_mask else [music.from_llm(row) for row in out.tokens]
    errors = grammar.validate_batch(tokens, [s.stream for s in stages], [s.plan for s in stages])
    return [StageStream(task, row, stage.plan, found, bool(row) and music.vocab.family[row[-1]] == "End")
            for row, stage, found in zip(tokens, stages, errors)]

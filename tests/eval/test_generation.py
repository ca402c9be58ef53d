"""Evaluation windows of real songs, batched composition, single-stage generations with and without the mask."""

import dataclasses

import pytest
import torch

from musicray.compose import Composer
from musicray.encoding import encode
from musicray.eval import metrics as m
from musicray.eval.generation import (
    compose_batch,
    compose_each,
    eval_window,
    eval_windows,
    first_bars,
    form_window,
    split_songs,
    stage_streams,
)
from musicray.quantize import base_tempo
from musicray.song import Chord, Note, Song, SongError, Tempo, parse_form
from musicray.tokens import SUBTASKS, Vocabulary

from .conftest import ADAPTED, TEST_SONGS

VOCAB = Vocabulary()


def song_with_melody_in(form: str, melodic: set[int]) -> Song:
    """A song of ``form`` whose sections with these indices have one melody note per bar."""
    sections = parse_form(form)
    starts = [sum(s.bars for s in sections[:i]) for i in range(len(sections))]
    melody = [Note(bar, 0, 60, 4, 80) for i in melodic for bar in range(starts[i], starts[i] + sections[i].bars)]
    return Song("s", "C:maj", "4/4", sections, chords=[Chord(0, 0, "C:maj")],
                tracks={"MELODY": melody, "BRIDGE": [], "PIANO": []},
                tempos=[Tempo(bar, 0, 90.0 + bar) for bar in range(sum(s.bars for s in sections))])


WINDOW_CASES = {
    # form, sections with melody, max bars, expected window form, cut
    "short sections fit whole": ("A2B2A2", {0, 1, 2}, 4, "A2B2", False),
    "a long section is cut": ("A8B8", {0, 1}, 4, "A4", True),
    "a window without melody is passed over": ("i4A2B2", {1, 2}, 4, "A2B2", False),
    "the first melodic section, cut": ("i2A8", {1}, 4, "A4", True),
    "a fitting window later beats a cut": ("A8B2", {0, 1}, 4, "B2", False),
    "the longest fitting window": ("X2A8B4", {0, 1, 2}, 4, "B4", False),
    "the first of the longest": ("A4B4", {0, 1}, 4, "A4", False),
}


@pytest.mark.parametrize("form, melodic, max_bars, expected, cut", WINDOW_CASES.values(), ids=WINDOW_CASES.keys())
def test_eval_window_picks_whole_sections_with_a_melody(form, melodic, max_bars, expected, cut):
    window, was_cut = eval_window(song_with_melody_in(form, melodic), max_bars)
    assert (window.form, was_cut) == (expected, cut)
    window.check()
    assert window.tracks["MELODY"] and all(n.bar < window.n_bars for n in window.tracks["MELODY"])


FORM_WINDOW_CASES = {
    # form, sections with melody, max bars, expected window form (None: no window), cut
    "a return inside": ("i2A4B4A4o2", {1, 2, 3}, 12, "i2A4B4A2", True),
    "whole sections": ("A4B4A4", {0, 1, 2}, 12, "A4B4A4", False),
    "no return in the bars": ("A4B4A4", {0, 1, 2}, 8, None, None),
    "no melody": ("i4i4", set(), 8, None, None),
}


@pytest.mark.parametrize("form, melodic, max_bars, expected, cut", FORM_WINDOW_CASES.values(),
                         ids=FORM_WINDOW_CASES.keys())
def test_form_window_keeps_the_first_bars_with_a_return(form, melodic, max_bars, expected, cut):
    found = form_window(song_with_melody_in(form, melodic), max_bars)
    assert (found[0].form, found[1]) == (expected, cut) if expected else found is None


def test_form_windows_carry_the_variation():
    songs = [song_with_melody_in("A4B4A4", {0, 1, 2}), song_with_melody_in("A2B2A2B2", {0, 1, 2, 3})]
    windows = eval_windows(songs, 2, 12, VOCAB, kind="form", variation=0.25)
    assert [w.request.form for w in windows] == ["A4B4A4", "A2B2A2B2"]
    assert all(w.request.variation == 0.25 for w in windows)
    with pytest.raises(SongError, match="window"):
        eval_windows(songs, 2, 12, VOCAB, kind="whole")


def test_a_song_without_melody_gives_no_window():
    assert eval_window(song_with_melody_in("i4o4", set()), 4) is None
    with pytest.raises(SongError, match="no test song has a melody"):
        eval_windows([song_with_melody_in("i4o4", set())], 2, 4, VOCAB)


def test_first_bars_keeps_what_starts_before_the_cut():
    song = song_with_melody_in("A3B3", {0, 1})
    cut = first_bars(song, 4)
    assert cut.form == "A3B1" and cut.n_bars == 4
    assert [n.bar for n in cut.tracks["MELODY"]] == [0, 1, 2, 3] and [t.bar for t in cut.tempos] == [0, 1, 2, 3]


def test_eval_windows_ask_for_the_real_plan(eval_data):
    songs = split_songs(eval_data)
    assert [s.song_id for s in songs] == list(TEST_SONGS)
    windows = eval_windows(songs, 2, 4, VOCAB, seed=10)
    assert [w.source_id for w in windows] == list(TEST_SONGS[:2])
    for i, window in enumerate(windows):
        request = window.request
        assert (request.form, request.key, request.metre) == (window.song.form, window.song.key, window.song.metre)
        assert request.tempo == base_tempo(window.song, VOCAB) and request.seed == 10 + i
        assert window.song.n_bars <= 4


@pytest.fixture(scope="module")
def composer(eval_run):
    return Composer(eval_run)


@pytest.fixture(scope="module")
def windows(eval_data):
    return eval_windows(split_songs(eval_data), 2, 2, VOCAB)


@pytest.mark.parametrize("compose_songs", [compose_batch, compose_each], ids=["batched", "one at a time"])
def test_the_evaluation_composes_as_the_composer_does(composer, windows, compose_songs):
    composed = compose_songs(composer, [w.request for w in windows])
    for window, result in zip(windows, composed):
        song, report = composer.compose(window.request)
        assert result.song == song and result.song.form == window.song.form
        assert list(result.stages) == list(SUBTASKS)
        assert [i["tokens"] for i in result.stages.values()] == [i["tokens"] for i in report["stages"].values()]
    with pytest.raises(ValueError, match="compose_each"):
        compose_batch(composer, [dataclasses.replace(w.request, use_mask=False) for w in windows])


# The parts of the real window a request gives so that the composer runs only ``task`` on its inputs.
GIVEN_FOR_STAGE = {
    "chord": (),
    "melody": ("chords",),
    "secondary": ("chords", "melody"),
    "dynamics": ("chords", "melody", "bridge", "piano"),
    "tempo": ("melody",),
}
WINDOW_PART = {"chords": lambda song: song.chords, "melody": lambda song: song.tracks["MELODY"],
               "bridge": lambda song: song.tracks["BRIDGE"], "piano": lambda song: song.tracks["PIANO"]}


@pytest.mark.parametrize("task", SUBTASKS)
def test_a_single_stage_of_the_evaluation_is_the_composers_stage(composer, windows, task):
    """The same prompt, plan, budget and seed: the tempo stage starts at the window's tempo in both."""
    streams = stage_streams(composer, windows, task, use_mask=True)
    for window, stream in zip(windows, streams):
        given = {name: WINDOW_PART[name](window.song) for name in GIVEN_FOR_STAGE[task]}
        _, report = composer.compose(dataclasses.replace(window.request, stages=(task,), **given))
        assert list(report["stages"]) == [task]
        assert report["stages"][task]["tokens"] == VOCAB.describe(stream.tokens)


def test_unmasked_composition_records_the_stage_that_failed(composer, windows):
    results = compose_each(composer, [dataclasses.replace(w.request, use_mask=False) for w in windows])
    for result in results:
        # Random weights do not write a grammatical chord stream by chance.
        assert result.song is None and result.failed_stage == "chord" and "ungrammatical" in result.error


def test_masked_single_stages_are_grammatical_and_keep_the_form(composer, windows):
    for task in SUBTASKS:
        streams = stage_streams(composer, windows, task, use_mask=True)
        assert len(streams) == len(windows)
        for stream, window in zip(streams, windows):
            assert stream.errors == [] and stream.finished
            assert m.structure_adherence(stream.tokens, VOCAB, window.song.sections) == 1.0
            # The prompt was the real window's: the dynamics quota counts its notes.
            if task == "dynamics":
                def velocities(ids):
                    return sum(VOCAB.family[t] == "Vel" for t in ids)

                assert velocities(stream.tokens) == velocities(encode(window.song, "dynamics", VOCAB).target)


def test_unmasked_single_stages_keep_the_raw_music_tokens(composer, windows):
    streams = stage_streams(composer, windows, "melody", use_mask=False)
    assert all(stream.errors for stream in streams)
    assert all(0 <= t < len(VOCAB) for stream in streams for t in stream.tokens)
    again = stage_streams(composer, windows, "melody", use_mask=False)
    assert [s.tokens for s in again] == [s.tokens for s in streams]   # seeded


def test_use_adapter_switches_between_adapter_and_stage1(composer, windows):
    example = encode(windows[0].song, ADAPTED[0], VOCAB)
    ids = torch.tensor([composer.music.prompt_ids(example)])

    def logits(task):
        with composer.use_adapter(task), torch.no_grad():
            return composer.model(input_ids=ids).logits[0, -1]

    with_adapter, alone = logits(ADAPTED[0]), logits(None)
    assert not torch.allclose(with_adapter, alone)
    assert torch.allclose(logits("tempo"), alone)   # tempo has no adapter: the stage-1 model runs it
    assert torch.allclose(logits(ADAPTED[0]), with_adapter)

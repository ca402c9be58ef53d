"""The sub-task records: one per stage, in stage order, and what the stage loop reads from them."""

import pytest

from musicray.compose import StagePlanner
from musicray.engine.bar_events import BAR_READERS
from musicray.request import Request
from musicray.song import Chord, Note
from musicray.streams import STREAMS, TASK_INPUTS
from musicray.tasks import SUBTASK_RECORDS, subtask
from musicray.tokens import SUBTASKS, Vocabulary


def test_one_record_per_sub_task_in_stage_order():
    assert tuple(SUBTASK_RECORDS) == SUBTASKS
    for name, record in SUBTASK_RECORDS.items():
        assert record.target in STREAMS and record.inputs == TASK_INPUTS[name]
        assert record.bar_event in BAR_READERS and record.adapter == record.serve_method == name


NOTE = [Note(0, 0, 60, 4, 80)]
STAGES_CASES = {
    # request fields -> the stages it runs
    "nothing given": ({}, list(SUBTASKS)),
    "chords given": ({"chords": [Chord(0, 0, "C:maj")]}, ["melody", "secondary", "dynamics", "tempo"]),
    "melody given": ({"melody": NOTE}, ["chord", "secondary", "dynamics", "tempo"]),
    "secondary melody given": ({"bridge": NOTE}, ["chord", "melody", "dynamics", "tempo"]),
    "a given piano replaces no stage": ({"piano": NOTE}, list(SUBTASKS)),
    "a subset": ({"stages": ("tempo", "chord")}, ["chord", "tempo"]),
    "infilling runs what it is asked": ({"chords": [Chord(0, 0, "C:maj")], "regenerate": (0,)}, list(SUBTASKS)),
    "infilling a melody": ({"regenerate": (0,), "regenerate_tracks": ("MELODY",)}, ["melody", "dynamics"]),
    "infilling both melodies": ({"regenerate": (0,), "regenerate_tracks": ("MELODY", "BRIDGE")},
                                ["melody", "secondary", "dynamics"]),
    "infilling the accompaniment": ({"regenerate": (0,), "regenerate_tracks": ("PIANO",)}, ["dynamics"]),
    "infilling a melody, no dynamics asked": ({"regenerate": (0,), "regenerate_tracks": ("MELODY",),
                                               "stages": ("melody", "tempo")}, ["melody"]),
}


@pytest.mark.parametrize("fields, expected", STAGES_CASES.values(), ids=STAGES_CASES.keys())
def test_a_given_part_replaces_its_stage(fields, expected):
    assert StagePlanner.stages_for(Request("A2", **fields)) == expected


def test_the_tempo_stage_alone_forces_its_first_bar_and_dynamics_alone_prepare():
    vocab = Vocabulary()
    forced = {name: record.forced_bars is not None for name, record in SUBTASK_RECORDS.items()}
    assert forced == {name: name == "tempo" for name in SUBTASKS}
    assert [name for name, record in SUBTASK_RECORDS.items() if record.prepare] == ["dynamics"]
    song = Request("A2", tempo=96, chords=[Chord(0, 0, "C:maj")]).song()
    subtask("dynamics").prepare(song, vocab)
    assert song.tracks["PIANO"], "dynamics perform the PIANO part: it is voiced before they run"
    forced = subtask("tempo").forced_bars(song, vocab, "steady")
    assert [(bar, vocab.describe(list(tokens))) for bar, tokens in forced] == [(1, "<Tempo_96>")]


@pytest.mark.parametrize("form, tempo, direction, bars", [
    ("A2", 96, "steady", {1: 96}),
    ("A4B4", 100, "slowing", {1: 100, 5: 100, 6: 93, 7: 87, 8: 80}),
    ("A4B4", 100, "speeding up", {1: 100, 5: 100, 6: 107, 7: 113, 8: 120}),
    ("A2", 100, "slowing", {1: 100, 2: 80}),                # the only section starts at the requested tempo
    ("A4o1", 90, "slowing", {1: 90, 5: 72}),                 # a one-bar last section is the direction's tempo
    ("A4B4", 230, "speeding up", {1: 230, 5: 230, 6: 240, 7: 240, 8: 240}),   # clipped to the vocabulary's tempi
])
def test_a_tempo_direction_forces_the_last_sections_tempi_from_the_requested_one(form, tempo, direction, bars):
    vocab = Vocabulary()
    song = Request(form, tempo=tempo).song()
    forced = subtask("tempo").forced_bars(song, vocab, direction)
    assert {bar: vocab.describe(list(tokens)) for bar, tokens in forced} == {bar: f"<Tempo_{bpm}>"
                                                                            for bar, bpm in bars.items()}


def test_keep_given_puts_back_what_a_stage_did_not_rewrite_exactly_as_given():
    """After dynamics rewrote bar 1's MELODY: bar 0 and bar 1's other tracks come back with their own velocities
    (here off the vocabulary's bins); after the tempo stage, a kept bar after a rewritten one starts at the given
    song's tempo there."""
    from musicray.song import Section, Song, Tempo
    from musicray.tasks import keep_given

    def song(velocity, tempos):
        notes = {"MELODY": [Note(0, 0, 60, 4, velocity), Note(1, 0, 62, 4, velocity)],
                 "BRIDGE": [Note(1, 4, 55, 4, velocity)], "PIANO": []}
        return Song("s", "C:maj", "4/4", [Section("A", 3)], tracks=notes, tempos=tempos)

    given = song(77, [Tempo(0, 0, 88.4), Tempo(0, 8, 90.0)])
    composed = song(95, [Tempo(0, 0, 88.0), Tempo(1, 0, 120.0), Tempo(2, 0, 89.0)])
    keep_given(composed, given, "dynamics", (1,), ("MELODY",))
    assert [n.velocity for n in composed.tracks["MELODY"]] == [77, 95]
    assert [n.velocity for n in composed.tracks["BRIDGE"]] == [77]
    keep_given(composed, given, "tempo", (1,))
    assert composed.tempos == [Tempo(0, 0, 88.4), Tempo(0, 8, 90.0), Tempo(1, 0, 120.0), Tempo(2, 0, 90.0)]

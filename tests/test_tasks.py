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
}


@pytest.mark.parametrize("fields, expected", STAGES_CASES.values(), ids=STAGES_CASES.keys())
def test_a_given_part_replaces_its_stage(fields, expected):
    assert StagePlanner.stages_for(Request("A2", **fields)) == expected


def test_the_tempo_stage_alone_forces_its_first_bar_and_dynamics_alone_prepare():
    vocab = Vocabulary()
    forced = {name: record.forced_first_bar is not None for name, record in SUBTASK_RECORDS.items()}
    assert forced == {name: name == "tempo" for name in SUBTASKS}
    assert [name for name, record in SUBTASK_RECORDS.items() if record.prepare] == ["dynamics"]
    song = Request("A2", tempo=96, chords=[Chord(0, 0, "C:maj")]).song()
    subtask("dynamics").prepare(song, vocab)
    assert song.tracks["PIANO"], "dynamics perform the PIANO part: it is voiced before they run"
    assert vocab.describe(list(subtask("tempo").forced_first_bar(song, vocab))) == "<Tempo_96>"

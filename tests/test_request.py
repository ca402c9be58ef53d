"""The one request builder (``request_from_fields``) the command line and the HTTP body share."""

import pytest

from musicray.errors import SongError
from musicray.request import (
    FieldError, Request, parse_chords, regenerated_bars, request_from_fields, stage_request, stage_settings,
)
from musicray.sampling import Sampling
from musicray.song import Chord, Note, Section, Song, Tempo
from musicray.tokens import SUBTASKS

CLI = {"form": "--form", "given": "--song", "melody": "--melody", "regenerate": "--regenerate",
       "temperature": "--temperature", "stage_settings": "--stage-sampling", "tempo": "--tempo"}


def given_song() -> Song:
    return Song("given", "D:min", "3/4", [Section("A", 2), Section("B", 2)], chords=[Chord(0, 0, "D:min")],
                tracks={"MELODY": [Note(0, 0, 62, 3, 90), Note(3, 0, 65, 3, 90)], "BRIDGE": [],
                        "PIANO": [Note(1, 0, 50, 6, 70)]},
                tempos=[Tempo(0, 0, 88.4)])


ERROR_CASES = {
    # fields, names, the field the error names, words of the message
    "no form": ({}, CLI, "--form", "required"),
    "a bad form": ({"form": "A4B?"}, {}, "form", ""),
    "too many bars for the server": ({"form": "A8B8", "max_bars": 8}, {}, "form", "max_bars=8"),
    "a bad key": ({"form": "A2", "key": "H:maj"}, {}, "key", "pitch name"),
    "a bad metre": ({"form": "A2", "metre_name": "5/4"}, {}, "metre", ""),
    "a tempo out of range": ({"form": "A2", "tempo": 500}, CLI, "--tempo", "20..300"),
    "a negative temperature": ({"form": "A2", "temperature": -1.0}, CLI, "--temperature", "0..10"),
    "top_p of 0": ({"form": "A2", "top_p": 0.0}, {}, "top_p", "above 0"),
    "a wrong stage setting": ({"form": "A2", "stage_settings": {"melody": {"heat": 1}}}, CLI, "--stage-sampling",
                              "unknown setting"),
    "infilling without a song": ({"form": "A2", "regenerate": "A"}, CLI, "--regenerate", "give it with --song"),
    "a bad infilling label": ({"given": given_song(), "regenerate": "C"}, {}, "regenerate", "no section"),
    "a bad chord": ({"form": "A2", "chords": "C:maj X:foo"}, {}, "chords", "bar 2"),
    "a melody past the form": ({"form": "A1", "melody": [Note(3, 0, 60, 4, 80)]}, {"melody": "melody_midi"},
                               "melody_midi", "no MELODY notes in the first 1 bars"),
    "a song without notes in the form": ({"form": "A1", "given": Song(
        "g", "C:maj", "4/4", [Section("A", 4)], tracks={"MELODY": [Note(3, 0, 60, 4, 80)]})},
        {"given": "song_midi"}, "song_midi", "no MELODY, BRIDGE or PIANO notes"),
}


@pytest.mark.parametrize("fields, names, field, words", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_fields_are_refused_naming_the_front_ends_field(fields, names, field, words):
    with pytest.raises(FieldError, match=f"^{field}: .*{words}") as caught:
        request_from_fields(**fields, names=names)
    assert caught.value.field == field and isinstance(caught.value, SongError)


def test_a_given_song_brings_its_form_key_metre_tempo_and_parts():
    request = request_from_fields(given=given_song(), stages=["dynamics", "tempo"], temperature=0.5,
                                  stage_settings={"melody": {"top_k": "3"}})
    assert (request.form, request.key, request.metre, request.tempo) == ("A2B2", "D:min", "3/4", 88)
    assert request.chords == [Chord(0, 0, "D:min")] and len(request.melody) == 2 and request.bridge == []
    assert request.stages == ("dynamics", "tempo") and request.regenerate is None and request.tempos is None
    assert request.sampling == Sampling(0.5) and request.stage_sampling == {"melody": Sampling(0.5, 3)}
    request.song().check()


def test_the_stage_deployments_wire_form_reads_back_the_same_request():
    request = request_from_fields(given=given_song(), regenerate="B", seed=7, top_p=0.9,
                                  stage_settings={"tempo": {"temperature": 0}}, allow_missing_adapters=True)
    assert request.regenerate == (2, 3) and request.tempos == [Tempo(0, 0, 88.4)]
    song = request.song()
    back = stage_request(song, stage_settings(request))
    for name in ("form", "key", "metre", "seed", "sampling", "stage_sampling", "regenerate", "chords", "melody",
                 "piano", "allow_missing_adapters", "use_mask"):
        assert getattr(back, name) == getattr(request, name), name
    assert Request("A2").stages == SUBTASKS


def test_parse_chords_errors_name_the_bar():
    with pytest.raises(SongError, match="bar 2"):
        parse_chords("C:maj X:min", "A2", "4/4")


def test_regenerated_bars_are_read_from_labels_and_ranges():
    assert regenerated_bars("i2A4B4", labels="A,i") == tuple(range(6))
    assert regenerated_bars("i2A4B4", bars="9-10,1") == (0, 8, 9)
    for labels, bars, field in ((None, "0-3", "regenerate-bars"), ("C", None, "no section labelled C"),
                                (None, "x", "cannot read"), (None, None, "no bar chosen")):
        with pytest.raises(SongError, match=field):
            regenerated_bars("i2A4B4", labels, bars)


def planned_in_words(prompt: str, max_bars: int | None):
    """A planner that writes one fixed plan (the request builder's part is what is tested here; the model's is
    tests/test_prompt_plan.py's), after checking that it is handed the prompt and the server's limit."""
    from musicray.prompt_plan import PromptPlan

    assert prompt == "a waltz in D minor, verse-chorus" and max_bars in (None, 64)
    return PromptPlan("A8B8", "E:maj", "6/8", 84, "slowing", ("verse", "chorus"))


PROMPT_CASES = {
    # stated fields, the request's (form, key, metre, tempo), the fields taken from the plan
    "nothing stated": ({}, ("A8B8", "E:maj", "6/8", 84), ("form", "key", "metre", "tempo")),
    "a stated form and tempo win": ({"form": "A2", "tempo": 120}, ("A2", "E:maj", "6/8", 120), ("key", "metre")),
    "every field stated": ({"form": "A2", "key": "G:maj", "metre_name": "4/4", "tempo": 90, "max_bars": 64},
                           ("A2", "G:maj", "4/4", 90), ()),
    "a given song brings its own": ({"given": given_song()}, ("A2B2", "D:min", "3/4", 88), ()),
}


@pytest.mark.parametrize("fields, expected, from_plan", PROMPT_CASES.values(), ids=PROMPT_CASES.keys())
def test_a_prompts_plan_fills_the_fields_not_stated(fields, expected, from_plan):
    request = request_from_fields(**fields, prompt="a waltz in D minor, verse-chorus", planner=planned_in_words)
    assert (request.form, request.key, request.metre, request.tempo) == expected
    assert request.from_plan == from_plan and request.plan["tempo_direction"] == "slowing"
    request.song().check()


@pytest.mark.parametrize("prompt, planner, words", [
    ("a waltz", None, "no planner"),
    ("   ", planned_in_words, "empty"),   # refused before the planner is called
])
def test_a_prompt_without_a_planner_or_words_is_refused_naming_it(prompt, planner, words):
    with pytest.raises(FieldError, match=f"^--prompt: .*{words}") as caught:
        request_from_fields(prompt=prompt, planner=planner, names={"prompt": "--prompt"})
    assert caught.value.field == "--prompt"


def test_a_planners_refusal_names_the_prompt():
    def refusing(prompt, max_bars):
        raise SongError("base_model: some-base needs the package(s) gguf, not installed")

    with pytest.raises(FieldError, match="^prompt: base_model: some-base") as caught:
        request_from_fields(prompt="a song", planner=refusing)
    assert caught.value.field == "prompt"

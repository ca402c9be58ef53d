"""The one request builder (``request_from_fields``) the command line and the HTTP body share."""

import dataclasses

import pytest

from musicray.errors import SongError
from musicray.request import (
    FieldError, Request, RunDefaults, continued_form, parse_chords, regenerated_bars, request_from_fields,
    stage_request, stage_settings,
)
from musicray.sampling import Sampling
from musicray.song import Chord, Note, Section, Song, Tempo
from musicray.tokens import SUBTASKS

CLI = {"form": "--form", "given": "--song", "melody": "--melody", "regenerate": "--regenerate",
       "temperature": "--temperature", "stage_settings": "--stage-sampling", "tempo": "--tempo",
       "continue_bars": "--continue"}


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
    "a continuation without a song": ({"form": "A2", "continue_bars": 4}, CLI, "--continue", "give it with --song"),
    "a continuation that is no form": ({"given": given_song(), "continue_bars": "B8Q"}, {}, "continue_bars",
                                       "neither a number of bars nor a form string"),
    "a continuation of 0 bars": ({"given": given_song(), "continue_bars": "0"}, CLI, "--continue", "1..1024"),
    "a continuation past the server's bars": ({"given": given_song(), "continue_bars": 8, "max_bars": 8}, {},
                                              "continue_bars", "max_bars=8"),
    "tracks without bars": ({"given": given_song(), "regenerate_tracks": ["MELODY"]}, {}, "regenerate_tracks",
                            "give them with regenerate_bars"),
    "tracks of a continuation": ({"given": given_song(), "continue_bars": 2, "regenerate_tracks": ["MELODY"]}, {},
                                 "regenerate_tracks", "a continuation composes every part"),
    "an unknown track": ({"given": given_song(), "regenerate": "B", "regenerate_tracks": ["MELODY", "DRUMS"]}, {},
                         "regenerate_tracks", "DRUMS: choose among MELODY, BRIDGE, PIANO"),
    "no track": ({"given": given_song(), "regenerate": "B", "regenerate_tracks": []}, {}, "regenerate_tracks",
                 "no track"),
    "tracks no stage writes": ({"given": given_song(), "regenerate": "B", "regenerate_tracks": "bridge",
                                "stages": ["melody", "tempo"]}, {}, "regenerate_tracks",
                               "none of the stages melody, tempo writes BRIDGE"),
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
    directed = request_from_fields("A2B2", tempo_direction="slowing")
    assert stage_request(directed.song(), stage_settings(directed)).tempo_direction == "slowing"


@pytest.mark.parametrize("fields, direction", [
    ({}, "steady"),
    ({"tempo_direction": "speeding up"}, "speeding up"),
    ({"prompt": "a waltz in D minor, verse-chorus"}, "slowing"),                                # the plan's
    ({"prompt": "a waltz in D minor, verse-chorus", "tempo_direction": "steady"}, "steady"),   # stated wins
])
def test_a_tempo_direction_is_the_stated_one_else_the_plans_else_steady(fields, direction):
    request = request_from_fields("A2", **fields, planner=planned_in_words)
    assert request.tempo_direction == direction and "tempo_direction" not in request.from_plan


def test_an_unknown_tempo_direction_is_refused_naming_the_field():
    with pytest.raises(FieldError, match="^--tempo-direction: unknown 'ritardando'; known: steady, slowing, "
                                         "speeding up$"):
        request_from_fields("A2", tempo_direction="ritardando", names={"tempo_direction": "--tempo-direction"})
    with pytest.raises(SongError, match="^tempo_direction: unknown 'faster'"):
        Request("A2", tempo_direction="faster").song()


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


RUN = RunDefaults(stage_settings={"melody": {"temperature": 0.8}, "dynamics": {"temperature": 0.6}}, variation=0.3)
DEFAULT_CASES = {
    # fields, the request's melody / dynamics / chords temperature, its variation, what it took from the run
    "nothing said: the run's evaluated settings": ({}, (0.8, 0.6, 1.0), 0.3, ("stage_sampling", "variation")),
    "a temperature for every stage wins": ({"temperature": 0.5}, (0.5, 0.5, 0.5), 0.3, ("variation",)),
    "a stage's own setting laid over the run's": ({"stage_settings": {"melody": {"temperature": 1.2}}},
                                                   (1.2, 0.6, 1.0), 0.3, ("stage_sampling", "variation")),
    "a variation given wins": ({"variation": 1.0}, (0.8, 0.6, 1.0), 1.0, ("stage_sampling",)),
}


@pytest.mark.parametrize("fields, temperatures, variation, taken", DEFAULT_CASES.values(), ids=DEFAULT_CASES.keys())
def test_what_a_request_leaves_unsaid_comes_from_the_runs_evaluated_settings(fields, temperatures, variation, taken):
    request = request_from_fields(form="A2B2", defaults=RUN, **fields)
    assert tuple(request.sampling_for(stage).temperature for stage in ("melody", "dynamics", "chords")) == temperatures
    assert request.variation == variation and request.from_run == taken
    assert set(request.taken_from_run()) == set(taken)
    back = stage_request(request.song(), stage_settings(request))
    assert back.stage_sampling == request.stage_sampling and back.variation == variation


def test_without_run_defaults_every_stage_samples_at_temperature_1():
    request = request_from_fields(form="A2")
    assert request.sampling == Sampling() and request.stage_sampling is None and request.variation is None
    assert request.from_run == () and request.taken_from_run() == {}


def test_regenerating_a_label_repeats_its_rewritten_first_occurrence_unless_told_otherwise():
    given = dataclasses.replace(given_song(), sections=[Section("A", 2), Section("B", 2), Section("A", 2)])
    by_label = request_from_fields(given=given, regenerate="A", defaults=RUN)
    assert by_label.variation == 0.0 and "variation" not in by_label.from_run
    assert by_label.regenerate == (0, 1, 4, 5) and by_label.returns() == [(4, 0), (5, 1)]
    assert request_from_fields(given=given, regenerate="A", variation=0.5).variation == 0.5
    assert request_from_fields(given=given, regenerate_bars="1-2").variation is None   # bars stay literal


@pytest.mark.parametrize("form, extension, continued", [
    ("i4A8B8", "16", "i4A8B8C16"),            # a number: a new section, the first label the form does not use
    ("A8", "40", "A8B32B8"),                  # longer than a section can be: cut into sections
    ("A8B8C8D8E8", 4, "A8B8C8D8E8X4"),        # every melodic label used: X
    ("A8B8", " B8A8 ", "A8B8B8A8"),           # a form string: the new part as given
])
def test_a_continuation_extends_the_form(form, extension, continued):
    assert continued_form(form, extension) == continued


def test_a_continuation_keeps_the_given_bars_and_writes_only_the_new_ones():
    """The new bars are the infilling's; the given song's parts, chords and tempo map up to its form's end stay,
    and a shorter ``form`` continues the song from there (what comes after it is left out)."""
    request = request_from_fields(given=given_song(), continue_bars="A2", seed=3)
    assert request.form == "A2B2A2" and request.regenerate == (4, 5) and request.stages == SUBTASKS
    assert request.tempos == [Tempo(0, 0, 88.4)] and request.melody == given_song().tracks["MELODY"]
    assert request.song().n_bars == 6
    cut = request_from_fields(given=given_song(), form="A2", continue_bars=3)
    assert cut.form == "A2B3" and cut.regenerate == (2, 3, 4)
    assert cut.melody == [Note(0, 0, 62, 3, 90)] and cut.piano == [Note(1, 0, 50, 6, 70)]
    both = request_from_fields(given=given_song(), continue_bars=2, regenerate_bars="2")
    assert both.regenerate == (1, 4, 5)


def test_infilling_by_track_names_its_tracks_and_voices_a_rewritten_piano():
    request = request_from_fields(given=given_song(), regenerate_bars="2", regenerate_tracks="piano, Melody",
                                  seed=4)
    assert request.regenerate == (1,) and request.regenerate_tracks == ("MELODY", "PIANO")
    # bar 2's PIANO is the D minor chord voiced (bass and close triad), not the given note
    assert [(n.bar, n.pitch) for n in request.piano] == [(1, 38), (1, 62), (1, 65), (1, 69)]
    back = stage_request(request.song(), stage_settings(request))
    assert back.regenerate_tracks == request.regenerate_tracks and back.piano == request.piano
    assert request_from_fields(given=given_song(), regenerate="B").regenerate_tracks is None


def planned_in_words(prompt: str, max_bars: int | None):
    """A planner that writes one fixed plan (the request builder's part is what is tested here; the model's is
    tests/test_prompt_plan.py's), after checking that it is handed the prompt and the server's limit."""
    from musicray.prompt_plan import PromptPlan

    assert prompt == "a waltz in D minor, verse-chorus" and max_bars in (None, 64)
    return PromptPlan("A8B8", "E:maj", "6/8", 84, "slowing", ("verse", "chorus"), {"verse": 8, "chorus": 8})


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

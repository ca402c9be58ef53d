"""The five-stage composer on a random-weight stage-1 model with LoRA adapters."""

import functools
import json
import dataclasses

import pytest

from musicray import compose
from musicray.compose import Composer, voice_piano
from musicray.errors import MissingRunPart
from musicray.midi import midi_to_song, song_to_midi
from musicray.request import parse_chords
from musicray.sampling import Sampling
from musicray.song import Note, SongError
from musicray.tokens import SUBTASKS, Vocabulary


# The run has adapters for three sub-tasks only: its requests allow the other two on the stage-1 model alone.
Request = functools.partial(compose.Request, allow_missing_adapters=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, make_random_run):
    run = tmp_path_factory.mktemp("run")
    make_random_run(run, SUBTASKS[:3], run / "cache")  # the other two stages run on the stage-1 model alone
    return run


@pytest.fixture(scope="module")
def composer(run_dir):
    return Composer(run_dir)


def test_compose_gives_the_requested_form_and_all_tracks(composer):
    song, report = composer.compose(Request("i1A2B2o1", "E:min", "3/4", 84, seed=5))
    assert song.form == "i1A2B2o1" and song.n_bars == 6
    assert all(song.tracks[name] for name in ("MELODY", "BRIDGE", "PIANO"))
    assert all(n.bar < 6 and n.position < 12 for _, n in song.notes())
    assert len({n.velocity for _, n in song.notes()}) > 1
    assert len(song.tempos) == 6
    assert list(report["stages"]) == list(SUBTASKS)
    assert [report["stages"][t]["adapter"] for t in SUBTASKS] == ["chord", "melody", "secondary", None, None]
    assert all(info["grammar_errors"] == 0 for info in report["stages"].values())
    again, _ = composer.compose(Request("i1A2B2o1", "E:min", "3/4", 84, seed=5))
    assert again == song
    back = midi_to_song(song_to_midi(song))
    assert back.form == song.form and back.tracks == song.tracks


def test_given_chords_and_melody_replace_their_stages(composer):
    chords = parse_chords("A:min F:maj,G:maj", "A2", "4/4")
    melody = [Note(0, 0, 69, 8, 90), Note(1, 4, 72, 4, 90)]
    song, report = composer.compose(Request("A2", "A:min", chords=chords, melody=melody, seed=1))
    assert "chord" not in report["stages"] and "melody" not in report["stages"]
    assert [c.label for c in song.chords] == ["A:min", "F:maj", "G:maj", "A:min", "F:maj", "G:maj"][:len(song.chords)]
    assert [(n.bar, n.position, n.pitch) for n in song.tracks["MELODY"]] == [(0, 0, 69), (1, 4, 72)]


def test_a_given_melody_gets_chords_written_for_it(composer):
    melody = [Note(bar, 0, 60 + 2 * bar, 8, 90) for bar in range(4)] + [Note(3, 8, 67, 8, 90)]
    song, report = composer.compose(Request("A2B2", "C:maj", melody=melody, seed=3))
    assert list(report["stages"]) == ["chord", "secondary", "dynamics", "tempo"]
    assert report["stages"]["chord"]["inputs"] == ["melody"]
    assert report["stages"]["secondary"]["inputs"] == ["chord", "melody"]
    assert song.chords and all(c.bar < 4 for c in song.chords)
    given = [(n.bar, n.position, n.pitch) for n in melody]
    assert [(n.bar, n.position, n.pitch) for n in song.tracks["MELODY"]] == given
    _, plain = composer.compose(Request("A2B2", "C:maj", seed=3, stages=("chord",)))
    assert plain["stages"]["chord"]["inputs"] == []
    melody_tokens = 2 * len(melody) + 5 + 4  # pitch + duration per note, a position per onset (5), a bar per bar
    assert report["stages"]["chord"]["prompt_tokens"] == plain["stages"]["chord"]["prompt_tokens"] + melody_tokens \
        + 1 + 2  # <Input_melody>, and the melody body's section tokens


def test_stages_subset_performs_a_given_song(composer, synthetic_songs):
    from musicray.quantize import quantized
    from musicray.windows import section_windows

    given = next(w for w in section_windows(quantized(synthetic_songs[0], Vocabulary()), 4)
                 if all(w.tracks.values()))
    song, report = composer.compose(Request(given.form, given.key, given.metre, 90, seed=2, chords=given.chords,
                                            melody=given.tracks["MELODY"], bridge=given.tracks["BRIDGE"],
                                            piano=given.tracks["PIANO"], stages=("dynamics", "tempo")))
    assert list(report["stages"]) == ["dynamics", "tempo"]
    assert song.chords == given.chords
    for name in ("MELODY", "BRIDGE", "PIANO"):  # every given note kept, each with a performed velocity
        assert [(n.bar, n.position, n.pitch, n.duration) for n in song.tracks[name]] == \
            [(n.bar, n.position, n.pitch, n.duration) for n in given.tracks[name]]
    assert report["stages"]["dynamics"]["new_tokens"] == sum(len(n) for n in given.tracks.values()) + \
        given.n_bars + len(given.sections) + 1  # one velocity per note, the bars, the sections, <End>
    assert len(song.tempos) == given.n_bars


def test_a_given_secondary_melody_replaces_its_stage(composer):
    chords = parse_chords("C:maj G:maj", "A2", "4/4")
    bridge = [Note(0, 0, 55, 8, 70), Note(1, 0, 59, 8, 70)]
    song, report = composer.compose(Request("A2", chords=chords, bridge=bridge, seed=4))
    assert list(report["stages"]) == ["melody", "dynamics", "tempo"]
    assert [(n.bar, n.pitch) for n in song.tracks["BRIDGE"]] == [(0, 55), (1, 59)]


@pytest.mark.parametrize("request_kwargs,field", [
    ({"form": "A4B?"}, "form"), ({"form": "A0"}, "form"), ({"form": "A4", "key": "H:maj"}, "key: pitch name"),
    ({"form": "A4", "metre": "5/4"}, "metre"), ({"form": "A4", "tempo": 1000}, "tempo"),
    ({"form": "A4", "stages": ("lyrics",)}, "stages"),
    ({"form": "A4", "stage_sampling": {"lyrics": Sampling(0.5)}}, "stage_sampling"),
])
def test_bad_requests_name_the_field(composer, request_kwargs, field):
    with pytest.raises(SongError, match=field):
        composer.compose(Request(**request_kwargs))


def test_the_song_starts_at_the_requested_tempo(composer):
    """The tempo stage writes how the tempo moves; where it starts is the request's (a random model would pick
    any of the 211 tempi for the first bar)."""
    for seed, tempo in ((1, 96), (2, 61), (3, 140)):
        song, _ = composer.compose(Request("A2B2", tempo=tempo, seed=seed, stages=("chord", "tempo")))
        assert song.tempos[0].bar == 0 and song.tempos[0].bpm == tempo
        assert len(song.tempos) == song.n_bars


def _notes(song, track: str) -> list[tuple[int, int, int, int]]:
    return [(n.bar, n.position, n.pitch, n.duration) for n in song.tracks[track]]


def test_stage_sampling_draws_only_its_stage_differently(composer):
    """A greedy melody over given chords is the same whatever the seed; the other stages still sample by seed, and
    songs of different per-stage settings batched together come out as each does alone."""
    chords = parse_chords("C:maj A:min F:maj G:maj", "A2B2", "4/4")
    greedy_melody = {"melody": Sampling(temperature=0)}
    requests = [Request("A2B2", chords=chords, seed=seed, stage_sampling=greedy_melody) for seed in (1, 2)]
    songs = [composer.compose(request)[0] for request in requests]
    assert _notes(songs[0], "MELODY") == _notes(songs[1], "MELODY")   # velocities: the sampled dynamics stage
    assert _notes(songs[0], "BRIDGE") != _notes(songs[1], "BRIDGE")
    sampled = composer.compose(Request("A2B2", chords=chords, seed=1))[0]
    assert _notes(sampled, "MELODY") != _notes(songs[0], "MELODY")
    mixed = [Request("A2B2", chords=chords, seed=1), requests[1]]
    batched = composer.run_stages([r.song() for r in mixed], mixed)
    assert [c.song for c in batched] == [sampled, songs[1]]



def _bars(song, bars):
    """Everything a song holds in ``bars`` (0-based): notes per track, the chord sounding at every grid step,
    tempo per bar."""
    from musicray.encoding import SoundingChords

    sounding = SoundingChords(song.chords)
    steps = range(song.spec.positions_per_bar)
    return {"notes": {name: [n for n in notes if n.bar in bars] for name, notes in song.tracks.items()},
            "chords": [sounding.at(b, p) for b in sorted(bars) for p in steps],
            "tempos": [t for t in song.tempos if t.bar in bars]}


@pytest.mark.parametrize("stages", [SUBTASKS, ("melody",), ("chord", "tempo")])
def test_infilling_rewrites_the_chosen_bars_and_keeps_the_rest_note_for_note(composer, stages):
    from musicray.request import regenerated_bars
    from musicray.quantize import quantized

    given, _ = composer.compose(Request("A2B2A2", "D:maj", "4/4", 90, seed=11))
    given = quantized(given, Vocabulary())
    given.tempos = [t if t.bar != 4 else type(t)(4, 0, 97.0) for t in given.tempos]   # a tempo change after B
    span = regenerated_bars(given.form, labels="B")
    assert span == (2, 3)
    song, report = composer.compose(Request(
        given.form, given.key, given.metre, 90, seed=12, chords=given.chords, melody=given.tracks["MELODY"],
        bridge=given.tracks["BRIDGE"], piano=given.tracks["PIANO"], tempos=given.tempos, stages=stages,
        regenerate=span))
    assert list(report["stages"]) == [t for t in SUBTASKS if t in stages]
    outside = {0, 1, 4, 5}
    assert _bars(song, outside) == _bars(given, outside)
    assert song.form == given.form and all(info["grammar_errors"] == 0 for info in report["stages"].values())
    assert _bars(song, {2, 3}) != _bars(given, {2, 3})   # the chosen bars were written anew
    if "chord" in stages:   # the accompaniment of the rewritten bars follows their new chords
        voiced = [n for n in voice_piano(song) if n.bar in (2, 3)]
        assert [(n.bar, n.position, n.pitch) for n in song.tracks["PIANO"] if n.bar in (2, 3)] == \
            [(n.bar, n.position, n.pitch) for n in voiced]


def test_regenerating_a_label_rewrites_every_occurrence_alike(composer):
    """``--regenerate A``: every A is written anew and each returning A repeats the rewritten first one (the
    request's variation is 0 unless it says otherwise); the other sections stay note for note."""
    from musicray.encoding import quantized
    from musicray.request import request_from_fields

    given, _ = composer.compose(Request("A2B2A2o4", "D:maj", "4/4", 90, seed=11))
    given = quantized(given, Vocabulary())
    request = request_from_fields(given=given, regenerate="A", seed=12, allow_missing_adapters=True)
    assert request.regenerate == (0, 1, 4, 5) and request.variation == 0.0
    song, report = composer.compose(request)
    assert all(info["grammar_errors"] == 0 for info in report["stages"].values())
    assert _bars(song, {2, 3, 6, 7, 8, 9}) == _bars(given, {2, 3, 6, 7, 8, 9})
    assert _bars(song, {0, 1}) != _bars(given, {0, 1})
    assert [_bar_events(song, bar) for bar in (4, 5)] == [_bar_events(song, bar) for bar in (0, 1)]


def test_generate_command_writes_each_track_with_its_instrument(run_dir, tmp_path, capsys):
    from musicray.cli import main
    from musicray.instruments import DEFAULT_INSTRUMENTS
    from musicray.midi import midi_instruments, read_midi

    out = tmp_path / "song.mid"
    assert main(["generate", "--run", str(run_dir), "--form", "A2", "--seed", "3", "--out", str(out),
                 "--allow-missing-adapters",
                 "--instrument", "melody=flute", "--instrument", "PIANO=Electric Piano 1"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    # the printed line names the stages that ran without their adapter, and only those
    assert [part.split()[0] for part in printed.split("; ", 1)[1].split(", ") if "(no adapter" in part] == \
        ["dynamics", "tempo"]
    assert midi_instruments(out) == {"MELODY": 73, "BRIDGE": DEFAULT_INSTRUMENTS["BRIDGE"], "PIANO": 4}
    assert read_midi(out).form == "A2"


def test_a_stage_without_its_adapter_is_refused_unless_allowed(composer, run_dir, tmp_path, capsys):
    from musicray.cli import main

    refused = rf"^adapters: no LoRA adapter for dynamics, tempo in {run_dir}/adapters; .*--allow-missing-adapters"
    with pytest.raises(MissingRunPart, match=refused):
        composer.compose(compose.Request("A1", seed=1))
    song, report = composer.compose(compose.Request("A1", seed=1, stages=("chord", "melody")))
    assert [info["adapter"] for info in report["stages"].values()] == ["chord", "melody"]
    out = tmp_path / "song.mid"
    assert main(["generate", "--run", str(run_dir), "--form", "A1", "--out", str(out)]) != 0
    assert "no LoRA adapter for dynamics, tempo" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("entry,message", [
    ("melody", "is not STAGE:SETTING=VALUE"), ("melody:temperature", "is not STAGE:SETTING=VALUE"),
    ("melody:temperature=0.8,", "is not STAGE:SETTING=VALUE"), ("drums:temperature=1", "unknown stage 'drums'"),
    ("melody:temperature=hot", "melody.temperature: 'hot' is not a number"),
])
def test_generate_command_refuses_wrong_stage_sampling(run_dir, tmp_path, capsys, entry, message):
    from musicray.cli import main

    assert main(["generate", "--run", str(run_dir), "--form", "A2", "--out", str(tmp_path / "song.mid"),
                 "--stage-sampling", entry]) != 0
    error = capsys.readouterr().err
    assert "--stage-sampling" in error and message in error
    assert not (tmp_path / "song.mid").exists()


def test_generate_command_samples_one_stage_greedily(run_dir, tmp_path):
    from musicray.cli import main
    from musicray.midi import read_midi

    melodies = []
    for seed in (1, 2):
        out = tmp_path / f"song{seed}.mid"
        assert main(["generate", "--run", str(run_dir), "--form", "A2", "--chords", "C:maj G:maj", "--seed", str(seed),
                     "--stage-sampling", "melody:temperature=0", "--out", str(out), "--allow-missing-adapters"]) == 0
        melodies.append(_notes(read_midi(out), "MELODY"))
    assert melodies[0] == melodies[1]


def _bar_events(song, bar: int) -> dict:
    """What a bar holds, placed in the bar: the melodies' notes starting in it (velocity included), the
    accompaniment's onsets, pitches and velocities (its last chord lasts into whatever follows the bar), and the
    chord sounding at each grid step."""
    from musicray.encoding import SoundingChords

    sounding = SoundingChords(song.chords)
    return {"notes": {name: sorted((n.position, n.pitch, n.velocity) + ((n.duration,) if name != "PIANO" else ())
                                   for n in notes if n.bar == bar) for name, notes in song.tracks.items()},
            "chords": [sounding.at(bar, p) for p in range(song.spec.positions_per_bar)]}


def test_returning_sections_of_a_long_pop909_form_repeat_their_first_occurrence(composer, pop909_root):
    """POP909 song 001's form (71 bars: A returns seven times, B once, b three times): at variation 0 every returning bar
    repeats its first occurrence's chords, melodies and velocities (a copied note that would pass the form's end
    is the one exception the grammar makes), the copies cost no model call per token, and the variation draw
    is the same for every stage."""
    from musicray.song import form_returns, parse_form

    form = (pop909_root / "structure" / "001" / "human_label1.txt").read_text().split()[0]
    request = Request(form, "E:maj", seed=3, stages=("chord", "melody", "secondary", "dynamics"), variation=0.0)
    song, report = composer.compose(request)
    returns = form_returns(parse_form(form))
    assert song.n_bars == 71 and len(returns) == 48
    same = [bar for bar, source in returns if _bar_events(song, bar) == _bar_events(song, source)]
    # A note may sound over up to 4 bars (the longest duration): only the returns that close enough to the end
    # may have had a copied note cut short.
    assert {bar for bar, _ in returns if bar < song.n_bars - 4} <= set(same)
    melody = report["stages"]["melody"]
    assert melody["forward_calls"] < 0.6 * melody["new_tokens"]   # copied bars go through jump-forward

    short = "A4B4A4o4"   # without a variation, the model alone decides (a random one repeats nothing)
    free, _ = composer.compose(Request(short, "E:maj", seed=3, stages=("chord", "melody")))
    assert not any(_bar_events(free, bar) == _bar_events(free, source) for bar, source in form_returns(free.sections))


def test_variation_sets_the_share_of_returning_bars_that_repeat():
    from musicray.song import form_returns, parse_form

    form = "A8B8A8B8A8"
    returns = form_returns(parse_form(form))
    assert len(returns) == 24
    shares = {v: len(Request(form, seed=1, variation=v).returns()) / len(returns) for v in (0.0, 0.3, 1.0)}
    assert shares[0.0] == 1.0 and shares[1.0] == 0.0 and 0.5 < shares[0.3] < 0.9
    assert Request(form, seed=1).returns() == []
    with pytest.raises(SongError, match="variation"):
        Request(form, variation=1.5).song()


def test_the_harmony_guard_is_on_by_default_and_can_be_switched_off(composer):
    """Composed under the guard, a random model's chords are the mode's and its melodies stay in the key or the
    chord and in register; with ``harmony_guard=False`` the same request wanders off."""
    from musicray.harmony_guard import outside_guard

    request = Request("A2B2", "D:maj", "4/4", 96, seed=2)
    assert request.harmony_guard
    song, report = composer.compose(request)
    assert song.chords and song.tracks["MELODY"] and song.tracks["BRIDGE"]
    assert outside_guard(song) == []
    assert all(info["grammar_errors"] == 0 for info in report["stages"].values())
    free, _ = composer.compose(dataclasses.replace(request, harmony_guard=False))
    assert len(outside_guard(free)) > 5


def test_continue_keeps_a_pop909_songs_bars_note_for_note_and_composes_only_the_new_ones(run_dir, pop909_root,
                                                                                          tmp_path, capsys):
    """``generate --song a.mid --form i4A4 --continue 4``: the first 8 bars of POP909 song 001 come back exactly
    as they were (performed velocities and tempo map too, not their tokens' bins), four new bars follow in a new
    section, and nothing sounds past the extended form."""
    from musicray.cli import main
    from musicray.data.pop909 import load_song
    from musicray.midi import read_midi, write_midi

    song, _ = load_song(pop909_root, "001")
    given_path, out = tmp_path / "a.mid", tmp_path / "continued.mid"
    write_midi(song, given_path)
    given = read_midi(given_path)
    assert main(["generate", "--run", str(run_dir), "--song", str(given_path), "--form", "i4A4", "--continue", "4",
                 "--seed", "5", "--allow-missing-adapters", "--out", str(out)]) == 0
    assert "form i4A4B4" in capsys.readouterr().out
    continued = read_midi(out)
    assert continued.form == "i4A4B4" and continued.key == given.key
    kept = set(range(8))
    for name in ("MELODY", "BRIDGE", "PIANO"):
        # onsets, pitches, velocities as given; a kept note may only be cut where a new note of its pitch starts
        assert [(n.bar, n.position, n.pitch, n.velocity) for n in continued.tracks[name] if n.bar in kept] == \
            [(n.bar, n.position, n.pitch, n.velocity) for n in given.tracks[name] if n.bar in kept]
    assert [n for n in continued.tracks["MELODY"] if n.bar < 7] == [n for n in given.tracks["MELODY"] if n.bar < 7]
    assert _bars(continued, kept)["chords"] == _bars(given, kept)["chords"]
    assert [t for t in continued.tempos if t.bar in kept] == [t for t in given.tempos if t.bar in kept]
    new = {name: [n for n in notes if n.bar >= 8] for name, notes in continued.tracks.items()}
    assert new["MELODY"] and new["PIANO"] and any(c.bar >= 8 for c in continued.chords)
    assert all(n.bar < 12 and n.bar * 16 + n.position + n.duration <= 12 * 16 for _, n in continued.notes())
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["stages"]) == list(SUBTASKS)
    # What a DAW shows (issue 20 §3): the key and time signatures, the tempo map, a marker per section, the new one
    # included (tests/test_midi.py checks the writer on every metre).
    import mido
    import pretty_midi

    from musicray.harmony import parse_key
    from musicray.midi import collapse_tempos

    daw = pretty_midi.PrettyMIDI(str(out))
    assert [(s.numerator, s.denominator) for s in daw.time_signature_changes] == [(4, 4)]
    tonic, mode = parse_key(given.key)
    assert [k.key_number for k in daw.key_signature_changes] == [tonic + (12 if mode == "min" else 0)]
    assert daw.get_tempo_changes()[1].tolist() == pytest.approx([t.bpm for t in collapse_tempos(continued.tempos)],
                                                                rel=1e-5)
    ticks, markers = 0, []
    for message in mido.MidiFile(str(out)).tracks[0]:
        ticks += message.time
        if message.type == "marker" and message.text.startswith("section:"):
            markers.append((message.text, ticks // (4 * 480)))
    assert markers == [("section:i4", 0), ("section:A4", 4), ("section:B4", 8)]


@pytest.mark.parametrize("tracks", [("MELODY",), ("BRIDGE", "PIANO")])
def test_infilling_by_track_rewrites_those_tracks_in_the_chosen_bars_and_keeps_everything_else(composer, tracks):
    """Bars 3-4 of MELODY (or of BRIDGE and PIANO) composed again: those tracks there are new, every other bar of
    them and every other track in every bar come back as given, velocities included, and so do the chords and
    the tempo map (no chord or tempo stage runs)."""
    from musicray.encoding import quantized
    from musicray.request import request_from_fields

    given, _ = composer.compose(Request("A2B2A2", "D:maj", "4/4", 90, seed=11))
    given = quantized(given, Vocabulary())
    request = dataclasses.replace(request_from_fields(given=given, regenerate_bars="3-4", regenerate_tracks=tracks,
                                                      seed=13), allow_missing_adapters=True)
    song, report = composer.compose(request)
    assert list(report["stages"]) == [t for t in ("melody", "secondary") if subtask_writes(t, tracks)] + ["dynamics"]
    assert song.chords == given.chords and song.tempos == given.tempos
    for name in ("MELODY", "BRIDGE", "PIANO"):
        rewritten = {2, 3} if name in tracks else set()
        assert [n for n in song.tracks[name] if n.bar not in rewritten] == \
            [n for n in given.tracks[name] if n.bar not in rewritten], name
        if rewritten:
            assert [n for n in song.tracks[name] if n.bar in rewritten] != \
                [n for n in given.tracks[name] if n.bar in rewritten], name


def subtask_writes(task: str, tracks) -> bool:
    from musicray.tasks import subtask

    return subtask(task).track in tracks


def test_a_tempo_direction_is_heard_over_the_last_section_and_leaves_the_rest_as_without_one(composer):
    """"slowing" gives the tempo stage the last section's tempi (a ritardando from the requested tempo to 0.8 of
    it); the bars before it, and every other stage, come out as the same request without a direction composes
    them (the same seed: the forced bars come after everything the model samples)."""
    from musicray.quantize import bar_tempos

    stages = ("chord", "melody", "tempo")
    slowing = Request("A2B4", "C:maj", "4/4", 100, seed=2, stages=stages, tempo_direction="slowing")
    song, report = composer.compose(slowing)
    plain, _ = composer.compose(Request("A2B4", "C:maj", "4/4", 100, seed=2, stages=stages))
    assert [round(bpm) for bpm in bar_tempos(song)[2:]] == [100, 93, 87, 80]
    assert bar_tempos(song)[:2] == bar_tempos(plain)[:2] and bar_tempos(song)[0] == 100
    assert (song.chords, song.tracks) == (plain.chords, plain.tracks)
    assert report["stages"]["tempo"]["grammar_errors"] == 0
    assert slowing.tempo_direction_applied(report["stages"]) == {"direction": "slowing", "applied": True,
                                                                  "bars": [3, 6], "bpm": [100, 80]}
    assert slowing.tempo_direction_applied(["chord", "melody"]) == {
        "direction": "slowing", "applied": False, "why": "the tempo stage did not run"}

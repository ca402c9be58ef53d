"""Any MIDI folder as training data: files made here with pretty_midi (not POP909), whose key, chords, roles,
sections, bars and beat phase are known, prepared by the real Ray job; unreadable and drum-only files skipped with
their reasons; a roles file; and the tiny preset trained on the result."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pretty_midi
import pytest

from musicray.data.midi_folder import (
    MidiFolderSource, MidiIngestError, beat_phase, estimate_sections, grid_shift, load_midi_song, midi_files, read_roles,
    regrouped_metre,
)
from musicray.data.prepare import Pop909Source, load_report, load_table, split_of
from musicray.harmony import canonical_chord
from musicray.run import RunDir
from musicray.song import Note, SongError, form_string

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"

# Four bars of chords (root pitch class, minor?) and the song's phrases: A A B A after a two-bar piano intro.
PROGRESSION = [(0, False), (9, True), (5, False), (7, False)]  # C, Am, F, G
CHORD_LABELS = ["C:maj", "A:min", "F:maj", "G:maj"]
PHRASES = "AABA"
INTRO_BARS = 2


def triad(root: int, minor: bool) -> list[int]:
    return [root, root + (3 if minor else 4), root + 7]


def make_song_file(path: Path, numerator: int = 4, phase_ticks: int = 0, tempo: float = 120.0,
                   drums: bool = True, signature: str | None = "", downbeat_beat: int = 0) -> None:
    """A pop song: a lead line (A: four chord tones per bar, B: two long ones), a bass line on the roots, block
    chords on a piano, drums; every onset ``phase_ticks`` after the tick grid's beat, as a performance recorded
    without a click would have it. The file's time signature is ``numerator``/4 unless ``signature`` names
    another ("1/4") or is None (none); its first downbeat is ``downbeat_beat`` beats after the start."""
    midi = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=tempo)
    if signature is not None:
        written = signature.split("/") if signature else (numerator, 4)
        midi.time_signature_changes.append(pretty_midi.TimeSignature(int(written[0]), int(written[1]), 0.0))
    beat = 60.0 / tempo
    shift = phase_ticks / 480 * beat + downbeat_beat * beat
    lead = pretty_midi.Instrument(program=80, name="Lead")
    bass = pretty_midi.Instrument(program=33, name="Bass")
    piano = pretty_midi.Instrument(program=0, name="Piano")
    kit = pretty_midi.Instrument(program=0, is_drum=True, name="Drums")
    bars = INTRO_BARS + 8 * len(PHRASES)
    for bar in range(bars):
        start = bar * numerator * beat + shift
        root, minor = PROGRESSION[bar % 4]
        tones = triad(root, minor)
        for pitch in tones:
            piano.notes.append(pretty_midi.Note(70, 60 + pitch, start, start + numerator * beat - 0.01))
        bass.notes.append(pretty_midi.Note(90, 36 + root, start, start + numerator * beat * 0.9))
        if drums:
            kit.notes += [pretty_midi.Note(100, 36, start + b * beat, start + b * beat + 0.1) for b in range(numerator)]
        if bar < INTRO_BARS:
            continue
        phrase = PHRASES[(bar - INTRO_BARS) // 8]
        if phrase == "A":  # one chord tone per beat, high
            for b in range(numerator):
                pitch = 72 + tones[b % 3] + (12 if b == numerator - 1 else 0)
                lead.notes.append(pretty_midi.Note(100, pitch, start + b * beat, start + (b + 0.9) * beat))
        else:  # the fifth for most of the bar, then the third
            lead.notes.append(pretty_midi.Note(100, 72 + tones[2], start, start + (numerator - 1) * beat))
            lead.notes.append(pretty_midi.Note(100, 72 + tones[1], start + (numerator - 1) * beat,
                                               start + numerator * beat - 0.05))
    midi.instruments = [piano, bass, lead] + ([kit] if drums else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    midi.write(str(path))
    if signature is None:  # pretty_midi writes 4/4 where it has none
        import mido

        written = mido.MidiFile(str(path))
        for track in written.tracks:
            track[:] = [message for message in track if message.type != "time_signature"]
        written.save(str(path))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("my_midi")
    make_song_file(root / "pop" / "song_a.mid")
    make_song_file(root / "pop" / "live" / "song_b.MIDI", numerator=3, phase_ticks=200, tempo=96.0, drums=False)
    make_song_file(root / "song_c.mid", tempo=100.0)
    (root / "empty.mid").write_bytes(b"")
    (root / "broken.mid").write_bytes(b"MThd" + random.Random(0).randbytes(300))
    (root / "readme.txt").write_text("not a MIDI file, not looked at")
    drums_only = pretty_midi.PrettyMIDI()
    kit = pretty_midi.Instrument(program=0, is_drum=True)
    kit.notes = [pretty_midi.Note(100, 38, t * 0.5, t * 0.5 + 0.1) for t in range(16)]
    drums_only.instruments.append(kit)
    drums_only.write(str(root / "drums.mid"))
    odd = pretty_midi.PrettyMIDI()
    odd.time_signature_changes.append(pretty_midi.TimeSignature(7, 8, 0.0))
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(80, 60 + t % 12, t * 0.25, t * 0.25 + 0.2) for t in range(40)]
    odd.instruments.append(piano)
    odd.write(str(root / "seven_eight.mid"))
    return root


def test_finds_midi_files_recursively_whatever_the_suffix_case(folder):
    assert sorted(midi_files(folder)) == ["broken.mid", "drums.mid", "empty.mid", "pop/live/song_b.MIDI",
                                          "pop/song_a.mid", "seven_eight.mid", "song_c.mid"]


def test_a_song_with_known_key_chords_roles_and_sections(folder):
    song, stats = MidiFolderSource(str(folder)).load("pop/song_a.mid")
    assert (song.metre, song.key) == ("4/4", "C:maj")
    assert song.form == "i2A8A8B8A8"
    assert [len(song.tracks[name]) for name in ("MELODY", "BRIDGE", "PIANO")] == [4 * 8 * 3 + 2 * 8, 34, 3 * 34]
    assert {n.pitch for n in song.tracks["MELODY"]} >= {76, 79}
    assert all(n.pitch < 48 for n in song.tracks["BRIDGE"])
    assert stats["instruments_by_track"] == {"MELODY": ["2:Lead"], "BRIDGE": ["1:Bass"], "PIANO": ["0:Piano"]}
    assert stats["dropped"]["drum_notes"] == 34 * 4 and stats["drum_tracks"] == 1
    # One chord per bar, as played (chorder names it on each beat; only changes are kept).
    assert [(c.bar, c.position, c.label) for c in song.chords] == \
        [(bar, 0, CHORD_LABELS[bar % 4]) for bar in range(song.n_bars)]
    assert [(t.bar, t.position, t.bpm) for t in song.tempos] == [(0, 0, 120.0)]


def test_a_performance_off_the_tick_grid_in_3_4(folder):
    song, stats = MidiFolderSource(str(folder)).load("pop/live/song_b.MIDI")
    assert song.metre == "3/4" and song.form == "i2A8A8B8A8"
    assert stats["beat_phase_shift_ticks"] == -200
    # Back on the beats: every melody note starts on a beat, the piano on each downbeat.
    assert all(n.position % 4 == 0 for n in song.tracks["MELODY"])
    assert {n.position for n in song.tracks["PIANO"]} == {0}
    assert [c.label for c in song.chords[:4]] == CHORD_LABELS
    assert song.tempos[0].bpm == pytest.approx(96.0, abs=0.01)


@pytest.mark.parametrize("name,reason,words", [
    ("empty.mid", "unreadable_midi", "empty file"),
    ("broken.mid", "unreadable_midi", "corrupt MIDI file"),
    ("drums.mid", "no_notes", "only drums (16 notes)"),
    ("seven_eight.mid", "unsupported_metre", "7/8"),
])
def test_files_that_cannot_be_used_are_skipped_with_their_reason(folder, name, reason, words):
    with pytest.raises(MidiIngestError, match=re.escape(words)) as caught:
        MidiFolderSource(str(folder)).load(name)
    assert caught.value.reason == reason


def test_a_file_running_past_the_longest_song_is_skipped_not_read():
    import io

    import miditoolkit

    midi = miditoolkit.MidiFile(ticks_per_beat=480)
    piano = miditoolkit.Instrument(0, False, "Piano")
    piano.notes = [miditoolkit.Note(80, 60, 0, 480), miditoolkit.Note(80, 62, 480 * 20_001, 480 * 20_002)]
    midi.instruments.append(piano)
    data = io.BytesIO()
    midi.dump(file=data)
    with pytest.raises(MidiIngestError, match="notes run to beat 20002") as caught:
        load_midi_song(data.getvalue(), "long.mid")
    assert caught.value.reason == "too_long"


@pytest.mark.parametrize("signature,downbeat_beat,first_bar_tick", [
    ("1/4", 0, 0), ("1/4", 1, 480), ("1/4", 2, 960), ("1/4", 3, 1440),  # POP909's files: the bars are estimated
    ("2/2", 3, 1440), (None, 2, 960),  # regrouped into 4/4, or no signature at all: estimated too
    ("4/4", 1, 0),  # a 4/4 file's own bar lines are kept, even where its music starts on beat 2
])
def test_downbeats_where_the_file_does_not_give_them(tmp_path, signature, downbeat_beat, first_bar_tick):
    path = tmp_path / "song.mid"
    make_song_file(path, signature=signature, downbeat_beat=downbeat_beat)
    song, stats = load_midi_song(path.read_bytes(), "song.mid")
    assert song.metre == "4/4" and stats["first_bar_tick"] == first_bar_tick
    on_the_downbeat = first_bar_tick == downbeat_beat * 480
    # Each piano chord on its bar's downbeat, as played; where the file's bar lines are off, beats later
    assert {n.position for n in song.tracks["PIANO"]} == {0 if on_the_downbeat else 4 * downbeat_beat}
    if on_the_downbeat:  # and chorder's chords with them
        assert [(c.position, c.label) for c in song.chords if c.label != "N"][:4] == [(0, label) for label in
                                                                                       CHORD_LABELS]
    assert song.tempos[0].bar == 0 and song.tempos[0].position == 0


def test_a_pickup_before_the_estimated_downbeat_gets_a_first_partial_bar(tmp_path):
    path = tmp_path / "pickup.mid"
    make_song_file(path, signature="1/4", downbeat_beat=3)
    midi = pretty_midi.PrettyMIDI(str(path))
    lead = next(i for i in midi.instruments if i.name == "Lead")
    lead.notes.append(pretty_midi.Note(100, 79, 1.0, 1.4))  # beat 2 of the lead-in (120 bpm)
    midi.write(str(path))
    song, stats = load_midi_song(path.read_bytes(), "pickup.mid")
    assert stats["first_bar_tick"] == 3 * 480 - 4 * 480
    assert (song.tracks["MELODY"][0].bar, song.tracks["MELODY"][0].position) == (0, 12)  # beat 4 of bar 0
    assert {n.position for n in song.tracks["PIANO"]} == {0} and min(n.bar for n in song.tracks["PIANO"]) == 1


@pytest.mark.parametrize("numerator,denominator,metre", [(1, 4, "4/4"), (5, 4, "4/4"), (2, 2, "4/4"),
                                                         (9, 8, "6/8"), (12, 8, "12/8"), (7, 8, None), (5, 16, None)])
def test_signatures_without_a_metre_are_regrouped_by_their_beat(numerator, denominator, metre):
    found = regrouped_metre(numerator, denominator)
    assert (found.name if found else None) == metre


@pytest.mark.parametrize("phase,shift", [(0, 0), (90, -90), (240, -240), (300, 180), (470, 10)])
def test_grid_shift_moves_to_the_nearer_beat(phase, shift):
    assert grid_shift(phase, 480) == shift


@pytest.mark.parametrize("phase", [0, 90, 240, 470])
def test_beat_phase_of_onsets(phase):
    rng = random.Random(phase)
    onsets = [beat * 480 + phase + rng.choice((0, 0, 0, 120, 240, 360)) + rng.randint(-8, 8) for beat in range(200)]
    import numpy as np

    found = beat_phase(np.array(onsets), 480)
    assert min(abs(found - phase), 480 - abs(found - phase)) <= 10


def test_sections_from_repetition_or_without_melody():
    def phrase(seed: int, start_bar: int) -> list[Note]:
        rng = random.Random(seed)
        return [Note(start_bar + bar, position, rng.randint(60, 80), 2, 90) for bar in range(8)
                for position in sorted(rng.sample(range(16), 5))]

    melody = phrase(1, 4) + phrase(2, 12) + phrase(1, 20) + phrase(3, 36) + phrase(2, 44)
    # Bars 28-35 have no melody (an instrumental break); bars 0-3 and 52-53 neither (intro, outro).
    assert form_string(estimate_sections(melody, 54)) == "i4A8B8A8x8C8B8o2"
    # No repetition at all: fixed 8-bar phrases, each its own label, X after E.
    distinct = [note for index in range(7) for note in phrase(10 + index, index * 8)]
    assert form_string(estimate_sections(distinct, 60)) == "A8B8C8D8E8X8X8o4"


def test_roles_file_overrides_the_estimate(folder, tmp_path):
    roles_path = tmp_path / "roles.json"
    roles_path.write_text(json.dumps({"pop/song_a.mid": {"MELODY": "bass", "BRIDGE": [2]}}))
    roles = read_roles(roles_path)
    song, stats = MidiFolderSource(str(folder), roles).load("pop/song_a.mid")
    assert stats["roles"] == "given"
    assert all(n.pitch < 48 for n in song.tracks["MELODY"]) and len(song.tracks["MELODY"]) == 34
    assert len(song.tracks["BRIDGE"]) == 4 * 8 * 3 + 2 * 8
    roles_path.write_text(json.dumps({"pop/song_a.mid": {"MELODY": "Flute"}}))
    with pytest.raises(MidiIngestError, match="no pitched instrument 'Flute'") as caught:
        MidiFolderSource(str(folder), read_roles(roles_path)).load("pop/song_a.mid")
    assert caught.value.reason == "bad_roles"
    for text, problem in [("{", "is not JSON"), ('{"a": {"LEAD": 1}}', "keys among"), ("[1]", "expected an object")]:
        roles_path.write_text(text)
        with pytest.raises(SongError, match=problem):
            read_roles(roles_path)


@pytest.mark.parametrize("song_id, key", [
    ("001/001.mid", "001"),  # POP909's layout: the split of the annotated song 001
    ("pop/live/song_b.MIDI", "song_b"),
    ("song_c.mid", "song_c"),
    ("a.b/take.2.midi", "take.2"),
])
def test_a_file_is_split_by_its_name_alone(song_id, key):
    assert MidiFolderSource("unused").split_key(song_id) == key


def test_pop909_files_fall_in_the_splits_of_the_annotated_songs():
    ids = [f"{i:03d}" for i in range(1, 910)]
    midi = MidiFolderSource("unused")
    assert [split_of(midi.split_key(f"{i}/{i}.mid")) for i in ids] == [split_of(Pop909Source("unused").split_key(i))
                                                                        for i in ids]


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    """The folder through `musicray data prepare --midi` (the real Ray job): (data dir, what it printed)."""
    import contextlib
    import io

    import ray

    from musicray.cli import main

    out = tmp_path_factory.mktemp("prepared")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert main(["data", "prepare", "--midi", str(folder), "--out", str(out), "--num-cpus", "2"]) == 0
    finally:
        ray.shutdown()
    return out, printed.getvalue()


def test_prepare_writes_the_tables_and_a_report_of_what_was_kept_and_why(prepared):
    out, printed = prepared
    report = load_report(out)
    assert '"kept": 3' in printed and '"unreadable_midi": 2' in printed
    assert (report["total"], report["kept"]) == (7, 3)
    assert report["skipped"] == {"no_notes": 1, "unreadable_midi": 2, "unsupported_metre": 1}
    assert {s["song_id"]: s["skipped"] for s in report["skipped_songs"]} == {
        "drums.mid": "no_notes", "empty.mid": "unreadable_midi", "broken.mid": "unreadable_midi",
        "seven_eight.mid": "unsupported_metre"}
    songs = load_table(out, "songs")
    assert sorted(songs["song_id"]) == ["pop/live/song_b.MIDI", "pop/song_a.mid", "song_c.mid"]
    assert report["kept_bars"] == int(songs["bars"].sum()) == 3 * 34
    assert report["kept_notes"] == int(songs[["melody_notes", "bridge_notes", "piano_notes"]].sum().sum())
    assert report["dropped_in_kept_songs"]["drum_notes"] == 2 * 34 * 4
    assert set(songs["form"]) == {"i2A8A8B8A8"}
    assert report["splits"]["train"] >= 1
    assert [split_of(Path(song_id).stem) for song_id in songs["song_id"]] == list(songs["split"])
    for task in ("song", "chord", "melody", "secondary", "dynamics", "tempo"):
        assert len(load_table(out, task)) == 3


def test_the_tiny_preset_trains_on_it(prepared, tmp_path):
    import ray

    from musicray.cli import main

    data, run = prepared[0], tmp_path / "run"
    try:
        status = main(["train", "--config", str(TINY), "--out", str(run), "--no-progress",
                       *[arg for value in (f"data.source={data}", f"cache_dir={tmp_path / 'cache'}",
                                           "stage1.max_steps=3", "stage1.num_workers=1", "stage1.warmup_steps=1",
                                           "stage1.checkpoint_every=3", "data.max_length=256")
                         for arg in ("--set", value)]])
    finally:
        ray.shutdown()
    assert status == 0
    assert (RunDir(run).stage1_model / "vocabulary.json").exists()
    rows = RunDir(run).stage1_metrics.read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # a header and one row per step


def test_cli_refuses_what_it_cannot_prepare(tmp_path, capsys):
    from musicray.cli import main

    (tmp_path / "nothing").mkdir()
    for argv, problem in [(["--midi", str(tmp_path / "missing")], "is not a folder"),
                          (["--midi", str(tmp_path / "nothing")], "holds no .mid or .midi file"),
                          (["--roles", str(tmp_path / "r.json")], "pass --midi DIR")]:
        assert main(["data", "prepare", *argv, "--out", str(tmp_path / "out")]) == 2
        assert problem in capsys.readouterr().err


def test_pop909_song_without_its_annotations(pop909_root):
    """POP909 001 with its track names removed: the key of key_audio.txt, the first five chord changes of
    chord_midi.txt, and its own MELODY track."""
    import io

    import miditoolkit

    midi = miditoolkit.MidiFile(str(pop909_root / "POP909" / "001" / "001.mid"))
    assert [i.name for i in midi.instruments] == ["MELODY", "BRIDGE", "PIANO"]
    for instrument in midi.instruments:
        instrument.name = ""
    data = io.BytesIO()
    midi.dump(file=data)
    song, stats = load_midi_song(data.getvalue(), "001")
    assert song.key == "Gb:maj"
    changes = [c.label for c in song.chords if c.label != "N"]
    rows = (pop909_root / "POP909" / "001" / "chord_midi.txt").read_text().split("\n")
    annotated = [label for label, _ in itertools.groupby(canonical_chord(row.split()[2]) for row in rows if row.strip())
                 if label != "N"]
    assert annotated[:8] == ["B:maj", "Db:maj", "Bb:min", "Eb:min", "B:maj", "Db:maj", "Gb:maj", "B:maj"]
    assert changes[:5] == annotated[:5]  # then it hears Bbm/Db where the annotators wrote Db
    assert stats["instruments_by_track"]["MELODY"] == ["0:"]
    assert len(song.tracks["MELODY"]) == len(midi.instruments[0].notes)


@pytest.mark.parametrize("song_id", ["046", "541", "721"])  # files in 1/4 whose music starts off tick 0's bar
def test_pop909_downbeats_without_the_annotations(pop909_root, song_id):
    """The annotators' downbeats (the bar grid human_label1.txt counts, as the annotated ingest recovers it) on the
    estimated downbeats of the file alone, within 70 ms."""
    import numpy as np
    import symusic

    from musicray.data import pop909

    files = pop909.SongFiles(pop909_root, song_id)
    spec = pop909.read_metre(files, None)
    beat_times = pop909.read_beat_times(files)
    grid, _ = pop909.find_bar_grid(files, spec, pop909.read_form(files), beat_times, pop909.read_midi(files)["MELODY"])
    annotated = pop909.rows_to_seconds(beat_times, grid.bar_rows)
    data = files.path("midi").read_bytes()
    song, stats = load_midi_song(data, song_id)
    assert song.metre == "4/4" and stats["time_signature"] == "1/4"
    score = symusic.Score.from_midi(data)
    bar_ticks = 4 * score.ticks_per_quarter
    ticks = stats["first_bar_tick"] - stats["beat_phase_shift_ticks"] + bar_ticks * np.arange(song.n_bars)
    estimated = pop909.tick_seconds(score.ticks_per_quarter, [(t.time, t.mspq) for t in score.tempos], ticks)
    nearest = np.abs(estimated[None, :] - annotated[:, None]).min(axis=1)
    assert np.mean(nearest < 0.07) > 0.95

"""POP909 ingest: real songs load into checked Songs; broken inputs fail with a reason naming file and field."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import statistics
from pathlib import Path

import miditoolkit
import numpy as np
import pandas as pd
import pytest

from musicray.data import pop909
from musicray.data.pop909 import IngestError, load_song
from musicray.song import METRES, TRACKS, SongError, parse_form

ROOT = pop909.default_pop909_dir()
INDEX_ROW_4_4 = {"num_beats_per_measure": 2, "num_quavers_per_beat": 2}


@pytest.fixture(scope="module")
def root() -> Path:
    if not (ROOT / pop909.INDEX_FILE).is_file():
        pytest.skip(f"POP909 not found at {ROOT} (set {pop909.POP909_DIR_ENV})")
    return ROOT


@pytest.fixture(scope="module")
def index_rows(root) -> dict[str, dict]:
    return {row["song_id"]: row for row in pop909.read_index(root).to_dict("records")}


# -- real songs ----------------------------------------------------------------------------------------------------
# 001/003: plain 4/4; 005: the annotators left two beats out mid-song; 034: 3/4; 092: 12/8.
REAL_SONGS = {"001": "4/4", "003": "4/4", "005": "4/4", "034": "3/4", "092": "12/8"}


@pytest.fixture(scope="module")
def loaded(root, index_rows) -> dict[str, tuple]:
    return {song_id: load_song(root, song_id, index_rows[song_id]) for song_id in REAL_SONGS}


@pytest.mark.parametrize("song_id", sorted(REAL_SONGS))
def test_real_song_is_a_checked_song_of_its_metre_and_form(root, loaded, song_id):
    song, stats = loaded[song_id]
    song.check()
    assert song.song_id == song_id
    assert song.metre == REAL_SONGS[song_id]
    form = (root / f"structure/{song_id}/human_label1.txt").read_text().strip()
    assert song.form == form
    assert song.n_bars == sum(section.bars for section in parse_form(form))
    assert stats["aligned_fraction"] >= 0.9
    assert stats["notes_dropped"] <= 0.05 * stats["notes_total"]
    assert stats["notes_kept"] == sum(len(notes) for notes in song.tracks.values())


@pytest.mark.parametrize("song_id", sorted(REAL_SONGS))
def test_real_song_notes_chords_and_tempos(loaded, song_id):
    song, _ = loaded[song_id]
    spec = song.spec
    assert set(song.tracks) == set(TRACKS)
    for name, notes in song.tracks.items():
        assert notes, name
        assert notes == sorted(notes)
        assert all(0 <= n.bar < song.n_bars and 0 <= n.position < spec.positions_per_bar for n in notes)
        assert all(n.duration >= 1 and 1 <= n.velocity <= 127 for n in notes)
    velocities = {n.velocity for _, n in song.notes()}
    assert len(velocities) > 20, "performed velocities are kept, not flattened"

    assert (song.chords[0].bar, song.chords[0].position) == (0, 0)
    assert song.chords == sorted(song.chords)
    assert all(c.position % spec.positions_per_beat == 0 for c in song.chords), "chords sit on beats"
    assert all(a.label != b.label for a, b in zip(song.chords, song.chords[1:])), "repeats are merged"

    assert len(song.tempos) == song.n_bars * spec.beats_per_bar, "one tempo per beat"
    assert song.tempos == sorted(song.tempos)
    assert 40 <= statistics.median(t.bpm for t in song.tempos) <= 250


def test_melody_of_song_001_starts_with_its_pickup_into_bar_4(loaded):
    # structure/001/melody.txt opens with 60 16ths of rest: the melody enters on the last beat of the intro (i4).
    song, _ = loaded["001"]
    first = song.tracks["MELODY"][0]
    assert (first.bar, first.position) == (3, 12)


def test_song_with_left_out_beats_keeps_its_sections_aligned(loaded):
    # Song 005: the labels skip two MIDI beats between bars; the bars after the gap must still align.
    _, stats = loaded["005"]
    assert stats["beats_left_out"] == 2
    assert stats["aligned_fraction"] >= 0.99


def test_results_pickle(loaded):
    song, stats = loaded["034"]
    assert pickle.loads(pickle.dumps((song, stats))) == (song, stats)


def test_read_index_pads_ids_and_maps_metres(index_rows):
    assert len(index_rows) == 909
    assert index_rows["001"]["metre"] == "4/4"
    assert index_rows["034"]["metre"] == "3/4"
    assert index_rows["092"]["metre"] == "12/8"
    assert not isinstance(index_rows["624"]["metre"], str)


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(pop909.POP909_DIR_ENV, str(tmp_path))
    assert pop909.default_pop909_dir() == tmp_path
    monkeypatch.delenv(pop909.POP909_DIR_ENV)
    assert pop909.default_pop909_dir().parts[-3:] == ("shared", "datasets", "pop909")


# -- reading the MIDI ----------------------------------------------------------------------------------------------
def miditoolkit_notes(path: Path) -> dict[str, list[tuple]]:
    """The ingest's earlier MIDI reader (miditoolkit + its tick-to-seconds mapping): per track, the notes as
    sorted (start s, end s, pitch, velocity). symusic lists a track's notes in another order, which the ingest
    never depends on."""
    midi = miditoolkit.MidiFile(str(path))
    seconds = midi.get_tick_to_time_mapping()
    by_name = {instrument.name.strip().upper(): instrument for instrument in midi.instruments}
    return {name: sorted((float(seconds[n.start]), float(seconds[n.end]), n.pitch, n.velocity)
                         for n in instrument.notes) for name, instrument in by_name.items()}


def symusic_notes(tracks: dict[str, pop909.PerformedTrack]) -> dict[str, list[tuple]]:
    return {name: sorted(zip(t.starts.tolist(), t.ends.tolist(), t.pitches.tolist(), t.velocities.tolist()))
            for name, t in tracks.items()}


# 001 plain; 225 has the most tempo changes (178); 471 has 960 ticks per beat and 13 tempo changes.
@pytest.mark.parametrize("song_id", ["001", "225", "471"])
def test_midi_reader_gives_the_earlier_readers_notes_to_the_bit(root, song_id):
    files = pop909.SongFiles(root, song_id)
    assert symusic_notes(pop909.read_midi(files)) == miditoolkit_notes(files.path("midi"))


def test_tick_seconds_follow_miditoolkits_tempo_rules(tmp_path):
    # A second tempo at tick 0 replaces the first; a change to the sounding tempo (480, 1700) is dropped (kept,
    # it would split the running sum: the note at tick 1701 would end a bit off); overlapping notes of one pitch
    # pair first-in first-out.
    midi = miditoolkit.MidiFile(ticks_per_beat=480)
    midi.tempo_changes = [miditoolkit.TempoChange(bpm, tick) for bpm, tick in
                          [(120.0, 0), (100.0, 0), (100.0, 480), (90.0, 960), (75.3, 1500), (75.3, 1700),
                           (140.0, 2000)]]
    melody = miditoolkit.Instrument(program=0, is_drum=False, name="MELODY")
    melody.notes = [miditoolkit.Note(90, 60, 0, 500), miditoolkit.Note(80, 60, 100, 300),
                    miditoolkit.Note(100, 64, 1490, 2500), miditoolkit.Note(60, 67, 1701, 1705),
                    miditoolkit.Note(50, 65, 2100, 2900)]
    midi.instruments = [melody] + [miditoolkit.Instrument(program=0, is_drum=False, name=name, notes=[
        miditoolkit.Note(70, 48, 2400, 3000)]) for name in ("BRIDGE", "PIANO")]
    (tmp_path / "POP909/001").mkdir(parents=True)
    midi.dump(str(tmp_path / "POP909/001/001.mid"))
    files = pop909.SongFiles(tmp_path, "001")
    assert symusic_notes(pop909.read_midi(files)) == miditoolkit_notes(files.path("midi"))


# Fingerprints of whole ingested songs, recorded with the ingest as it was before symusic and the vectorised
# alignment (commit 03b4b22): the faster ingest gives every one of them bit for bit (the same held for all 909
# songs and the prepared tables, docs/benchmarks.md). An intended change to the ingest updates them on purpose.
# 001, 005 (left-out beats), 034 (3/4), 092 (12/8), 225 (178 tempo changes), 471 (960 ticks per beat).
REFERENCE_FINGERPRINTS = {
    "001": ("4c246734ba50d292", "278a89124c9be064"),
    "005": ("4991531ecfc43f03", "47dce05f833df340"),
    "034": ("03cd96910ae34cc8", "56d1bf430b1f339d"),
    "092": ("0760be90026beaa4", "94ce0ad3ad3fbddd"),
    "225": ("a2a04afa59e69784", "2aec812ec2aac858"),
    "471": ("38a83f9385bba665", "854282b75c90bb84"),
}


def fingerprint(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=float).encode()).hexdigest()[:16]


def song_fields(song) -> dict:
    """Every field of a Song, as plain lists (the layout of song_to_dict, kept here so the fingerprints do not
    depend on the stored format)."""
    return {"song_id": song.song_id, "key": song.key, "metre": song.metre, "form": song.form,
            "chords": [[c.bar, c.position, c.label] for c in song.chords],
            "tracks": {name: [[n.bar, n.position, n.pitch, n.duration, n.velocity] for n in notes]
                       for name, notes in song.tracks.items()},
            "tempos": [[t.bar, t.position, t.bpm] for t in song.tempos]}


@pytest.mark.parametrize("song_id", sorted(REFERENCE_FINGERPRINTS))
def test_ingest_gives_the_reference_song_and_stats(root, index_rows, song_id):
    song, stats = load_song(root, song_id, index_rows[song_id])
    assert (fingerprint(song_fields(song)), fingerprint(stats)) == REFERENCE_FINGERPRINTS[song_id]


# -- the bar grid --------------------------------------------------------------------------------------------------
def test_align_bars_follows_beats_the_annotators_left_out():
    # Reference: one note per beat for 8 bars of 4/4. The MIDI plays it from row 2, with two extra beats
    # (rows 18, 19) before bar 4: bars 4.. start two rows later.
    pitches = 60 + np.arange(32) % 7
    reference = np.arange(32, dtype=float)
    midi_rows = np.where(reference < 16, reference + 2, reference + 4)
    alignment = pop909.align_bars(reference, pitches, midi_rows, pitches, n_bars=8, beats_per_bar=4, n_rows=40)
    assert alignment.bar_rows.tolist() == [2, 6, 10, 14, 20, 24, 28, 32]
    assert alignment.fraction == 1.0

    grid = pop909.BarGrid(np.arange(40) * 0.5, alignment.bar_rows, METRES["4/4"])
    # The rows: bar 0's downbeat; late in bar 3; the two left-out rows; bar 4's downbeat; before bar 0; after.
    steps, inside = grid.grid_steps(np.array([2.0, 17.8, 18.0, 19.3, 19.9, 1.0, 36.0]))
    assert inside.tolist() == [True, True, False, False, True, False, False]
    assert steps[[0, 1, 4]].tolist() == [0, 63, 64]


# -- broken inputs -------------------------------------------------------------------------------------------------
SONG = "001"


@pytest.fixture
def fake_root(root, tmp_path) -> Path:
    """A dataset root holding only song 001's files."""
    for kind in pop909.SONG_FILES.values():
        relative = kind.format(id=SONG)
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, tmp_path / relative)
    return tmp_path


def _write_midi_without(track: str):
    def mutate(fake: Path) -> None:
        path = fake / f"POP909/{SONG}/{SONG}.mid"
        midi = miditoolkit.MidiFile(str(path))
        midi.instruments = [i for i in midi.instruments if i.name != track]
        midi.dump(str(path))
    return mutate


def _empty_melody(fake: Path) -> None:
    path = fake / f"POP909/{SONG}/{SONG}.mid"
    midi = miditoolkit.MidiFile(str(path))
    next(i for i in midi.instruments if i.name == "MELODY").notes = []
    midi.dump(str(path))


def _truncate(relative: str, size: int):
    def mutate(fake: Path) -> None:
        path = fake / relative
        path.write_bytes(path.read_bytes()[:size])
    return mutate


def _replace_text(relative: str, old: str, new: str, count: int = 1):
    def mutate(fake: Path) -> None:
        path = fake / relative
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, count))
    return mutate


def _write_text(relative: str, text: str):
    return lambda fake: (fake / relative).write_text(text)


def _delete(relative: str):
    return lambda fake: (fake / relative).unlink()


MIDI = f"POP909/{SONG}/{SONG}.mid"
BROKEN = [
    # id, mutation, reason, file named in the message, field named in the message
    ("empty-midi", _truncate(MIDI, 0), "unreadable_midi", f"{SONG}.mid", "midi"),
    ("truncated-midi", _truncate(MIDI, 100), "unreadable_midi", f"{SONG}.mid", "midi"),
    ("no-melody-track", _write_midi_without("MELODY"), "missing_track", f"{SONG}.mid", "track"),
    # miditoolkit neither writes nor reads a track without notes: an empty MELODY is a missing one.
    ("empty-melody-track", _empty_melody, "missing_track", f"{SONG}.mid", "track"),
    ("no-form-file", _delete(f"structure/{SONG}/human_label1.txt"), "missing_file", "human_label1.txt", "file"),
    ("no-reference-melody", _delete(f"structure/{SONG}/melody.txt"), "missing_file", "melody.txt", "file"),
    ("unknown-chord", _replace_text(f"POP909/{SONG}/chord_midi.txt", "B:maj", "C:weird"), "unknown_chord",
     "chord_midi.txt", "chord"),
    ("chord-row-short", _write_text(f"POP909/{SONG}/chord_midi.txt", "0.0\t1.0\n"), "unreadable_file",
     "chord_midi.txt", "chord"),
    ("malformed-form", _write_text(f"structure/{SONG}/human_label1.txt", "A4B?"), "bad_form", "human_label1.txt",
     "form"),
    ("unknown-section", _write_text(f"structure/{SONG}/human_label1.txt", "A4Z4"), "bad_form", "human_label1.txt",
     "form"),
    ("form-longer-than-song", _write_text(f"structure/{SONG}/human_label1.txt", "A32" * 4), "label_grid_mismatch",
     "human_label1.txt", "form"),
    ("bad-key", _write_text(f"structure/{SONG}/analyzed_key.txt", "H:dorian\n"), "bad_key", "analyzed_key.txt",
     "key"),
    ("beats-not-numbers", _write_text(f"POP909/{SONG}/beat_midi.txt", "a b c\nd e f\n"), "unreadable_file",
     "beat_midi.txt", "beat"),
]


@pytest.mark.parametrize("mutate, reason, file_name, field", [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_broken_input_raises_ingest_error(fake_root, mutate, reason, file_name, field):
    mutate(fake_root)
    with pytest.raises(IngestError) as caught:
        load_song(fake_root, SONG, INDEX_ROW_4_4)
    err = caught.value
    assert err.reason == reason, str(err)
    assert err.reason in pop909.SKIP_REASONS
    assert err.song_id == SONG and file_name in err.path
    message = str(err)
    assert message.startswith(f"song {SONG}: ") and file_name in message and f": {field}: " in message


def test_unmodified_fake_root_loads(fake_root, loaded):
    song, _ = load_song(fake_root, SONG, INDEX_ROW_4_4)
    assert song == loaded[SONG][0]


def test_unsupported_metre(fake_root):
    with pytest.raises(IngestError) as caught:
        load_song(fake_root, SONG, {"num_beats_per_measure": 3, "num_quavers_per_beat": 3})
    assert caught.value.reason == "unsupported_metre" and "index.xlsx" in str(caught.value)


def test_index_read_from_a_minimal_index_file(fake_root):
    (fake_root / pop909.INDEX_FILE).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"song_id": [1], "name": ["x"], "artist": ["y"], "modify_times": [0],
                  "num_beats_per_measure": [2], "num_quavers_per_beat": [2]}).to_excel(
        fake_root / pop909.INDEX_FILE, index=False)
    assert pop909.song_ids(fake_root) == [SONG]
    song, _ = load_song(fake_root, 1)
    assert song.song_id == SONG and song.metre == "4/4"
    with pytest.raises(IngestError) as caught:
        load_song(fake_root, "002")
    assert caught.value.reason == "missing_file"


def test_ingest_error_is_a_song_error_and_pickles():
    err = IngestError("017", "bad_form", "structure/017/human_label1.txt", "form", "unknown section label 'Z'")
    assert isinstance(err, SongError)
    assert str(err) == "song 017: structure/017/human_label1.txt: form: unknown section label 'Z'"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.song_id, copy.reason, copy.path, copy.field, copy.detail, str(copy)) == \
        (err.song_id, err.reason, err.path, err.field, err.detail, str(err))

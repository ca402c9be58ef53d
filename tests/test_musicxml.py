"""Song -> MusicXML: the lead sheet and the full score, read back by music21 (an independent parser of the file):
notes, chord symbols, key and time signatures, rehearsal marks; and the CLI's `export` with its errors."""

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from music21 import converter, expressions, harmony, key as m21key, meter, note as m21note

from musicray.data.synth import synth_song
from musicray.harmony import CHORD_QUALITIES, chord_bass_pitch_class, chord_pitch_classes, chord_root, parse_key
from musicray.midi import collapse_tempos, write_midi
from musicray.musicxml import CHORD_KINDS, read_song, tempo_marks, write_musicxml
from musicray.song import TRACKS, Chord, Note, Section, Song, SongError, Tempo, song_to_dict

ROOT = Path(__file__).resolve().parents[1]
POP909_DIR = Path(os.environ.get("POP909_DIR", ROOT.parent / "shared" / "datasets" / "pop909"))


def every_chord_song() -> Song:
    """6/8, a minor key whose signature is spelt with sharps (Db:min is C# minor), every chord quality musicray
    knows, slash chords and no-chord, chords off the downbeat, overlapping piano notes of different lengths, notes
    held over barlines, an empty BRIDGE and a tempo change."""
    qualities = list(CHORD_QUALITIES)
    chords = [Chord(bar, 0, f"{('C', 'Eb', 'F#', 'A')[bar % 4]}:{quality}") for bar, quality in enumerate(qualities)]
    chords += [Chord(1, 3, "Gb:maj7/5"), Chord(2, 3, "N"), Chord(3, 3, "B:min/b3"), Chord(4, 3, "D:7/b7")]
    bars = len(qualities)
    return Song(
        song_id="every-chord", key="Db:min", metre="6/8", sections=[Section("i", 2), Section("A", 6),
                                                                    Section("B", bars - 8)],
        chords=sorted(chords),
        tracks={
            "MELODY": [Note(bar, position, 61 + (bar + position) % 12, 1 + (bar % 3), 90)
                       for bar in range(bars) for position in (0, 3)] + [Note(bars - 1, 0, 73, 6, 100)],
            "BRIDGE": [],
            "PIANO": [Note(0, 0, 37, 12, 60), Note(0, 0, 56, 6, 50), Note(0, 2, 61, 5, 50), Note(1, 5, 64, 4, 40),
                      Note(2, 0, 25, 1, 70), Note(2, 0, 100, 3, 70)],
        },
        tempos=[Tempo(0, 0, 66.0), Tempo(4, 3, 70.5)],
    )


SONGS = [pytest.param(every_chord_song, id="every-chord-6/8-Db:min")]
# Synthetic songs in 3/4 (seed 0) and 12/8 (seed 7), with their own keys, forms and chords.
SONGS += [pytest.param(lambda seed=seed: synth_song(seed), id=f"synth-{seed}") for seed in (0, 7)]


def quarters(song: Song, bar: int, position: int) -> Fraction:
    spec = song.spec
    step = Fraction(spec.beat_unit).limit_denominator(8) / spec.positions_per_beat
    return (bar * spec.positions_per_bar + position) * step


def expected_notes(song: Song, track: str) -> list[tuple]:
    step = quarters(song, 0, 1)
    return sorted((quarters(song, n.bar, n.position), n.pitch, n.duration * step) for n in song.tracks[track])


def read_notes(part) -> list[tuple]:
    """(onset, MIDI pitch, length) in quarter notes of every note of a part, tied notes joined into one."""
    found = []
    for element in part.flatten().stripTies().notes:
        if isinstance(element, harmony.Harmony):
            continue
        for pitch in element.pitches:
            found.append((Fraction(element.offset), pitch.midi, Fraction(element.quarterLength)))
    return sorted(found)


def read_chords(part) -> list[tuple]:
    """(onset, root, bass, pitch classes) of every chord symbol; None/()/() for a no-chord mark."""
    found = []
    for symbol in part.flatten().getElementsByClass(harmony.Harmony):
        if isinstance(symbol, harmony.NoChord):
            found.append((Fraction(symbol.offset), None, None, ()))
        else:
            found.append((Fraction(symbol.offset), symbol.root().pitchClass, symbol.bass().pitchClass,
                          tuple(sorted({p.pitchClass for p in symbol.pitches}))))
    return found


def expected_chords(song: Song) -> list[tuple]:
    return [(quarters(song, c.bar, c.position), chord_root(c.label), chord_bass_pitch_class(c.label),
             chord_pitch_classes(c.label)) for c in song.chords]


def test_every_quality_has_a_kind():
    assert set(CHORD_KINDS) == set(CHORD_QUALITIES)
    assert {c.label.split(":")[1].split("/")[0] for c in every_chord_song().chords if c.label != "N"} == \
        set(CHORD_QUALITIES)


@pytest.mark.parametrize("make_song", SONGS)
@pytest.mark.parametrize("lead_sheet", [False, True], ids=["full-score", "lead-sheet"])
def test_notes_chords_and_marks_round_trip(make_song, lead_sheet, tmp_path):
    song = make_song()
    path = write_musicxml(song, tmp_path / "score.musicxml", lead_sheet=lead_sheet)
    assert path.read_text().lstrip().startswith("<?xml")
    score = converter.parse(str(path))
    assert (score.metadata.bestTitle, score.metadata.composer) == (song.song_id, "musicray")
    tracks = ("MELODY",) if lead_sheet else TRACKS
    assert [part.partName for part in score.parts] == list(tracks)
    for part, track in zip(score.parts, tracks):
        assert read_notes(part) == expected_notes(song, track), track
        assert len(part.getElementsByClass("Measure")) == song.n_bars, track
        signature = part.recurse().getElementsByClass(meter.TimeSignature).first()
        assert signature.ratioString == song.metre
        written_key = part.recurse().getElementsByClass(m21key.Key).first()
        tonic, mode = parse_key(song.key)
        assert (written_key.tonic.pitchClass, written_key.mode) == (tonic, {"maj": "major", "min": "minor"}[mode])
        assert abs(written_key.sharps) <= 7, "a signature a score can have (Db minor is written C# minor)"
    top = score.parts[0]
    assert read_chords(top) == expected_chords(song)
    marks = [(mark.getContextByClass("Measure").number, mark.content)
             for mark in top.recurse().getElementsByClass(expressions.RehearsalMark)]
    assert marks == [(start + 1, section.label) for start, section in zip(song.section_starts(), song.sections)]


@pytest.mark.parametrize("key,sign", [("Eb:maj", -1), ("Db:min", +1), ("Gb:maj", -1), ("B:maj", +1)])
def test_pitches_are_spelt_in_the_key(key, sign, tmp_path):
    """Flats in a key of flats, sharps in a key of sharps (Db:min is C# minor, four sharps)."""
    song = every_chord_song().replace(key=key)
    score = converter.parse(str(write_musicxml(song, tmp_path / "spelt.musicxml")))
    alters = {p.accidental.alter for n in score.flatten().notes if not isinstance(n, harmony.Harmony)
              for p in n.pitches if p.accidental and p.accidental.alter}
    assert alters == {sign}


def test_tempo_marks_at_changes_a_player_hears():
    tempos = [Tempo(0, 0, 100.0), Tempo(0, 4, 101.0), Tempo(0, 8, 103.5), Tempo(1, 0, 101.0), Tempo(1, 4, 96.0)]
    assert tempo_marks(tempos) == [Tempo(0, 0, 100.0), Tempo(0, 8, 103.5), Tempo(1, 4, 96.0)]


def test_tempo_marks_per_change(tmp_path):
    song = every_chord_song()
    score = converter.parse(str(write_musicxml(song, tmp_path / "s.musicxml", lead_sheet=True)))
    marks = score.recurse().getElementsByClass("MetronomeMark")
    assert [(Fraction(m.getOffsetInHierarchy(score)), m.number, m.referent.quarterLength) for m in marks] == \
        [(quarters(song, t.bar, t.position), t.bpm, 1.5) for t in song.tempos]


def test_a_real_pop909_lead_sheet(tmp_path):
    if not (POP909_DIR / "POP909" / "001").is_dir():
        pytest.skip(f"POP909 not found at {POP909_DIR} (set POP909_DIR)")
    from musicray.data.pop909 import load_song

    song, _ = load_song(POP909_DIR, "001")
    # Its first sections (the whole song takes music21 half a minute): the real melody, chords and tempo.
    sections = song.sections[:3]
    bars = sum(section.bars for section in sections)
    song = song.replace(sections=sections, chords=[c for c in song.chords if c.bar < bars],
                        tempos=[t for t in song.tempos if t.bar < bars],
                        tracks={name: [song.inside_form(n) for n in notes if n.bar < bars]
                                for name, notes in song.tracks.items()})
    score = converter.parse(str(write_musicxml(song, tmp_path / "001.musicxml", lead_sheet=True)))
    assert read_notes(score.parts[0]) == expected_notes(song, "MELODY")
    assert read_chords(score.parts[0]) == expected_chords(song)


# -- the command line: MIDI or song JSON in, errors named ----------------------------------------------------------
def musicray(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "musicray", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_export_reads_a_musicray_midi_or_a_song_json(tmp_path):
    song = synth_song(0)
    midi = write_midi(song, tmp_path / "song.mid")  # its markers carry the chords, sections and exact key
    (tmp_path / "song.json").write_text(json.dumps({"song": song_to_dict(song)}))  # as the HTTP API answers
    assert read_song(tmp_path / "song.json") == song
    assert read_song(midi) == song.replace(tempos=collapse_tempos(song.tempos))
    done = musicray("export", midi, "--musicxml", tmp_path / "song.musicxml", "--lead-sheet")
    assert done.returncode == 0, done.stderr
    assert "1 staff" in done.stdout
    score = converter.parse(str(tmp_path / "song.musicxml"))
    assert read_notes(score.parts[0]) == expected_notes(song, "MELODY")
    assert read_chords(score.parts[0]) == expected_chords(song)


@pytest.mark.parametrize("name,content,problem", [
    ("song.mid", b"not midi", "not a Standard MIDI File"),
    ("song.json", b"{not json", "not a JSON file"),
    ("song.json", b'{"song_id": "x"}', "missing or malformed field"),
    ("song.json", b"[1, 2]", "expected an object"),
])
def test_bad_input_is_a_clear_error(name, content, problem, tmp_path):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SongError, match=problem):
        read_song(tmp_path / name)
    done = musicray("export", tmp_path / name, "--musicxml", tmp_path / "out.musicxml")
    assert done.returncode != 0 and problem in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.musicxml").exists()

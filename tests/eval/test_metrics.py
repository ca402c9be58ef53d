"""Song metrics on hand-made songs with known answers, and on real POP909 songs."""

import math

import numpy as np
import pytest

from musicray.encoding import encode
from musicray.eval import metrics as m
from musicray.grammar import Grammar, GrammarError, Plan
from musicray.quantize import quantized
from musicray.song import Chord, Note, Section, Song, Tempo, parse_form
from musicray.streams import TASK_TARGET
from musicray.tokens import SUBTASKS, Vocabulary

VOCAB = Vocabulary()


def make_song(form="A2", metre="4/4", melody=(), chords=(("C:maj", 0, 0),), tempos=(), bridge=(), piano=()):
    """A song from (bar, position, pitch[, velocity]) notes and (label, bar, position) chords."""
    def notes(items):
        return [Note(bar, position, pitch, 2, rest[0] if rest else 80) for bar, position, pitch, *rest in items]

    return Song("hand-made", "C:maj", metre, parse_form(form),
                chords=[Chord(bar, position, label) for label, bar, position in chords],
                tracks={"MELODY": notes(melody), "BRIDGE": notes(bridge), "PIANO": notes(piano)},
                tempos=[Tempo(bar, 0, float(bpm)) for bar, bpm in tempos] or [Tempo(0, 0, 100.0)])


# -- chord tones (Yeh et al. 2021) ---------------------------------------------------------------------------
C4, D4, E4, F4, G4, A4, BB4 = 60, 62, 64, 65, 67, 69, 70

CHORD_TONE_CASES = {
    # melody, chords, (n_c, n_n, n_p, without), chord-tone ratio, CTnCTR
    "only chord tones": ([(0, 0, C4), (0, 4, E4), (0, 8, G4), (1, 0, C4 + 12)], (("C:maj", 0, 0),),
                         (4, 0, 0, 0), 1.0, 1.0),
    "passing tone resolves by step": ([(0, 0, C4), (0, 4, D4), (0, 8, E4), (0, 12, F4)], (("C:maj", 0, 0),),
                                      (2, 2, 1, 0), 0.5, 0.75),
    "a leap away is not a resolution": ([(0, 0, D4), (0, 4, A4)], (("C:maj", 0, 0),), (0, 2, 0, 0), 0.0, 0.0),
    "a repeated note is skipped to find the next pitch": ([(0, 0, D4), (0, 4, D4), (0, 8, E4)], (("C:maj", 0, 0),),
                                                          (1, 2, 2, 0), 1 / 3, 1.0),
    "resolution under the next chord does not count": ([(0, 12, F4), (1, 0, G4)], (("C:maj", 0, 0), ("G:maj", 1, 0)),
                                                        (1, 1, 0, 0), 0.5, 0.5),
    "a slash chord's bass is a chord tone": ([(0, 0, BB4)], (("C:maj/b7", 0, 0),), (1, 0, 0, 0), 1.0, 1.0),
    "notes under no chord are left out": ([(0, 0, C4), (1, 0, D4)], (("C:maj", 0, 0), ("N", 1, 0)),
                                          (1, 0, 0, 1), 1.0, 1.0),
    "nothing under a chord: undefined": ([(0, 0, C4)], (("N", 0, 0),), (0, 0, 0, 1), None, None),
}


@pytest.mark.parametrize("melody, chords, counts, ratio, ratio_with_proper", CHORD_TONE_CASES.values(),
                         ids=CHORD_TONE_CASES.keys())
def test_chord_tone_counts_and_ratios(melody, chords, counts, ratio, ratio_with_proper):
    song = make_song(melody=melody, chords=chords)
    assert m.chord_tone_counts(song) == m.ChordToneCounts(*counts)
    assert m.chord_tone_ratio(song) == pytest.approx(ratio) if ratio is not None else m.chord_tone_ratio(song) is None
    if ratio_with_proper is None:
        assert m.ctnctr(song) is None
    else:
        assert m.ctnctr(song) == pytest.approx(ratio_with_proper)


def test_chord_tone_ratio_reads_the_chord_sounding_at_each_onset():
    # E is a chord tone of C major but not of F major: which chord sounds decides.
    song = make_song(melody=[(0, 8, E4), (1, 8, E4)], chords=(("C:maj", 0, 0), ("F:maj", 1, 4)))
    assert m.chord_tone_counts(song) == m.ChordToneCounts(1, 1, 0, 0)


# -- pitch-class entropy (Wu & Yang 2020) --------------------------------------------------------------------
ENTROPY_CASES = {
    # form, melody, window, expected bits
    "one pitch class in every octave": ("A2", [(0, 0, C4), (0, 4, C4 + 12), (1, 0, C4 - 12)], 1, 0.0),
    "two pitch classes equally often": ("A1", [(0, 0, C4), (0, 4, G4)], 1, 1.0),
    "all twelve equally often": ("A1", [(0, i, C4 + i) for i in range(12)], 1, math.log2(12)),
    "1-bar windows see one class each": ("A2", [(0, 0, C4), (1, 0, G4)], 1, 0.0),
    "a window longer than the song is the song": ("A2", [(0, 0, C4), (1, 0, G4)], 4, 1.0),
    "empty bars are skipped, not zero": ("A3", [(0, 0, C4), (0, 4, G4), (2, 0, C4), (2, 4, E4)], 1, 1.0),
    "sliding windows: the mean over windows": ("A3", [(0, 0, C4), (1, 0, G4), (2, 0, G4)], 2, 0.5),
}


@pytest.mark.parametrize("form, melody, window, expected", ENTROPY_CASES.values(), ids=ENTROPY_CASES.keys())
def test_pitch_class_entropy(form, melody, window, expected):
    assert m.pitch_class_entropy(make_song(form, melody=melody), window) == pytest.approx(expected)


def test_pitch_class_entropy_of_no_notes_is_undefined_and_tracks_can_be_chosen():
    song = make_song("A1", melody=[], bridge=[(0, 0, C4), (0, 4, G4)])
    assert m.pitch_class_entropy(song) is None
    assert m.pitch_class_entropy(song, 1, ("BRIDGE",)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="window_bars"):
        m.pitch_class_entropy(song, 0)


# -- grooving pattern similarity (Wu & Yang 2020) ------------------------------------------------------------
GROOVE_CASES = {
    # form, metre, melody onsets, expected GS
    "identical bars": ("A3", "4/4", [(b, p, C4) for b in range(3) for p in (0, 4, 10)], 1.0),
    "pitches do not matter, only onsets": ("A2", "4/4", [(0, 0, C4), (0, 8, E4), (1, 0, G4), (1, 8, C4)], 1.0),
    "one onset moved: 2 of 16 positions differ": ("A2", "4/4", [(0, 0, C4), (1, 8, C4)], 1 - 2 / 16),
    "mean over all pairs": ("A3", "4/4", [(0, 0, C4), (1, 0, C4), (2, 8, C4)], (1 + 2 * (1 - 2 / 16)) / 3),
    "3/4 has 12 positions; an empty bar counts": ("A2", "3/4", [(0, 0, C4)], 1 - 1 / 12),
    "chords at one onset are one onset": ("A2", "4/4", [(0, 0, C4), (0, 0, E4), (1, 0, G4)], 1.0),
}


@pytest.mark.parametrize("form, metre, melody, expected", GROOVE_CASES.values(), ids=GROOVE_CASES.keys())
def test_groove_consistency(form, metre, melody, expected):
    assert m.groove_consistency(make_song(form, metre, melody=melody)) == pytest.approx(expected)


def test_groove_patterns_and_a_single_bar():
    song = make_song("A2", melody=[(0, 0, C4), (1, 15, C4)])
    patterns = m.grooving_patterns(song)
    assert patterns.shape == (2, 16) and patterns.sum() == 2 and patterns[1, 15]
    assert m.groove_consistency(make_song("A1", melody=[(0, 0, C4)])) is None


# -- velocity and tempo --------------------------------------------------------------------------------------
def test_velocity_mean_and_spread_per_track():
    song = make_song(melody=[(0, 0, C4, 60), (0, 4, E4, 80), (0, 8, G4, 100)], piano=[(0, 0, 48, 50)])
    stats = m.velocity_stats(song)
    assert stats["MELODY"] == {"mean": 80.0, "std": pytest.approx(math.sqrt(800 / 3)), "notes": 3}
    assert stats["PIANO"] == {"mean": 50.0, "std": 0.0, "notes": 1}
    assert stats["BRIDGE"] == {"mean": None, "std": None, "notes": 0}


TEMPO_CASES = {
    # form, per-bar tempos, change rate, range
    "steady": ("A4", [(0, 100)], 0.0, 0.0),
    "two changes in three boundaries": ("A4", [(0, 100), (1, 100), (2, 110), (3, 90)], 2 / 3, 20.0),
    "below a bpm is no change": ("A2", [(0, 100), (1, 100.2)], 0.0, 0.0),
    "one bar has no boundary": ("A1", [(0, 96)], None, 0.0),
}


@pytest.mark.parametrize("form, tempos, rate, bpm_range", TEMPO_CASES.values(), ids=TEMPO_CASES.keys())
def test_tempo_change_rate_and_range(form, tempos, rate, bpm_range):
    stats = m.tempo_change_stats(make_song(form, tempos=tempos))
    assert stats["change_rate"] == (pytest.approx(rate) if rate is not None else None)
    assert stats["range_bpm"] == pytest.approx(bpm_range)


# -- structure adherence and grammar validity ----------------------------------------------------------------
def tokens(text: str) -> list[int]:
    return VOCAB.parse(text)


STRUCTURE_CASES = {
    "as requested": ("<Sec_A2><Bar><Bar><Sec_B2><Bar><Bar><End>", 1.0),
    "a bar short": ("<Sec_A2><Bar><Bar><Sec_B2><Bar><End>", 0.5),
    "a bar too many": ("<Sec_A2><Bar><Bar><Bar><Sec_B2><Bar><Bar><End>", 0.5),
    "wrong label": ("<Sec_A2><Bar><Bar><Sec_C2><Bar><Bar><End>", 0.5),
    "announces other bars": ("<Sec_A2><Bar><Bar><Sec_B3><Bar><Bar><End>", 0.5),
    "an extra section": ("<Sec_A2><Bar><Bar><Sec_B2><Bar><Bar><Sec_A2><Bar><Bar><End>", 2 / 3),
    "a missing section": ("<Sec_A2><Bar><Bar><End>", 0.5),
    "nothing written": ("", 0.0),
    "other tokens do not matter": ("<Rel_60><Sec_A2><Bar><Pos_0><Chord_I:maj><Bar><Sec_B2><Bar><Vel_82><Bar>", 1.0),
    "after <End> nothing counts": ("<Sec_A2><Bar><Bar><Sec_B2><Bar><Bar><End><Sec_A2><Bar>", 1.0),
}


@pytest.mark.parametrize("text, expected", STRUCTURE_CASES.values(), ids=STRUCTURE_CASES.keys())
def test_structure_adherence(text, expected):
    requested = [Section("A", 2), Section("B", 2)]
    assert m.structure_adherence(tokens(text), VOCAB, requested) == pytest.approx(expected)


def test_written_sections_read_declared_and_written_bars():
    written = m.written_sections(tokens("<Sec_A2><Bar><Sec_B4><Bar><Bar><Bar>"), VOCAB)
    assert written == [m.WrittenSection("A", 2, 1), m.WrittenSection("B", 4, 3)]


def test_grammar_validity_counts_sequences_without_errors():
    error = GrammarError(0, "<Bar>", "not allowed")
    assert m.grammar_validity([[], [error], []]) == pytest.approx(2 / 3)
    assert m.grammar_validity([]) is None


def test_mean_of_skips_undefined_values():
    assert m.mean_of([1.0, None, 3.0, float("nan")]) == {"mean": 2.0, "std": 1.0, "n": 2}
    assert m.mean_of([None]) == {"mean": None, "std": None, "n": 0}


def test_every_song_metric_has_a_definition():
    song = make_song(melody=[(0, 0, C4)])
    assert set(m.song_metrics(song)) <= set(m.DEFINITIONS)


# -- real POP909 songs ---------------------------------------------------------------------------------------
REAL_SONGS = ("001", "034", "092")   # 4/4, 3/4, 12/8


@pytest.fixture(scope="module")
def real_songs(pop909_root):
    from musicray.data.prepare import Pop909Source

    source = Pop909Source(str(pop909_root))
    return {song_id: quantized(source.load(song_id)[0], VOCAB) for song_id in REAL_SONGS}


@pytest.mark.parametrize("song_id", REAL_SONGS)
def test_real_songs_have_plausible_metrics(real_songs, song_id):
    song = real_songs[song_id]
    values = m.song_metrics(song)
    # A pop melody mostly sits on its chords, uses several pitch classes, and repeats its rhythms.
    assert 0.4 < values["chord_tone_ratio"] < 1.0
    assert values["chord_tone_ratio"] <= values["ctnctr"] <= 1.0
    assert 0.5 < values["pitch_class_entropy_h1"] < values["pitch_class_entropy_h4"] < math.log2(12)
    assert 0.6 < values["groove_consistency"] < 1.0
    for track in ("melody", "bridge", "piano"):
        assert 1 <= values[f"velocity_mean_{track}"] <= 127 and values[f"velocity_std_{track}"] > 0
    assert 0 <= values["tempo_change_rate"] <= 1 and values["tempo_range_bpm"] >= 0


@pytest.mark.parametrize("song_id", REAL_SONGS)
def test_a_melody_moved_off_its_chords_scores_lower(real_songs, song_id):
    song = real_songs[song_id]
    tritone = song.replace(tracks={**song.tracks, "MELODY": [Note(n.bar, n.position, n.pitch + 6, n.duration,
                                                                  n.velocity) for n in song.tracks["MELODY"]]})
    assert m.chord_tone_ratio(tritone) < m.chord_tone_ratio(song) - 0.2
    # Moving every pitch the same way keeps the histogram's shape and every rhythm.
    assert m.pitch_class_entropy(tritone, 4) == pytest.approx(m.pitch_class_entropy(song, 4))
    assert m.groove_consistency(tritone) == pytest.approx(m.groove_consistency(song))


@pytest.mark.parametrize("song_id", REAL_SONGS)
def test_real_streams_adhere_to_their_form_and_grammar(real_songs, song_id):
    song, grammar = real_songs[song_id], Grammar(VOCAB)
    examples = [encode(song, task, VOCAB) for task in SUBTASKS]
    plans = [Plan.from_prompt(e.prompt, VOCAB) for e in examples]
    errors = grammar.validate_batch([e.target for e in examples], [TASK_TARGET[t] for t in SUBTASKS], plans)
    assert m.grammar_validity(errors) == 1.0
    assert all(m.structure_adherence(e.target, VOCAB, song.sections) == 1.0 for e in examples)
    # The same stream against another form does not adhere.
    other = [Section(s.label, s.bars + 1) for s in song.sections]
    assert m.structure_adherence(examples[0].target, VOCAB, other) == 0.0


def test_groove_similarity_matches_a_direct_pairwise_count(real_songs):
    song = real_songs["001"]
    patterns = m.grooving_patterns(song)
    onsets = [{(n.position) for n in song.tracks["MELODY"] if n.bar == bar} for bar in range(song.n_bars)]
    pairs = [(a, b) for a in range(song.n_bars) for b in range(a + 1, song.n_bars)]
    direct = np.mean([1 - len(onsets[a] ^ onsets[b]) / patterns.shape[1] for a, b in pairs])
    assert m.groove_consistency(song) == pytest.approx(direct)

"""Objective measures of a song, each from an established definition, computed on musicray's symbolic grid.

Every function is pure (a ``Song`` or a token stream in, numbers out) and returns ``None`` where the measure is
undefined for its input (no melody note under a chord, a one-bar song for a between-bars measure), so that
averages over songs skip it instead of counting it as zero. The docstrings give each measure's source and how
it is computed here: time is musicray's grid (``song.spec.positions_per_bar`` steps per bar: 16 in 4/4, 12 in
3/4, 24 in 12/8), pitches are MIDI numbers, chords are the song's chord changes (a chord sounds until the next).

Sources:

* Wu, S.-L. & Yang, Y.-H. (2020). *The Jazz Transformer on the Front Line: Exploring the Shortcomings of
  AI-composed Music through Quantitative Measures.* ISMIR 2020; reference code MusDr
  (github.com/slSeanWU/MusDr, ``eval_metrics.py``/``side_utils.py``): pitch-class histogram entropy ``H`` and
  grooving pattern similarity ``GS``.
* Yeh, Y.-C., Hsiao, W.-Y., Fukayama, S., Kitahara, T., Genchel, B., Liu, H.-M., Dong, H.-W., Chen, Y.,
  Leong, T. & Yang, Y.-H. (2021). *Automatic melody harmonization with triad chords: A comparative study.*
  Journal of New Music Research 50(1): chord tone to non-chord tone ratio ``CTnCTR``.
* Velocity and tempo figures are plain descriptive statistics; no paper fixes them, so they are defined here
  (and say so): velocity mean and population standard deviation per track, and the tempo-change rate and range
  of the per-bar tempo curve.
* Structure adherence and grammar validity are musicray's own checks of what the thesis (Chu, NCU 2025)
  controls: the form as requested, and sequences the grammar accepts (``musicray.grammar``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from musicray.harmony import chord_pitch_classes
from musicray.quantize import bar_tempos
from musicray.song import TRACKS, Note, Section, Song
from musicray.tokens import Vocabulary

N_PITCH_CLASSES = 12
# Jazz Transformer / MusDr report the pitch-class entropy over 1-bar and 4-bar windows (H1, H4).
ENTROPY_WINDOWS: tuple[int, ...] = (1, 4)


# -- harmony: chord tones of the melody ----------------------------------------------------------------------

@dataclass(frozen=True)
class ChordToneCounts:
    """Melody notes by their relation to the chord sounding at their onset (Yeh et al. 2021's n_c, n_n, n_p)."""

    chord_tones: int          # n_c: pitch class in the chord
    non_chord_tones: int      # n_n: pitch class not in the chord
    proper_non_chord: int     # n_p: non-chord tones resolved by step to a chord tone (see chord_tone_counts)
    without_chord: int        # notes under no chord (``N``), left out of every ratio


def _chord_lookup(song: Song):
    """(onset -> pitch classes of the sounding chord, onset -> index of that chord change)."""
    steps = song.spec.positions_per_bar
    changes = sorted(song.chords)
    starts = [c.bar * steps + c.position for c in changes]
    tones = [frozenset(chord_pitch_classes(c.label)) for c in changes]

    def index(note: Note) -> int:
        return bisect.bisect_right(starts, note.bar * steps + note.position) - 1

    def sounding(note: Note) -> frozenset[int]:
        i = index(note)
        return tones[i] if i >= 0 else frozenset()

    return sounding, index


def chord_tone_counts(song: Song, track: str = "MELODY") -> ChordToneCounts:
    """Count a track's notes as chord tones, non-chord tones and *proper* non-chord tones (Yeh et al. 2021).

    On our grid: each note is counted once, at its onset, against the chord change sounding there (the last
    change at or before the onset; notes under ``N`` or before the first chord are left out). A non-chord tone
    is proper when the next note of the track with a different pitch, within the same chord (the same chord
    change), is a chord tone at most 2 semitones away, i.e. the non-chord tone resolves by step. The reference
    implementation (the paper's code) counts 1/16-note frames instead of notes, so a long note weighs more there;
    counting notes makes the ratio independent of the grid. Pitch distance is in MIDI semitones.
    """
    sounding, change_index = _chord_lookup(song)
    notes = sorted(song.tracks.get(track, []))
    chord = non_chord = proper = without = 0
    for i, note in enumerate(notes):
        tones = sounding(note)
        if not tones:
            without += 1
            continue
        if note.pitch % N_PITCH_CLASSES in tones:
            chord += 1
            continue
        non_chord += 1
        following = next((n for n in notes[i + 1:] if n.pitch != note.pitch), None)
        if following is not None and change_index(following) == change_index(note) \
                and following.pitch % N_PITCH_CLASSES in tones and abs(following.pitch - note.pitch) <= 2:
            proper += 1
    return ChordToneCounts(chord, non_chord, proper, without)


def chord_tone_ratio(song: Song, track: str = "MELODY") -> float | None:
    """Share of a track's notes that are chord tones: n_c / (n_c + n_n), the counts of ``chord_tone_counts``
    (Yeh et al. 2021's n_c and n_n; 1.0 when every note under a chord is one of its tones)."""
    counts = chord_tone_counts(song, track)
    total = counts.chord_tones + counts.non_chord_tones
    return counts.chord_tones / total if total else None


def ctnctr(song: Song, track: str = "MELODY") -> float | None:
    """Chord tone to non-chord tone ratio, CTnCTR = (n_c + n_p) / (n_c + n_n) (Yeh et al. 2021): like
    ``chord_tone_ratio`` but a non-chord tone that resolves by step (a passing or neighbour tone) is not held
    against the melody. Counts as in ``chord_tone_counts``."""
    counts = chord_tone_counts(song, track)
    total = counts.chord_tones + counts.non_chord_tones
    return (counts.chord_tones + counts.proper_non_chord) / total if total else None


# -- pitch: pitch-class histogram entropy --------------------------------------------------------------------

def _notes(song: Song, tracks: tuple[str, ...]) -> list[Note]:
    return [note for name in tracks for note in song.tracks.get(name, [])]


def pitch_class_histogram(notes: list[Note]) -> np.ndarray | None:
    """The normalised 12-bin histogram of the notes' pitch classes, each note counted once (MusDr's
    ``get_pitch_histogram``); None for no notes."""
    if not notes:
        return None
    counts = np.bincount([n.pitch % N_PITCH_CLASSES for n in notes], minlength=N_PITCH_CLASSES)
    return counts / counts.sum()


def histogram_entropy(histogram: np.ndarray) -> float:
    """Entropy in bits of a normalised histogram (MusDr's ``compute_histogram_entropy``; 0 log 0 = 0)."""
    nonzero = histogram[histogram > 0]
    return float(-(nonzero * np.log2(nonzero)).sum())


def pitch_class_entropy(song: Song, window_bars: int = 1, tracks: tuple[str, ...] = ("MELODY",)) -> float | None:
    """Pitch-class histogram entropy H_w (Wu & Yang 2020, MusDr ``compute_piece_pitch_entropy``), in bits.

    Every run of ``window_bars`` consecutive bars (a window starting at each bar, as in MusDr; the whole song
    when it is shorter than a window) gives the histogram of the pitch classes of the notes *starting* in it,
    each note once regardless of duration; the result is the mean entropy over the windows that hold a note.
    0 for one pitch class, log2(12) = 3.585 for all twelve equally often. None when the tracks have no note.
    """
    if window_bars < 1:
        raise ValueError(f"window_bars: {window_bars}; expected at least 1")
    notes = _notes(song, tracks)
    window = min(window_bars, song.n_bars)
    by_bar: list[list[Note]] = [[] for _ in range(song.n_bars)]
    for note in notes:
        by_bar[note.bar].append(note)
    entropies = []
    for start in range(song.n_bars - window + 1):
        histogram = pitch_class_histogram([n for bar in by_bar[start:start + window] for n in bar])
        if histogram is not None:
            entropies.append(histogram_entropy(histogram))
    return float(np.mean(entropies)) if entropies else None


# -- rhythm: grooving pattern similarity ---------------------------------------------------------------------

def grooving_patterns(song: Song, tracks: tuple[str, ...] = ("MELODY",)) -> np.ndarray:
    """[bars, positions per bar] booleans: where at least one note of the tracks starts (Wu & Yang 2020's
    grooving pattern, MusDr ``get_onset_xor_distance``'s onset vector), on our grid."""
    patterns = np.zeros((song.n_bars, song.spec.positions_per_bar), dtype=bool)
    for note in _notes(song, tracks):
        patterns[note.bar, note.position] = True
    return patterns


def groove_consistency(song: Song, tracks: tuple[str, ...] = ("MELODY",)) -> float | None:
    """Grooving pattern similarity GS (Wu & Yang 2020, MusDr ``compute_piece_groove_similarity``).

    For every pair of bars a, b: GS(a, b) = 1 - (1/Q) * sum_i XOR(g_a[i], g_b[i]), with g the bar's grooving
    pattern (``grooving_patterns``) and Q the positions per bar of the song's metre (16 in 4/4, 12 in 3/4,
    24 in 12/8: musicray's grid, where the Jazz Transformer used 64 per bar, so values are comparable between
    songs of the same metre). The result is the mean over all pairs, bars without onsets included as in MusDr
    (which samples 1000 pairs of long pieces; here every pair is used). 1 when all bars share one rhythm.
    None for a one-bar song.
    """
    patterns = grooving_patterns(song, tracks).astype(np.int64)
    n_bars, positions = patterns.shape
    if n_bars < 2:
        return None
    # XOR count of every pair at once: |a| + |b| - 2 |a AND b|.
    onsets = patterns.sum(axis=1)
    xor = onsets[:, None] + onsets[None, :] - 2 * (patterns @ patterns.T)
    pairs = np.triu_indices(n_bars, k=1)
    return float(np.mean(1.0 - xor[pairs] / positions))


# -- performance: velocity and tempo (defined here) ----------------------------------------------------------

def velocity_stats(song: Song) -> dict[str, dict[str, float | int | None]]:
    """Per track: the mean and the population standard deviation (spread) of its notes' MIDI velocities (1..127),
    each note once, and the note count. Descriptive statistics defined here (no paper fixes them); mean and std
    are None for a silent track."""
    stats = {}
    for name in TRACKS:
        velocities = np.array([n.velocity for n in song.tracks.get(name, [])], dtype=float)
        stats[name] = {"mean": float(velocities.mean()) if len(velocities) else None,
                       "std": float(velocities.std()) if len(velocities) else None,
                       "notes": len(velocities)}
    return stats


def tempo_change_stats(song: Song) -> dict[str, float | None]:
    """The per-bar tempo curve's change rate and range. Defined here (no paper fixes them).

    The curve is each bar's mean tempo (``musicray.quantize.bar_tempos``: beats per bar over the bar's duration,
    bpm of the metre's beat), rounded to whole bpm, the resolution of musicray's tempo tokens. ``change_rate`` is
    the share of the n_bars - 1 bar boundaries where the rounded tempo changes (None for one bar);
    ``range_bpm`` is max - min of the curve; ``mean_bpm`` its mean.
    """
    curve = np.rint(np.array(bar_tempos(song), dtype=float))
    changes = np.count_nonzero(np.diff(curve)) if len(curve) > 1 else 0
    return {"change_rate": float(changes / (len(curve) - 1)) if len(curve) > 1 else None,
            "range_bpm": float(curve.max() - curve.min()), "mean_bpm": float(curve.mean())}


# -- structure and grammar (token streams) -------------------------------------------------------------------

@dataclass(frozen=True)
class WrittenSection:
    label: str
    declared_bars: int    # the bars its <Sec_..> token announces
    written_bars: int     # the <Bar> tokens that follow it, up to the next section or <End>


def written_sections(ids: list[int], vocab: Vocabulary) -> list[WrittenSection]:
    """The sections a body of any stream writes, read from its ``<Sec_..>`` and ``<Bar>`` tokens only (whatever
    else the stream holds, grammatical or not); tokens before the first section are ignored."""
    sections: list[list] = []
    for token in ids:
        family = vocab.family[token]
        if family == "End":
            break
        if family == "Sec":
            text = vocab.tokens[token][len("<Sec_"):-1]
            sections.append([text[0], int(text[1:]), 0])
        elif family == "Bar" and sections:
            sections[-1][2] += 1
    return [WrittenSection(*s) for s in sections]


def structure_adherence(ids: list[int], vocab: Vocabulary, requested: list[Section] | tuple[Section, ...]) -> float:
    """Share of sections written exactly as requested: the i-th written section has the requested label, announces
    the requested bars and holds exactly that many ``<Bar>`` tokens. The denominator is the larger of the requested
    and written section counts, so a missing or an extra section counts against it. Defined here: it measures
    the thesis' structure control (Chu 2025), bars per section as requested; 1.0 for any grammatical stream."""
    written = written_sections(ids, vocab)
    if not requested:
        raise ValueError("requested: no sections")
    exact = sum(1 for want, got in zip(requested, written)
                if (got.label, got.declared_bars, got.written_bars) == (want.label, want.bars, want.bars))
    return exact / max(len(requested), len(written))


def grammar_validity(errors: list[list]) -> float | None:
    """Share of sequences without a grammar error, given each sequence's errors from ``Grammar.validate_batch``
    (musicray's grammar: the token order of each stream, the form's sections and bars, positions per bar, one
    velocity per note). None for no sequences."""
    return sum(1 for e in errors if not e) / len(errors) if errors else None


# -- one song ------------------------------------------------------------------------------------------------

def song_metrics(song: Song) -> dict[str, float | None]:
    """Every song-level measure above, flat (the keys of the report's metric tables)."""
    metrics: dict[str, float | None] = {
        "chord_tone_ratio": chord_tone_ratio(song), "ctnctr": ctnctr(song),
        **{f"pitch_class_entropy_h{w}": pitch_class_entropy(song, w) for w in ENTROPY_WINDOWS},
        f"pitch_class_entropy_h{ENTROPY_WINDOWS[-1]}_all_tracks": pitch_class_entropy(song, ENTROPY_WINDOWS[-1],
                                                                                       TRACKS),
        "groove_consistency": groove_consistency(song),
        "groove_consistency_all_tracks": groove_consistency(song, TRACKS),
    }
    for name, stats in velocity_stats(song).items():
        metrics[f"velocity_mean_{name.lower()}"] = stats["mean"]
        metrics[f"velocity_std_{name.lower()}"] = stats["std"]
    tempo = tempo_change_stats(song)
    metrics["tempo_change_rate"] = tempo["change_rate"]
    metrics["tempo_range_bpm"] = tempo["range_bpm"]
    return metrics


def mean_of(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean and population std over the defined values, and how many there were (None values are skipped)."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    if not defined:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(defined)), "std": float(np.std(defined)), "n": len(defined)}


# What each song_metrics key means, where it comes from: the report's glossary.
DEFINITIONS: dict[str, str] = {
    "chord_tone_ratio": "MELODY notes whose pitch class is in the chord sounding at their onset, n_c/(n_c+n_n) "
                        "(Yeh et al. 2021, counted per note)",
    "ctnctr": "CTnCTR = (n_c+n_p)/(n_c+n_n), non-chord tones resolved by step count as proper (Yeh et al. 2021)",
    "pitch_class_entropy_h1": "MELODY pitch-class histogram entropy over 1-bar windows, bits (Wu & Yang 2020, H1)",
    "pitch_class_entropy_h4": "MELODY pitch-class histogram entropy over 4-bar windows, bits (Wu & Yang 2020, H4)",
    "pitch_class_entropy_h4_all_tracks": "H4 over the notes of all three tracks (Wu & Yang 2020)",
    "groove_consistency": "MELODY grooving pattern similarity GS between all pairs of bars (Wu & Yang 2020)",
    "groove_consistency_all_tracks": "GS over the onsets of all three tracks (Wu & Yang 2020)",
    **{f"velocity_{stat}_{name.lower()}": f"{'mean' if stat == 'mean' else 'population std'} of {name} velocities "
       "(descriptive; defined here)" for name in TRACKS for stat in ("mean", "std")},
    "tempo_change_rate": "share of bar boundaries where the per-bar tempo (whole bpm) changes (defined here)",
    "tempo_range_bpm": "max - min of the per-bar tempo, bpm (defined here)",
    "structure_adherence": "share of sections written with the requested label and bar count, mean over the "
                           "five stage streams (defined here; the thesis' structure control)",
    "grammar_validity": "share of stage streams the musicray grammar accepts (musicray.grammar)",
}

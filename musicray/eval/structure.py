"""Structure and key of whole songs: do returning sections return, do the tracks stay in the key and in register.

Measures per song (``song_structure_measures``), each defined below with its source, on musicray's grid (16th
notes: 4 steps per beat in simple metres, 6 per dotted-quarter beat in compound ones, so a step is a 16th in
every metre):

* **melody similarity of two sections** (defined here, after issue 17): the MELODY as one sounding pitch per step
  (``sounding_pitches``: the highest note sounding at that step, ``REST`` where none does), two sections compared
  step by step over their common length (the shorter one's steps from each section's first bar); the share of
  steps where both sound the same MIDI pitch or both rest. Over the pairs of *melodic* sections of a song
  (upper-case labels, POP909's convention), ``same_label_similarity`` is the mean over the pairs that share a label
  and ``different_label_similarity`` the mean over the others;
* **returning bars identical** (defined here): every bar of a melodic section whose label occurred earlier in the
  song is compared with the same bar of that label's first occurrence (bars past the first occurrence's length
  have no counterpart and are left out); the share whose every step agrees as above (empty bars included: two
  silent bars are identical);
* **scale consistency, pitch range, pitch classes used** per track (MELODY, BRIDGE, PIANO): MusPy's
  ``scale_consistency`` (the largest share of notes in one major or minor scale, any tonic), ``pitch_range``
  (highest minus lowest MIDI pitch) and ``n_pitch_classes_used``, computed by MusPy on the song as musicray writes
  it to MIDI (``musicray.midi.song_to_midi``) and MusPy reads it back (Dong et al. 2020);
* **chord time in the key's scale** (defined here): the share of the time under a chord (``N`` left out) whose
  chord has every tone (bass included, ``musicray.harmony.chord_pitch_classes``) in the song key's scale
  (``scale_pitch_classes``: major, or natural minor);
* the MELODY's **chord-tone ratio** of ``musicray.eval.metrics`` (Yeh et al. 2021), for its goal.

Over a set of songs every figure is a mean with a seeded 95 % percentile bootstrap interval over songs
(``bootstrap_interval``); ``goal_met`` says "met" only when the whole interval clears the goal. A logistic
regression on the per-song measures (``real_vs_generated``) tells generated songs from real ones of the same
forms; its cross-validated accuracy (0.5: indistinguishable by these measures) and coefficients say how, and by
which measures. ``structure_report`` puts it together for the evaluation report.

Sources:

* Dong, H.-W., Chen, K., McAuley, J. & Berg-Kirkpatrick, T. (2020). *MusPy: A Toolkit for Symbolic Music
  Generation.* ISMIR 2020 (scale consistency, pitch range, pitch classes used).
* Efron, B. & Tibshirani, R. J. (1993). *An Introduction to the Bootstrap.* Chapman & Hall (percentile interval).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np

from musicray.eval.metrics import chord_tone_ratio
from musicray.harmony import chord_pitch_classes, scale_pitch_classes
from musicray.song import TRACKS, Song

REST = -1               # a step where no note of the track sounds (MIDI pitch 0 is a note)
CONFIDENCE = 0.95
# Bootstrap resamples. Measured over 20 seeds on 8, 16 and 43 POP909 test songs: an interval's ends move by at
# most 9 % of its width (0.003-0.018 for the similarity shares), well inside the interval itself.
RESAMPLES = 2000
CV_FOLDS = 5

SOURCES = (
    "Dong, H.-W., Chen, K., McAuley, J. & Berg-Kirkpatrick, T. (2020). MusPy: A Toolkit for Symbolic Music "
    "Generation. ISMIR 2020 (scale consistency, pitch range, pitch classes used per track).",
    "Efron, B. & Tibshirani, R. J. (1993). An Introduction to the Bootstrap. Chapman & Hall (95 % percentile "
    "intervals over songs).",
)

# MusPy's per-track measures, by the name used in the measure keys.
MUSPY_MEASURES = ("scale_consistency", "pitch_range", "n_pitch_classes_used")


# -- the melody on the grid ----------------------------------------------------------------------------------

def sounding_pitches(song: Song, track: str = "MELODY") -> np.ndarray:
    """One entry per grid step of the song: the MIDI pitch sounding there (the highest when notes overlap), or
    ``REST``. Notes are cut at the end of the form."""
    steps = song.spec.positions_per_bar
    grid = np.full(song.n_bars * steps, REST, dtype=np.int64)
    for note in song.tracks.get(track, []):
        start = note.bar * steps + note.position
        # The maximum keeps the higher of overlapping notes (the skyline), whatever their order.
        grid[start:start + note.duration] = np.maximum(grid[start:start + note.duration], note.pitch)
    return grid


def agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Share of the common length's steps where two sounding-pitch sequences agree (same pitch, or both rest);
    None when either is empty."""
    length = min(len(a), len(b))
    return float(np.mean(a[:length] == b[:length])) if length else None


def melodic_sections(song: Song, track: str = "MELODY") -> list[tuple[str, np.ndarray]]:
    """(label, sounding pitches) of each melodic section (upper-case label), in song order."""
    grid, steps = sounding_pitches(song, track), song.spec.positions_per_bar
    return [(section.label, grid[start * steps:(start + section.bars) * steps])
            for start, section in zip(song.section_starts(), song.sections) if section.label.isupper()]


def label_similarities(song: Song, track: str = "MELODY") -> tuple[list[float], list[float]]:
    """(same-label, different-label) agreements of every pair of melodic sections (``agreement``)."""
    sections = melodic_sections(song, track)
    same, different = [], []
    for i, (label_a, a) in enumerate(sections):
        for label_b, b in sections[i + 1:]:
            (same if label_a == label_b else different).append(agreement(a, b))
    return same, different


def returning_bar_agreements(song: Song, track: str = "MELODY") -> list[float]:
    """For every bar of a returning melodic section (its label came before), its agreement with the same bar of
    the label's first occurrence; bars past the first occurrence's length are left out."""
    steps = song.spec.positions_per_bar
    first: dict[str, np.ndarray] = {}
    agreements = []
    for label, pitches in melodic_sections(song, track):
        if label not in first:
            first[label] = pitches
            continue
        earlier = first[label]
        for bar in range(min(len(pitches), len(earlier)) // steps):
            span = slice(bar * steps, (bar + 1) * steps)
            agreements.append(agreement(pitches[span], earlier[span]))
    return agreements


# -- harmony in the key --------------------------------------------------------------------------------------

def chord_time_in_scale(song: Song) -> float | None:
    """Share of the song's chord time (grid steps under a chord other than ``N``, each change sounding until the
    next or the end of the form) whose chord has all its tones in the key's scale; None without a chord."""
    steps_per_bar, end = song.spec.positions_per_bar, song.n_bars * song.spec.positions_per_bar
    scale = set(scale_pitch_classes(song.key))
    changes = sorted(song.chords)
    starts = [c.bar * steps_per_bar + c.position for c in changes] + [end]
    in_scale = total = 0
    for chord, start, stop in zip(changes, starts, starts[1:]):
        tones = chord_pitch_classes(chord.label)
        if not tones or stop <= start:
            continue
        total += stop - start
        in_scale += (stop - start) * set(tones).issubset(scale)
    return in_scale / total if total else None


# -- MusPy ---------------------------------------------------------------------------------------------------

def to_muspy(song: Song) -> "muspy.Music":
    """The song as MusPy reads musicray's MIDI file of it: ``muspy.read_midi``'s own path (mido parses the file,
    ``muspy.from_mido`` converts it), from the bytes ``musicray.midi.song_to_midi`` writes."""
    import mido
    import muspy

    from musicray.midi import TEXT_CHARSET, song_to_midi

    buffer = io.BytesIO()
    song_to_midi(song).dump(file=buffer, charset=TEXT_CHARSET)
    buffer.seek(0)
    return muspy.from_mido(mido.MidiFile(file=buffer))


def track_measures(song: Song) -> dict[str, float | None]:
    """MusPy's scale consistency, pitch range and pitch classes used of each track, keyed
    ``<measure>_<track>`` (lower case); None for a track without notes."""
    import muspy

    music = to_muspy(song)
    tracks = {track.name: track for track in music.tracks}
    measures: dict[str, float | None] = {}
    for name in TRACKS:
        track = tracks.get(name)
        alone = muspy.Music(resolution=music.resolution, tracks=[track]) if track is not None and track.notes \
            else None
        for measure in MUSPY_MEASURES:
            measures[f"{measure}_{name.lower()}"] = None if alone is None else float(getattr(muspy, measure)(alone))
    return measures


# -- one song ------------------------------------------------------------------------------------------------

def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def song_structure_measures(song: Song) -> dict[str, float | None]:
    """Every measure of this module for one song, flat (the keys of ``DEFINITIONS``); None where a measure is
    undefined (no pair of same-label sections, a silent track...)."""
    same, different = label_similarities(song)
    returning = returning_bar_agreements(song)
    return {
        "same_label_similarity": _mean(same),
        "different_label_similarity": _mean(different),
        "returning_bars_identical": _mean([a == 1.0 for a in returning]),
        "chord_time_in_scale": chord_time_in_scale(song),
        "chord_tone_ratio": chord_tone_ratio(song),
        **track_measures(song),
        **{f"velocity_mean_{name.lower()}": _mean([note.velocity for note in song.tracks.get(name, [])])
           for name in TRACKS},
    }


DEFINITIONS: dict[str, str] = {
    "same_label_similarity": "MELODY, pairs of melodic sections with the same label: share of 16th steps (over the "
                             "shorter section) where both sound the same pitch or both rest; mean per song (defined "
                             "here, issue 17)",
    "different_label_similarity": "as same_label_similarity, over pairs of melodic sections with different labels",
    "returning_bars_identical": "MELODY bars of a returning melodic section identical at every 16th step to the same "
                                "bar of the label's first occurrence, share per song (defined here, issue 17)",
    "chord_time_in_scale": "share of chord time (N left out) whose chord tones are all in the key's scale (defined "
                           "here)",
    "chord_tone_ratio": "MELODY notes whose pitch class is in the sounding chord, n_c/(n_c+n_n) (Yeh et al. 2021)",
    **{f"scale_consistency_{name.lower()}": f"{name}: largest share of notes in one major or minor scale (MusPy)"
       for name in TRACKS},
    **{f"pitch_range_{name.lower()}": f"{name}: highest minus lowest MIDI pitch, semitones (MusPy)" for name in TRACKS},
    **{f"n_pitch_classes_used_{name.lower()}": f"{name}: distinct pitch classes of the song (MusPy)" for name in TRACKS},
    **{f"velocity_mean_{name.lower()}": f"{name}: mean MIDI velocity of the song's notes (defined here)"
       for name in TRACKS},
}
MEASURES: tuple[str, ...] = tuple(DEFINITIONS)


# -- intervals and goals -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A mean over songs with its bootstrap interval (``low``/``high`` None for fewer than two songs)."""

    mean: float
    low: float | None
    high: float | None
    n: int


def bootstrap_interval(values: list[float | None], seed: int = 0, resamples: int = RESAMPLES,
                       confidence: float = CONFIDENCE) -> Interval | None:
    """Mean of the defined values (None and NaN skipped) and its percentile bootstrap interval: the songs are
    resampled with replacement ``resamples`` times (numpy, seeded), the interval holds the central ``confidence``
    of the resampled means. None for no defined value; no interval (low, high None) for one."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: {confidence}; expected a share between 0 and 1, e.g. 0.95")
    if resamples < 1:
        raise ValueError(f"resamples: {resamples}; expected at least 1")
    defined = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not len(defined):
        return None
    mean = float(defined.mean())
    if len(defined) < 2:
        return Interval(mean, None, None, 1)
    rng = np.random.default_rng(seed)
    means = defined[rng.integers(0, len(defined), size=(resamples, len(defined)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(mean, float(low), float(high), len(defined))


@dataclass(frozen=True)
class Goal:
    """A goal on a mean: at least ``at_least``, at most ``at_most``, or both (a range)."""

    at_least: float | None = None
    at_most: float | None = None

    @classmethod
    def within(cls, reference: float, share: float) -> "Goal":
        """Within ``share`` (0.25: 25 %) of a reference figure, either side."""
        return cls(reference * (1 - share), reference * (1 + share))

    def __str__(self) -> str:
        if self.at_least is not None and self.at_most is not None:
            return f"{self.at_least:.3g} - {self.at_most:.3g}"
        return f"≥ {self.at_least:.3g}" if self.at_least is not None else f"≤ {self.at_most:.3g}"


def goal_met(interval: Interval | None, goal: Goal) -> bool | None:
    """True only when the whole interval clears the goal: its lower end for an at-least goal, its upper end for
    an at-most goal, both for a range; None when there is no interval to judge (fewer than two songs)."""
    if interval is None or interval.low is None:
        return None
    return ((goal.at_least is None or interval.low >= goal.at_least)
            and (goal.at_most is None or interval.high <= goal.at_most))


# Issue 17's goals for pop909-small, on the generated songs' means.
GOALS: dict[str, Goal] = {
    "same_label_similarity": Goal(at_least=0.6),
    "different_label_similarity": Goal(at_most=0.35),
    "returning_bars_identical": Goal(0.4, 0.85),
    "chord_tone_ratio": Goal(at_least=0.58),
    "scale_consistency_melody": Goal(at_least=0.97),
    "chord_time_in_scale": Goal(at_least=0.8),
}
# Goals relative to the real reference's mean on the same songs: within this share of it.
GOALS_NEAR_REAL: dict[str, float] = {"pitch_range_melody": 0.25, "pitch_range_bridge": 0.25,
                                     **{f"velocity_mean_{name.lower()}": 0.10 for name in TRACKS}}


def goal_for(measure: str, real: Interval | None) -> Goal | None:
    """The measure's goal; a goal relative to the real figure needs the real interval (None without it)."""
    if measure in GOALS_NEAR_REAL:
        return Goal.within(real.mean, GOALS_NEAR_REAL[measure]) if real is not None else None
    return GOALS.get(measure)


# -- real vs generated ---------------------------------------------------------------------------------------

def real_vs_generated(real: list[dict], generated: list[dict], measures: tuple[str, ...] = MEASURES,
                      seed: int = 0, folds: int = CV_FOLDS) -> dict:
    """How well a logistic regression on the per-song measures tells generated songs (label 1) from real ones.

    The measures undefined for every song are left out; a missing value is replaced by the training fold's mean
    of that measure, and each measure is standardised on the training fold (scikit-learn pipeline, so no test
    song leaks into the fit). ``accuracy`` is the mean of a stratified, shuffled (seeded) k-fold
    cross-validation, k = ``folds`` or the smaller class's size if smaller; 0.5 means these measures do not give
    the generated songs away. ``coefficients``: the model fitted on all songs, per standardised measure, largest
    first; positive means the generated songs have more of it. ``accuracy`` is None, with the ``reason``, when a
    class has fewer than two songs.
    """
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    used = [key for key in measures if any(song.get(key) is not None for song in real + generated)]
    smaller = min(len(real), len(generated))
    result = {"real_songs": len(real), "generated_songs": len(generated), "measures": used, "accuracy": None,
              "fold_accuracies": [], "folds": 0, "coefficients": {}, "reason": None}
    if smaller < 2 or not used:
        result["reason"] = (f"{smaller} song(s) in the smaller class; at least 2 are needed" if smaller < 2
                            else "no measure is defined for these songs")
        return result
    features = np.array([[np.nan if song.get(key) is None else song[key] for key in used]
                         for song in real + generated], dtype=float)
    labels = np.array([0] * len(real) + [1] * len(generated))

    def model():
        return make_pipeline(SimpleImputer(strategy="mean", keep_empty_features=True), StandardScaler(),
                             LogisticRegression(max_iter=1000))

    folds = min(folds, smaller)
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(model(), features, labels, cv=splits)
    fitted = model().fit(features, labels)
    weights = fitted[-1].coef_[0]
    order = np.argsort(-np.abs(weights))
    result.update(accuracy=float(scores.mean()), fold_accuracies=[float(s) for s in scores], folds=folds,
                  coefficients={used[i]: float(weights[i]) for i in order})
    return result


# -- the report's section ------------------------------------------------------------------------------------

def structure_report(generated: list[Song], real: list[Song], real_songs: list[Song] | None = None,
                     seed: int = 0, variants: dict[str, list[Song]] | None = None) -> dict:
    """The "Structure and key" figures: every measure's mean and 95 % bootstrap interval over the generated songs,
    over the real songs of the same forms (``real``, the same code on them) and, when given, over whole real
    songs (``real_songs``); each goal and whether the generated songs meet it (and each of ``variants``: the same
    windows composed with one setting changed, e.g. ``{"temperature 1": songs}``); the real-vs-generated
    classifier (generated vs ``real``); the per-song values. JSON-ready."""
    variants = variants or {}
    per_song = {"generated": [song_structure_measures(s) for s in generated],
                "real": [song_structure_measures(s) for s in real]}
    if real_songs is not None:
        per_song["real_songs"] = [song_structure_measures(s) for s in real_songs]
    per_variant = {label: [song_structure_measures(s) for s in songs] for label, songs in variants.items()}

    def interval(songs: list[dict], measure: str) -> Interval | None:
        return bootstrap_interval([song[measure] for song in songs], seed)

    rows = []
    for measure in MEASURES:
        intervals = {side: interval(songs, measure) for side, songs in per_song.items()}
        goal = goal_for(measure, intervals["real"])
        row = {"measure": measure, **{side: None if i is None else asdict(i) for side, i in intervals.items()},
               "goal": None if goal is None else str(goal),
               "met": None if goal is None else goal_met(intervals["generated"], goal)}
        if per_variant:
            row["variants"] = {}
            for label, songs in per_variant.items():
                found = interval(songs, measure)
                row["variants"][label] = {"interval": None if found is None else asdict(found),
                                          "met": None if goal is None else goal_met(found, goal)}
        rows.append(row)
    return {"definitions": DEFINITIONS, "confidence": CONFIDENCE, "resamples": RESAMPLES, "seed": seed,
            "rows": rows, "classifier": real_vs_generated(per_song["real"], per_song["generated"], seed=seed),
            "variants": {label: real_vs_generated(per_song["real"], songs, seed=seed)["accuracy"]
                         for label, songs in per_variant.items()},
            "per_song": {**per_song, **{f"variant: {label}": songs for label, songs in per_variant.items()}},
            "sources": list(SOURCES)}

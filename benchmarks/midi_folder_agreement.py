"""How well `musicray data prepare --midi` recovers POP909's annotations from its MIDI files alone.

Each chosen POP909 MIDI file is given to the MIDI-folder ingest (``musicray.data.midi_folder.load_midi_song``)
with its track names removed (they are annotations too), and the estimates are compared with POP909's own:

* key: the estimated key vs the first key of key_audio.txt (exact, and same tonic or relative key),
* chords: at every beat of beat_midi.txt where chord_midi.txt names a chord, the estimated chord sounding there:
  root and quality exact, and root and triad (sevenths and sixths folded onto their triad),
* melody track: whether the MELODY estimate is POP909's MELODY instrument, and the share of POP909's melody notes
  that land in the estimated MELODY,
* bars: the estimated downbeats (and beats) against beat_midi.txt's downbeat column and against the annotators'
  bar grid (the one human_label1.txt counts; ``pop909.find_bar_grid`` recovers it): the share of real downbeats an
  estimated one lies within DOWNBEAT_TOLERANCE_S of (``mir_eval.util.match_events``), on which beat of the estimated
  bar the annotators' downbeats fall, and the bar counts and metres,
* sections: the estimated section boundaries against human_label1.txt's, both in the annotators' bars, with
  mir_eval's segmentation metrics: boundary precision, recall and F within +-1 bar (``mir_eval.segment.detection``,
  the song's start and end left out), and the pairwise label agreement (``mir_eval.segment.pairwise``: of the pairs
  of quarter bars that share a label in one, the share that share one in the other), beside the same boundaries
  with every section labelled apart (what the repetition labels add),
* speed: seconds per song of the ingest, beside POP909's annotated ingest (``pop909.load_song``) of the same song.

    python benchmarks/midi_folder_agreement.py [--pop909 DIR] [--songs 20] [--json out.json]

mir_eval is in the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import miditoolkit
import mir_eval
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicray.data.midi_folder import load_midi_song  # noqa: E402
from musicray.data import pop909  # noqa: E402
from musicray.data.pop909 import default_pop909_dir, load_song  # noqa: E402
from musicray.harmony import canonical_chord, canonical_key, parse_chord, parse_key  # noqa: E402
from musicray.song import SongError  # noqa: E402

# Sevenths and sixths folded onto the triad they extend (root + triad agreement).
TRIADS = {"7": "maj", "maj7": "maj", "maj6": "maj", "min7": "min", "minmaj7": "min", "min6": "min", "hdim7": "dim",
          "dim7": "dim", "sus4(b7)": "sus4"}


# A downbeat is found when an estimated one lies this close (the usual beat-tracking window, mir_eval's default).
DOWNBEAT_TOLERANCE_S = 0.07
# Section boundaries match within this many of the annotators' bars.
BOUNDARY_WINDOW_BARS = 1.0
# Labels are compared on frames of this many bars (a quarter bar: a beat of 4/4).
LABEL_FRAME_BARS = 0.25


def annotated_bars(root: Path, song_id: str) -> tuple[np.ndarray, list[str], list[int], str]:
    """The annotators' bar grid as the seconds of each labelled bar's downbeat and of the last bar's end, with the
    labels and lengths of human_label1.txt's sections and the index's metre. Raises SongError where the annotated
    ingest cannot recover the grid."""
    files = pop909.SongFiles(root, song_id)
    spec = pop909.read_metre(files, None)
    sections = pop909.read_form(files)
    beat_times = pop909.read_beat_times(files)
    grid, _ = pop909.find_bar_grid(files, spec, sections, beat_times, pop909.read_midi(files)["MELODY"])
    rows = np.append(grid.bar_rows, grid.bar_rows[-1] + spec.beats_per_bar)
    return (pop909.rows_to_seconds(beat_times, rows), [s.label for s in sections], [s.bars for s in sections],
            spec.name)


def found_share(reference: np.ndarray, estimated: np.ndarray) -> float:
    """The share of ``reference`` times an ``estimated`` one matches (one to one); swapped, the share of the
    estimates that are real."""
    return len(mir_eval.util.match_events(reference, estimated, DOWNBEAT_TOLERANCE_S)) / max(1, len(reference))


def in_bars(seconds: np.ndarray, downbeats: np.ndarray) -> np.ndarray:
    """Seconds as fractional bars of a grid (``downbeats``: each bar's start and the last one's end), linear
    within a bar and outside the grid at its first and last bar's length."""
    bars = np.interp(seconds, downbeats, np.arange(len(downbeats), dtype=float))
    before = (seconds - downbeats[0]) / (downbeats[1] - downbeats[0])
    after = len(downbeats) - 1 + (seconds - downbeats[-1]) / (downbeats[-1] - downbeats[-2])
    return np.where(seconds < downbeats[0], before, np.where(seconds > downbeats[-1], after, bars))


def intervals(boundaries: np.ndarray) -> np.ndarray:
    return np.column_stack([boundaries[:-1], boundaries[1:]])


def bar_and_section_figures(root: Path, song_id: str, song, seconds_at) -> dict:
    """The estimated bars and sections against beat_midi.txt and human_label1.txt (module docstring)."""
    spec = song.spec
    table = np.loadtxt(root / "POP909" / song_id / "beat_midi.txt", ndmin=2)
    beats, beat_midi_downbeats = table[:, 0], table[table[:, 2] == 1, 0]
    estimated_downbeats = np.array([seconds_at(bar, 0) for bar in range(song.n_bars + 1)])
    estimated_beats = np.array([seconds_at(bar, beat * spec.positions_per_beat)
                                for bar in range(song.n_bars) for beat in range(spec.beats_per_bar)])
    figures = {
        "metre_estimated": song.metre, "bars_estimated": song.n_bars,
        "bars_beat_midi": len(beat_midi_downbeats),
        "beats_found": found_share(beats, estimated_beats),
        "downbeats_found_beat_midi": found_share(beat_midi_downbeats, estimated_downbeats[:-1]),
        "downbeats_real_beat_midi": found_share(estimated_downbeats[:-1], beat_midi_downbeats),
    }
    try:
        downbeats, labels, lengths, metre = annotated_bars(root, song_id)
    except SongError as error:
        return {**figures, "annotated_grid": f"none: {error}"}
    # Which beat of the estimated bar each annotated downbeat falls on (0: the estimate's downbeat).
    nearest = np.abs(estimated_beats[None, :] - downbeats[:-1, None]).argmin(axis=1)
    beat_of_bar = np.bincount(nearest % spec.beats_per_bar, minlength=spec.beats_per_bar)
    reference = intervals(np.concatenate([[0], np.cumsum(lengths)]).astype(float))
    boundaries = np.concatenate([[0], np.cumsum([s.bars for s in song.sections])])
    estimated, estimated_labels = mir_eval.util.adjust_intervals(
        intervals(in_bars(estimated_downbeats[boundaries], downbeats)), [s.label for s in song.sections],
        t_min=0.0, t_max=float(reference[-1, 1]))
    precision, recall, f_measure = mir_eval.segment.detection(reference, estimated, window=BOUNDARY_WINDOW_BARS,
                                                               trim=True)
    pairwise = mir_eval.segment.pairwise(reference, labels, estimated, estimated_labels, frame_size=LABEL_FRAME_BARS)
    apart = mir_eval.segment.pairwise(reference, labels, estimated, [str(i) for i in range(len(estimated))],
                                      frame_size=LABEL_FRAME_BARS)
    return {
        **figures, "annotated_grid": "found", "metre_annotated": metre, "bars_annotated": int(np.sum(lengths)),
        "downbeats_found_annotated": found_share(downbeats[:-1], estimated_downbeats[:-1]),
        "downbeats_real_annotated": found_share(estimated_downbeats[:-1], downbeats[:-1]),
        "downbeat_beat_of_estimated_bar": beat_of_bar.tolist(),
        "boundary_precision": precision, "boundary_recall": recall, "boundary_f": f_measure,
        "sections_estimated": len(song.sections), "sections_annotated": len(labels),
        "pairwise_precision": pairwise[0], "pairwise_recall": pairwise[1], "pairwise_f": pairwise[2],
        "pairwise_f_labels_apart": apart[2],
    }


def relative_or_same(estimated: str, annotated: str) -> bool:
    (a, mode_a), (b, mode_b) = parse_key(estimated), parse_key(annotated)
    if a == b:
        return True
    relative = (a + 9) % 12 == b if mode_a == "maj" else (a + 3) % 12 == b
    return mode_a != mode_b and relative


def song_figures(root: Path, song_id: str) -> dict:
    folder = root / "POP909" / song_id
    midi = miditoolkit.MidiFile(str(folder / f"{song_id}.mid"))
    melody_index = next(i for i, inst in enumerate(midi.instruments) if inst.name.strip().upper() == "MELODY")
    for instrument in midi.instruments:
        instrument.name = ""
    buffer = io.BytesIO()
    midi.dump(file=buffer)
    started = time.perf_counter()
    song, stats = load_midi_song(buffer.getvalue(), song_id)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    try:  # the annotated ingest of the same song, for the speed ratio (timed also where it skips the song)
        load_song(root, song_id)
        annotated_kept = True
    except SongError:
        annotated_kept = False
    annotated_seconds = time.perf_counter() - started

    annotated_key = canonical_key(
        (folder / "key_audio.txt").read_text().split("\n")[0].split()[-1])
    # Chord agreement at each beat: the estimated chord sounding at the beat's time (song steps -> ticks ->
    # seconds through the file's own tempo map, from bar 0's downbeat and less the beat-phase shift the ingest
    # applied; outside the map at its first and last tempo).
    spec = song.spec
    step_ticks = midi.ticks_per_beat * spec.beat_unit / spec.positions_per_beat
    tick_seconds = midi.get_tick_to_time_mapping()
    shift, first_bar_tick = stats["beat_phase_shift_ticks"], stats["first_bar_tick"]

    def seconds_at(bar: int, position: int) -> float:
        tick = int(round(first_bar_tick + (bar * spec.positions_per_bar + position) * step_ticks - shift))
        last = len(tick_seconds) - 1
        if tick < 0:
            return float(tick * (tick_seconds[1] - tick_seconds[0]))
        if tick > last:
            return float(tick_seconds[last] + (tick - last) * (tick_seconds[last] - tick_seconds[last - 1]))
        return float(tick_seconds[tick])

    change_times = np.array([seconds_at(c.bar, c.position) for c in song.chords])
    labels = [c.label for c in song.chords]
    chord_rows = [line.split() for line in (folder / "chord_midi.txt").read_text().splitlines() if line.strip()]
    beats = [float(line.split()[0]) for line in (folder / "beat_midi.txt").read_text().splitlines() if line.strip()]
    exact = triad = folded = counted = 0
    starts = np.array([float(row[0]) for row in chord_rows])
    for beat in beats:
        index = int(np.searchsorted(starts, beat + 1e-3, side="right")) - 1
        if index < 0:
            continue
        annotated = canonical_chord(chord_rows[index][2])
        a_root, a_quality, _ = parse_chord(annotated)
        if a_root is None:
            continue
        found = int(np.searchsorted(change_times, beat + 0.05, side="right")) - 1
        e_root, e_quality, _ = parse_chord(labels[found]) if found >= 0 else (None, "N", "")
        counted += 1
        exact += e_root == a_root and e_quality == a_quality
        triad += e_root == a_root and TRIADS.get(e_quality, e_quality) == TRIADS.get(a_quality, a_quality)
        folded += e_root == a_root and TRIADS.get(e_quality, e_quality) == a_quality
    chosen = stats["instruments_by_track"]["MELODY"]
    melody_notes = sum(1 for n in midi.instruments[melody_index].notes if n.velocity > 0 and n.end > n.start)
    in_melody = melody_notes if chosen == [f"{melody_index}:"] else 0
    return {
        "song": song_id, "seconds": round(seconds, 3), "annotated_seconds": round(annotated_seconds, 3),
        "annotated_kept": annotated_kept, "key": song.key, "key_annotated": annotated_key,
        "key_exact": song.key == annotated_key, "key_same_or_relative": relative_or_same(song.key, annotated_key),
        "chord_beats": counted, "chord_exact": exact / max(1, counted), "chord_triad": triad / max(1, counted),
        "chord_folded_exact": folded / max(1, counted),
        "melody_track": chosen == [f"{melody_index}:"], "melody_notes_share": in_melody / max(1, melody_notes),
        "roles": stats["instruments_by_track"], "form": song.form, "metre": song.metre,
        **bar_and_section_figures(root, song_id, song, seconds_at),
    }


def spread(values: list[float]) -> str:
    quartiles = np.percentile(values, [25, 75]) if values else (0, 0)
    return (f"median {statistics.median(values):.3f}, IQR {quartiles[0]:.3f}-{quartiles[1]:.3f}, "
            f"min {min(values):.3f}, max {max(values):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pop909", type=Path, default=default_pop909_dir())
    parser.add_argument("--songs", type=int, default=20, help="songs spread evenly over POP909's 909 ids")
    parser.add_argument("--json", type=Path, help="write every song's figures here")
    args = parser.parse_args()
    stride = 909 // args.songs
    ids = [f"{1 + i * stride:03d}" for i in range(args.songs)]
    song_figures(args.pop909, ids[0])  # imports (music21, chorder, symusic) and caches out of the timings
    rows = []
    for song_id in ids:
        rows.append(song_figures(args.pop909, song_id))
        r = rows[-1]
        print(f"{song_id}: key {r['key']} vs {r['key_annotated']}, chords exact {r['chord_exact']:.2f} triad "
              f"{r['chord_triad']:.2f}, melody track {r['melody_track']}, downbeats {r['downbeats_found_beat_midi']:.2f}, "
              f"boundary F {r.get('boundary_f', float('nan')):.2f}, pairwise F {r.get('pairwise_f', float('nan')):.2f}, "
              f"{r['seconds']:.2f} s", flush=True)
    beats = sum(r["chord_beats"] for r in rows)
    print(f"\n{len(rows)} songs ({', '.join(ids)})")
    print(f"key exact: {sum(r['key_exact'] for r in rows)}/{len(rows)}; same or relative: "
          f"{sum(r['key_same_or_relative'] for r in rows)}/{len(rows)}")
    print(f"chords per song, root+quality: {spread([r['chord_exact'] for r in rows])}")
    print(f"chords per song, root+triad: {spread([r['chord_triad'] for r in rows])}")
    print(f"chords over all {beats} beats, root+quality "
          f"{sum(r['chord_exact'] * r['chord_beats'] for r in rows) / beats:.3f}, root+triad "
          f"{sum(r['chord_triad'] * r['chord_beats'] for r in rows) / beats:.3f}; root+quality if every estimate "
          f"were folded onto its triad {sum(r['chord_folded_exact'] * r['chord_beats'] for r in rows) / beats:.3f}")
    print(f"melody track: {sum(r['melody_track'] for r in rows)}/{len(rows)}")
    print(f"seconds per song: {spread([r['seconds'] for r in rows])}; the annotated ingest of the same songs: "
          f"{spread([r['annotated_seconds'] for r in rows])}; ratio of the totals "
          f"{sum(r['seconds'] for r in rows) / sum(r['annotated_seconds'] for r in rows):.1f}")
    print(f"beats found (beat_midi.txt, +-{DOWNBEAT_TOLERANCE_S * 1000:.0f} ms): "
          f"{spread([r['beats_found'] for r in rows])}")
    print(f"downbeats found, beat_midi.txt's downbeat column: {spread([r['downbeats_found_beat_midi'] for r in rows])}")
    print(f"estimated downbeats that are beat_midi.txt's: {spread([r['downbeats_real_beat_midi'] for r in rows])}")
    graded = [r for r in rows if r["annotated_grid"] == "found"]
    print(f"{len(graded)} songs with the annotators' bar grid (the others: "
          f"{[(r['song'], r['annotated_grid']) for r in rows if r['annotated_grid'] != 'found']})")
    if graded:
        print(f"downbeats found, the annotators' grid: {spread([r['downbeats_found_annotated'] for r in graded])}; "
              f"songs with >= 90 % found: {sum(r['downbeats_found_annotated'] >= 0.9 for r in graded)}")
        print(f"estimated downbeats that are the annotators': {spread([r['downbeats_real_annotated'] for r in graded])}")
        print(f"metre = the index's: {sum(r['metre_estimated'] == r['metre_annotated'] for r in graded)}/"
              f"{len(graded)} (estimated: {dict(Counter(r['metre_estimated'] for r in graded))})")
        print(f"bars estimated / labelled: {spread([r['bars_estimated'] / r['bars_annotated'] for r in graded])}")
        print("annotated downbeats on beat k of the estimated bar, songs by their most common k: "
              f"{dict(Counter(int(np.argmax(r['downbeat_beat_of_estimated_bar'])) for r in graded))}")
        for name in ("boundary_precision", "boundary_recall", "boundary_f", "pairwise_precision", "pairwise_recall",
                     "pairwise_f", "pairwise_f_labels_apart"):
            print(f"{name}: {spread([r[name] for r in graded])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

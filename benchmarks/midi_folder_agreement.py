"""How well `musicray data prepare --midi` recovers POP909's annotations from its MIDI files alone.

Each chosen POP909 MIDI file is given to the MIDI-folder ingest (``musicray.data.midi_folder.load_midi_song``)
with its track names removed (they are annotations too), and the estimates are compared with POP909's own:

* key: the estimated key vs the first key of key_audio.txt (exact, and same tonic or relative key),
* chords: at every beat of beat_midi.txt where chord_midi.txt names a chord, the estimated chord sounding there:
  root and quality exact, and root and triad (sevenths and sixths folded onto their triad),
* melody track: whether the MELODY estimate is POP909's MELODY instrument, and the share of POP909's melody notes
  that land in the estimated MELODY,
* speed: seconds per song of the ingest, beside POP909's annotated ingest (``pop909.load_song``) of the same song.

    python benchmarks/midi_folder_agreement.py [--pop909 DIR] [--songs 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import miditoolkit
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicray.data.midi_folder import load_midi_song  # noqa: E402
from musicray.data.pop909 import default_pop909_dir, load_song  # noqa: E402
from musicray.harmony import canonical_chord, canonical_key, parse_chord, parse_key  # noqa: E402
from musicray.song import SongError  # noqa: E402

# Sevenths and sixths folded onto the triad they extend (root + triad agreement).
TRIADS = {"7": "maj", "maj7": "maj", "maj6": "maj", "min7": "min", "minmaj7": "min", "min6": "min", "hdim7": "dim",
          "dim7": "dim", "sus4(b7)": "sus4"}


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
    # seconds through the file's own tempo map, less the beat-phase shift the ingest applied).
    spec = song.spec
    step_ticks = midi.ticks_per_beat * spec.beat_unit / spec.positions_per_beat
    tick_seconds = midi.get_tick_to_time_mapping()
    shift = stats["beat_phase_shift_ticks"]

    def seconds_at(bar: int, position: int) -> float:
        tick = int(round((bar * spec.positions_per_bar + position) * step_ticks - shift))
        return float(tick_seconds[min(max(tick, 0), len(tick_seconds) - 1)])

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
              f"{r['chord_triad']:.2f}, melody track {r['melody_track']}, {r['seconds']:.2f} s", flush=True)
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
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

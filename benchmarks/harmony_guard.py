"""The harmony guard on and off: the same requests (POP909 test windows: form, key, metre, tempo) composed by a trained
run with ``harmony_guard`` True and False, measured against the real windows.

    python benchmarks/harmony_guard.py --run RUN_DIR (--data DATA_DIR | --pop909 DIR) [--songs 16] [--max-bars 8]

``--data`` takes the test split of prepared tables; ``--pop909`` reads the test-split songs straight from POP909
(no preparation job, no Ray).

Measures, per song (median and interquartile range over the songs):

- MELODY scale consistency: the largest share of the track's notes inside one major or minor scale, over the 24
  (MusPy's ``scale_consistency``, Dong et al. 2020: MusPy's own where it is installed, else the same definition
  written out here; the JSON says which);
- MELODY in the key: the share of its notes in the requested key's scale;
- chord time in the key: the share of chord time (grid steps; no-chord left out) whose tones are all in the key's
  scale (issue 17's "87 % in POP909");
- MELODY and BRIDGE pitch range (highest - lowest pitch, as MusPy's ``pitch_range``);
- outside the guard: the share of MELODY and BRIDGE notes the guard would not have written (``outside_guard``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicray.compose import Composer  # noqa: E402
from musicray.eval.generation import eval_windows, split_songs  # noqa: E402
from musicray.harmony import chord_pitch_classes, scale_pitch_classes  # noqa: E402
from musicray.harmony_guard import outside_guard  # noqa: E402
from musicray.song import Song  # noqa: E402

ALL_SCALES = [scale_pitch_classes(f"{root}:{mode}") for root in ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab",
                                                                   "A", "Bb", "B") for mode in ("maj", "min")]


def scale_consistency(pitches: list[int]) -> float | None:
    if not pitches:
        return None
    try:
        import muspy
    except ImportError:
        classes = np.asarray(pitches) % 12
        return max(float(np.isin(classes, scale).mean()) for scale in ALL_SCALES)
    notes = [muspy.Note(time=i, pitch=int(p), duration=1, velocity=80) for i, p in enumerate(pitches)]
    return float(muspy.scale_consistency(muspy.Music(resolution=4, tracks=[muspy.Track(notes=notes)])))


def scale_consistency_source() -> str:
    try:
        import muspy
        return f"muspy {muspy.__version__}"
    except ImportError:
        return "own (MusPy's definition)"


def in_key(pitches: list[int], key: str) -> float | None:
    return float(np.isin(np.asarray(pitches) % 12, scale_pitch_classes(key)).mean()) if pitches else None


def chord_time_in_key(song: Song) -> float | None:
    scale = set(scale_pitch_classes(song.key))
    changes = sorted(song.chords)
    per_bar = song.spec.positions_per_bar
    inside = total = 0
    for i, chord in enumerate(changes):
        start = chord.bar * per_bar + chord.position
        end = changes[i + 1].bar * per_bar + changes[i + 1].position if i + 1 < len(changes) else song.n_bars * per_bar
        tones = set(chord_pitch_classes(chord.label))
        if tones and end > start:
            total += end - start
            inside += (end - start) * (tones <= scale)
    return inside / total if total else None


def measures(song: Song) -> dict[str, float | None]:
    melody = [n.pitch for n in song.tracks["MELODY"]]
    bridge = [n.pitch for n in song.tracks["BRIDGE"]]
    guarded_notes = len(melody) + len(bridge)
    notes_outside = sum(1 for found in outside_guard(song) if not found.startswith("chord"))
    return {
        "MELODY scale consistency": scale_consistency(melody),
        "MELODY in the key's scale": in_key(melody, song.key),
        "chord time in the key's scale": chord_time_in_key(song),
        "MELODY pitch range": float(max(melody) - min(melody)) if melody else None,
        "BRIDGE pitch range": float(max(bridge) - min(bridge)) if bridge else None,
        "notes outside the guard": notes_outside / guarded_notes if guarded_notes else None,
    }


def summary(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for name in rows[0]:
        values = [r[name] for r in rows if r[name] is not None]
        if values:
            q1, q3 = np.quantile(values, [0.25, 0.75])
            out[name] = {"median": statistics.median(values), "q1": float(q1), "q3": float(q3), "n": len(values)}
    return out


def pop909_test_songs(root: Path, vocab) -> list[Song]:
    """The kept POP909 songs of the test split, quantized as the preparation job stores them."""
    from musicray.data.pop909 import load_song, song_ids
    from musicray.data.prepare import split_of
    from musicray.quantize import quantized
    from musicray.song import SongError

    songs = []
    for song_id in song_ids(root):
        if split_of(song_id) == "test":
            try:
                songs.append(quantized(load_song(root, song_id)[0], vocab))
            except SongError:
                continue
    return songs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run dir with stage1/model and adapters/")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="prepared POP909 data dir (its test split)")
    source.add_argument("--pop909", type=Path, help="POP909 root: its test-split songs read directly")
    parser.add_argument("--songs", type=int, default=16)
    parser.add_argument("--max-bars", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON of the figures")
    args = parser.parse_args(argv)
    composer = Composer(args.run)
    songs = split_songs(args.data) if args.data else pop909_test_songs(args.pop909, composer.music.vocab)
    windows = eval_windows(songs, args.songs, args.max_bars, composer.music.vocab, args.seed)
    result = {"command": "python benchmarks/harmony_guard.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "load_before": os.getloadavg()[0], "songs": len(windows),
              "scale_consistency": scale_consistency_source()}
    rows = {"real": [measures(w.song) for w in windows]}
    for guard in (True, False):
        requests = [dataclasses.replace(w.request, harmony_guard=guard) for w in windows]
        started = time.perf_counter()
        composed = composer.run_stages([r.song() for r in requests], requests, isolate_failures=True)
        result[f"seconds guard {'on' if guard else 'off'}"] = round(time.perf_counter() - started, 1)
        ok = [c.song for c in composed if c.failed_stage is None]
        result[f"failed guard {'on' if guard else 'off'}"] = len(composed) - len(ok)
        rows["guard on" if guard else "guard off"] = [measures(song) for song in ok]
    result["load_after"] = os.getloadavg()[0]
    result["figures"] = {name: summary(r) for name, r in rows.items()}
    names = list(result["figures"]["real"])
    print(f"| measure (median [q1, q3] over {len(windows)} songs) | guard on | guard off | real |")
    print("|---|---|---|---|")
    for name in names:
        cells = []
        for column in ("guard on", "guard off", "real"):
            f = result["figures"][column].get(name)
            cells.append(f"{f['median']:.3g} [{f['q1']:.3g}, {f['q3']:.3g}]" if f else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print({k: v for k, v in result.items() if k != "figures"})
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

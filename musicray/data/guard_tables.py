"""Measure the harmony guard's tables on POP909's training split and write them as package data.

    python -m musicray.data.guard_tables            # writes musicray/harmony_guard.json

Per key mode, the chords (degree of the key and quality, as the degree language writes them) that cover
``--chord-share`` of the chord time: each chord_midi.txt segment is counted in seconds against the key that
key_audio.txt gives at its middle (a modulating song counts each part in its own key); no-chord time is not chord
time. Per melodic track, the register: the narrowest pitch range that leaves out at most half of
``1 - --register-share`` of the track's notes on each side. And, for the record, how many real notes the guard's
pitch rule keeps (in the key's scale or the sounding chord, and in the register): the share the guard trades away.
"""

from __future__ import annotations

import argparse
import bisect
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from musicray.data.pop909 import SongFiles, default_pop909_dir, read_midi, song_ids
from musicray.data.prepare import split_of
from musicray.harmony import (DEGREE_NAMES, KEY_MODES, canonical_key, chord_pitch_classes,
                              parse_chord, parse_key, scale_pitch_classes)
from musicray.harmony_guard import GUARD_TABLES_PATH, GUARDED_TRACKS
from musicray.song import SongError

KEY_AUDIO_FILE = "POP909/{id}/key_audio.txt"


def _segments(path: Path) -> list[tuple[float, float, str]]:
    """(start s, end s, label) rows of a chord_midi.txt or key_audio.txt."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            start, end, label = line.split("\t")
            rows.append((float(start), float(end), label.strip()))
    return rows


def _sounding(segments: list[tuple[float, float, str]]):
    """label_at(seconds): the label of the last segment starting at or before it (the first one before any)."""
    starts = [start for start, _, _ in segments]

    def label_at(seconds: float) -> str:
        return segments[max(bisect.bisect_right(starts, seconds) - 1, 0)][2]
    return label_at


def measure_song(root: Path, song_id: str) -> dict:
    """One song's chord seconds per (mode, degree, quality), and its guarded tracks' pitches with whether each
    note is in the key's scale or the sounding chord."""
    files = SongFiles(root, song_id)
    keys = [(s, e, canonical_key(k)) for s, e, k in _segments(root / KEY_AUDIO_FILE.format(id=song_id))]
    chords = _segments(files.path("chords"))
    key_at, chord_at = _sounding(keys), _sounding(chords or [(0.0, 0.0, "N")])
    chord_seconds: Counter = Counter()
    for start, end, label in chords:
        root_pc, quality, _ = parse_chord(label)
        if root_pc is None or end <= start:
            continue
        tonic, mode = parse_key(key_at((start + end) / 2))
        chord_seconds[mode, DEGREE_NAMES[(root_pc - tonic) % 12], quality] += end - start
    tracks = read_midi(files)
    notes = {}
    for name in GUARDED_TRACKS:
        onsets, pitches = tracks[name].starts, tracks[name].pitches
        allowed = []
        for onset, pitch in zip(onsets.tolist(), pitches.tolist()):
            key, chord = key_at(onset), chord_at(onset)
            allowed.append(pitch % 12 in set(scale_pitch_classes(key)) | set(chord_pitch_classes(chord)))
        notes[name] = (pitches.astype(int).tolist(), allowed)
    return {"chord_seconds": chord_seconds, "notes": notes}


def covering(counts: Counter, share: float) -> list:
    """The most frequent keys of ``counts`` whose total first reaches ``share`` of the whole."""
    total, kept, running = sum(counts.values()), [], 0.0
    for item, value in counts.most_common():
        if running >= share * total:
            break
        kept.append(item)
        running += value
    return kept


def register(pitches: np.ndarray, share: float) -> tuple[int, int]:
    """The pitch range that leaves out at most (1 - share) / 2 of the notes below and above."""
    tail = (1 - share) / 2
    return int(np.quantile(pitches, tail, method="higher")), int(np.quantile(pitches, 1 - tail, method="lower"))


def build_tables(root: Path, chord_share: float, register_share: float, split: str = "train") -> dict:
    ids = [song_id for song_id in song_ids(root) if split_of(song_id) == split]
    chord_seconds: Counter = Counter()
    pitches: dict[str, list[int]] = {name: [] for name in GUARDED_TRACKS}
    in_harmony: dict[str, list[bool]] = {name: [] for name in GUARDED_TRACKS}
    skipped = []
    for song_id in ids:
        try:
            measured = measure_song(root, song_id)
        except (SongError, OSError, ValueError) as err:   # a song whose files are missing or unreadable
            skipped.append(f"{song_id}: {err}")
            continue
        chord_seconds.update(measured["chord_seconds"])
        for name, (song_pitches, allowed) in measured["notes"].items():
            pitches[name] += song_pitches
            in_harmony[name] += allowed
    chords, chord_cover = {}, {}
    for mode in KEY_MODES:
        counts = Counter({(degree, quality): s for (m, degree, quality), s in chord_seconds.items() if m == mode})
        kept = covering(counts, chord_share)
        chords[mode] = [f"{degree}:{quality}" for degree, quality in kept]
        chord_cover[mode] = {"chords_used": len(counts), "chords_kept": len(kept),
                             "chord_seconds": round(sum(counts.values()), 1),
                             "share_covered": round(sum(counts[k] for k in kept) / sum(counts.values()), 4)}
    registers, note_cover = {}, {}
    for name in GUARDED_TRACKS:
        values, allowed = np.asarray(pitches[name]), np.asarray(in_harmony[name])
        low, high = register(values, register_share)
        inside = (values >= low) & (values <= high)
        registers[name] = [low, high]
        note_cover[name] = {"notes": int(len(values)), "in_register": round(float(inside.mean()), 4),
                            "in_scale_or_chord": round(float(allowed.mean()), 4),
                            "kept_by_guard": round(float((inside & allowed).mean()), 4),
                            "lowest": int(values.min()), "highest": int(values.max())}
    return {
        "format": "musicray-harmony-guard/1",
        "command": " ".join(["python -m musicray.data.guard_tables", shlex.join(sys.argv[1:])]).strip(),
        "source": f"POP909 {split} split ({len(ids) - len(skipped)} songs): chord_midi.txt, key_audio.txt, "
                  f"the MIDI's {' and '.join(GUARDED_TRACKS)} tracks",
        "chord_share": chord_share, "register_share": register_share,
        "chords": chords, "registers": registers,
        "measured": {"chords": chord_cover, "notes": note_cover, "skipped": skipped},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m musicray.data.guard_tables", description=__doc__.splitlines()[0])
    parser.add_argument("--pop909", type=Path, default=None, help="POP909 root (default $POP909_DIR)")
    parser.add_argument("--chord-share", type=float, default=0.99, help="share of chord time the chords cover")
    parser.add_argument("--register-share", type=float, default=0.99, help="share of notes inside the register")
    parser.add_argument("--out", type=Path, default=GUARD_TABLES_PATH, help="where to write the JSON")
    args = parser.parse_args(argv)
    tables = build_tables(args.pop909 or default_pop909_dir(), args.chord_share, args.register_share)
    args.out.write_text(json.dumps(tables, indent=1) + "\n")
    for mode in KEY_MODES:
        print(f"{mode}: {tables['measured']['chords'][mode]} -> {' '.join(tables['chords'][mode])}")
    for name in GUARDED_TRACKS:
        print(f"{name}: register {tables['registers'][name]} {tables['measured']['notes'][name]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

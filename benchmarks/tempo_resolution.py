"""How much timing each tempo resolution keeps: per beat vs per bar vs per song, integer bpm, on POP909.

Every song that ``musicray.data.pop909.load_song`` ingests carries one tempo per beat of its labelled bars (60 /
the beat's interval in beat_midi.txt, so the performed beat times). From a tempo track one rebuilds beat onset
times in seconds (from bar 0's downbeat: ``t[k+1] = t[k] + 60 / bpm[k]``); this script compares the rebuilt
times with the performed ones for several encodings of the tempo track:

    per beat, integer       every beat's tempo, rounded to an integer bpm in 30..240 (a <Tempo> per beat)
    per bar, integer        the bar's harmonic-mean tempo, integer bpm: what musicray encodes (bar_tempos)
    per bar, exact          the same, unrounded: isolates the per-bar choice from the integer rounding
    per bar, carried        per bar, integer, each bar's integer chosen so that its end lands as near as it can
                            to the performed downbeat (the rounding error is carried into the next bar)
    per bar, 0.5 bpm        per bar, rounded to half a bpm (a Tempo family twice as large)
    per song, integer       one tempo, the header's base tempo (median bar tempo)

and reports the absolute beat-time error (ms) over all beats and over downbeats (including the song's final
barline; beat 0 is exact by construction and left out), for all songs and for the songs whose tempo is not
constant (the others are exact under every option but the per-song one, up to rounding), the tempo tokens per
song, and how many songs vary in tempo at the beat and bar level.

    python benchmarks/tempo_resolution.py [--pop909 DIR] [--workers 2] [--limit N]

Takes about a minute on two cores. docs/tokens.md records its output.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from musicray.data.pop909 import default_pop909_dir, load_song, read_index
from musicray.quantize import bar_tempos
from musicray.song import Song, SongError
from musicray.streams import DEFAULT_BPM
from musicray.tokens import Vocabulary

VOCAB = Vocabulary()
OPTIONS: tuple[str, ...] = ("per beat, integer", "per bar, integer", "per bar, exact", "per bar, carried",
                            "per bar, 0.5 bpm", "per song, integer")


def beat_tempos(song: Song) -> np.ndarray:
    """The tempo sounding at every beat of every bar (the same walk as ``bar_tempos``)."""
    spec = song.spec
    tempos = sorted(song.tempos)
    result, index, current = [], 0, (tempos[0].bpm if tempos else DEFAULT_BPM)
    for bar in range(song.n_bars):
        for beat in range(spec.beats_per_bar):
            here = (bar, beat * spec.positions_per_beat)
            while index < len(tempos) and (tempos[index].bar, tempos[index].position) <= here:
                current = tempos[index].bpm
                index += 1
            result.append(current)
    return np.array(result, dtype=float)


def quantize(bpm) -> np.ndarray:
    """Vocabulary.quantize_tempo, vectorized (np.rint rounds half to even, as Python's round)."""
    return np.clip(np.rint(bpm), VOCAB.config.tempo_min, VOCAB.config.tempo_max)


def times(per_beat_bpm: np.ndarray) -> np.ndarray:
    """Onset of beats 0..N (N: the final barline), seconds from bar 0's downbeat."""
    return np.concatenate([[0.0], np.cumsum(60.0 / per_beat_bpm)])


def carried_bar_tempos(performed: np.ndarray, beats_per_bar: int) -> np.ndarray:
    """Integer bar tempos chosen bar by bar so that each rebuilt downbeat is the nearest to the performed one."""
    downbeats = times(performed)[::beats_per_bar]
    rebuilt, result = 0.0, []
    for target in downbeats[1:]:
        bpm = float(quantize(beats_per_bar * 60.0 / max(target - rebuilt, 1e-6)))
        result.append(bpm)
        rebuilt += beats_per_bar * 60.0 / bpm
    return np.array(result)


def measure_song(task: tuple[Path, dict]) -> dict:
    root, row = task
    try:
        song, _ = load_song(root, row["song_id"], row)
    except SongError as err:
        return {"song_id": row["song_id"], "skipped": getattr(err, "reason", "invalid_song")}
    bpb = song.spec.beats_per_bar
    performed = beat_tempos(song)
    bars_exact = np.array(bar_tempos(song))
    bars_int = np.array([VOCAB.quantize_tempo(b) for b in bars_exact], dtype=float)
    base = float(VOCAB.quantize_tempo(statistics.median(bars_int)))  # quantize.base_tempo of the quantized song
    tracks = {
        "per beat, integer": quantize(performed),
        "per bar, integer": np.repeat(bars_int, bpb),
        "per bar, exact": np.repeat(bars_exact, bpb),
        "per bar, carried": np.repeat(carried_bar_tempos(performed, bpb), bpb),
        "per bar, 0.5 bpm": np.repeat(np.clip(np.rint(bars_exact * 2) / 2, VOCAB.config.tempo_min,
                                              VOCAB.config.tempo_max), bpb),
        "per song, integer": np.full(len(performed), base),
    }
    truth = times(performed)
    errors = {name: np.abs(times(track) - truth)[1:] * 1000.0 for name, track in tracks.items()}
    beat_int = tracks["per beat, integer"]
    return {
        "song_id": song.song_id, "beats": len(performed), "bars": song.n_bars, "sections": len(song.sections),
        "bpb": bpb, "errors": errors,
        "tokens": {name: len(performed) if name.startswith("per beat") else song.n_bars if name.startswith("per bar")
                   else 1 for name in tracks},
        "changes": {name: 1 + int(np.count_nonzero(np.diff(track))) for name, track in tracks.items()},
        "beat_varies": bool(np.ptp(performed) > 1e-3),
        "beat_int_varies": bool(np.ptp(beat_int) > 0),
        "bar_int_varies": bool(np.ptp(bars_int) > 0),
        "bar_max_dev": float(np.max(np.abs(bars_exact - base)) / base),
        "non_integer": bool(np.any(np.abs(performed - np.rint(performed)) > 1e-3)),
        "clipped": bool(np.any((performed < VOCAB.config.tempo_min) | (performed > VOCAB.config.tempo_max))),
    }


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def error_table(kept: list[dict]) -> str:
    lines = ["| tempo track | tempo tokens / song: median, mean (only changes: mean) | "
             "all beats: median / p95 / p99 / max ms | downbeats: median / p95 / p99 / max ms | "
             "songs with a beat off > 50 ms |",
             "|---|---:|---:|---:|---:|"]
    for name in OPTIONS:
        every = np.concatenate([r["errors"][name] for r in kept])
        down = np.concatenate([r["errors"][name][r["bpb"] - 1::r["bpb"]] for r in kept])
        tokens = [r["tokens"][name] for r in kept]
        off = sum(1 for r in kept if r["errors"][name].max() > 50.0)
        changes = statistics.mean(r["changes"][name] for r in kept)
        lines.append(f"| {name} | {statistics.median(tokens):.0f}, {statistics.mean(tokens):.1f} ({changes:.1f}) | "
                     f"{np.median(every):.1f} / {pct(every, 95):.1f} / {pct(every, 99):.0f} / {every.max():.0f} | "
                     f"{np.median(down):.1f} / {pct(down, 95):.1f} / {pct(down, 99):.0f} / {down.max():.0f} | "
                     f"{off} |")
    return "\n".join(lines)


def variation_table(kept: list[dict]) -> str:
    n = len(kept)

    def line(label: str, count: int) -> str:
        return f"| {label} | {count} | {100.0 * count / n:.1f}% |"

    changes = {name: [r["changes"][name] for r in kept] for name in ("per beat, integer", "per bar, integer")}
    off_integer = sum(r["non_integer"] for r in kept)
    return "\n".join([
        f"| of {n} ingested songs | songs | share |", "|---|---:|---:|",
        line("performed beat tempo not constant (any change > 0.001 bpm)", sum(r["beat_varies"] for r in kept)),
        line("integer beat tempo not constant", sum(r["beat_int_varies"] for r in kept)),
        line("integer bar tempo not constant (bar-level ritardando/rubato)", sum(r["bar_int_varies"] for r in kept)),
        line("a bar's tempo more than 2% from the base tempo", sum(r["bar_max_dev"] > 0.02 for r in kept)),
        line("a bar's tempo more than 5% from the base tempo", sum(r["bar_max_dev"] > 0.05 for r in kept)),
        line("some beat's tempo not an integer bpm", off_integer),
        line("constant tempo, but not an integer bpm (e.g. 58.5 throughout)",
             sum(r["non_integer"] and not r["beat_varies"] for r in kept)),
        line("a beat slower than 30 or faster than 240 bpm (clipped)", sum(r["clipped"] for r in kept)),
        "",
        "tempo tokens if a tempo were written only where it changes (median / mean / max per song): "
        + "; ".join(f"{name}: {statistics.median(c):.0f} / {statistics.mean(c):.1f} / {max(c)}"
                    for name, c in changes.items()),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pop909", type=Path, default=default_pop909_dir(), help="POP909 dataset root")
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument("--limit", type=int, default=None, help="only the first N songs")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rows = read_index(args.pop909).to_dict("records")[:args.limit]
    with Pool(args.workers) as pool:
        results = pool.map(measure_song, [(args.pop909, row) for row in rows], chunksize=4)
    kept = [r for r in results if "skipped" not in r]
    skipped = Counter(r["skipped"] for r in results if "skipped" in r)
    beats, bars = sum(r["beats"] for r in kept), sum(r["bars"] for r in kept)
    varying = [r for r in kept if r["beat_varies"]]
    print(f"{len(kept)} of {len(results)} songs ingested (skipped: {dict(sorted(skipped.items()))}); "
          f"{beats} beats, {bars} bars", "", f"All {len(kept)} ingested songs:", "", error_table(kept), "",
          f"The {len(varying)} songs whose performed tempo is not constant:", "", error_table(varying), "",
          variation_table(kept), sep="\n")
    print(f"\n{len(results)} songs in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""How far rounding POP909's performed onsets to a grid moves them, for grids of 2..12 steps per beat.

For every song with a supported metre, every note onset (all three tracks) is placed on the beat rows of
beat_midi.txt (as the ingest does), rounded to the grid, and mapped back to seconds; the displacement is the
distance between the two times. Reported separately for simple (4/4, 3/4) and compound (12/8) songs: the share
of onsets moved by more than 30 ms and the median displacement. The same run ingests all songs with
``musicray.data.pop909.load_song`` and reports the keep rate by skip reason.

    python benchmarks/quantization_grid.py [--pop909 DIR] [--workers 2] [--per-song]

Takes one to three minutes on two cores. docs/quantization.md records its output.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from musicray.data.pop909 import (
    IngestError, SongFiles, default_pop909_dir, load_song, read_beat_times, read_index, read_midi, rows_to_seconds,
    seconds_to_rows,
)

GRIDS: tuple[int, ...] = (2, 3, 4, 6, 8, 12)
THRESHOLD_MS = 30.0
METRE_KIND: dict[str, str] = {"4/4": "simple", "3/4": "simple", "12/8": "compound"}


def onset_displacements_ms(root: Path, song_id: str) -> dict[int, np.ndarray]:
    """Per grid, the displacement (ms) of every onset of the song when rounded to that grid."""
    files = SongFiles(root, song_id)
    beat_times = read_beat_times(files)
    starts = np.concatenate([track.starts for track in read_midi(files).values()])
    rows = seconds_to_rows(beat_times, starts)
    return {grid: np.abs(rows_to_seconds(beat_times, np.rint(rows * grid) / grid) - starts) * 1000.0
            for grid in GRIDS}


def measure_song(task: tuple[Path, dict]) -> dict:
    root, row = task
    result = {"song_id": row["song_id"], "metre": row["metre"]}
    try:
        _, stats = load_song(root, row["song_id"], row)
        result["reason"] = "kept"
        result["notes_total"], result["notes_dropped"] = stats["notes_total"], stats["notes_dropped"]
    except IngestError as err:
        result["reason"] = err.reason
    if isinstance(row["metre"], str):
        try:
            result["displacement_ms"] = onset_displacements_ms(root, row["song_id"])
        except IngestError:
            pass
    return result


def grid_table(results: list[dict]) -> str:
    lines = ["| steps per beat | simple: % onsets moved > 30 ms | simple: median ms | "
             "compound: % onsets moved > 30 ms | compound: median ms |",
             "|---:|---:|---:|---:|---:|"]
    for grid in GRIDS:
        cells = [str(grid)]
        for kind in ("simple", "compound"):
            moved = np.concatenate([r["displacement_ms"][grid] for r in results
                                    if "displacement_ms" in r and METRE_KIND[r["metre"]] == kind])
            cells += [f"{100.0 * np.mean(moved > THRESHOLD_MS):.1f}", f"{np.median(moved):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def moved_percent(result: dict) -> dict[int, float]:
    return {g: 100.0 * float(np.mean(result["displacement_ms"][g] > THRESHOLD_MS)) for g in GRIDS}


def coarsest_good_grid(moved: dict[int, float]) -> int:
    """The coarsest grid that moves at most 2 points more onsets than the best grid for the song."""
    return min(g for g in GRIDS if moved[g] <= min(moved.values()) + 2.0)


def songs_by_grid_table(results: list[dict]) -> str:
    lines = ["| songs whose coarsest grid within 2 points of their best is | " + " | ".join(map(str, GRIDS)) + " |",
             "|---|" + "---:|" * len(GRIDS)]
    for kind in ("simple", "compound"):
        counts = Counter(coarsest_good_grid(moved_percent(r)) for r in results
                         if "displacement_ms" in r and METRE_KIND[r["metre"]] == kind)
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(g, 0)) for g in GRIDS) + " |")
    return "\n".join(lines)


def per_song_table(results: list[dict], kind: str) -> str:
    lines = ["song  metre  " + "  ".join(f"{g:>5}" for g in GRIDS) + "  coarsest within 2 points"]
    for r in results:
        if "displacement_ms" in r and METRE_KIND[r["metre"]] == kind:
            moved = moved_percent(r)
            lines.append(f"{r['song_id']}   {r['metre']:>5}  " + "  ".join(f"{moved[g]:5.1f}" for g in GRIDS)
                         + f"  {coarsest_good_grid(moved)}")
    return "\n".join(lines)


def keep_table(results: list[dict]) -> str:
    counts = Counter(r["reason"] for r in results)
    kept = counts.pop("kept", 0)
    lines = [f"kept {kept} of {len(results)} songs ({100.0 * kept / len(results):.1f}%)", "",
             "| skip reason | songs |", "|---|---:|"]
    lines += [f"| {reason} | {n} |" for reason, n in counts.most_common()]
    dropped = sum(r.get("notes_dropped", 0) for r in results)
    total = sum(r.get("notes_total", 0) for r in results)
    lines += ["", f"notes outside the labelled bars in kept songs: {dropped} of {total} "
                  f"({100.0 * dropped / total:.2f}%)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pop909", type=Path, default=default_pop909_dir(), help="POP909 dataset root")
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument("--per-song", action="store_true", help="also print the grid figures of each compound song")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rows = read_index(args.pop909).to_dict("records")
    with Pool(args.workers) as pool:
        results = pool.map(measure_song, [(args.pop909, row) for row in rows], chunksize=4)
    print(grid_table(results), "", songs_by_grid_table(results), "", keep_table(results), sep="\n")
    if args.per_song:
        print("", per_song_table(results, "compound"), sep="\n")
    print(f"\n{len(results)} songs in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""Data preparation speed: musicray's Ray job vs MidiTok's REMI tokenizer, on the same POP909 songs and cores.

musicray: ``musicray.data.prepare.prepare(Pop909Source(root), tmpdir)`` (a local Ray instance with ``--workers``
CPUs): per song it reads the MIDI and the annotations, aligns the labelled bars to the beats, quantizes, encodes
the six task sequences and, at the end, writes the Parquet tables. Ray start-up (``ensure_ray``) is timed apart
from the ``prepare`` call, each repeat on a fresh Ray instance.

MidiTok: ``miditok.REMI`` tokenizing ``POP909/<id>/<id>.mid`` (``tokenizer.encode(path)``, which loads a
``symusic.Score``) and sending the token ids back to the parent; no annotation is read and nothing is written.
The config is chosen to be comparable with musicray's vocabulary: 32 velocity bins, tempo tokens (211 of them,
30..240 bpm, as musicray's integer tempos), a 16th-note grid up to 16 beats (musicray's 64-step longest
note), all 128 pitches, time signatures on, one sequence per track (``use_programs=False``: POP909's three tracks
are all program 0), sustain pedals off (musicray ignores them), chords off (musicray takes the annotated chords;
``--miditok-chords`` turns MidiTok's chord detection on). It runs in a ``multiprocessing`` pool of ``--workers``
spawned processes (start-up: spawning them and building a tokenizer in each, timed apart) and in one process.

    python benchmarks/prepare_vs_miditok.py [--pop909 DIR] [--limit N] [--repeat K] [--workers 2]
                                            [--miditok-chords] [--serial-musicray]

The repeats alternate which side goes first; the table gives medians. Besides wall time it gives CPU seconds
(user + system of the process and its descendants: Ray's processes, the pool's workers), which load from other
jobs on the machine inflates much less than wall time. ``--serial-musicray`` adds musicray's
``prepare_one`` in a loop in this process (no Ray, no Parquet), to separate Ray's cost from the per-song work.
On 2 cores the 909 songs take about 3 minutes per repeat. docs/benchmarks.md records the output.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

# Heavy imports (ray, musicray, miditok) stay inside functions, so that spawned MidiTok workers import only
# miditok and their start-up is not charged with Ray's import.

_TOKENIZER = None


def cpu_seconds(children: bool = True) -> float:
    """User + system CPU seconds of this process and (by default) its living descendants (Ray's processes,
    the pool's workers): a figure that other load on the machine inflates much less than wall time."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me, *(me.children(recursive=True) if children else [])]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def make_tokenizer(chords: bool = False):
    import miditok

    config = miditok.TokenizerConfig(
        pitch_range=(0, 127), beat_res={(0, 16): 4}, num_velocities=32, use_velocities=True,
        use_tempos=True, num_tempos=211, tempo_range=(30, 240), use_time_signatures=True,
        use_chords=chords, use_programs=False, use_sustain_pedals=False, use_rests=False,
    )
    return miditok.REMI(config)


def _init_worker(chords: bool) -> None:
    global _TOKENIZER
    _TOKENIZER = make_tokenizer(chords)


def _ready(_: int) -> int:
    time.sleep(0.05)  # let each worker take one, so that every worker has finished its initializer
    return os.getpid()


def tokenize(path: str) -> list[list[int]]:
    """Token ids of one MIDI file, one list per track."""
    sequences = _TOKENIZER.encode(Path(path))
    if not isinstance(sequences, list):
        sequences = [sequences]
    return [list(sequence.ids) for sequence in sequences]


def midi_paths(root: Path, song_ids: list[str]) -> list[str]:
    return [str(root / "POP909" / song_id / f"{song_id}.mid") for song_id in song_ids]


def run_miditok_pool(paths: list[str], workers: int, chords: bool) -> dict:
    cpu, started = cpu_seconds(), time.perf_counter()
    with get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(chords,)) as pool:
        while len(set(pool.map(_ready, range(workers), chunksize=1))) < workers:
            pass
        up = time.perf_counter()
        results = pool.map(tokenize, paths, chunksize=8)
        done = time.perf_counter()
        cpu = cpu_seconds() - cpu
    return {"startup": up - started, "work": done - up, "total": done - started, "cpu": cpu,
            "tokens": sum(len(ids) for song in results for ids in song)}


def run_miditok_serial(paths: list[str], chords: bool) -> dict:
    cpu, started = cpu_seconds(False), time.perf_counter()
    _init_worker(chords)
    up = time.perf_counter()
    tokens = sum(len(ids) for path in paths for ids in tokenize(path))
    done = time.perf_counter()
    return {"startup": up - started, "work": done - up, "total": done - started,
            "cpu": cpu_seconds(False) - cpu, "tokens": tokens}


def run_musicray(root: Path, limit: int | None, workers: int) -> dict:
    import pandas as pd
    import ray

    from musicray.data.layout import DataDir
    from musicray.data.prepare import Pop909Source, ensure_ray, prepare
    from musicray.tokens import TASKS

    if ray.is_initialized():
        ray.shutdown()
    cpu, started = cpu_seconds(), time.perf_counter()
    ensure_ray(workers)
    up = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="musicray-bench-") as out:
        report = prepare(Pop909Source(str(root)), out, limit=limit, num_cpus=workers, progress=False)
        done = time.perf_counter()
        cpu = cpu_seconds() - cpu  # Ray's processes are this process's descendants until ray.shutdown()
        tokens = 0
        for task in TASKS:
            table = pd.read_parquet(DataDir(out).table(task), columns=["prompt_len", "target_len"])
            tokens += int(table["prompt_len"].sum() + table["target_len"].sum())
    ray.shutdown()
    return {"startup": up - started, "work": done - up, "total": done - started, "cpu": cpu, "tokens": tokens,
            "kept": report["kept"]}


def run_musicray_serial(root: Path, song_ids: list[str]) -> dict:
    from musicray.data.prepare import Pop909Source, prepare_one
    from musicray.tokens import Vocabulary

    cpu, started = cpu_seconds(False), time.perf_counter()
    source, vocab = Pop909Source(str(root)), Vocabulary()
    up = time.perf_counter()
    results = [prepare_one(source, song_id, vocab) for song_id in song_ids]
    done = time.perf_counter()
    cpu = cpu_seconds(False) - cpu
    tokens = sum(row["prompt_len"] + row["target_len"] for r in results if "examples" in r
                 for row in r["examples"].values())
    return {"startup": up - started, "work": done - up, "total": done - started, "cpu": cpu, "tokens": tokens,
            "kept": sum(1 for r in results if "song" in r)}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def table(runs: dict[str, list[dict]], songs: int) -> str:
    lines = ["| pipeline | start-up s | work s | total s | songs/s (total) | CPU s | tokens out | "
             "musicray total / this total |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    reference = median_of(runs["musicray prepare (Ray)"], "total")
    for name, results in runs.items():
        total = median_of(results, "total")
        lines.append(f"| {name} | {median_of(results, 'startup'):.2f} | {median_of(results, 'work'):.2f} | "
                     f"{total:.2f} | {songs / total:.1f} | {median_of(results, 'cpu'):.1f} | "
                     f"{results[0]['tokens']:,} | {reference / total:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from musicray.data.pop909 import default_pop909_dir, song_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pop909", type=Path, default=default_pop909_dir(), help="POP909 dataset root")
    parser.add_argument("--limit", type=int, default=None, help="only the first N songs")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each pipeline; the table gives medians")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes / Ray CPUs for both sides")
    parser.add_argument("--miditok-chords", action="store_true", help="MidiTok detects chords (use_chords=True)")
    parser.add_argument("--serial-musicray", action="store_true",
                        help="also time musicray's prepare_one in one process (no Ray, no Parquet)")
    args = parser.parse_args(argv)

    make_tokenizer(args.miditok_chords)  # fails here, not in a pool that would respawn failing workers forever
    ids = song_ids(args.pop909)[:args.limit]
    paths = midi_paths(args.pop909, ids)
    pool_name = f"MidiTok REMI, Pool({args.workers})"
    runs: dict[str, list[dict]] = {"musicray prepare (Ray)": [], pool_name: [], "MidiTok REMI, 1 process": []}
    if args.serial_musicray:
        runs["musicray prepare_one, 1 process"] = []
    print(f"{len(ids)} songs, {args.workers} workers, {os.cpu_count()} CPUs, Python {platform.python_version()}",
          flush=True)
    for repeat in range(args.repeat):
        order = ["musicray", "miditok"] if repeat % 2 == 0 else ["miditok", "musicray"]
        for side in order:
            if side == "musicray":
                run = run_musicray(args.pop909, args.limit, args.workers)
                runs["musicray prepare (Ray)"].append(run)
                print(f"repeat {repeat + 1}: musicray (Ray) start-up {run['startup']:.2f} s, prepare {run['work']:.2f} s, "
                      f"CPU {run['cpu']:.1f} s, kept {run['kept']} of {len(ids)}", flush=True)
            else:
                run = run_miditok_pool(paths, args.workers, args.miditok_chords)
                runs[pool_name].append(run)
                print(f"repeat {repeat + 1}: {pool_name} start-up {run['startup']:.2f} s, work {run['work']:.2f} s, "
                      f"CPU {run['cpu']:.1f} s", flush=True)
                run = run_miditok_serial(paths, args.miditok_chords)
                runs["MidiTok REMI, 1 process"].append(run)
                print(f"repeat {repeat + 1}: MidiTok 1 process {run['total']:.2f} s, CPU {run['cpu']:.1f} s", flush=True)
        if args.serial_musicray:
            run = run_musicray_serial(args.pop909, ids)
            runs["musicray prepare_one, 1 process"].append(run)
            print(f"repeat {repeat + 1}: musicray prepare_one, 1 process {run['total']:.2f} s, CPU {run['cpu']:.1f} s",
                  flush=True)

    print()
    print(table(runs, len(ids)))
    musicray = runs["musicray prepare (Ray)"]
    miditok = runs[pool_name]
    print(f"\nratio musicray / MidiTok, both on {args.workers} processes: total (with start-ups) "
          f"{median_of(musicray, 'total') / median_of(miditok, 'total'):.2f}, work only "
          f"{median_of(musicray, 'work') / median_of(miditok, 'work'):.2f}, CPU seconds "
          f"{median_of(musicray, 'cpu') / median_of(miditok, 'cpu'):.2f} (goal: <= 1.0); "
          f"medians of {args.repeat} repeat(s); MidiTok chords {'on' if args.miditok_chords else 'off'}")


if __name__ == "__main__":
    main()

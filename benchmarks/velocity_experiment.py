"""Velocity languages side by side: do the tracks play at their own levels? (issue 17, dynamics)

For each run (``NAME=RUN_DIR``; runs that differ in ``vocab.velocity`` only, e.g. the same stage-1 model with a
dynamics adapter trained in each language), on the same POP909 test windows (``--window form``, the evaluation's
``eval.window``: the first ``--max-bars`` bars of the first ``--songs`` test songs with a returning section):

* composed: the dynamics stage writes the velocities of the real window's notes (its own inputs only, mask on,
  the dynamics adapter, the run's sampling or ``--temperature``), as in a composed song, decoded into the window;
  per track the mean and the spread (population std) of its velocities, mean over songs with a 95 % bootstrap
  interval, against the real windows by the same code (``musicray.eval.metrics.velocity_stats``);
* teacher-forced: on the test split's dynamics examples (the training windows), the model's expected velocity (its
  probabilities over the ``Vel`` tokens, each read as the velocity it sounds at for the note's track) against the
  real one, per track: whether the model tells the tracks apart at all.

    .venv/bin/python benchmarks/velocity_experiment.py --data ~/.cache/musicray/data/pop909-all \\
        --run absolute=runs/velexp/s0-absolute --run track=runs/velexp/s0-track --songs 32 --max-bars 24

Prints Markdown tables; ``--json PATH`` writes the figures. docs/results.md keeps them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from musicray.compose import Composer
from musicray.encoding import decode_body
from musicray.eval.generation import eval_windows, split_songs, stage_streams
from musicray.eval.metrics import velocity_stats
from musicray.eval.structure import bootstrap_interval
from musicray.sampling import Sampling, stage_sampling
from musicray.song import TRACKS
from musicray.train.config import run_defaults
from musicray.train.data import load_examples

TASK = "dynamics"


def interval(values: list[float | None]) -> dict | None:
    found = bootstrap_interval(values)
    return dataclasses.asdict(found) if found else None


def per_track(songs) -> dict:
    """Per track: the interval over songs of each song's velocity mean and std (songs where the track is silent
    are left out)."""
    stats = [velocity_stats(song) for song in songs]
    return {track: {stat: interval([s[track][stat] for s in stats]) for stat in ("mean", "std")} for track in TRACKS}


def run_sampling(run_dir: Path, temperature: float | None) -> Sampling:
    """``--temperature`` where given, else the dynamics sampling the run was evaluated with (``run_defaults``: what
    generate, serve and the page use), else the default."""
    if temperature is not None:
        return Sampling(temperature=temperature)
    return stage_sampling(run_defaults(run_dir).stage_settings, Sampling(), "eval.sampling").get(TASK, Sampling())


def composed(composer: Composer, windows, sampling: Sampling) -> list:
    """The windows with the velocities the dynamics stage wrote for their notes."""
    streams = stage_streams(composer, windows, TASK, use_mask=True, sampling=sampling)
    songs = []
    for window, stream in zip(windows, streams):
        song = window.song.replace(tracks={name: list(notes) for name, notes in window.song.tracks.items()})
        decode_body(stream.tokens, TASK, song, composer.music.vocab)
        songs.append(song)
    return songs


@torch.no_grad()
def teacher_forced_levels(composer: Composer, data_dir: Path, examples: int, max_bars: int) -> dict:
    """Per track: the real velocity and the model's expected one (mean over notes) on the test examples."""
    music, vocab = composer.music, composer.music.vocab
    vel_ids = vocab.ids_of["Vel"]
    values = torch.tensor([vocab.value[i] for i in vel_ids], dtype=torch.float)
    offsets = vocab.velocity_offsets().tolist()
    found = {track: {"real": [], "expected": []} for track in TRACKS}
    for example in load_examples(data_dir, [TASK], "test", vocab, max_bars)[:examples]:
        # the track of each note of each bar, in the order of the prompt's notes (the dynamics order)
        bars, track = [], 0
        for token in example.prompt:
            family = vocab.family[token]
            if family == "Bar":
                bars.append([])
            elif family == "Track":
                track = vocab.value[token]
            elif family == "Pitch" and bars:
                bars[-1].append(track)
        tracks = [t for bar in bars for t in bar]
        ids, _ = music.render(example)
        start = len(ids) - len(example.target) - 1
        with composer.use_adapter(TASK):
            logits = composer.model(torch.tensor([ids])).logits[0]
        velocities = [j for j, token in enumerate(example.target) if vocab.family[token] == "Vel"]
        for k, j in enumerate(velocities[:len(tracks)]):
            probabilities = torch.softmax(logits[start + j - 1, [music.offset + i for i in vel_ids]], 0)
            offset = offsets[tracks[k]]
            found[TRACKS[tracks[k]]]["expected"].append(float((probabilities * values).sum()) + offset)
            found[TRACKS[tracks[k]]]["real"].append(vocab.value[example.target[j]] + offset)
    return {track: {key: (round(float(np.mean(v)), 1) if v else None) for key, v in rows.items()}
            | {"notes": len(rows["real"])} for track, rows in found.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR",
                        help="a run with a dynamics adapter (repeatable)")
    parser.add_argument("--data", type=Path, required=True, help="the prepared data dir (POP909)")
    parser.add_argument("--songs", type=int, default=32, help="test windows")
    parser.add_argument("--max-bars", type=int, default=24, help="bars per window")
    parser.add_argument("--window", default="form", choices=["form", "sections"],
                        help="which test windows (eval.window): with a returning section, or any sections")
    parser.add_argument("--temperature", type=float, default=None,
                        help="the dynamics stage's temperature (default: the run's evaluated sampling)")
    parser.add_argument("--tf-examples", type=int, default=40, help="teacher-forced test examples (0: none)")
    parser.add_argument("--tf-max-bars", type=int, default=4, help="bars per teacher-forced example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)
    songs = split_songs(args.data)
    results: dict = {}
    for name, run_dir in runs.items():
        composer = Composer(run_dir, adapters=(TASK,))
        sampling = run_sampling(Path(run_dir), args.temperature)
        windows = eval_windows(songs, args.songs, args.max_bars, composer.music.vocab, args.seed, kind=args.window)
        started = time.perf_counter()
        generated = composed(composer, windows, sampling)
        seconds = time.perf_counter() - started
        results.setdefault("real", per_track([w.song for w in windows]))
        results[name] = {"composed": per_track(generated), "sampling": dataclasses.asdict(sampling),
                         "velocity": composer.music.vocab.config.velocity, "seconds": round(seconds, 1),
                         "windows": len(windows),
                         "teacher_forced": (teacher_forced_levels(composer, args.data, args.tf_examples,
                                                                  args.tf_max_bars) if args.tf_examples else None)}
        print(f"{name}: {len(windows)} windows in {seconds:.0f} s", flush=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def cell(entry: dict | None) -> str:
    if not entry:
        return "–"
    spread = f" [{entry['low']:.1f}, {entry['high']:.1f}]" if entry.get("low") is not None else ""
    return f"{entry['mean']:.1f}{spread}"


def markdown(results: dict) -> str:
    names = [name for name in results if name != "real"]
    lines = ["| track | measure | real | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for track in TRACKS:
        for stat in ("mean", "std"):
            lines.append(f"| {track} | velocity {stat} | {cell(results['real'][track][stat])} | "
                         + " | ".join(cell(results[n]["composed"][track][stat]) for n in names) + " |")
    if any(results[n]["teacher_forced"] for n in names):
        lines += ["", "| track | teacher-forced: real | " + " | ".join(f"{n}: expected" for n in names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        first = next(results[n]["teacher_forced"] for n in names if results[n]["teacher_forced"])
        for track in TRACKS:
            lines.append(f"| {track} | {first[track]['real']} | "
                         + " | ".join(str((results[n]["teacher_forced"] or {}).get(track, {}).get("expected"))
                                      for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

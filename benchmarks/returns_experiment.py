"""Returning sections, composed: the same run, test forms and seeds at several ``variation`` settings.

For the first ``--songs`` test songs with a returning section in their first ``--max-bars`` bars (the evaluation's
``form`` windows), the composer writes those bars from the real window's form, key, metre and base tempo, once per
variation (``none``: the model alone decides; 0: every returning bar repeats its first occurrence; ...), mask on,
adapters, batched, the same seeds. Measured with ``musicray.eval.structure`` (MusPy where it has the measure, 95 %
bootstrap intervals over songs) against the real windows: same-label and different-label melody similarity,
returning bars identical to their first occurrence, MELODY scale consistency, chord time in the key's scale; and
the model forward calls per decode step of each stage (a batch's calls over the tokens its longest row writes:
1.0 is one call per token; copied bars that line up across the batch go through jump-forward).

    .venv/bin/python benchmarks/returns_experiment.py --run runs/pop909-tiny \\
        --data ~/.cache/musicray/data/pop909-... --songs 32 --max-bars 32 --variations none 0 0.4 1

Writes ``<out>/returns_experiment.json`` and prints a Markdown table (docs/results.md keeps the figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from musicray.compose import Composer
from musicray.eval.generation import compose_batch, eval_windows, split_songs
from musicray.eval.structure import song_structure_measures, structure_report
from musicray.tokens import SUBTASKS

SHOWN = ("same_label_similarity", "different_label_similarity", "returning_bars_identical",
         "scale_consistency_melody", "chord_time_in_scale")


def _variation(text: str) -> float | None:
    return None if text == "none" else float(text)


def run(args) -> dict:
    composer = Composer(args.run)
    songs = split_songs(args.data)
    results = {}
    for variation in args.variations:
        windows = eval_windows(songs, args.songs, args.max_bars, composer.music.vocab, args.seed, kind="form",
                               variation=variation)
        windows = [dataclasses.replace(w, request=dataclasses.replace(w.request, harmony_guard=not args.no_harmony_guard))
                   for w in windows]
        started = time.perf_counter()
        composed, calls, steps = [], dict.fromkeys(SUBTASKS, 0), dict.fromkeys(SUBTASKS, 0)
        for start in range(0, len(windows), args.batch):   # batches keep the KV cache small on a CPU
            batch = compose_batch(composer, [w.request for w in windows[start:start + args.batch]])
            composed += batch
            for task in SUBTASKS:   # a batch's decode call: its model calls, and the steps its longest row takes
                ran = [c.stages[task] for c in batch if task in c.stages]
                if ran:
                    calls[task] += ran[0]["forward_calls"]
                    steps[task] += max(info["new_tokens"] for info in ran)
        seconds = time.perf_counter() - started
        report = structure_report([c.song for c in composed], [w.song for w in windows], seed=args.seed)
        calls = {task: calls[task] / max(1, steps[task]) for task in SUBTASKS}
        results["none" if variation is None else f"{variation:g}"] = {
            "rows": {row["measure"]: row for row in report["rows"] if row["measure"] in SHOWN},
            "forward_calls_per_token": calls, "seconds": round(seconds, 1), "songs": len(windows),
            "bars": sum(w.song.n_bars for w in windows),
            "per_song": [song_structure_measures(c.song) for c in composed]}
        print(f"variation {variation}: {len(windows)} songs in {seconds:.0f} s", flush=True)
    return results


def markdown(results: dict) -> str:
    def cell(entry):
        if not entry:
            return "–"
        spread = f" [{entry['low']:.2f}, {entry['high']:.2f}]" if entry.get("low") is not None else ""
        return f"{entry['mean']:.2f}{spread}"

    first = next(iter(results.values()))
    lines = ["| measure | real (same windows) | " + " | ".join(f"variation {v}" for v in results) + " |",
             "|---|---|" + "---|" * len(results)]
    for measure in SHOWN:
        lines.append(f"| {measure} | {cell(first['rows'][measure]['real'])} | "
                     + " | ".join(cell(r["rows"][measure]["generated"]) for r in results.values()) + " |")
    for task in ("chord", "melody", "secondary", "dynamics"):
        lines.append(f"| model calls per decode step, {task} | – | "
                     + " | ".join(f"{r['forward_calls_per_token'][task]:.2f}" for r in results.values()) + " |")
    lines.append("| seconds to compose | – | " + " | ".join(f"{r['seconds']:.0f}" for r in results.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the prepared data the run was trained on")
    parser.add_argument("--songs", type=int, default=32)
    parser.add_argument("--max-bars", type=int, default=32)
    parser.add_argument("--variations", type=_variation, nargs="+", default=[None, 0.0, 0.4, 1.0])
    parser.add_argument("--no-harmony-guard", action="store_true", help="compose without the harmony guard")
    parser.add_argument("--batch", type=int, default=8, help="songs per decode call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--out", type=Path, default=Path("runs/returns"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "returns_experiment.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()

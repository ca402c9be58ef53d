"""Songs planned from words, measured: the share of the attributes ``musicray.prompt_plan.CHECKED_PROMPTS`` state that
the plans honour, with the instruct base and with music-tuned runs (their stage-1 model, adapters off: does full
fine-tuning on music tokens erase the text skill?).

    .venv/bin/python benchmarks/plan_experiment.py --planner base:smollm2-135m-instruct --planner run:RUN_DIR \\
        --out runs/plan-experiment.json

Prints one Markdown row per planner (docs/results.md keeps the figures), each miss, and the lengths the plans gave
each section word (``--length-prior off``: the model alone chooses them, without POP909's prior).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path

import torch

from musicray.request import Request
from musicray.prompt_plan import CHECKED_PROMPTS, PromptPlanner, load_planner, missed_attributes


def planner_for(spec: str, cache_dir: str, length_prior: bool = True) -> PromptPlanner:
    """base:NAME plans with that base; run:DIR with the run's own music-tuned stage-1 model (what is measured)."""
    kind, _, name = spec.partition(":")
    if kind not in ("base", "run"):
        raise SystemExit(f"--planner {spec}: expected base:NAME or run:DIR")
    if kind == "base":
        return load_planner(base=name, cache_dir=cache_dir, length_prior=length_prior)
    return load_planner(run=name, music_tuned=True, length_prior=length_prior)


def measure(planner: PromptPlanner) -> dict:
    rows, seconds = [], []
    for prompt, stated in CHECKED_PROMPTS:
        started = time.perf_counter()
        plan = planner.plan(prompt)
        seconds.append(time.perf_counter() - started)
        Request(plan.form, plan.key, plan.metre, plan.tempo).song()   # raises on an invalid plan
        rows.append({"prompt": prompt, "plan": plan.to_dict(), "stated": len(stated),
                     "missed": [list(map(str, miss)) for miss in missed_attributes(plan, stated)]})
    stated = sum(row["stated"] for row in rows)
    missed = sum(len(row["missed"]) for row in rows)
    lengths: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        for word, bars in row["plan"]["section_bars"].items():
            lengths[word][bars] += 1
    bars = [sum(row["plan"]["section_bars"][word] for word in row["plan"]["sections"]) for row in rows]
    return {"lengths": {word: dict(sorted(counts.items())) for word, counts in lengths.items()},
            "bars_median": statistics.median(bars), "stated": stated, "honoured": stated - missed,
            "share": round((stated - missed) / stated, 3),
            "valid": len(rows), "seconds_median": round(statistics.median(seconds), 2),
            "seconds_min": round(min(seconds), 2), "seconds_max": round(max(seconds), 2), "prompts": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planner", action="append", required=True, help="base:NAME or run:DIR (repeatable)")
    parser.add_argument("--cache-dir", default="~/.cache/musicray")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--length-prior", choices=("on", "off"), default="on",
                        help="add POP909's section-length prior to the model's length choices (off: the model alone)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for spec in args.planner:
        result = {"planner": spec, "length_prior": args.length_prior,
                  **measure(planner_for(spec, args.cache_dir, args.length_prior == "on"))}
        results.append(result)
        print(f"| {spec} | {result['honoured']} / {result['stated']} ({result['share']:.0%}) | {result['valid']} / "
              f"{len(CHECKED_PROMPTS)} | {result['seconds_median']} s ({result['seconds_min']}-{result['seconds_max']}) |",
              flush=True)
        lengths = "; ".join(f"{word} {counts}" for word, counts in result["lengths"].items())
        print(f"    lengths (bars: plans): {lengths}; median song {result['bars_median']} bars", flush=True)
        for row in result["prompts"]:
            for miss in row["missed"]:
                print(f"    miss: {row['prompt']!r}: {miss[0]} planned {miss[1]}, stated {miss[2]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_average": os.getloadavg(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

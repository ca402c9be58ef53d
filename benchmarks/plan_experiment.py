"""Songs planned from words, measured: the share of the attributes ``musicray.prompt_plan.CHECKED_PROMPTS`` state that
the plans honour, with the instruct base and with music-tuned runs (their stage-1 model, adapters off: does full
fine-tuning on music tokens erase the text skill?).

    .venv/bin/python benchmarks/plan_experiment.py --planner base:smollm2-135m-instruct --planner run:RUN_DIR \\
        --out runs/plan-experiment.json

Prints one Markdown row per planner (docs/results.md keeps the figures), and each miss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from musicray.compose import Request
from musicray.model import load_base, load_music_model
from musicray.prompt_plan import CHECKED_PROMPTS, PromptPlanner, missed_attributes
from musicray.run import RunDir


def planner_for(spec: str, cache_dir: str) -> PromptPlanner:
    kind, _, name = spec.partition(":")
    if kind == "base":
        return PromptPlanner(*load_base(name, cache_dir))
    if kind == "run":
        model, music = load_music_model(RunDir(name).require("stage-1 model"))
        return PromptPlanner(model, music.tokenizer)
    raise SystemExit(f"--planner {spec}: expected base:NAME or run:DIR")


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
    return {"stated": stated, "honoured": stated - missed, "share": round((stated - missed) / stated, 3),
            "valid": len(rows), "seconds_median": round(statistics.median(seconds), 2),
            "seconds_min": round(min(seconds), 2), "seconds_max": round(max(seconds), 2), "prompts": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planner", action="append", required=True, help="base:NAME or run:DIR (repeatable)")
    parser.add_argument("--cache-dir", default="~/.cache/musicray")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for spec in args.planner:
        result = {"planner": spec, **measure(planner_for(spec, args.cache_dir))}
        results.append(result)
        print(f"| {spec} | {result['honoured']} / {result['stated']} ({result['share']:.0%}) | {result['valid']} / "
              f"{len(CHECKED_PROMPTS)} | {result['seconds_median']} s ({result['seconds_min']}-{result['seconds_max']}) |",
              flush=True)
        for row in result["prompts"]:
            for miss in row["missed"]:
                print(f"    miss: {row['prompt']!r}: {miss[0]} planned {miss[1]}, stated {miss[2]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_average": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()

"""How fast the command line answers: `python -m musicray --help` (and each subcommand's --help and an argument
error) in a fresh subprocess, against `python -c pass`, the interpreter's own start-up.

    python benchmarks/cli_startup.py [--repeat 7] [--all]

Prints the median wall time of each command over --repeat runs (after one warm-up run each, so the file cache
is warm as it is for a user's second call), its ratio to `python -c pass`, the median CPU time (user + system of
the child; on a machine shared with other jobs it moves less than the wall time), and the goal: under 1 s for
--help and argument errors (under 1.5 s absolute on the 2-core development machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 1.0
SUBCOMMANDS = ("data prepare", "data synth", "data inspect", "pipeline", "generate", "eval", "render", "train",
               "serve", "tune")


def wall_seconds(argv: list[str], repeat: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of ``argv`` over ``repeat`` runs after a warm-up run."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run(argv, cwd=ROOT, capture_output=True, env=env, check=False)  # warm-up
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, capture_output=True, env=env, check=False)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per command (median reported)")
    parser.add_argument("--all", action="store_true", help="also every subcommand's --help and an argument error")
    args = parser.parse_args()

    python = [sys.executable]
    baseline, baseline_cpu = wall_seconds(python + ["-c", "pass"], args.repeat)
    commands = {"musicray --help": ["-m", "musicray", "--help"]}
    if args.all:
        commands.update({f"musicray {name} --help": ["-m", "musicray", *name.split(), "--help"] for name in SUBCOMMANDS})
        commands["musicray generate (argument error)"] = ["-m", "musicray", "generate", "--run"]
        commands["musicray render (bad instrument)"] = ["-m", "musicray", "render", "x.mid", "--out", "x.wav",
                                                        "--instrument", "MELODY=kazoo"]
    print(f"python: {sys.executable} ({sys.version.split()[0]}), {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}, {args.repeat} runs each, median")
    print(f"{'command':<40} {'seconds':>8} {'x python -c pass':>17} {'CPU seconds':>12}")
    print(f"{'python -c pass':<40} {baseline:8.3f} {1.0:17.1f} {baseline_cpu:12.3f}")
    worst = 0.0
    for name, argv in commands.items():
        seconds, cpu = wall_seconds(python + argv, args.repeat)
        worst = max(worst, seconds)
        print(f"{name:<40} {seconds:8.3f} {seconds / baseline:17.1f} {cpu:12.3f}")
    print(f"slowest: {worst:.3f} s ({'within' if worst < GOAL_S else 'OVER'} the {GOAL_S:g} s goal)")
    return 0 if worst < GOAL_S else 1


if __name__ == "__main__":
    sys.exit(main())

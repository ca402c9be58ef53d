"""The GPU path rehearsed at Llama 3 width on a CPU (issue 19): configs/rehearsal.yaml end to end, with the peak
memory of every stage-1 rank and the seconds per step.

The rehearsal base (Llama-3.2-1B's published configuration with 2 layers, Llama 3's 128,256-id vocabulary, random
weights; about 390 M parameters with the music rows) is built into the cache, then, through the library calls the
commands make: the vocabulary extension and stage 1 on 2 Ray Train workers under ZeRO-3 (checkpoints every
``--every`` steps), the export of one consolidated ``save_pretrained`` model; with ``--resume-check`` a second run
stopped after ``--every`` steps and resumed to the end, whose losses and weights must equal the first's; stage 2
(one short LoRA trial per sub-task); one song by the native loop and one by the vLLM engine with all five adapters.

    python benchmarks/rehearsal.py [--base rehearsal] [--steps 4] [--every 2] [--resume-check] [--out DIR] [--json]

Peak RSS per rank is each Ray Train worker process's high-water mark (``VmHWM`` in /proc, read while it lives), the
driver's is its own ``ru_maxrss`` (it consolidates the ZeRO shards for the export). Seconds per step come from
stage1/metrics.csv (median and spread over the steps after the first). ``--base rehearsal-small`` is the same path
at hidden 256 (what tests/train/test_rehearsal.py runs) in a few minutes. Needs about 9 GB per rank at full width:
check ``free -g`` first. docs/benchmarks.md records its output.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RAY_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
GIB = 1024 ** 3


class WorkerPeaks:
    """Polls the peak RSS (VmHWM) of this process's Ray Train worker descendants while they live."""

    def __init__(self, every_s: float = 0.5):
        self.peaks: dict[int, int] = {}
        self.every_s, self._stop = every_s, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            for child in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" not in " ".join(child.cmdline()):
                        continue
                    status = Path(f"/proc/{child.pid}/status").read_text()
                except (psutil.Error, OSError):
                    continue
                kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
                self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), kib * 1024)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def step_seconds(run_dir: Path) -> list[float]:
    with (run_dir / "stage1" / "metrics.csv").open() as f:
        return [float(row["step_s"]) for row in csv.DictReader(f)]


def losses(run_dir: Path) -> list[float]:
    with (run_dir / "stage1" / "metrics.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def compose_both(run_dir: Path, form: str) -> dict:
    from musicray.compose import Composer
    from musicray.request import Request
    from musicray.engine.vllm_engine import VllmStages

    result = {}
    tick = time.perf_counter()
    song, report = Composer(run_dir).compose(Request(form, seed=1))
    song.check()
    tokens = sum(info["new_tokens"] for info in report["stages"].values())
    result["native"] = {"s": time.perf_counter() - tick, "tokens": tokens, "bars": song.n_bars}

    tick = time.perf_counter()
    stages = VllmStages(run_dir)
    started = time.perf_counter() - tick

    try:
        tick = time.perf_counter()
        served, done = asyncio.run(stages.compose_request(Request(form, seed=1)))
    finally:
        stages.shutdown()
    served.check()
    result["vllm"] = {"startup_s": started, "s": time.perf_counter() - tick, "bars": served.n_bars,
                      "tokens": sum(info["new_tokens"] for info in done.values()),
                      "adapters": [info["adapter"] for info in done.values()]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="rehearsal", choices=["rehearsal", "rehearsal-small"])
    parser.add_argument("--steps", type=int, default=4, help="stage-1 optimizer steps")
    parser.add_argument("--every", type=int, default=2, help="steps between checkpoints")
    parser.add_argument("--resume-check", action="store_true",
                        help="also stop a second run after --every steps, resume it and compare (twice the training)")
    parser.add_argument("--form", default="A2", help="the composed song's form")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/musicray"), help="where the base is built")
    parser.add_argument("--out", type=Path, help="run dirs (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line at the end")
    args = parser.parse_args(argv)
    os.environ.update(RAY_ENV)

    from musicray.data.prepare import ensure_ray
    from musicray.model import resolve_base
    from musicray.train.config import load_config
    from musicray.train.finetune import train_stage1
    from musicray.train.tune import tune_adapters

    out = args.out or Path(tempfile.mkdtemp(prefix="musicray-rehearsal-"))
    sets = [f"base_model={args.base}", f"cache_dir={args.cache}", f"stage1.max_steps={args.steps}",
            f"stage1.checkpoint_every={args.every}"]
    config = load_config(ROOT / "configs" / "rehearsal.yaml", sets)
    report: dict = {"base": args.base, "steps": args.steps, "cpus": os.cpu_count(),
                    "load_at_start": os.getloadavg()[0]}

    tick = time.perf_counter()
    resolve_base(args.base, Path(args.cache).expanduser())
    report["build_base_s"] = time.perf_counter() - tick
    ensure_ray()

    tick = time.perf_counter()
    with WorkerPeaks() as peaks:
        train_stage1(config, out / "run", progress=False, force=True)
    report["stage1_s"] = time.perf_counter() - tick
    report["peak_rss_per_rank_gib"] = [round(b / GIB, 2) for b in sorted(peaks.peaks.values(), reverse=True)]
    seconds = step_seconds(out / "run")
    report["step_s"] = spread(seconds[1:] or seconds)
    report["first_step_s"] = seconds[0]
    report["losses"] = losses(out / "run")
    print(f"stage 1: {args.steps} steps in {report['stage1_s']:.0f} s; peak RSS per rank "
          f"{report['peak_rss_per_rank_gib']} GiB; {report['step_s']['median']:.1f} s/step "
          f"({report['step_s']['min']:.1f}-{report['step_s']['max']:.1f})", flush=True)

    if args.resume_check:
        from musicray.model import load_music_model

        stopped = load_config(ROOT / "configs" / "rehearsal.yaml", [*sets, f"stage1.max_steps={args.every}"])
        train_stage1(stopped, out / "resumed", progress=False, force=True)
        train_stage1(config, out / "resumed", resume=True, progress=False)
        a = load_music_model(out / "run" / "stage1" / "model")[0].state_dict()
        b = load_music_model(out / "resumed" / "stage1" / "model")[0].state_dict()
        report["resume"] = {"loss_diff": max(abs(x - y) for x, y in zip(losses(out / "run"),
                                                                          losses(out / "resumed"))),
                            "weight_diff": max((a[k] - b[k]).abs().max().item() for k in a)}
        del a, b
        print(f"resume: largest loss difference {report['resume']['loss_diff']:.2e}, weights "
              f"{report['resume']['weight_diff']:.2e}", flush=True)

    tick = time.perf_counter()
    tune_adapters(config, out / "run", progress=False, force=True)
    report["stage2_s"] = time.perf_counter() - tick
    print(f"stage 2: five LoRA trials in {report['stage2_s']:.0f} s", flush=True)
    import ray

    ray.shutdown()    # the engines below need the cores
    report["compose"] = compose_both(out / "run", args.form)
    report["driver_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)
    report["load_at_end"] = os.getloadavg()[0]
    report["out"] = str(out)
    native, served = report["compose"]["native"], report["compose"]["vllm"]
    print(f"compose {args.form}: native {native['s']:.0f} s ({native['tokens']} tokens); vLLM start "
          f"{served['startup_s']:.0f} s, song {served['s']:.0f} s ({served['tokens']} tokens, adapters "
          f"{served['adapters']}); driver peak RSS {report['driver_peak_rss_gib']} GiB", flush=True)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

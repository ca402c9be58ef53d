"""Serving on vLLM vs musicray's own loop: songs/s under concurrency, the grammar processor's share of an engine
step, and time to the first streamed bar.

One run, side by side on one Ray instance and one run dir (same form, same token caps, seeds all different):

    native, per-adapter   the Serve graph with musicray's loop: one deployment per sub-task, @serve.batch
    native, multiplexed   one deployment with all five adapters, whole songs batched (@serve.batch)
    vllm                  one deployment holding a vLLM engine with all five adapters (continuous batching)
    vllm, per-adapter     one deployment per sub-task, each holding a vLLM engine with its own adapter

For each: songs/s with 1, 8 and 32 closed-loop clients (each posts its next song when the last returns). For
vLLM also: the grammar processor's share of the engine's step time at each level (from the processor's own
counters, ``$MUSICRAY_GRAMMAR_STATS``: its update_state + apply time over the time from one masked step to the
next), the mean rows per engine step, and over sequential ``POST /v1/generate/stream`` requests the time to the
first bar event and to the final MIDI.

    python benchmarks/serve_vllm.py [--run RUN_DIR] [--form A4B4] [--concurrency 1 8 32] [--no-docs]

Without ``--run`` it builds the tiny random-weight model with five random LoRA adapters in a temp dir. Prints a
table and writes it as the "Serving on vLLM" section of docs/benchmarks.md. Takes ~10 minutes on two cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import DOCS, write_section  # noqa: E402
from serve_throughput import build_tiny_run, closed_loop, free_port  # noqa: E402

SECTION = "## Serving on vLLM"
LAYOUTS = {"native, per-adapter": {"engine": "native", "multiplexed": False},
           "native, multiplexed": {"engine": "native", "multiplexed": True},
           "vllm": {"engine": "vllm", "multiplexed": True},
           "vllm, per-adapter": {"engine": "vllm", "multiplexed": False}}


NO_STATS = {"steps": 0, "grammar_seconds": 0.0, "step_seconds": 0.0, "rows_by_step": {}}


def read_stats(path: Path, before_any_step: bool = False) -> dict:
    """The grammar processor's counters; before the engine's first measured step a missing file is all zeros,
    after it a missing or unreadable file stops the benchmark (it would report a grammar share of 0)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if before_any_step:
            return NO_STATS
        raise SystemExit(f"{path}: the grammar processor wrote no counters (is $MUSICRAY_GRAMMAR_STATS reaching the "
                         "vLLM engine's process?); refusing to report a grammar share without them") from None
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: unreadable grammar counters ({err})") from None


def stats_delta(before: dict, after: dict) -> dict:
    steps = after["steps"] - before["steps"]
    if steps <= 0:
        raise SystemExit("the grammar processor counted no engine step at this level: its counters are stale")
    step_seconds = after["step_seconds"] - before["step_seconds"]
    grammar = after["grammar_seconds"] - before["grammar_seconds"]
    rows = {int(k): v - before["rows_by_step"].get(k, 0) for k, v in after["rows_by_step"].items()}
    counted = sum(rows.values())
    return {"steps": steps, "grammar_share": grammar / step_seconds if step_seconds else 0.0,
            "grammar_ms_per_step": 1000 * grammar / steps if steps else 0.0,
            "step_ms": 1000 * step_seconds / steps if steps else 0.0,
            "mean_rows": sum(k * v for k, v in rows.items()) / counted if counted else 0.0}


def closed_loop_rate(post, body: dict, clients: int, songs: int, first_seed: int) -> dict:
    outs, errors, wall = closed_loop(post, body, clients, range(first_seed, first_seed + songs))
    return {"songs": len(outs), "errors": errors, "wall_s": wall, "songs_per_s": len(outs) / wall}


def stream_times(base: str, body: dict, repeats: int) -> dict:
    import requests

    first, whole = [], []
    for k in range(repeats):
        tick, first_bar = time.perf_counter(), None
        with requests.post(base + "/v1/generate/stream", json={**body, "seed": 5000 + k}, stream=True,
                           timeout=600) as response:
            for line in response.iter_lines(decode_unicode=True):
                if line == "event: bar" and first_bar is None:
                    first_bar = time.perf_counter() - tick
                if line == "event: song":
                    whole.append(time.perf_counter() - tick)
                    break
        first.append(first_bar)
    return {"first_bar_s": statistics.median(first), "song_s": statistics.median(whole), "first": first,
            "whole": whole}


def measure(run: Path, name: str, url: str, config: dict, body: dict, levels: list[int], min_songs: int,
            rounds: int, stats_file: Path) -> dict:
    import requests
    from ray import serve

    from musicray.serve import build_app

    started = time.perf_counter()
    serve.run(build_app(run, config), name=name.replace(", ", "-"), route_prefix=f"/{name.replace(', ', '-')}")
    result = {"startup_s": time.perf_counter() - started, "levels": {}}
    base = f"{url}/{name.replace(', ', '-')}"

    def post(payload: dict) -> dict:
        response = requests.post(base + "/v1/generate", json=payload, timeout=900)
        if response.status_code != 200:
            raise RuntimeError(f"seed {payload['seed']}: {response.status_code} {response.text[:300]}")
        return response.json()

    for seed in (1000, 1001):   # warm-up
        post({**body, "seed": seed})
    seed = 0
    for clients in levels:
        songs = max(min_songs, rounds * clients)   # each client posts ``rounds`` songs in turn: a closed loop
        before = read_stats(stats_file, before_any_step=True)
        result["levels"][clients] = closed_loop_rate(post, body, clients, songs, seed)
        time.sleep(1)   # the processor writes its counters when the batch empties
        if config["engine"] == "vllm" and config["multiplexed"]:   # (five engines would share the stats file)
            result["levels"][clients]["grammar"] = stats_delta(before, read_stats(stats_file))
        seed += songs
        print(f"  {name} @{clients}: {result['levels'][clients]['songs_per_s']:.2f} songs/s", flush=True)
    if config["engine"] == "vllm" and config["multiplexed"]:
        result["stream"] = stream_times(base, body, 5)
    serve.delete(name.replace(", ", "-"))
    return result


def markdown(results: dict, args, machine: str, date: str, load: tuple) -> str:
    levels = args.concurrency
    model = (f"the run dir `{args.run}` (its stage-1 model and five adapters)" if args.run else
             "tiny random-weight model (head_dim 64) with five random LoRA adapters")
    command = "python benchmarks/serve_vllm.py" + (f" --run {args.run}" if args.run else "")
    lines = [
        SECTION, "",
        f"`{command}` ({date}; {machine}; load average {load[0]:.2f} before, "
        f"{load[1]:.2f} after; {model}; form "
        f"`{args.form}`, composer default token caps; each level runs max({args.min_songs}, {args.rounds} x clients) "
        "songs, every client posting its next song when the last returns; all layouts in one Ray instance, one "
        "after the other).", "",
        "| layout | " + " | ".join(f"songs/s @{c}" for c in levels) + f" | @{levels[-1]} vs @{levels[0]} | errors |",
        "| --- | " + " | ".join("---:" for _ in levels) + " | ---: | ---: |",
    ]
    for name in LAYOUTS:
        r = results[name]
        rates = [r["levels"][c]["songs_per_s"] for c in levels]
        errors = sum(len(level["errors"]) for level in r["levels"].values())
        lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in rates)
                     + f" | {rates[-1] / rates[0]:.2f}x | {errors} |")
    vllm = results["vllm"]
    lines += ["", "The grammar as vLLM's logits processor, per engine step (its update_state + apply against the "
              "time from one masked step to the next):", "",
              "| clients | engine steps | mean rows per step | step (ms) | grammar (ms) | grammar share |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for clients in levels:
        g = vllm["levels"][clients]["grammar"]
        lines.append(f"| {clients} | {g['steps']} | {g['mean_rows']:.1f} | {g['step_ms']:.1f} | "
                     f"{g['grammar_ms_per_step']:.2f} | {100 * g['grammar_share']:.1f} % |")
    stream = vllm["stream"]
    best_native_any = max(level["songs_per_s"] for name in LAYOUTS if name.startswith("native")
                          for level in results[name]["levels"].values())
    top = vllm["levels"][levels[-1]]["songs_per_s"]
    scale = top / vllm["levels"][levels[0]]["songs_per_s"]
    share = vllm["levels"][levels[-1]]["grammar"]["grammar_share"]
    lines += [
        "",
        f"Streaming (`POST /v1/generate/stream`, one client, median of 5): first bar after "
        f"{stream['first_bar_s']:.2f} s, the whole song (five stages and the MIDI) after {stream['song_s']:.2f} s. "
        f"Start-up (serve.run until the app answers): vLLM {vllm['startup_s']:.0f} s, five vLLM engines "
        f"(per-adapter) {results['vllm, per-adapter']['startup_s']:.0f} s, native multiplexed "
        f"{results['native, multiplexed']['startup_s']:.0f} s.",
        "",
        f"Goals: vLLM at {levels[-1]} clients >= 2x the native graph's best ({top:.2f} vs {best_native_any:.2f} "
        f"songs/s, {top / best_native_any:.2f}x: {'met' if top >= 2 * best_native_any else 'missed'}); vLLM "
        f"{levels[-1]} vs {levels[0]} clients >= 6x ({scale:.2f}x: {'met' if scale >= 6 else 'missed'}); "
        f"grammar share <= 5 % at {levels[-1]} ({100 * share:.1f} %: {'met' if share <= 0.05 else 'missed'}).",
        "",
        *_reading(vllm, results, levels, top, best_native_any, scale),
        "",
        "The per-adapter vLLM layout runs five engines (each an engine-core and a worker process with its own KV "
        "cache) on the same two cores: each stage decodes only its own sub-task's rows, a song crosses five "
        "engines, and the engines take turns on the cores; one engine with all five adapters batches across "
        "sub-tasks instead.",
        "",
        "On a GPU: `python benchmarks/gpu_vllm.py --shapes 1b 8b --out gpu_vllm.json` (prepared for a lent GPU, "
        "meant to finish in under 8 minutes on an H100/H200: random-weight 1B- and 8B-shaped models in bf16 with "
        "five random adapters, songs/s and decode tokens/s of the vLLM engine and of musicray's loop at 1, 8 and 32 "
        "songs, and the HBM-bandwidth bound of a decode step). No GPU was lent to this task; the script has only "
        "been dry-run on the CPU (`--shapes tiny --device cpu`).",
        "",
    ]
    return "\n".join(lines)


def _reading(vllm: dict, results: dict, levels: list[int], top: float, best_native: float, scale: float) -> list[str]:
    """What the numbers say, written from them: which engine wins a lone song and the top level, and why."""
    lone_vllm = vllm["levels"][levels[0]]["songs_per_s"]
    lone_native = max(results[name]["levels"][levels[0]]["songs_per_s"] for name in LAYOUTS if name.startswith("native"))
    step_ms = vllm["levels"][levels[0]]["grammar"]["step_ms"]
    rows = vllm["levels"][levels[-1]]["grammar"]["mean_rows"]
    lone = (f"A lone song is {'slower' if lone_vllm < lone_native else 'faster'} on vLLM ({lone_vllm:.2f} vs "
            f"{lone_native:.2f} songs/s): one vLLM engine step with one song takes {step_ms:.1f} ms (scheduling, "
            "input preparation, LoRA bookkeeping and the sampler around the forward pass), where musicray's loop "
            "makes one forward call per step and feeds forced runs (a given or copied bar, the closing <End>) in "
            "one pass (jump-forward, which vLLM does not do).")
    top_text = (f"At {levels[-1]} clients vLLM reaches {top / best_native:.2f}x the native graph's best: continuous "
                f"batching scales {scale:.1f}x from {levels[0]} to {levels[-1]} clients ({rows:.0f} rows per step), "
                "where @serve.batch's static batches stop at the batch size and wait for their slowest song.")
    return [lone, "", top_text, "", "All of it shares two cores with the clients, the HTTP proxy, the ingress and "
            "other jobs (see the load average); on a tiny model a step costs per-step overhead, not arithmetic. "
            "vLLM's own advantages (paged attention, CUDA graphs, multi-LoRA kernels) are GPU ones at 1B-8B "
            "parameters, where the forward pass dominates a step (benchmarks/gpu_vllm.py, not yet run on a GPU)."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run dir (default: a tiny random one in a temp dir)")
    parser.add_argument("--form", default="A4B4")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-songs", type=int, default=8, help="songs at least, at each concurrency level")
    parser.add_argument("--rounds", type=int, default=3,
                        help="songs each client posts in turn at each level (a closed loop, not a burst of one each)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, help="write the docs from an earlier run's --json (and its load "
                                                        "averages, --load BEFORE AFTER) instead of measuring")
    parser.add_argument("--load", type=float, nargs=2, default=None)
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results = {name: {**r, "levels": {int(k): v for k, v in r["levels"].items()}} for name, r in results.items()}
        text = markdown(results, args, f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU", args.date,
                        tuple(args.load or (0.0, 0.0)))
        print(text)
        if not args.no_docs:
            write_section(text, SECTION)
        return 0

    import ray
    from ray import serve

    machine = f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU"
    body = {"form": args.form, "key": "C:maj", "tempo": 100, "seed": 7}
    base_config = {"torch_threads": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.01,
                   "stages": {"default": {"ray_actor_options": {"num_cpus": 0.3}},
                              "multiplexed": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64}}}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or build_tiny_run(Path(tmp))
        stats_file = Path(tmp) / "grammar_stats.json"
        os.environ["MUSICRAY_GRAMMAR_STATS"] = str(stats_file)   # inherited by the engine's processes
        results: dict = {}
        port = free_port()
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for name in args.layouts:
                print(f"{name} ...", flush=True)
                results[name] = measure(run, name, f"http://127.0.0.1:{port}", {**base_config, **LAYOUTS[name]},
                                        body, args.concurrency, args.min_songs, args.rounds, stats_file)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if set(args.layouts) != set(LAYOUTS):
        print(json.dumps(results, indent=1, default=str))
        return 0
    text = markdown(results, args, machine, args.date, (load_before, os.getloadavg()[0]))
    print()
    print(text)
    if not args.no_docs:
        write_section(text, SECTION)
        print(f"wrote the {SECTION!r} section of {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

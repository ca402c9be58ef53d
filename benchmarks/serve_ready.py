"""How long `musicray serve --run RUN` takes to answer, and whether stopping it leaves any process behind.

    python benchmarks/serve_ready.py --run runs/tiny [--num-cpus 2] [--stop SIGTERM|SIGINT] [-- extra serve args]

Starts the server in a subprocess (its own local Ray instance), polls GET /healthz until it answers 200 (ready),
composes one song over HTTP, sends the signal, and reports: seconds to ready, seconds of the first song, seconds to
stop, the processes it had started that are still running afterwards (should be none), the scheduling warnings
Serve printed, and the load average (the machine is shared: read the seconds with it).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time

import psutil
import requests

from musicray.serve.launch import start_server, wait_until_ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--stop", choices=("SIGTERM", "SIGINT"), default="SIGTERM")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("extra", nargs="*", help="more `musicray serve` arguments (after --)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    server, port = start_server(args.run, args.num_cpus, args.extra)
    ready = wait_until_ready(server, port, args.timeout)
    song = None
    if ready is not None:
        tick = time.perf_counter()
        answer = requests.post(f"http://127.0.0.1:{port}/v1/generate", json={"form": "A4B4", "seed": 1}, timeout=300)
        song = time.perf_counter() - tick
        if answer.status_code != 200:
            print(f"POST /v1/generate: {answer.status_code} {answer.text[:300]}")
    children = psutil.Process(server.pid).children(recursive=True)
    tick = time.perf_counter()
    server.send_signal(getattr(signal, args.stop))
    try:
        output, _ = server.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        output, _ = server.communicate()
    stopped = time.perf_counter() - tick
    time.sleep(5)
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    warnings = [line for line in output.splitlines() if "more than 30s" in line]
    print(f"ready: {ready if ready is None else round(ready, 1)} s; first song (A4B4): "
          f"{song if song is None else round(song, 1)} s; stopped by {args.stop} in {stopped:.1f} s; "
          f"load average at start {load:.1f}, now {os.getloadavg()[0]:.1f}")
    print(f"processes it started: {len(children)}; still running: {len(left)} "
          f"{[' '.join(c.cmdline())[:60] for c in left]}")
    print(f"'more than 30s' warnings: {len(warnings)}")
    for line in warnings[:3]:
        print("   ", line[:200])
    for child in left:    # ours: started by the server this script started
        child.kill()


if __name__ == "__main__":
    main()

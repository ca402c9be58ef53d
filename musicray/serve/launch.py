"""``musicray serve`` as a child process: start it on a free port with a local Ray instance of its own, and wait
until it answers. For scripts, notebooks, benchmarks and tests that need a server of their own.

    server, port = start_server("runs/tiny")
    seconds = wait_until_ready(server, port, timeout=300)   # None: it exited or did not answer in time
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str | Path, num_cpus: int = 2, extra: list[str] | tuple[str, ...] = (),
                 port: int | None = None) -> tuple[subprocess.Popen, int]:
    """``python -m musicray serve --run RUN`` on ``port`` (a free one by default), its output (stdout and stderr
    together, text) on the process' ``stdout`` pipe. RAY_ADDRESS is dropped from its environment, so it starts a
    local Ray instance of its own rather than joining whatever cluster this process uses."""
    port = port or free_port()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    process = subprocess.Popen([sys.executable, "-m", "musicray", "serve", "--run", str(run), "--port", str(port),
                                "--num-cpus", str(num_cpus), *extra], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    return process, port


def wait_until_ready(process: subprocess.Popen, port: int, timeout: float, poll_s: float = 0.25) -> float | None:
    """Seconds from now until ``GET /healthz`` answers 200, polling every ``poll_s``; None when the process exits
    first or ``timeout`` passes (the caller reads ``process.stdout`` to say why)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return time.perf_counter() - started
        except (OSError, http.client.HTTPException):
            pass   # not listening yet, Serve still deploying (503), or a connection cut while it starts
        time.sleep(poll_s)
    return None

"""Waiting for a server of one's own: ready when /healthz answers 200, None when the process dies or is late."""

import subprocess
import sys
import time

from musicray.serve.launch import free_port, wait_until_ready

# A stand-in for `musicray serve` that answers /healthz after a delay (what the wait loop sees while Serve deploys).
HEALTHZ_AFTER = """
import http.server, sys, time
time.sleep(float(sys.argv[2]))
class Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Healthz).serve_forever()
"""


def test_ready_once_healthz_answers():
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", HEALTHZ_AFTER, str(port), "0.5"])
    try:
        ready = wait_until_ready(server, port, timeout=30, poll_s=0.05)
        assert ready is not None and ready >= 0.5
    finally:
        server.kill()
        server.wait()


def test_not_ready_when_the_process_exits_or_time_runs_out():
    port = free_port()
    exits = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.perf_counter()
    assert wait_until_ready(exits, port, timeout=30, poll_s=0.05) is None
    assert time.perf_counter() - started < 10   # it noticed the exit rather than waiting out the timeout
    late = subprocess.Popen([sys.executable, "-c", HEALTHZ_AFTER, str(port), "30"])
    try:
        assert wait_until_ready(late, port, timeout=0.5, poll_s=0.05) is None
    finally:
        late.kill()
        late.wait()

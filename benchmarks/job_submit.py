"""The pipeline as a Ray job on a two-node cluster started with `ray start`, losing its second node in stage 1.

What a user of a real cluster does, on this machine: a head (`ray start --head --block`, a temp dir and ports of its
own, the dashboard on 127.0.0.1, token authentication on with a token of the run's own) and a second node (`ray start
--address HEAD --block`, a temp dir of its own and a custom resource), then `ray job submit --working-dir .` of
`jobs/pipeline.py` on the tiny preset with few steps and ``stage1.placement_strategy=STRICT_SPREAD`` (one Ray Train
worker per node, or wait for a node). Once Ray Train has registered a checkpoint and a worker trains on the second
node, that node's raylet is killed (SIGKILL; its `ray start --block` then kills the rest of the node, as when a
machine dies) and a replacement node joins, as an autoscaler would bring one. Ray Train restarts the worker group
from the last checkpoint on the head and the replacement; the job goes on through stage 2, the songs and the
evaluation.

    python benchmarks/job_submit.py [--steps 40] [--every 4] [--out DIR] [--json]

Checks and prints: the nodes the workers ran on before and after the loss, the job's final status, that stage 1
ended with all its steps (restarted from a checkpoint, not from scratch) and that the checkpoints, the model, the
adapters and the songs reached the run dir; and the lost time from metrics.csv's row times (``restart_s``,
``redo_s``, ``lost_s``, as benchmarks/node_loss.py measures them with ``ray.cluster_utils.Cluster``).
Exit status 0 when every check holds. docs/benchmarks.md records its output.

Never a bare `ray stop` here (it stops every Ray instance on the machine, other users' included): the nodes are
stopped by their own PIDs (SIGTERM to `ray start --block`, which stops its node's processes; SIGKILL to any left).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_loss import RAY_ENV, lost_time, read_metrics, registered_checkpoint, start_token_auth, workers_under  # noqa: E402

from musicray.run import RunDir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SUBTASKS = ("chord", "melody", "secondary", "dynamics", "tempo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def normal_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:     # not allowed to: the node starts as nice as this script
        pass


class RayNode:
    """One `ray start --block` process and the node it runs; ``stop`` ends both by PID."""

    def __init__(self, name: str, args: list[str], temp_dir: Path, env: dict):
        self.name, self.temp_dir = name, temp_dir
        temp_dir.mkdir(parents=True, exist_ok=True)
        self.log = temp_dir.with_suffix(".log")
        # Every port of its own: the head's defaults (6379, 8265, 52365, ...) may belong to another Ray here.
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
        command = [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", *args,
                   *(f"{flag}={free_port()}" for flag in ports)]
        # A raylet gives its dashboard agent 15 s (fixed) to write its port file, and aborts when it is late; the
        # agent's imports take longer than that at low priority on a loaded machine. The node starts at normal
        # priority, then gets this script's (nice) back once it is up (wait_started). Needs the right to lower niceness.
        self.niceness = os.getpriority(os.PRIO_PROCESS, 0)
        with self.log.open("w") as log:
            # A session of its own: a signal meant for this script's terminal does not reach the node.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=normal_priority)

    def wait_started(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{self.name}: `ray start` did not start (see {self.log}):\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        for process in self.processes():   # the node's processes, and the workers they start, run nice again
            try:
                process.nice(self.niceness)
            except psutil.Error:
                pass

    def raylet(self) -> psutil.Process:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if child.name() == "raylet":
                return child
        raise RuntimeError(f"{self.name}: no raylet under `ray start` (pid {self.process.pid})")

    def train_workers(self) -> list[int]:
        return workers_under(self.process.pid, "RayTrainWorker")

    def kill_raylet(self) -> None:
        """The node dies: its raylet is killed; `ray start --block` sees it and kills the node's other processes."""
        self.raylet().kill()
        self.process.wait(timeout=60)

    def processes(self) -> list[psutil.Process]:
        """The node's processes: those under `ray start`, and any left after it exited (their command lines name
        the node's temp dir, which is this run's alone)."""
        found = {}
        try:
            found.update((p.pid, p) for p in psutil.Process(self.process.pid).children(recursive=True))
        except psutil.Error:
            pass
        for process in psutil.process_iter(["cmdline"]):
            if str(self.temp_dir) in " ".join(process.info["cmdline"] or []):
                found[process.pid] = process
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        left = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        _, alive = psutil.wait_procs(left, timeout=10)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass


def job_status(address: str, job_id: str) -> str:
    """The job's final status from the Job SDK (`ray job status` prints it in words that change between releases);
    the token authentication in this process's environment (start_token_auth) reaches the dashboard too."""
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(job_id).value)


def pipeline_args(run_dir: Path, out: Path, steps: int, every: int) -> list[str]:
    """The tiny preset, small: few stage-1 steps, one short trial per sub-task, one evaluation window."""
    settings = [f"cache_dir={out / 'cache'}", "data.songs=16", "data.max_length=256",
                "stage1.placement_strategy=STRICT_SPREAD", f"stage1.max_steps={steps}",
                f"stage1.checkpoint_every={every}", "stage1.max_failures=2", "stage1.lr_schedule=constant",
                "stage1.warmup_steps=2", "stage2.trials_per_subtask=1", "stage2.max_steps=4", "stage2.eval_every=2",
                "eval.songs=1", "eval.max_examples=4", "eval.mask_loss_ablation=false",
                "eval.language_ablation=false"]
    return ["jobs/pipeline.py", "--preset", "tiny", "--out", str(run_dir), "--quiet",
            *(item for setting in settings for item in ("--set", setting))]


def job_with_node_loss(out: Path, steps: int, every: int, timeout: float) -> dict:
    run_dir = out / "run"
    run = RunDir(run_dir)
    # Short (Ray's socket paths must stay under 108 bytes) and private to this run.
    ray_tmp = Path(tempfile.mkdtemp(prefix="mrj-"))
    start_token_auth(out)
    # A raylet waits for its node's dashboard agent to start, and dies when it is late: the defaults are too short
    # for an agent's imports on a loaded machine.
    env = {**os.environ, **RAY_ENV, "RAY_raylet_start_wait_time_s": "120", "RAY_agent_register_timeout_ms": "300000",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    report: dict = {"steps": steps, "checkpoint_every": every}
    nodes: list[RayNode] = []
    try:
        def start(name: str, arguments, tries: int = 8) -> RayNode:
            # `ray start` gives the raylet 30 s to register, which a loaded machine may miss: tried again (with
            # fresh ports), as an autoscaler would start another node.
            for attempt in range(tries):
                node = RayNode(name, arguments(), ray_tmp / f"{name}{attempt}", env)
                nodes.append(node)
                try:
                    node.wait_started()
                    report.setdefault("node_start_tries", {})[name] = attempt + 1
                    return node
                except RuntimeError:
                    node.stop()
                    if attempt == tries - 1:
                        raise
            raise AssertionError("not reached")

        ports: dict = {}

        def head_arguments() -> list[str]:
            ports.update(gcs=free_port(), dashboard=free_port())
            return ["--head", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}", "--num-cpus=1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                    f"--ray-client-server-port={free_port()}"]

        head = start("head", head_arguments)
        dashboard = f"http://127.0.0.1:{ports['dashboard']}"

        def join(name: str) -> RayNode:
            return start(name, lambda: [f"--address=127.0.0.1:{ports['gcs']}", "--node-ip-address=127.0.0.1",
                                        "--num-cpus=1", f"--resources={json.dumps({name: 1})}"])

        second = join("second")
        job_id = f"musicray-{int(time.time())}"
        job_log = out / "job.log"
        started = time.time()
        with job_log.open("w") as log:
            submit = subprocess.Popen([RAY, "job", "submit", "--address", dashboard, "--submission-id", job_id,
                                       "--working-dir", str(ROOT), "--", "python", *pipeline_args(run_dir, out, steps,
                                                                                                    every)],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = started + timeout
        while submit.poll() is None and time.time() < deadline and not (
                registered_checkpoint(run_dir) and second.train_workers()):
            time.sleep(0.1)
        old_head = set(head.train_workers())
        report["workers_before"] = {"head": len(old_head), "second": len(second.train_workers())}
        killed_at = time.time()
        second.kill_raylet()
        replacement = join("replacement")
        report["replacement_joined_s"] = round(time.time() - killed_at, 2)
        while submit.poll() is None and time.time() < deadline:
            after = {"head": len(set(head.train_workers()) - old_head), "replacement": len(replacement.train_workers())}
            if all(after.values()):
                report["new_workers_s"] = round(time.time() - killed_at, 2)
                report["workers_after"] = after
                break
            time.sleep(0.2)
        try:
            submit.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            report["error"] = f"the job did not end in {timeout} s"
        report["wall_s"] = round(time.time() - started, 2)
        report["job_status"] = job_status(dashboard, job_id)
        rows = read_metrics(run_dir) if run.stage1_metrics.exists() else []
        if rows:
            report["logged_steps"] = [int(r["step"]) for r in rows]
            report.update(lost_time(rows, killed_at))
            report["start_s"] = round(rows[0]["time"] - rows[0]["step_s"] - started, 2)
        report["checkpoints"] = sorted(p.name for p in run.ray_experiment("stage1").glob("checkpoint_*"))
        model_info = run.stage1_model / "musicray.json"
        report["model_step"] = json.loads(model_info.read_text())["step"] if model_info.exists() else None
        report["adapters"] = run.adapters_present(SUBTASKS)
        report["songs"] = sorted(p.name for p in run.songs.glob("*.mid")) if run.songs.exists() else []
        report["eval_report"] = run.eval_report.exists()
        report["job_log"] = str(job_log)
    except RuntimeError as error:    # a node that would not start: reported, with the end of its `ray start` log
        report["error"] = str(error)[-1500:]
    finally:
        for node in reversed(nodes):
            node.stop()
    report["run_dir"] = str(run_dir)
    return report


def failed_checks(report: dict) -> list[str]:
    """What the run should show; an empty list when it does."""
    steps, every = report["steps"], report["checkpoint_every"]
    restart = report.get("restart_step", 0)
    checks = {
        "every node started": "error" not in report,
        "the job succeeded": report.get("job_status") == "SUCCEEDED",
        "one worker per node before the loss": report.get("workers_before") == {"head": 1, "second": 1},
        "one worker on the head and one on the replacement after it":
            report.get("workers_after") == {"head": 1, "replacement": 1},
        "restarted from a checkpoint": restart > 0 and restart % every == 0,
        "stage 1 ended with every step": sorted(set(report.get("logged_steps", []))) == list(range(1, steps + 1))
            and report.get("model_step") == steps,
        "checkpoints in the run dir": bool(report.get("checkpoints")),
        "every adapter in the run dir": report.get("adapters") == list(SUBTASKS),
        "songs and the evaluation report": bool(report.get("songs")) and report.get("eval_report") is True,
    }
    return [name for name, held in checks.items() if not held]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The tiny model's steps take a fraction of a second: with few steps the run can end between the first
    # registered checkpoint and the kill (seen with 8 steps), and nothing is lost or restarted.
    parser.add_argument("--steps", type=int, default=40, help="stage-1 steps in all")
    parser.add_argument("--every", type=int, default=4, help="steps between checkpoints")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the job may take")
    parser.add_argument("--out", type=Path, default=None, help="where the run goes (default: a temporary dir)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="musicray-job-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Stopped with SIGTERM, the nodes are still stopped (the `finally` of job_with_node_loss runs).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = job_with_node_loss(out, args.steps, args.every, args.timeout)
    failed = failed_checks(report)
    report["failed_checks"] = failed
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print(f"job {report.get('job_status')} in {report.get('wall_s')} s; workers before {report.get('workers_before')}, "
              f"after {report.get('workers_after')}; died after step {report.get('died_after_step')}, restarted from "
              f"{report.get('restart_step')}; lost {report.get('lost_s')} s = restart {report.get('restart_s')} s "
              f"(replacement up {report.get('replacement_joined_s')} s, new workers up {report.get('new_workers_s')} s) "
              f"+ redo {report.get('redo_s')} s (first start {report.get('start_s')} s); checkpoints "
              f"{report.get('checkpoints')}, adapters {report.get('adapters')}, songs {len(report.get('songs', []))}; "
              f"failed checks: {failed or 'none'}{'; ' + report['error'][-500:] if 'error' in report else ''}",
              flush=True)
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

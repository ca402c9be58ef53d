"""Stage 1 on a two-node Ray cluster on this machine, losing its second node mid-run: how much time is lost.

A head node and a second node, each with one CPU (``ray.cluster_utils.Cluster``, token authentication on with a
token of the run's own), train configs/tiny.yaml's stage 1 with ``stage1.placement_strategy=SPREAD``: one Ray
Train worker per node. Once Ray Train has registered a checkpoint, the second node is removed (its raylet and every
process on it killed, as when a machine dies) and a replacement node joins, as an autoscaler would bring one. Ray
Train (``FailureConfig(max_failures)``) restarts the worker group from the last checkpoint, on the head and the new
node, and the run finishes with all its steps.

    python benchmarks/node_loss.py [--steps 8] [--every 2] [--repeat 1] [--out DIR] [--json]

Prints, per repeat: the nodes the workers ran on before and after the loss, the step the node died at and the
checkpoint the run restarted from, and the lost time, from metrics.csv's row times: ``restart_s`` (from the node's
loss to the first step of the new worker group: failure detection, the replacement's start, the new workers'
start-up, loading the checkpoint; ``old_group_gone_s`` and ``new_workers_s`` say when the old worker group was
gone and when both new worker processes were up), ``redo_s`` (the steps after the checkpoint done a second time) and ``lost_s``
(their sum: how much later the run ends than it would have without the loss), beside ``start_s``, the first worker
group's start (from train_stage1's call to its first step), which a restart repeats in part.
With --repeat N, the median and spread of each. docs/benchmarks.md records its output.

``--stage2`` loses the node under a stage-2 trial instead: two Ray Tune trials (chord, melody; one per node) train
LoRA adapters on the tiny model with the music tokens; the second node is removed while its trial trains and a
replacement joins; Tune (``FailureConfig(stage2.max_failures)``) starts that trial again from its last reported
checkpoint, and both adapters are exported.
tests/train/test_finetune_multinode.py runs it with small settings and checks what it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from musicray.run import RunDir
from musicray.train.stage1_metrics import read_metrics as read_metrics_csv

ROOT = Path(__file__).resolve().parents[1]
# A slow, shared machine: the new worker group may wait a while for the replacement node; the controller polls
# its workers often so that the dead one is noticed soon.
RAY_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def start_token_auth(tmp: Path) -> None:
    """Token authentication for the cluster this process starts: a fresh token of its own (as `ray get-auth-token
    --generate` makes one), read by every node and by the driver (Ray 2.60 keeps it on; so does musicray)."""
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))


def workers_under(pid: int, marker: str) -> list[int]:
    """PIDs of the processes under ``pid`` (a raylet, or `ray start`) whose command line names ``marker``: Ray Train
    workers are ``RayTrainWorker`` actors, Ray Tune's function trials ``ImplicitFunc`` actors."""
    import psutil

    pids = []
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if marker in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:      # exited meanwhile
                pass
    except psutil.Error:
        pass
    return pids


def node_workers(node, marker: str) -> list[int]:
    """PIDs of the ``marker`` actors on a ``ray.cluster_utils.Cluster`` node (children of its raylet)."""
    return [pid for info in node.all_processes.get("raylet", []) for pid in workers_under(info.process.pid, marker)]


def train_workers(node) -> list[int]:
    """PIDs of the Ray Train workers running on ``node``."""
    return node_workers(node, "RayTrainWorker")


def registered_checkpoint(run_dir: Path) -> bool:
    snapshot = RunDir(run_dir).ray_experiment("stage1") / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and "checkpoint_0" in snapshot.read_text(errors="replace")


def read_metrics(run_dir: Path) -> list[dict]:
    return read_metrics_csv(RunDir(run_dir).stage1_metrics)


def lost_time(rows: list[dict], killed_at: float) -> dict:
    """``restart_s``, ``redo_s`` and ``lost_s`` of one run whose second node died at ``killed_at`` (epoch s)."""
    restart = max(int(r["start_step"]) for r in rows)
    first = [r for r in rows if r["start_step"] == 0]
    after = [r for r in rows if r["start_step"] == restart]
    died_step = max(int(r["step"]) for r in first)
    # Steps the first worker group finished after the checkpoint it had saved are done again.
    redone = [r for r in after if r["step"] <= died_step]
    restart_s = after[0]["time"] - after[0]["step_s"] - killed_at
    redo_s = sum(r["step_s"] for r in redone)
    # The redone steps repeat the lost ones exactly (same weights, optimizer state and batches from the checkpoint).
    lost = {int(r["step"]): r["loss"] for r in first}
    loss_diff = max((abs(r["loss"] - lost[int(r["step"])]) for r in redone), default=0.0)
    return {"died_after_step": died_step, "restart_step": restart, "redone_steps": len(redone),
            "redone_loss_diff": loss_diff,
            "restart_s": round(restart_s, 2), "redo_s": round(redo_s, 2), "lost_s": round(restart_s + redo_s, 2)}


@contextmanager
def two_nodes():
    """A head and a second node on this machine, one CPU each, with this process's driver joined to the head;
    yields ``(cluster, second)`` and shuts both down afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    # A temp dir of the cluster's own, short (Ray's socket paths must stay under 108 bytes) and private: the
    # cluster writes its address there, where another user's ray.init() on this machine will not find and join it.
    ray_tmp = tempfile.mkdtemp(prefix="mr-")
    os.environ["RAY_TMPDIR"] = ray_tmp
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        second = cluster.add_node(num_cpus=1)
        # The driver joins the head (as `ray job submit` would run it); the workers' logs stay in the cluster's files.
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster, second
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def node_loss(out: Path, steps: int, every: int) -> dict:
    """One run: train on two nodes, remove the second after the first registered checkpoint, add a new one."""
    from musicray.train.config import load_config
    from musicray.train.finetune import train_stage1

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"cache_dir={out / 'cache'}", "data.songs=16", "data.max_length=256", "stage1.placement_strategy=SPREAD",
        f"stage1.max_steps={steps}", f"stage1.checkpoint_every={every}", "stage1.max_failures=2",
        "stage1.lr_schedule=constant", "stage1.warmup_steps=2"])
    run_dir = out / "run"
    with two_nodes() as (cluster, second):
        outcome: dict = {}

        def train():
            try:
                outcome["model"] = str(train_stage1(config, run_dir, progress=False))
            except Exception as error:  # noqa: BLE001 - reported in the result
                outcome["error"] = repr(error)

        report: dict = {"steps": steps, "checkpoint_every": every}
        started = time.time()
        thread = threading.Thread(target=train)
        thread.start()
        deadline = time.time() + 600
        while thread.is_alive() and time.time() < deadline:
            if registered_checkpoint(run_dir) and train_workers(second):
                break
            time.sleep(0.05)
        old_head = set(train_workers(cluster.head_node))
        report["workers_before"] = {"head": len(old_head), "second": len(train_workers(second))}
        killed_at = time.time()
        cluster.remove_node(second, allow_graceful=False)
        replacement = cluster.add_node(num_cpus=1)
        report["replacement_joined_s"] = round(time.time() - killed_at, 2)
        while thread.is_alive() and time.time() < deadline:
            head_now = set(train_workers(cluster.head_node))
            if "old_group_gone_s" not in report and not head_now & old_head:
                # The failure was noticed and the old worker group torn down (its head worker has exited).
                report["old_group_gone_s"] = round(time.time() - killed_at, 2)
            workers_after = {"head": len(head_now - old_head), "replacement": len(train_workers(replacement))}
            if all(workers_after.values()):
                report["new_workers_s"] = round(time.time() - killed_at, 2)   # both new worker processes are up
                report["workers_after"] = workers_after
                break
            time.sleep(0.2)
        thread.join(timeout=max(1.0, deadline - time.time()))
        report["wall_s"] = round(time.time() - started, 2)
        report.update(outcome)
        if "model" in outcome:
            rows = read_metrics(run_dir)
            report["logged_steps"] = [int(r["step"]) for r in rows]
            report.update(lost_time(rows, killed_at))
            # For scale: the first worker group's start, from train_stage1's call to its first step (data,
            # initial model, workers' imports, DeepSpeed engine), which the restart repeats in part.
            report["start_s"] = round(rows[0]["time"] - rows[0]["step_s"] - started, 2)
            report["step_s_median"] = round(statistics.median(r["step_s"] for r in rows), 3)
    report["run_dir"] = str(run_dir)
    return report


def trial_actors(node) -> list[int]:
    """PIDs of the Ray Tune trial actors (function trainables) running on ``node``."""
    return node_workers(node, "ImplicitFunc")


def trial_node_loss(out: Path, steps: int, every: int) -> dict:
    """Stage 2 on two nodes (one trial each): the second node is removed while its trial trains, a new one joins,
    and Tune (``FailureConfig(stage2.max_failures)``) runs that trial again from its last reported checkpoint."""
    import pandas as pd
    import ray

    from musicray.model import add_music_tokens, load_base, save_music_model
    from musicray.run import RunDir
    from musicray.tokens import Vocabulary
    from musicray.train.config import load_config
    from musicray.train.data import resolve_data_dir
    from musicray.train.tune import tune_adapters

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"cache_dir={out / 'cache'}", "data.songs=16", "data.max_length=256", "stage2.subtasks=[chord, melody]",
        "stage2.trials_per_subtask=1", f"stage2.max_steps={steps}", f"stage2.eval_every={every}",
        "stage2.max_failures=2", "stage2.cpus_per_trial=1", "stage2.grace_period=100"])
    run = RunDir(out / "run")
    # Stage 2's base: the tiny model with the music tokens (stage 1's training is not what this measures).
    model, tokenizer = load_base(config.base_model, out / "cache")
    save_music_model(model, add_music_tokens(model, tokenizer, Vocabulary(config.vocab)), run.stage1_model)
    outcome: dict = {}
    report: dict = {"steps": steps, "eval_every": every}
    with two_nodes() as (cluster, second):
        data_dir = resolve_data_dir(config, progress=False)

        def tune():
            try:
                outcome["adapters"] = {k: str(v) for k, v in tune_adapters(config, run.root, progress=False,
                                                                           data_dir=data_dir).items()}
            except Exception as error:  # noqa: BLE001 - reported in the result
                outcome["error"] = repr(error)

        started = time.time()
        thread = threading.Thread(target=tune)
        thread.start()
        deadline = time.time() + 600
        # Both trials have reported (and checkpointed) once: the second node's trial is under way there.
        trials = run.root / "ray" / "stage2"
        while thread.is_alive() and time.time() < deadline and not (
                trial_actors(second) and len(list(trials.glob("*/checkpoint_0*"))) >= 2):
            time.sleep(0.05)
        report["trials_before"] = {"head": len(trial_actors(cluster.head_node)), "second": len(trial_actors(second))}
        killed_at = time.time()
        cluster.remove_node(second, allow_graceful=False)
        replacement = cluster.add_node(num_cpus=1)
        thread.join(timeout=max(1.0, deadline - time.time()))
        report["wall_s"] = round(time.time() - started, 2)
        report["after_loss_s"] = round(time.time() - killed_at, 2)
        report["replacement_used"] = replacement.node_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        report.update(outcome)
        if run.trials_csv.exists():
            table = pd.read_csv(run.trials_csv)
            report["trials"] = table[["subtask", "status", "steps"]].to_dict("records")
        # Each trial's reports in order: a trial started again from its checkpoint goes on from that step (from
        # scratch, it would report its first steps twice).
        report["reported_steps"] = {}
        for progress in trials.glob("*/progress.csv"):
            rows = pd.read_csv(progress)
            report["reported_steps"][str(rows["subtask"].iloc[0])] = [int(step) for step in rows["step"]]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="stage-1 steps in all")
    parser.add_argument("--every", type=int, default=2, help="steps between checkpoints")
    parser.add_argument("--repeat", type=int, default=1, help="runs (the median and spread of each figure)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary dir)")
    parser.add_argument("--json", action="store_true", help="print each run's report as one JSON line")
    parser.add_argument("--stage2", action="store_true",
                        help="lose the node under a Ray Tune trial of stage 2 instead (--steps: the trial's steps, "
                             "--every: between its reports)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="musicray-node-loss-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(RAY_ENV)
    start_token_auth(out)
    if args.stage2:
        report = trial_node_loss(out, args.steps, args.every)
        print(json.dumps(report), flush=True)
        return 0 if "adapters" in report else 1
    reports = []
    for index in range(args.repeat):
        report = node_loss(out / f"repeat{index}", args.steps, args.every)
        reports.append(report)
        print(json.dumps(report) if args.json else
              f"run {index}: workers before {report.get('workers_before')}, after {report.get('workers_after')}; "
              f"died after step {report.get('died_after_step')}, restarted from {report.get('restart_step')}; "
              f"restart {report.get('restart_s')} s (replacement up {report.get('replacement_joined_s')} s, old "
              f"group gone {report.get('old_group_gone_s')} s, new workers up {report.get('new_workers_s')} s) + "
              f"redo {report.get('redo_s')} s = lost {report.get('lost_s')} s "
              f"(first start {report.get('start_s')} s, wall {report.get('wall_s')} s, step {report.get('step_s_median')} s)"
              f"{report.get('error', '')}",
              flush=True)
    if not args.json and len(reports) > 1 and all(key in r for r in reports for key in ("lost_s", "new_workers_s")):
        for key in ("restart_s", "old_group_gone_s", "new_workers_s", "redo_s", "lost_s", "start_s", "wall_s"):
            values = [r[key] for r in reports]
            print(f"{key}: median {statistics.median(values):.1f}, min {min(values):.1f}, max {max(values):.1f}")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)
    return 0 if all("model" in r for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where Ray Train and Ray Tune keep checkpoints (``ray_storage``): RUN/ray by default, or an S3 bucket, here a
local S3 server (moto) started by the test. Stage 1 is trained into the bucket, stopped and resumed from the
checkpoints there, and a small sweep keeps its trial checkpoints there too; the models stay in the run dir."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from musicray.errors import SongError
from musicray.run import RunDir
from musicray.train.config import load_config
from musicray.train.storage import ray_storage

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
BUCKET = "musicray-test"
# Ray Train knobs for a slow, shared 2-core machine (as in test_finetune.py).
RAY_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# Credentials for the local server (moto accepts any); Ray's processes inherit them from this one.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.parametrize("uri, path, shown, filesystem", [
    (None, "{run}/ray", "{run}/ray", None),
    ("s3://bucket/prefix?region=us-east-1", "bucket/prefix{run}", "s3://bucket/prefix{run}", "s3"),
    ("s3://bucket/prefix/?endpoint_override=http://127.0.0.1:9&region=eu-west-1", "bucket/prefix{run}",
     "s3://bucket/prefix{run}", "s3"),
    ("{tmp}/shared", "{tmp}/shared{run}", "{tmp}/shared{run}", "local"),
])
def test_each_run_dir_has_its_own_folder_in_the_storage(tmp_path, uri, path, shown, filesystem):
    run = RunDir(tmp_path / "runs" / "a")
    fill = {"run": str(run.root), "tmp": str(tmp_path)}
    config = load_config(None, [] if uri is None else [f"ray_storage={uri.format(**fill)}"])
    storage = ray_storage(config, run)
    assert storage.path == path.format(**fill)
    assert storage.location("stage1") == shown.format(**fill) + "/stage1"
    # None for RUN/ray: Ray resolves the plain path itself, as before ray_storage existed.
    assert (storage.filesystem and storage.filesystem.type_name) == filesystem
    # An ablation is a run dir of its own, so it never shares the main run's experiments.
    assert ray_storage(config, run.ablation(True)).path != storage.path


def test_a_run_started_again_from_scratch_removes_its_experiment(tmp_path):
    storage = ray_storage(load_config(None, [f"ray_storage={tmp_path / 'shared'}"]), RunDir(tmp_path / "run"))
    checkpoint = Path(storage.path) / "stage1" / "checkpoint_000002" / "latest"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("global_step2")
    storage.remove("stage2")                 # not there: nothing to do
    storage.remove("stage1")
    assert not (Path(storage.path) / "stage1").exists() and Path(storage.path).is_dir()


@pytest.mark.parametrize("override, message", [
    ("ray_storage=nope://bucket/x", "ray_storage: 'nope://bucket/x' cannot be opened"),
    ("ray_storage=s3://", "ray_storage: 's3://' names no bucket"),
    ("ray_storage=''", "ray_storage: ''"),
    ("stage1.placement_strategy=EVERYWHERE", "stage1.placement_strategy: 'EVERYWHERE'; expected PACK, SPREAD"),
])
def test_bad_storage_or_placement_names_the_field(tmp_path, override, message):
    with pytest.raises(SongError, match=message.replace("?", r"\?")):
        ray_storage(load_config(None, [override]), RunDir(tmp_path))


@pytest.fixture(scope="module")
def s3_server():
    """A local S3 server (moto) with one bucket; yields its endpoint URL."""
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {key: os.environ.get(key) for key in {**AWS_ENV, **RAY_ENV}}
    os.environ.update({**AWS_ENV, **RAY_ENV})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def bucket_keys(endpoint: str, prefix: str) -> list[str]:
    """Every object under ``prefix`` in the bucket, read with boto3 (not through musicray's or Ray's pyarrow)."""
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="module")
def ray_started(s3_server):
    import ray

    from musicray.data.prepare import ensure_ray

    # Ray's processes read the credentials from their environment (as on a cluster's nodes), so this module's
    # Ray starts after s3_server has set them: a Ray left running by an earlier module is shut down first.
    if ray.is_initialized():
        ray.shutdown()
    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_run(s3_server, ray_started, tmp_path_factory):
    """Stage 1 with ``ray_storage`` in the bucket: two steps, stopped, then resumed to four from the checkpoint
    there. Yields (run dir, its folder in the bucket, the overrides)."""
    from musicray.train.finetune import train_stage1

    tmp = tmp_path_factory.mktemp("s3")
    uri = f"s3://{BUCKET}/runs?endpoint_override={s3_server}&region=us-east-1"
    run = RunDir(tmp / "run")
    sets = [f"ray_storage={uri}", f"cache_dir={tmp / 'cache'}", "data.songs=16", "data.max_length=256",
            "stage1.lr_schedule=constant", "stage1.warmup_steps=1", "stage1.checkpoint_every=2",
            "stage1.keep_checkpoints=1", "stage1.max_steps=4", "stage2.subtasks=[chord]",
            "stage2.trials_per_subtask=1", "stage2.max_steps=2", "stage2.eval_every=1", "stage2.eval_batches=1"]
    prefix = f"runs{run.root}/"
    train_stage1(load_config(TINY, [*sets, "stage1.max_steps=2"]), run.root, progress=False)
    first = bucket_keys(s3_server, prefix + "stage1/")
    assert any(key.endswith("checkpoint_000002/latest") for key in first), first
    train_stage1(load_config(TINY, sets), run.root, resume=True, progress=False)
    return run, prefix, sets


def test_stage1_checkpoints_go_to_s3_and_a_resume_continues_from_them(s3_server, s3_run):
    run, prefix, _ = s3_run
    keys = bucket_keys(s3_server, prefix + "stage1/")
    checkpoints = sorted({key.split("/checkpoint_")[1].split("/")[0] for key in keys if "/checkpoint_0" in key})
    assert checkpoints == ["000004"]     # keep_checkpoints=1: Ray Train deleted step 2's from the bucket
    assert any("/checkpoint_000004/global_step4/" in key and key.endswith("optim_states.pt") for key in keys)
    assert not run.ray.exists()          # nothing of Ray's went to the run dir
    with run.stage1_metrics.open() as f:
        steps = [(int(float(row["step"])), int(float(row["start_step"]))) for row in csv.DictReader(f)]
    assert steps == [(1, 0), (2, 0), (3, 2), (4, 2)]     # the resumed run continued from step 2's checkpoint
    assert json.loads((run.stage1_model / "musicray.json").read_text())["step"] == 4
    assert run.has_model()               # the model the rest of the pipeline reads stays in the run dir


def test_stage2_trial_checkpoints_go_to_s3_and_the_adapter_to_the_run_dir(s3_server, s3_run):
    from musicray.train.tune import tune_adapters

    run, prefix, sets = s3_run
    adapters = tune_adapters(load_config(TINY, sets), run.root, progress=False)
    assert (adapters["chord"] / "adapter_model.safetensors").exists() and run.trials_csv.exists()
    trial_keys = bucket_keys(s3_server, prefix + "stage2/")
    assert any(key.endswith("adapter_model.safetensors") for key in trial_keys), trial_keys
    assert not run.ray.exists()

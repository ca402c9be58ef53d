"""Stage 1's driver: the full fine-tune of the base LLM with the music vocabulary, on Ray Train under DeepSpeed.

The driver (``train_stage1``) prepares the data, builds the initial model once (base LLM + music tokens, whose
mean-resized rows are random, so every rank must start from the same saved weights), and runs a Ray Train
``TorchTrainer``. Each worker loads that model, wraps it in a DeepSpeed engine (ZeRO-2/3 JSON from
``configs/deepspeed/``, the fields that the musicray config owns filled in from it) on the process group Ray
Train has already set up (gloo on CPU, nccl on GPU), and trains on its share of a seeded batch stream.

Layout of ``RUN_DIR/stage1``::

    config.yaml      the resolved configuration (load_config reads it back)
    init/            the initial model: base + music tokens (save_music_model)
    metrics.csv      one row per logged step, written by rank 0 (a restarted worker group appends again
                     from its checkpoint step; ``start_step`` says where each group started)
    tensorboard/     the same metrics for TensorBoard
    model/           the final model: fp32 weights consolidated from the last checkpoint (save_music_model)
    done.json        the hash of the settings the finished model was made with (musicray.rerun)

(``musicray.run.RunDir`` owns these paths.) A finished stage 1 with the same settings is kept; otherwise the run
is refused unless ``resume`` or ``force`` says what to do (``musicray.rerun.decide``).

and ``RUN_DIR/ray/stage1`` is the Ray Train run (``storage_path`` + ``name``): checkpoints
``checkpoint_000010/`` ... (each a DeepSpeed checkpoint: ``latest``, ``global_step10/`` with the per-rank
ZeRO shards) and the run snapshot that makes a later run with the same name and storage path resume. With
``ray_storage`` set (e.g. ``s3://bucket/prefix``) that run lives there instead (``musicray.train.storage``), and the
export downloads the last checkpoint into a temporary directory.

Resuming: Ray Train (v2 API, the default in Ray 2.60) restarts the worker group from the latest reported
checkpoint after a worker failure (``FailureConfig(max_failures)``), and a new ``TorchTrainer`` with the same
``RunConfig(name, storage_path)`` loads the run snapshot, so ``ray.train.get_checkpoint()`` returns the latest
checkpoint there too (``resume=True``). Either way the worker loads it with ``engine.load_checkpoint`` (model,
optimizer, LR-schedule state) and skips the batch stream to the saved step, so the run continues exactly where
the checkpoint left it. A resumed run must keep the number of workers, micro-batch, accumulation, data and base
model (the ZeRO shards and the data order depend on them); steps, checkpoint and logging intervals may change
(with a linear or cosine schedule, a new ``max_steps`` also reshapes the rest of the decay).

On a cluster of several nodes, RUN_DIR and ``cache_dir`` must be on storage that every node shares (NFS or
similar): workers read the initial model and the prepared data from there, rank 0 writes the metrics there, and
Ray Train keeps the checkpoints there unless ``ray_storage`` names a bucket. ``stage1.placement_strategy``
(``SPREAD``) puts the workers on different nodes. Each rank writes its DeepSpeed shard to a local temporary directory
(``$TMPDIR``) before Ray Train copies it into the run, so point ``TMPDIR`` at a large local disk for big models.
The final export consolidates the fp32 weights on the driver (about 32 GB of host memory for 8B parameters).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import yaml

from musicray.errors import SongError
from musicray.rerun import RESUME, RUN, SKIP, decide, read_saved, stage_keys, write_done
from musicray.run import RunDir
from musicray.train.config import Config, config_to_dict
from musicray.train.deepspeed_config import deepspeed_config
from musicray.train.stage1_metrics import ProgressTail, validation_missing
from musicray.train.stage1_models import build_init_model, export_model
from musicray.train.stage1_recipe import train_loop_per_worker
from musicray.train.storage import ray_storage

STAGE = "stage1"
# Settings a resumed run must share with the run it continues (ZeRO shards and data order depend on them).
RESUME_FIXED = ("base_model", "data", "stage1.tasks", "stage1.num_workers", "stage1.micro_batch_size",
                "stage1.gradient_accumulation_steps", "stage1.seed")


def _get(config_dict: dict, dotted: str):
    node = config_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def stage1_keys(config: Config) -> dict:
    """The settings the stage-1 model depends on (its re-run hash is theirs)."""
    return stage_keys(config_to_dict(config), "stage1")


def stage1_plan(config: Config, run: RunDir, resume: bool = False, force: bool = False) -> str:
    """RUN, SKIP or RESUME for stage 1 in ``run`` (``musicray.rerun.decide``), or a ``StageConflict``."""
    started = run.stage1.is_dir() and any(run.stage1.iterdir())
    saved = read_saved(run.stage1_done, started, run.stage1_done.exists() or run.has_model())
    return decide("stage1", run.stage1, saved, stage1_keys(config), resume, force, resumable=True)


def _check_resume(run: RunDir, config: Config) -> None:
    """A resumed run keeps RESUME_FIXED (its checkpoints and data order depend on them)."""
    saved = run.stage1_config
    if saved.exists():
        old, new = yaml.safe_load(saved.read_text()) or {}, config_to_dict(config)
        changed = [key for key in RESUME_FIXED if _get(old, key) != _get(new, key)]
        if changed:
            raise SongError(f"--resume: {', '.join(changed)} differ from the run in {run.stage1}; a resumed run "
                            "must keep them (its checkpoints and data order depend on them). Start a new --out "
                            "(or pass --force) for a different setup.")


def _write_config(config: Config, path: Path) -> None:
    header = ("# The resolved configuration of this stage-1 run (load_config reads it back).\n")
    path.write_text(header + yaml.safe_dump(config_to_dict(config), sort_keys=False))


def train_stage1(config: Config, run_dir: str | Path, resume: bool = False, progress: bool = True,
                 force: bool = False, data_dir: Path | None = None) -> Path:
    """Full fine-tune on Ray Train + DeepSpeed; returns the final model dir ``run_dir/stage1/model``.

    A finished stage 1 with the same settings is kept; one with other settings, or an unfinished one, is refused
    unless ``resume`` (continue from its latest checkpoint) or ``force`` (train again from scratch) says what to
    do (``musicray.rerun``). ``data_dir``: the prepared data, when the caller has resolved it already."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from musicray.data.prepare import ensure_ray
    from musicray.train.data import resolve_data_dir

    s = config.stage1
    run = RunDir(run_dir)
    plan = stage1_plan(config, run, resume, force)
    if plan == SKIP:
        return run.stage1_model
    storage = ray_storage(config, run)
    if plan == RESUME:
        _check_resume(run, config)
    elif plan == RUN and force:      # from scratch: the old model, metrics and Ray Train checkpoints go
        shutil.rmtree(run.stage1, ignore_errors=True)
        storage.remove(STAGE)
    ds_config = deepspeed_config(config)
    if not s.use_gpu:   # else DeepSpeed warns on every import that it found no GPU and chose the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ensure_ray()
    data_dir = data_dir or resolve_data_dir(config, progress=progress)
    run.stage1.mkdir(parents=True, exist_ok=True)
    run.stage1_done.unlink(missing_ok=True)    # unfinished until the model is exported again
    init_dir = run.stage1_init
    if not run.has_init_model():
        build_init_model(config, init_dir)
    _write_config(config, run.stage1_config)

    env_vars = {} if s.use_gpu else {"DS_ACCELERATOR": "cpu"}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "data_dir": str(data_dir), "init_dir": str(init_dir),
                           "run_dir": str(run.root), "ds_config": ds_config},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker},
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(name=STAGE, **storage.run_config(),
                             checkpoint_config=CheckpointConfig(num_to_keep=s.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             worker_runtime_env={"env_vars": env_vars}),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"))
    with ProgressTail(run.stage1_metrics, s.max_steps, progress):
        result = trainer.fit()
    if result.checkpoint is None:
        raise SongError(f"stage 1 reported no checkpoint (max_steps: {s.max_steps})")
    why = validation_missing(run.stage1_metrics)
    if why is not None:   # the workers' own warning stays in their logs
        warnings.warn(f"stage 1: trained without a validation loss: {why}", stacklevel=2)
    # A local checkpoint is read where it is; one in a bucket is downloaded to a temporary directory first.
    with result.checkpoint.as_directory() as checkpoint_dir:
        model = export_model(Path(checkpoint_dir), init_dir, run.stage1_model, s.precision)
    write_done(run.stage1_done, STAGE, stage1_keys(config))
    return model

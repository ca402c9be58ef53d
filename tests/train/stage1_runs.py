"""What the stage-1 tests share: Ray Train's knobs for a slow machine, the small settings every stage-1 run of the
tests starts from, and a run's metrics (the Ray instance itself is conftest.py's ``ray_cluster`` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

from musicray.run import RunDir
from musicray.train.stage1_metrics import read_metrics

# Ray Train knobs for a slow, shared 2-core machine: a longer worker-group start timeout, and a faster
# controller poll so reported checkpoints are registered soon after each report.
RAY_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def stage1_settings(cache_dir: Path, **values) -> list[str]:
    """``--set`` overrides of a small stage-1 run: 16 songs, rows of 256 tokens, a constant learning rate; keyword
    arguments add or replace settings (``stage1__max_steps=4`` for ``stage1.max_steps``)."""
    settings = {"cache_dir": str(cache_dir), "data.songs": 16, "data.max_length": 256,
                "stage1.lr_schedule": "constant"}
    settings.update({key.replace("__", "."): value for key, value in values.items()})
    return [f"{key}={json.dumps(value) if isinstance(value, bool) else value}" for key, value in settings.items()]


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(RunDir(run_dir).stage1_metrics)

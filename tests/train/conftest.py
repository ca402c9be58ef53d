"""The stage-1 tests' shared Ray instance (one per module, with Ray Train's knobs for a slow machine)."""

from __future__ import annotations

import os

import pytest

from .stage1_runs import RAY_ENV

@pytest.fixture(scope="module")
def ray_cluster():
    """One Ray instance for the module's runs (Ray Train starts a worker group in it per run)."""
    import ray

    from musicray.data.prepare import ensure_ray

    saved = {key: os.environ.get(key) for key in RAY_ENV}
    os.environ.update(RAY_ENV)
    started = not ray.is_initialized()
    ensure_ray()
    yield
    if started:
        ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

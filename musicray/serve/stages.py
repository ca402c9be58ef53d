"""The model side of the Serve graph: a deployment holding the stage-1 model with one or all sub-task adapters.

``StageComposer`` is one class for both layouts:

* per adapter: one deployment per sub-task, each replica loads the stage-1 model with only its own adapter;
* multiplexed: one deployment, each replica loads the stage-1 model once with all five adapters and switches
  with ``set_adapter`` per batch (a lock keeps two sub-tasks' batches from interleaving on the one model).

Each sub-task has its own ``@serve.batch`` method (``with_stage_methods``: named by its record), so concurrent requests for a
sub-task become one ``Composer.run_stage`` call: a single decode over the batch, one grammar state per row,
the mask computed in process (``musicray.engine.decode``). The multiplexed deployment also batches whole songs
(``compose``): the ingress makes one call per song, and a batch of concurrent songs goes through all its
stages together, so every stage decodes the whole batch instead of the few songs that happen to reach it at
the same moment. Requests in a batch that differ in sampling settings are run as separate groups. Songs travel
as ``song_to_dict`` JSON.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from ray import serve

from musicray.compose import Composer
from musicray.errors import MissingRunPart
from musicray.request import stage_request
from musicray.song import SongError, song_from_dict, song_to_dict
from musicray.tasks import SUBTASK_RECORDS


def _memory() -> dict:
    try:
        import psutil

        process = psutil.Process()
        info = process.memory_full_info()
        return {"rss_mb": round(info.rss / 2**20, 1), "uss_mb": round(info.uss / 2**20, 1)}
    except Exception:  # psutil missing or no permission: memory is informative only
        return {}


def _error(err: BaseException) -> dict:
    """A failed song's answer; ``status`` 400 where the request asked for what the deployment cannot do as asked
    (a stage without its adapter), else the ingress answers 500."""
    return {"error": {"type": "SongError" if isinstance(err, SongError) else type(err).__name__,
                      "message": str(err), **({"status": 400} if isinstance(err, MissingRunPart) else {})}}


def with_stage_methods(run_one_stage: str, batched: bool):
    """Class decorator: one method per sub-task, named by its record (``SubTask.serve_method``), that answers
    ``self.<run_one_stage>(task, songs, settings)``; ``batched`` makes each a ``@serve.batch`` method (its own
    queue, so concurrent calls for one sub-task decode together). The ingress calls a stage by that name."""
    def decorate(cls):
        for record in SUBTASK_RECORDS.values():
            setattr(cls, record.serve_method, _stage_method(record.name, record.serve_method, run_one_stage, batched))
        return cls
    return decorate


def _stage_method(task: str, name: str, run_one_stage: str, batched: bool):
    async def method(self, songs, settings):
        return await getattr(self, run_one_stage)(task, songs, settings)

    # Serve's batching finds a method by its __name__, so the name is set before decorating.
    method.__name__, method.__qualname__ = name, name
    method.__doc__ = f"The {task} stage alone, on the song(s) and settings given."
    return serve.batch(method) if batched else method


@serve.deployment(name="StageComposer")
@with_stage_methods("_batch", batched=True)
class StageComposer:
    def __init__(self, run_dir: str, subtasks: list[str], options: dict, config: dict):
        import torch

        threads = config.get("torch_threads") or max(1, int(options.get("ray_actor_options", {}).get("num_cpus", 1)))
        torch.set_num_threads(threads)
        device = config.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and options.get("ray_actor_options", {}).get("num_gpus") \
                else "cpu"
        self.subtasks, self.device, self.threads = list(subtasks), device, threads
        self.composer = Composer(run_dir, device, tuple(self.subtasks), config.get("tokens_per_bar"))
        self.lock = threading.Lock()
        self.batches = {task: 0 for task in self.subtasks}
        self.songs = {task: 0 for task in self.subtasks}
        for name in (*(task.serve_method for task in SUBTASK_RECORDS.values()), "compose"):
            method = getattr(self, name)
            method.set_max_batch_size(int(options["max_batch_size"]))
            method.set_batch_wait_timeout_s(float(options["batch_wait_timeout_s"]))

    # -- one batched entry point per sub-task: ``with_stage_methods`` adds them (``SubTask.serve_method``) --------
    @serve.batch
    async def compose(self, songs: list[dict], settings: list[dict], stages: list[list[str]]) -> list[dict]:
        """Whole songs: each through its ``stages`` (in order), the batch's songs decoding together per stage.
        Answers per song ``{"song", "infos": {task: info}}``, or ``{"error", "stage"}`` for the stage that failed."""
        missing = {task for row in stages for task in row} - set(self.subtasks)
        if missing:
            return [{**_error(SongError(f"stages: this deployment serves {self.subtasks}, not {sorted(missing)}")),
                     "stage": sorted(missing)[0]}] * len(songs)
        return await asyncio.to_thread(self._compose, songs, settings, stages)

    def _compose(self, songs: list[dict], settings: list[dict], stages: list[list[str]]) -> list[dict]:
        return self._run_stages(songs, settings, stages, finish_songs=False)

    async def _batch(self, task: str, songs: list[dict], settings: list[dict]) -> list[dict]:
        if task not in self.subtasks:
            return [_error(SongError(f"stages: this deployment serves {self.subtasks}, not {task}"))] * len(songs)
        # The decode runs in a worker thread so that the replica keeps taking requests into the next batch.
        results = await asyncio.to_thread(self._run_stages, songs, settings, [[task]] * len(songs), False)
        return [out if "error" in out else {"song": out["song"], "info": out["infos"][task]} for out in results]

    def _run_stages(self, songs: list[dict], settings: list[dict], stages: list[list[str]],
                    finish_songs: bool) -> list[dict]:
        """``Composer.run_stages`` on the batch (songs that fail stop alone). Answers per song
        ``{"song", "infos": {task: info}}``, or ``{"error", "stage"}`` for the stage that failed."""
        results: list[dict | None] = [None] * len(songs)
        rows, batch, requests = [], [], []
        for i, (song, setting) in enumerate(zip(songs, settings)):
            try:   # a song that cannot be read stops alone
                parsed = song_from_dict(song)
                requests.append(stage_request(parsed, setting))
            except (SongError, KeyError, TypeError, ValueError) as err:
                results[i] = {**_error(err), "stage": stages[i][0] if stages[i] else "input"}
                continue
            rows.append(i)
            batch.append(parsed)
        started = time.perf_counter()
        with self.lock:
            done = self.composer.run_stages(batch, requests, [stages[i] for i in rows], isolate_failures=True,
                                            finish_songs=finish_songs)
        wall = round(time.perf_counter() - started, 3)
        ran = [task for composition in done for task in composition.stages]
        for task in set(ran):
            self.batches[task] += 1
            self.songs[task] += ran.count(task)
        for i, composition in zip(rows, done):
            if composition.failed_stage is not None:
                results[i] = {**_error(composition.error), "stage": composition.failed_stage}
                continue
            infos = {task: {**info, "batch_seconds": wall, "replica_pid": os.getpid()}
                     for task, info in composition.stages.items()}
            results[i] = {"song": song_to_dict(composition.song), "infos": infos}
        return results

    # -- introspection ------------------------------------------------------------------------------------------
    async def info(self) -> dict:
        return {"subtasks": self.subtasks, "adapters": list(self.composer.adapters), "device": self.device,
                "torch_threads": self.threads, "pid": os.getpid(), "batches": dict(self.batches),
                "songs": dict(self.songs), **_memory()}

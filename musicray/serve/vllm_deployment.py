"""The Serve deployment of the vLLM engine (``engine: vllm``): the model side of the graph, as ``StageComposer``
is for musicray's own loop, answering the ingress with the same contract.

Each replica holds one ``VllmStages`` engine. Every call is a coroutine on the replica's event loop that runs its
song's stages as engine requests: concurrent calls meet in the engine's running batch (continuous batching),
so there is no ``@serve.batch`` window to wait for. ``compose`` runs a whole song (the layout with every adapter
in one engine); the per-sub-task methods (``chord``, ``melody``, ...) run one stage (the per-adapter layout,
one engine per sub-task deployment); ``compose_stream`` is ``compose`` as a stream of events for
``POST /v1/generate/stream``. A caller that goes away cancels its coroutine, and vLLM aborts the request.
"""

from __future__ import annotations

import os

from ray import serve

from musicray.compose import StageFailed
from musicray.request import stage_request
from musicray.serve.stages import _error, _memory, with_stage_methods
from musicray.song import SongError, song_from_dict, song_to_dict


@serve.deployment(name="VllmComposer")
@with_stage_methods("_stage", batched=False)
class VllmComposer:
    def __init__(self, run_dir: str, subtasks: list[str], options: dict, config: dict):
        from musicray.engine.vllm_engine import VllmStages

        device = config.get("device", "auto")
        if device == "auto":
            device = "cuda" if options.get("ray_actor_options", {}).get("num_gpus") else "cpu"
        self.subtasks, self.device = list(subtasks), device
        self.stages = VllmStages(run_dir, tuple(self.subtasks), config.get("tokens_per_bar"), device,
                                 config.get("vllm_engine_args"))
        self.songs = 0

    def __del__(self):
        stages = getattr(self, "stages", None)
        if stages is not None:
            stages.shutdown()

    # -- whole songs ---------------------------------------------------------------------------------------------
    async def compose(self, song: dict, settings: dict, stages: list[str]) -> dict:
        """``{"song", "infos": {task: info}}``, or ``{"error", "stage"}`` for the stage that failed."""
        result = None
        async for event in self.compose_stream(song, settings, stages, bar_events=False):
            result = event
        return result["data"]

    async def compose_stream(self, song: dict, settings: dict, stages: list[str], bar_events: bool = True):
        """Events ``{"event": "stage" | "bar" | "stage_done", "data": {...}}`` as the song's stages run, then
        ``{"event": "result", "data": {"song", "infos"}}`` (or ``{"error", "stage"}`` for the stage that failed)."""
        missing = sorted(set(stages) - set(self.subtasks))
        if missing:
            yield {"event": "result", "data": {**_error(SongError(
                f"stages: this deployment serves {self.subtasks}, not {missing}")), "stage": missing[0]}}
            return
        try:
            parsed = song_from_dict(song)
            request = stage_request(parsed, settings)
        except (SongError, KeyError, TypeError, ValueError) as err:
            yield {"event": "result", "data": {**_error(err), "stage": stages[0] if stages else "input"}}
            return
        infos: dict[str, dict] = {}
        try:
            async for event in self.stages.compose(parsed, request, stages, bar_events):
                if event.kind == "stage_done":
                    # batch_seconds: the stage's wall time here (the ingress reports it as the stage's wall time)
                    infos[event.data["stage"]] = {**event.data, "batch_seconds": event.data["seconds"],
                                                  "replica_pid": os.getpid()}
                yield {"event": event.kind, "data": event.data}
        except StageFailed as err:
            yield {"event": "result", "data": {**_error(err.error), "stage": err.stage}}
            return
        self.songs += 1
        yield {"event": "result", "data": {"song": song_to_dict(parsed), "infos": infos}}

    # -- one stage per call (the per-adapter layout): ``with_stage_methods`` adds one method per sub-task ----------
    async def _stage(self, task: str, song: dict, settings: dict) -> dict:
        out = await self.compose(song, settings, [task])
        return out if "error" in out else {"song": out["song"], "info": out["infos"][task]}

    def check_health(self) -> None:
        """Serve calls this periodically: a dead engine fails it, and Serve replaces the replica."""
        engine = self.stages.engine
        if engine is None or engine.errored:
            raise RuntimeError("the vLLM engine of this replica is dead")

    # -- introspection ------------------------------------------------------------------------------------------
    async def info(self) -> dict:
        engine = self.stages
        return {"engine": "vllm", "subtasks": self.subtasks, "adapters": list(engine.loras), "device": self.device,
                "pid": os.getpid(), "running_requests": engine.running, "songs": self.songs,
                "requests": dict(engine.requests), "engine_args": engine.engine_args, **_memory()}


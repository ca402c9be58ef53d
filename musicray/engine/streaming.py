"""``musicray generate --stream``: one song composed on an in-process vLLM engine, each bar printed as it is
generated (the same events ``POST /v1/generate/stream`` sends)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import TextIO

from musicray.compose import Composer, StageFailed, finish
from musicray.request import Request
from musicray.song import Song, SongError
from musicray.tasks import SUBTASK_RECORDS
from musicray.tokens import SUBTASKS


def describe_event(kind: str, data: dict) -> str:
    """One line per event, for a terminal."""
    if kind == "stage":
        return f"== {data['stage']} ({data['bars']} bars, adapter {data.get('adapter')})"
    if kind == "stage_done":
        return f"   {data['stage']}: {data['new_tokens']} tokens in {data['seconds']} s"
    detail = "; ".join(f"{key} {data[key]}" for key in dict.fromkeys(t.bar_event for t in SUBTASK_RECORDS.values())
                       if key in data)
    return f"   bar {data['bar']:>3} ({data['section']} bar {data['bar_in_section']}): {detail}"


def compose_streaming(run_dir: str | Path, request: Request, adapters: tuple[str, ...] = SUBTASKS,
                      out: TextIO = sys.stdout, engine_args: dict | None = None) -> tuple[Song, dict]:
    """Compose ``request`` on a vLLM engine for ``run_dir``, printing its events to ``out`` as they come;
    (song, report) as ``Composer.compose`` answers. ``engine_args``: extra ``vllm.AsyncEngineArgs``, as the
    server's ``vllm_engine_args``."""
    from musicray.engine.available import vllm_available

    if not vllm_available():
        raise SongError('--stream: composing bar by bar needs vLLM (pip install -e ".[vllm]"); '
                        "without it, drop --stream")
    from musicray.engine.vllm_engine import VllmStages

    song = request.song()
    stages = VllmStages(run_dir, adapters, engine_args=engine_args)
    started = time.perf_counter()
    report: dict = {"stages": {}}

    async def run() -> None:
        async for event in stages.compose(song, request, Composer.stages_for(request), bar_events=True):
            print(describe_event(event.kind, event.data), file=out, flush=True)
            if event.kind == "stage_done":
                report["stages"][event.data["stage"]] = event.data

    try:
        asyncio.run(run())
    except StageFailed as err:
        raise SongError(str(err)) from None
    finally:
        stages.shutdown()
    finish(song)
    report.update(form=song.form, key=song.key, metre=song.metre, seconds=round(time.perf_counter() - started, 3))
    return song, report

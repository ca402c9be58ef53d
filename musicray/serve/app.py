"""The musicray Ray Serve application: an HTTP ingress composing the sub-task deployments.

``POST /v1/generate`` takes a plan (form, key, metre, tempo, seed; optional chords, a melody as MIDI, the
stages to run, sampling settings) and answers a three-track MIDI (MELODY, BRIDGE, PIANO), as JSON with the
MIDI in base64, its notes (``song``: ``song_to_dict`` of the MIDI, for the page's piano roll) and a per-stage report,
or as ``audio/midi`` bytes (``Accept: audio/midi`` or ``?format=midi``). ``POST /v1/render`` turns a MIDI file
into a WAV (``musicray.serve.audio``), ``POST /v1/export`` into MusicXML (``musicray.musicxml``), ``POST /v1/song``
into the notes the page draws (a song dropped on it). ``GET /`` is the web page (``musicray.serve.page``),
``GET /healthz`` reports the adapters each deployment holds; ``/docs`` is the OpenAPI UI.

The ingress (``Ingress``) validates the request, builds the empty song and calls the stage deployments through
``DeploymentHandle``s in stage order (chord, melody, secondary, dynamics, tempo), passing the song as
``song_to_dict`` JSON; each stage deployment batches concurrent songs (``musicray.serve.stages``). In
multiplexed mode it makes one call per song to the one deployment, which batches whole songs.

Launch: ``musicray serve --run RUN_DIR`` (the command line parses its options and calls ``serve_forever``
here), ``serve run configs/serve/app.yaml`` (``app_builder``), or ``serve.run(build_app(run_dir, config))`` from
Python.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations of the Serve class view.
import asyncio
import base64
import contextlib
import functools
import io
import json
import signal
import threading
import time
from pathlib import Path
from typing import Literal, Optional

from fastapi import FastAPI, Query
from fastapi import Request as HTTPRequest
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from musicray.compose import Composer, StageFailed, finish
from musicray.midi import TEXT_CHARSET, midi_to_song, song_to_midi
from musicray.run import RunDir
from musicray.serve.config import (
    APP_NAME, DEFAULT_HOST, DEFAULT_PORT, DEPLOYMENT_KEYS, read_config_file, serve_config, stage_options,
)
from musicray.serve.audio import AudioUnavailable, Renderer
from musicray.serve.page import INDEX, static_files
from musicray.request import stage_settings
from musicray.serve.schema import (ExportBody, GenerateBody, InputError, RenderBody, request_song, to_request,
                                   uploaded_song)
from musicray.serve.stages import StageComposer
from musicray.song import SongError, song_from_dict, song_to_dict
from musicray.tasks import subtask
from musicray.tokens import SUBTASKS
from musicray.train.config import run_defaults

MIDI_TYPES = ("audio/midi", "audio/x-midi", "audio/mid")
BODY_SLACK = 64 * 1024  # room for the JSON around a melody upload

api = FastAPI(
    title="musicray",
    description="Structured, expressive pop songs from an LLM with one LoRA adapter per sub-task, on Ray Serve.",
    version="0.1.0")


# -- errors: bad input is a 4xx naming the field, never a 5xx ----------------------------------------------------
def _field_of(message: str) -> str:
    head, sep, _ = message.partition(":")
    return head.strip() if sep and head.strip().replace("_", "").isalnum() else "body"


@api.exception_handler(RequestValidationError)
async def _validation_error(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
    errors = jsonable_encoder(exc.errors())
    lines, fields = [], []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "json_invalid" or not loc:
            field = "body"
        else:
            field = loc[0] if not loc[0].isdigit() else "body"
        fields.append(field)
        where = ".".join(loc) if field != "body" else "body"
        reason = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":
            reason = f"invalid JSON ({(error.get('ctx') or {}).get('error', 'cannot parse')})"
        lines.append(f"{where}: {reason}")
    return JSONResponse(status_code=422, content={"detail": errors, "field": fields[0] if fields else "body",
                                                  "message": "; ".join(lines)})


@api.exception_handler(SongError)
async def _song_error(request: HTTPRequest, exc: SongError) -> JSONResponse:
    field = exc.field if isinstance(exc, InputError) else _field_of(str(exc))
    status = exc.status if isinstance(exc, InputError) else 400
    return JSONResponse(status_code=status, content={"detail": str(exc), "field": field})


@api.exception_handler(StageFailed)
async def _stage_failed(request: HTTPRequest, exc: StageFailed) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"detail": str(exc), "stage": exc.stage})


@api.exception_handler(AudioUnavailable)
async def _audio_unavailable(request: HTTPRequest, exc: AudioUnavailable) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"detail": str(exc), "stage": "render"})


# The body limit of this process's ingress. Set through a module-level function: Serve serves a frozen copy of
# ``api`` and runs a by-value copy of the ingress class, so neither can carry state the middleware would see.
_BODY_LIMIT: dict[str, int] = {}


def _set_body_limit(max_midi_bytes: int) -> int:
    _BODY_LIMIT["bytes"] = 4 * ((max_midi_bytes + 2) // 3) + BODY_SLACK
    return _BODY_LIMIT["bytes"]


@api.middleware("http")
async def _limit_body(request: HTTPRequest, call_next):
    """Refuse a body larger than the largest allowed upload before it is read (413)."""
    limit = _BODY_LIMIT.get("bytes")
    length = request.headers.get("content-length")
    if limit and length and length.isdigit() and int(length) > limit:
        return JSONResponse(status_code=413, content={
            "detail": f"body: {int(length)} bytes exceeds the limit of {limit} bytes "
                      f"(melody_midi up to max_midi_bytes as base64, plus {BODY_SLACK} bytes)", "field": "body"})
    return await call_next(request)


def midi_bytes(song) -> bytes:
    buffer = io.BytesIO()
    song_to_midi(song).dump(file=buffer, charset=TEXT_CHARSET)
    return buffer.getvalue()


def musicxml_bytes(song, lead_sheet: bool) -> bytes:
    """The song's MusicXML (``musicray.musicxml``: what ``musicray export --musicxml`` writes)."""
    import tempfile

    from musicray.musicxml import write_musicxml

    with tempfile.TemporaryDirectory(prefix="musicray-export-") as folder:
        return write_musicxml(song, Path(folder) / "song.musicxml", lead_sheet).read_bytes()


def song_answer(data: bytes) -> dict:
    """A MIDI file as the page shows a song: the file, its notes and grid (the fields a /v1/generate answer has
    for them)."""
    song = midi_to_song(data)
    spec = song.spec
    return {"midi": base64.b64encode(data).decode("ascii"), "form": song.form, "bars": song.n_bars, "key": song.key,
            "metre": song.metre, "song": song_to_dict(song),
            "grid": {"beats_per_bar": spec.beats_per_bar, "positions_per_beat": spec.positions_per_beat}}


def song_as_written(data: bytes) -> dict:
    """``song_to_dict`` of the song as its MIDI file holds it: what the page draws is what the WAV plays and what
    a regenerated section keeps (MIDI cuts a note where its pitch sounds again, and merges equal tempos)."""
    return song_to_dict(midi_to_song(data))


# The ingress's helpers come before it: Serve pickles the ingress class by value when it is decorated, and a
# function defined below the class would be missing from the copy.
def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _stage_result(out: dict, tasks: list[str], infos: dict):
    """The song a (streamed) stage call answered, its stages' reports added to ``infos``; StageFailed if it failed."""
    if "error" in out:
        raise _failed(out.get("stage", tasks[0]), out["error"])
    infos.update(out["infos"])
    return song_from_dict(out["song"])


def _stage_reports(infos: dict[str, dict]) -> dict[str, dict]:
    """Each stage's report as `musicray generate` writes it (the composer's), plus what serving adds."""
    return {task: {key: value for key, value in info.items() if key != "replica_pid"} for task, info in infos.items()}


def _finished_midi(song) -> bytes:
    try:
        finish(song)
        return midi_bytes(song)
    except SongError as err:  # the composed song, not the request, is at fault
        raise StageFailed("finish", f"finish: the composed song cannot be written: {err}", 500) from None


def _planned(request, stages: list[str]) -> dict:
    """The answer's account of a prompt (the plan and the request's fields taken from it) and of a tempo direction
    (where the ``stages`` run applied it): nothing without either."""
    planned = {"plan": request.plan, "from_plan": list(request.from_plan)} if request.plan is not None else {}
    if request.plan is not None or request.tempo_direction != "steady":
        planned["tempo_direction"] = request.tempo_direction_applied(stages)
    return planned


def _failed(task: str, error: dict) -> StageFailed:
    # The ingress has validated the request, so a stage failing is the server's fault (e.g. a model output that
    # does not decode), not the client's: a 500 naming the stage.
    # A deployment marks what the request asked for and cannot have (a stage without its adapter) as 400.
    if error.get("status") == 400:
        return StageFailed(task, error["message"], 400)
    return StageFailed(task, f"{task}: the stage failed on this song: {error['type']}: {error['message']}", 500)


# -- building the graph ------------------------------------------------------------------------------------------
# -- the ingress -------------------------------------------------------------------------------------------------
@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, stages: dict[str, DeploymentHandle], config: dict):
        self.stages, self.config = stages, config
        self.max_bars, self.max_midi_bytes = int(config["max_bars"]), int(config["max_midi_bytes"])
        self.max_body_bytes = _set_body_limit(self.max_midi_bytes)
        self.renderer = Renderer(self.max_midi_bytes, int(config["render_sample_rate"]),
                                 float(config["max_render_seconds"]))
        self.files = static_files()
        # What a request leaves unsaid is composed as the run's evaluation composed (eval.sampling/variation).
        self.run_defaults = run_defaults(config["run_dir"])
        self.planner, self.planner_lock = None, threading.Lock()

    # The page names its files and the API relatively, so it works under any route prefix (Starlette redirects
    # /prefix to /prefix/).
    @api.get("/", include_in_schema=False)
    async def page(self) -> Response:
        content, media_type = self.files[INDEX]
        return Response(content=content, media_type=media_type)

    @api.get("/static/{name}", include_in_schema=False)
    async def static_file(self, name: str) -> Response:
        if name not in self.files:
            return JSONResponse(status_code=404, content={"detail": f"no static file {name!r}", "field": "path"})
        content, media_type = self.files[name]
        return Response(content=content, media_type=media_type, headers={"Cache-Control": "no-cache"})

    @api.get("/healthz", summary="liveness, and the adapters each sub-task deployment holds")
    async def healthz(self) -> JSONResponse:
        deployments: dict[str, dict] = {}
        for name, handle in {h.deployment_name: h for h in self.stages.values()}.items():
            try:
                deployments[name] = await asyncio.wait_for(handle.info.remote(), timeout=30)
            except Exception as err:  # a stage that cannot answer makes the service unhealthy
                deployments[name] = {"error": f"{type(err).__name__}: {err}"}
        adapters = {}
        for task, handle in self.stages.items():
            info = deployments[handle.deployment_name]
            adapters[task] = task if task in info.get("adapters", ()) else None
        ok = not any("error" in info for info in deployments.values())
        return JSONResponse(status_code=200 if ok else 503, content={
            "ok": ok, "mode": "multiplexed" if self.config["multiplexed"] else "per-adapter",
            "engine": self.config["engine"],
            "adapters": adapters, "deployments": deployments,
            "limits": {"max_bars": self.max_bars, "max_midi_bytes": self.max_midi_bytes}})

    @api.post("/v1/generate", summary="compose a song",
              responses={200: {"content": {"application/json": {}, "audio/midi": {}},
                               "description": "JSON with the MIDI in base64 and a per-stage report, or the MIDI"},
                         400: {"description": "the music rules refuse a field (named in the message)"},
                         413: {"description": "melody_midi or the body is larger than allowed"},
                         422: {"description": "a field has the wrong type or is out of range"}})
    async def generate(self, body: GenerateBody, http: HTTPRequest,
                       format: Optional[Literal["json", "midi"]] = Query(
                           None, description="midi: answer audio/midi bytes (as Accept: audio/midi)")) -> Response:
        started = time.perf_counter()
        request = await self._request(body)
        song = request_song(request)
        settings = stage_settings(request)
        plan = Composer.stages_for(request)
        if self.config["multiplexed"]:
            song, infos = await self._compose_whole(song, settings, plan)
        else:
            song, infos = await self._compose_by_stage(song, settings, plan)
        stages = _stage_reports(infos)
        data = _finished_midi(song)
        seconds = round(time.perf_counter() - started, 3)
        accept = http.headers.get("accept", "")
        if format == "midi" or (format is None and any(t in accept for t in MIDI_TYPES)):
            return Response(content=data, media_type="audio/midi", headers={
                "Content-Disposition": 'attachment; filename="musicray.mid"', "X-Musicray-Form": song.form,
                "X-Musicray-Bars": str(song.n_bars), "X-Musicray-Seconds": str(seconds),
                **({"X-Musicray-From-Plan": ",".join(request.from_plan)} if request.plan is not None else {})})
        try:
            written = await asyncio.to_thread(song_as_written, data)
        except SongError as err:  # our own MIDI that does not read back: the server's fault
            raise StageFailed("finish", f"finish: the written song does not read back: {err}", 500) from None
        spec = song.spec
        return JSONResponse({"midi": base64.b64encode(data).decode("ascii"), "form": song.form, "bars": song.n_bars,
                             "key": song.key, "metre": song.metre, "seed": request.seed, "stages": stages,
                             "seconds": seconds, "song": written, "from_run": request.taken_from_run(),
                             "grid": {"beats_per_bar": spec.beats_per_bar,
                                      "positions_per_beat": spec.positions_per_beat}, **_planned(request, plan)})

    @api.post("/v1/generate/stream", summary="compose a song, streamed as Server-Sent Events",
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "events: stage (a stage starts), bar (a bar of it is complete: "
                                              "engine vllm), stage_done (its report), song (the MIDI in base64), "
                                              "or error"},
                         400: {"description": "the music rules refuse a field (named in the message)"},
                         413: {"description": "melody_midi or the body is larger than allowed"},
                         422: {"description": "a field has the wrong type or is out of range"}})
    async def generate_stream(self, body: GenerateBody) -> Response:
        # The request is checked before the stream starts: bad input is the same 4xx as /v1/generate.
        request = await self._request(body)
        song = request_song(request)
        stages = Composer.stages_for(request)
        return StreamingResponse(self._stream(song, stage_settings(request), stages, request.seed,
                                              _planned(request, stages)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _stream(self, song, settings: dict, plan: list[str], seed: int, planned: dict):
        """The SSE body: each stage's events as its deployment yields them (vLLM: bars as they are generated;
        native: a stage's start and end), then the song. A client that leaves cancels the stage calls."""
        started, infos = time.perf_counter(), {}
        try:
            for task, tasks in self._stream_calls(plan):
                handle = self.stages[task]
                if self.config["engine"] == "vllm":
                    calls = handle.options(stream=True).compose_stream.remote(song_to_dict(song), settings, tasks)
                    async for event in calls:
                        if event["event"] == "result":
                            song = _stage_result(event["data"], tasks, infos)
                        else:
                            yield _sse(event["event"], event["data"])
                else:   # musicray's own loop decodes a stage in one call: its start and end are the events
                    yield _sse("stage", {"stage": task, "bars": song.n_bars})
                    out = await getattr(handle, subtask(task).serve_method).remote(song_to_dict(song), settings)
                    song = _stage_result({"song": out["song"], "infos": {task: out["info"]}} if "song" in out
                                         else out, tasks, infos)
                    yield _sse("stage_done", {"stage": task, **infos[task]})
            data = _finished_midi(song)
            yield _sse("song", {"midi": base64.b64encode(data).decode("ascii"), "form": song.form,
                                "bars": song.n_bars, "key": song.key, "metre": song.metre, "seed": seed,
                                "stages": _stage_reports({task: {**info, "wall_seconds": info.get("seconds")}
                                                          for task, info in infos.items()}),
                                "seconds": round(time.perf_counter() - started, 3), **planned})
        except StageFailed as err:
            yield _sse("error", {"detail": str(err), "stage": err.stage, "status": err.status})
        except Exception as err:   # a deployment that died mid-stream: the client hears why
            yield _sse("error", {"detail": f"{type(err).__name__}: {err}", "stage": "compose", "status": 503})

    async def _request(self, body: GenerateBody):
        """The body's composer request; a prompt is planned in a worker thread (a model's forward passes)."""
        build = functools.partial(to_request, body, self.max_bars, self.max_midi_bytes, self._plan, self.run_defaults)
        return build() if body.prompt is None else await asyncio.to_thread(build)

    def _plan(self, prompt: str, max_bars: int):
        """The plan of a prompt, by the config's ``planner`` (loaded on the first prompt; one plan at a time)."""
        from musicray.prompt_plan import load_planner

        with self.planner_lock:
            if self.planner is None:
                base = self.config["planner"]
                self.planner = load_planner(base, None if base else self.config["run_dir"])
            return self.planner.plan(prompt, max_bars)

    def _stream_calls(self, plan: list[str]) -> list[tuple[str, list[str]]]:
        """(deployment's sub-task, stages it runs) per call: one call for the whole song where one vLLM deployment
        holds every adapter, else one per stage."""
        if self.config["engine"] == "vllm" and self.config["multiplexed"] and plan:
            return [(plan[0], list(plan))]
        return [(task, [task]) for task in plan]

    @api.post("/v1/render", summary="render a MIDI file (e.g. a composed song) to a WAV",
              responses={200: {"content": {"audio/wav": {}}, "description": "16-bit stereo WAV"},
                         400: {"description": "midi is not base64 or not a MIDI file"},
                         413: {"description": "midi is larger than max_midi_bytes or longer than max_render_seconds"},
                         503: {"description": "no renderer or soundfont is installed on the server"}})
    async def render(self, body: RenderBody) -> Response:
        audio = await self.renderer.render(body.midi)
        return Response(content=audio.wav, media_type="audio/wav", headers={
            "Content-Disposition": 'attachment; filename="musicray.wav"', "X-Musicray-Renderer": audio.renderer,
            "X-Musicray-Seconds": f"{audio.seconds:.3f}"})


    @api.post("/v1/song", summary="read a MIDI file as the page shows a song (e.g. one dropped on it)",
              responses={400: {"description": "midi is not base64 or not a MIDI file, or has more than max_bars"},
                         413: {"description": "midi is larger than max_midi_bytes"}})
    async def song(self, body: RenderBody) -> JSONResponse:
        # Written again by musicray: the page then sends back a file whose markers carry key, chords and form.
        song = uploaded_song(body.midi, self.max_midi_bytes, max_bars=self.max_bars)
        answer = await asyncio.to_thread(song_answer, midi_bytes(song))
        return JSONResponse({**answer, "seed": None, "stages": {}, "seconds": 0.0})

    @api.post("/v1/export", summary="a MIDI file as MusicXML (full score or lead sheet) for score editors",
              responses={200: {"content": {"application/vnd.recordare.musicxml+xml": {}},
                               "description": "uncompressed MusicXML"},
                         400: {"description": "midi is not base64 or not a MIDI file"},
                         413: {"description": "midi is larger than max_midi_bytes"}})
    async def export(self, body: ExportBody) -> Response:
        song = uploaded_song(body.midi, self.max_midi_bytes)
        try:
            data = await asyncio.to_thread(musicxml_bytes, song, body.lead_sheet)
        except SongError as err:
            raise InputError("midi", str(err)) from None
        name = "musicray-lead-sheet.musicxml" if body.lead_sheet else "musicray.musicxml"
        return Response(content=data, media_type="application/vnd.recordare.musicxml+xml",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def _compose_by_stage(self, song, settings: dict, plan: list[str]) -> tuple:
        """One handle call per stage, each to that sub-task's deployment (which batches it with other songs)."""
        infos: dict[str, dict] = {}
        for task in plan:
            tick = time.perf_counter()
            method = getattr(self.stages[task], subtask(task).serve_method)
            try:
                out = await method.remote(song_to_dict(song), settings)
            except Exception as err:
                raise StageFailed(task, f"{task}: stage deployment unavailable: {type(err).__name__}: {err}", 503)
            if "error" in out:
                raise _failed(task, out["error"])
            song = song_from_dict(out["song"])
            infos[task] = {**out["info"], "wall_seconds": round(time.perf_counter() - tick, 3)}
        return song, infos

    async def _compose_whole(self, song, settings: dict, plan: list[str]) -> tuple:
        """One handle call for the whole song to the multiplexed deployment (which batches whole songs)."""
        if not plan:
            return song, {}
        try:
            out = await self.stages[plan[0]].compose.remote(song_to_dict(song), settings, plan)
        except Exception as err:
            raise StageFailed("compose", f"compose: deployment unavailable: {type(err).__name__}: {err}", 503)
        if "error" in out:
            raise _failed(out.get("stage", "compose"), out["error"])
        # One call covered every stage: each stage's wall time is its batch's decode wall time in the replica.
        return song_from_dict(out["song"]), {task: {**info, "wall_seconds": info["batch_seconds"]}
                                             for task, info in out["infos"].items()}


def _check_run_dir(run_dir: str) -> None:
    RunDir(run_dir).require("stage-1 model")


def _deployment(options: dict) -> dict:
    return {key: options[key] for key in DEPLOYMENT_KEYS if key in options}


def build_app(run_dir: str | Path | None = None, config: dict | None = None) -> Application:
    """The Serve application: ingress + one deployment per sub-task (or one multiplexed deployment)."""
    config = serve_config(config, run_dir=str(run_dir) if run_dir is not None else None)
    if not config["run_dir"]:
        raise SongError("run_dir: no run dir given (musicray serve --run RUN_DIR, or args.run_dir in the config)")
    _check_run_dir(config["run_dir"])
    # The model side: musicray's own loop (StageComposer) or a vLLM engine per replica (VllmComposer), either
    # one deployment with every adapter or one per sub-task. The ingress talks to both the same way.
    if config["engine"] == "vllm":
        from musicray.serve.vllm_deployment import VllmComposer as model_side
    else:
        model_side = StageComposer
    if config["multiplexed"]:
        options = stage_options(config, "multiplexed")
        composer = model_side.options(name="composer", **_deployment(options)).bind(
            config["run_dir"], list(SUBTASKS), options, config)
        stages = {task: composer for task in SUBTASKS}
    else:
        stages = {}
        for task in SUBTASKS:
            options = stage_options(config, task)
            stages[task] = model_side.options(name=f"stage_{task}", **_deployment(options)).bind(
                config["run_dir"], [task], options, config)
    return Ingress.options(**_deployment(config["ingress"])).bind(stages, config)


def app_builder(args: dict) -> Application:
    """For ``serve run``: ``import_path: musicray.serve.app:app_builder`` with the settings as ``args``."""
    args = dict(args or {})
    return build_app(args.pop("run_dir", None), args)


# Below this many CPUs, a local instance serves all adapters from one multiplexed deployment unless told otherwise:
# five replicas each importing torch and loading the model take minutes to start on two cores (and Serve warns
# that they wait to be scheduled), one takes seconds.
SMALL_MACHINE_CPUS = 6


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill PID``) stops the server as Ctrl-C does, so the cleanup below runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def _stop_children(timeout: float = 10.0) -> None:
    """End what is left of the processes this one started (Ray's agents outliving ``ray.shutdown``)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def serve_forever(run_dir: str | Path, config_file: str | Path | None = None, host: str | None = None,
                  port: int | None = None, multiplexed: bool | None = None, num_cpus: int | None = None,
                  engine: str | None = None) -> None:
    """Start Ray (or join the cluster in RAY_ADDRESS), Serve and the app for ``run_dir``; serve until Ctrl-C or
    SIGTERM, then shut down what this call started (every process of a local Ray instance it started).

    ``config_file`` is a Serve config file or a mapping of settings (``read_config_file``); ``host``/``port``
    override its ``http_options`` (defaults: DEFAULT_HOST, DEFAULT_PORT); ``engine`` and ``multiplexed`` (True or
    False) override its settings; unset, a local instance of fewer than SMALL_MACHINE_CPUS CPUs is multiplexed.
    """
    import os

    import ray

    settings, http = read_config_file(config_file) if config_file else ({}, {})
    local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if multiplexed is not None:
        settings["multiplexed"] = multiplexed
    elif "multiplexed" not in settings and local and (num_cpus or os.cpu_count() or 1) < SMALL_MACHINE_CPUS:
        settings["multiplexed"] = True
        print(f"musicray: {num_cpus or os.cpu_count()} CPUs: one deployment serves all five adapters "
              "(--per-adapter for one deployment per sub-task)", flush=True)
    if engine:
        settings["engine"] = engine
    settings.pop("run_dir", None)
    app = build_app(run_dir, settings)  # validates the run dir and the settings before anything starts
    host = host or http.get("host") or DEFAULT_HOST
    port = port if port is not None else int(http.get("port") or DEFAULT_PORT)
    started_ray = serving = False
    _stop_on_sigterm()
    try:
        if not ray.is_initialized():
            ray.init(num_cpus=num_cpus, include_dashboard=False)
            started_ray = True
            _stop_on_sigterm()      # again: ray.init installs its own handler, which skips the cleanup below
        serve.start(http_options={"host": host, "port": port})
        serving = True
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"musicray: serving {run_dir} on http://{host}:{port}/ (the web page; POST /v1/generate, "
              "POST /v1/render, GET /healthz, /docs); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("musicray: stopping", flush=True)
    finally:
        try:
            if serving:
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
                _stop_children()

"""musicray's stages on vLLM: one async engine holding the stage-1 model once and the sub-task LoRA adapters.

``VllmStages`` starts a ``vllm.v1`` ``AsyncLLM`` on a run dir (``enable_lora``, one ``LoRARequest`` per sub-task,
chosen per request, so one engine step decodes a batch that mixes sub-tasks) with the grammar as its logits
processor (``musicray.engine.grammar_processor``). ``compose`` runs one song's stages in order, each as one engine
request that joins the running batch at the engine's next step (continuous batching: no batch to wait for, and
a song's next stage starts as soon as its previous one ends). It yields events as it goes (a stage starts, a bar
is complete, a stage ends), so that a caller can stream them; prompts, plans, budgets and the check of every
answer are ``musicray.compose.StagePlanner``'s, the same as the native loop's.

Why not Ray Serve LLM (``ray.serve.llm``)? Its deployments serve OpenAI-style completions: a request cannot carry
the per-request grammar state the mask needs (the plan, forced bars and budget of a stage, built from the song
the earlier stages wrote), and a song is five dependent requests whose prompts come from decoding the answers
before them. musicray therefore runs vLLM's async engine inside its own Serve deployment
(``musicray.serve.vllm_deployment``), as Ray Serve LLM itself does inside its ``LLMServer``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from musicray.compose import StageFailed, StageInput, StagePlanner
from musicray.engine.bar_events import BarEvents
from musicray.grammar import Grammar
from musicray.request import Request
from musicray.run import RunDir
from musicray.song import Song, SongError
from musicray.tasks import subtask
from musicray.tokens import SUBTASKS

# vLLM's CPU backend reserves this much memory for the KV cache unless VLLM_CPU_KVCACHE_SPACE says otherwise
# (its default, 4 GiB, is more than a tiny model needs and than a shared test machine should give).
DEFAULT_CPU_KV_CACHE_GIB = "1"


@dataclass
class StageEvent:
    """One step of a song's progress: ``kind`` is ``stage`` (a stage starts), ``bar`` (a bar of it is complete)
    or ``stage_done`` (its report); ``data`` is what a client is sent."""

    kind: str
    data: dict = field(default_factory=dict)


class VllmStages:
    """A vLLM engine with the stage-1 model and the sub-task adapters of a run dir (see the module docstring)."""

    def __init__(self, run_dir: str | Path, adapters: tuple[str, ...] = SUBTASKS,
                 tokens_per_bar: dict[str, int] | None = None, device: str = "cpu", engine_args: dict | None = None):
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        from musicray.model import MusicTokenizer
        from musicray.engine.grammar_processor import FQCN
        from musicray.tokens import Vocabulary

        run = RunDir(run_dir)
        model_dir = run.require("stage-1 model")
        music = MusicTokenizer(AutoTokenizer.from_pretrained(model_dir), Vocabulary.load(model_dir / "vocabulary.json"))
        found = run.adapters_present(adapters)
        for task in found:   # before the engine starts: an adapter vLLM cannot load would kill it at first use
            check_adapter(run.adapter(task))
        # Prompts, plans and the answers' checks run here, in the deployment; the mask runs in the engine.
        self.planner = StagePlanner(music, Grammar(music.vocab), found, tokens_per_bar, run.root)
        self.loras = {task: LoRARequest(subtask(task).adapter, k + 1, str(run.adapter(task)))
                      for k, task in enumerate(found)}
        self.subtasks = list(adapters)
        config = json.loads((model_dir / "config.json").read_text())
        ranks = [json.loads((run.adapter(task) / "adapter_config.json").read_text()).get("r", 8) for task in found]
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_CACHE_GIB)
        max_model_len = min(int(config.get("max_position_embeddings", 16384)), 16384)
        args = {
            "model": str(model_dir), "tokenizer": str(model_dir), "dtype": "float32" if device == "cpu" else "auto",
            "max_model_len": max_model_len,
            "logits_processors": [FQCN],
            # The processor reads each request's output tokens as the engine appends them: async scheduling
            # would hand it a step whose previous token is not written yet.
            "async_scheduling": False,
            "enable_prefix_caching": True,   # the five stages' prompts share the chat frame and the song's header
            # On CPU a prompt is prefilled in one step: vLLM rewinds the seeded generator of a request whose
            # prefill is split over steps, which a CPU generator cannot do (the engine dies: "CPU Generator does
            # not use offset"), and every stage request is seeded.
            **({"enable_chunked_prefill": False, "max_num_batched_tokens": max_model_len} if device == "cpu" else {}),
            **({"enable_lora": True, "max_loras": len(found), "max_lora_rank": _lora_rank(max(ranks))} if found
               else {}),
            **(engine_args or {}),
        }
        self.engine_args = {k: v for k, v in args.items() if k != "logits_processors"}
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self.max_model_len = int(args["max_model_len"])
        self._ids = itertools.count()
        self.running = 0
        self.requests = {task: 0 for task in SUBTASKS}

    def shutdown(self) -> None:
        # Dropped here, while the interpreter is whole: vLLM's __del__ shuts down again and fails at exit.
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
        del engine

    async def compose(self, song: Song, request: Request, stages: list[str],
                      bar_events: bool = False) -> AsyncIterator[StageEvent]:
        """Run ``stages`` on ``song`` in order (the song is changed in place), yielding each stage's events (with
        ``bar_events``, one per bar as it is complete). Raises ``StageFailed`` naming the stage that failed (a
        stage whose adapter is missing and not allowed: before any stage runs, status 400)."""
        try:
            self.planner.check_adapters(stages, request)
        except SongError as err:
            raise StageFailed(next(t for t in stages if self.planner.adapter_of(t) is None), err, 400) from None
        for task in stages:
            async for event in self.run_stage(song, task, request, bar_events):
                yield event

    async def compose_request(self, request: Request) -> tuple[Song, dict[str, dict]]:
        """A new song for ``request`` through every stage it asks for, and each stage's report by stage (its
        ``stage_done`` data): what ``Composer.compose`` gives on musicray's own loop, on this engine."""
        song, reports = request.song(), {}
        async for event in self.compose(song, request, StagePlanner.stages_for(request)):
            if event.kind == "stage_done":
                reports[event.data["stage"]] = event.data
        return song, reports

    async def run_stage(self, song: Song, task: str, request: Request,
                        bar_events: bool = False) -> AsyncIterator[StageEvent]:
        started = time.perf_counter()
        try:
            stage = self.planner.begin_stage([song], task, [request])[0]
        except Exception as err:
            raise StageFailed(task, err) from err
        yield StageEvent("stage", {"stage": task, "adapter": self.planner.adapter_of(task),
                                   "bars": song.n_bars})
        bars = BarEvents(song, task, stage.stream, self.planner.music.vocab) if bar_events and request.use_mask \
            else None
        tokens: list[int] = []
        first_token_seconds = None
        try:
            async for new in self._decode(stage, request):
                if first_token_seconds is None:
                    first_token_seconds = time.perf_counter() - started
                tokens += new
                if bars is not None:
                    for event in bars.feed(self.planner.music.from_llm(new)):
                        yield StageEvent("bar", event)
            music_ids = self.planner.music.from_llm(tokens) if request.use_mask else _until_eot(tokens, self.planner)
            seconds = round(time.perf_counter() - started, 3)
            info = self.planner.end_stage(song, stage, music_ids, request,
                                          {"seconds": seconds, "mask_seconds": None, "batch": None,
                                           "first_token_seconds": round(first_token_seconds or seconds, 3)})
        except StageFailed:
            raise
        except Exception as err:
            raise StageFailed(task, err) from err
        self.requests[task] += 1
        yield StageEvent("stage_done", {"stage": task, **info})

    async def _decode(self, stage: StageInput, request: Request) -> AsyncIterator[list[int]]:
        """The engine's new output tokens (LLM ids) of one stage request, as they come."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from musicray.engine.grammar_processor import EXTRA_ARGS_KEY, grammar_args

        if len(stage.prompt) + stage.budget + 1 > self.max_model_len:
            raise SongError(f"form: the {stage.task} stage needs up to {len(stage.prompt) + stage.budget + 1} tokens, "
                            f"more than the engine's max_model_len {self.max_model_len}")
        sampling = request.sampling_for(stage.task)
        params = SamplingParams(
            max_tokens=stage.budget + 1,   # the budget holds <End>; <|eot_id|> follows it
            temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p, seed=stage.seed,
            stop_token_ids=[self.planner.music.eot_id], output_kind=RequestOutputKind.DELTA,
            extra_args={EXTRA_ARGS_KEY: grammar_args(stage.stream, stage.plan, stage.budget)} if request.use_mask
            else None)
        request_id = f"{stage.task}-{next(self._ids)}"
        self.running += 1
        try:
            async for output in self.engine.generate({"prompt_token_ids": stage.prompt}, params, request_id,
                                                     lora_request=self.loras.get(stage.task)):
                new = list(output.outputs[0].token_ids)
                if new:
                    yield new
        finally:
            self.running -= 1


def check_adapter(path: Path) -> None:
    """Refuse (SongError naming the adapter) an adapter that vLLM's multi-LoRA cannot load: one that carries whole
    modules besides its LoRA matrices (``modules_to_save``, or ``embed_tokens``/``lm_head`` saved by PEFT's
    ``save_embedding_layers``). vLLM fails on it inside the engine, which then dies for every request."""
    from safetensors import safe_open

    config = json.loads((path / "adapter_config.json").read_text())
    extra = list(config.get("modules_to_save") or [])
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        with safe_open(str(weights), "pt") as tensors:
            extra += sorted({key.rsplit(".weight", 1)[0].rsplit(".", 1)[-1] for key in tensors.keys()
                             if "lora_" not in key})
    if extra:
        raise SongError(f"adapters: {path} carries whole modules besides its LoRA weights ({', '.join(extra)}); "
                        "vLLM's multi-LoRA loads LoRA matrices of attention/MLP only. Save it with "
                        "save_embedding_layers=False and no modules_to_save (as musicray tune does), or serve "
                        "with --engine native")


def _until_eot(tokens: list[int], planner: StagePlanner) -> list[int]:
    eot = planner.music.eot_id
    return tokens[:tokens.index(eot)] if eot in tokens else tokens


def _lora_rank(rank: int) -> int:
    """The smallest of vLLM's supported max_lora_rank values that holds ``rank``."""
    for supported in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= supported:
            return supported
    return rank

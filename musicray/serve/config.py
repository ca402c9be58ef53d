"""The serving config: defaults, validation, and reading a Ray Serve config file.

One YAML file serves both launchers. ``configs/serve/app.yaml`` is a Ray Serve config file (``serve run
configs/serve/app.yaml``) whose single application has ``import_path: musicray.serve.app:app_builder`` and
``args:`` holding the musicray settings below; ``musicray serve --config`` reads the same ``args`` and the
file's ``http_options`` (host, port). A plain YAML mapping of the settings works for ``musicray serve`` too.

Settings (all optional but ``run_dir``):

* ``engine``: ``vllm`` (``musicray.engine.vllm_engine``: vLLM's async engine, continuous batching, the grammar as
  its logits processor), ``native`` (musicray's own KV-cached loop behind ``@serve.batch``) or ``auto`` (the
  default: vllm where it is installed, else native).
* ``multiplexed``: false = one deployment per sub-task (each holds the stage-1 model and its own adapter);
  true = one deployment holding the stage-1 model once with all five adapters (native: ``set_adapter`` per
  batch; vllm: a ``LoRARequest`` per request, batches mixing sub-tasks). Default (null): true under vllm, false
  under native.
* ``vllm_engine_args``: extra ``vllm.AsyncEngineArgs`` of each vLLM engine (e.g. ``gpu_memory_utilization``,
  ``max_num_seqs``, ``max_model_len``).
* ``max_bars`` (a longer form is refused with 400), ``max_midi_bytes`` (a larger ``melody_midi`` upload is
  refused with 413).
* ``max_render_seconds`` (``POST /v1/render`` refuses a longer song with 413) and ``render_sample_rate`` (of the
  page's WAV: 22050 Hz keeps a 3-minute song near 16 MB; ``musicray render`` gives full quality).
* ``max_batch_size`` / ``batch_wait_timeout_s``: ``@serve.batch`` settings of every sub-task; a ``stages``
  entry may override them per sub-task.
* ``tokens_per_bar``: per sub-task caps on the tokens a stage may emit per bar beyond the form's minimum
  (overrides ``SubTask.tokens_per_bar`` of ``musicray.tasks`` in each stage's ``Composer``). Default: the records'.
* ``torch_threads``: intra-op threads of each model replica (default: its whole CPUs, at least 1).
* ``device``: ``auto`` (CUDA when the replica has a GPU), ``cpu`` or ``cuda``.
* ``planner``: the model that plans a body's ``prompt`` (``musicray.prompt_plan``), loaded in the ingress on the
  first prompt: null (the default) = the base model the served run was fine-tuned from (its stage-1 config's
  ``base_model``; a full fine-tune on music tokens loses the text skill), or its stage-1 model where the run has no
  stage-1 config; or an instruct base model's name or directory (e.g. ``smollm2-135m-instruct``, converted once
  into ``~/.cache/musicray``).
* ``ingress`` / ``stages``: deployment options (``num_replicas``, ``max_ongoing_requests``,
  ``ray_actor_options``). ``stages.default`` applies to every sub-task deployment, ``stages.<subtask>``
  overrides it for one, ``stages.multiplexed`` for the multiplexed deployment.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from musicray.song import SongError
from musicray.tokens import SUBTASKS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
APP_NAME = "musicray"
IMPORT_PATH = "musicray.serve.app:app_builder"

DEFAULTS: dict[str, Any] = {
    "run_dir": None,
    "engine": "auto",
    "multiplexed": None,
    "vllm_engine_args": {},
    "max_bars": 256,
    "max_midi_bytes": 1 << 20,
    "max_render_seconds": 600.0,
    "render_sample_rate": 22050,
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.01,
    "tokens_per_bar": None,
    "torch_threads": None,
    "device": "auto",
    "planner": None,
    "ingress": {"num_replicas": 1, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.1}},
    "stages": {"default": {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.3}}},
}
ENGINES = ("auto", "vllm", "native")
SAMPLE_RATES = (16000, 22050, 32000, 44100, 48000)  # what browsers' <audio> plays from a WAV everywhere
DEPLOYMENT_KEYS = ("num_replicas", "max_ongoing_requests", "ray_actor_options")
STAGE_KEYS = DEPLOYMENT_KEYS + ("max_batch_size", "batch_wait_timeout_s")
STAGE_ENTRIES = ("default", "multiplexed", *SUBTASKS)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _positive(config: dict, key: str, kind=int, allow_zero: bool = False) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or value < 0 or (value == 0 and not allow_zero):
        raise SongError(f"config: {key} must be a {'non-negative' if allow_zero else 'positive'} "
                        f"{'number' if kind is float else 'integer'}, got {value!r}")


def _deployment_options(where: str, options: dict, allowed: tuple[str, ...]) -> None:
    if not isinstance(options, dict):
        raise SongError(f"config: {where} must be a mapping, got {options!r}")
    unknown = set(options) - set(allowed)
    if unknown:
        raise SongError(f"config: {where}: unknown key(s) {sorted(unknown)}; known: {', '.join(allowed)}")
    for key in ("num_replicas", "max_ongoing_requests", "max_batch_size"):
        if key in options and (isinstance(options[key], bool) or not isinstance(options[key], int)
                               or options[key] < 1):
            raise SongError(f"config: {where}.{key} must be a positive integer, got {options[key]!r}")
    if "ray_actor_options" in options and not isinstance(options["ray_actor_options"], dict):
        raise SongError(f"config: {where}.ray_actor_options must be a mapping")


def serve_config(config: dict | None = None, **overrides) -> dict:
    """The defaults updated with ``config`` and ``overrides``, validated (SongError names the bad key)."""
    config = dict(config or {})
    config.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise SongError(f"config: unknown key(s) {sorted(unknown)}; known: {', '.join(DEFAULTS)}")
    merged = _merge(DEFAULTS, config)
    if merged["run_dir"] is not None:
        merged["run_dir"] = str(Path(merged["run_dir"]).expanduser().resolve())
    if merged["engine"] not in ENGINES:
        raise SongError(f"config: engine must be one of {', '.join(ENGINES)}, got {merged['engine']!r}")
    if merged["engine"] == "auto":
        from musicray.engine.available import vllm_available

        merged["engine"] = "vllm" if vllm_available() else "native"
    if merged["multiplexed"] is None:
        merged["multiplexed"] = merged["engine"] == "vllm"
    if not isinstance(merged["multiplexed"], bool):
        raise SongError(f"config: multiplexed must be true or false, got {merged['multiplexed']!r}")
    if not isinstance(merged["vllm_engine_args"], dict):
        raise SongError(f"config: vllm_engine_args must be a mapping, got {merged['vllm_engine_args']!r}")
    _positive(merged, "max_bars")
    _positive(merged, "max_midi_bytes")
    _positive(merged, "max_render_seconds", float)
    if merged["render_sample_rate"] not in SAMPLE_RATES:
        raise SongError(f"config: render_sample_rate must be one of {', '.join(map(str, SAMPLE_RATES))}, "
                        f"got {merged['render_sample_rate']!r}")
    _positive(merged, "max_batch_size")
    _positive(merged, "batch_wait_timeout_s", float, allow_zero=True)
    if merged["torch_threads"] is not None:
        _positive(merged, "torch_threads")
    if merged["device"] not in ("auto", "cpu", "cuda"):
        raise SongError(f"config: device must be auto, cpu or cuda, got {merged['device']!r}")
    if merged["planner"] is not None and (not isinstance(merged["planner"], str) or not merged["planner"].strip()):
        raise SongError(f"config: planner must be a base model's name or directory (or null: the run's own "
                        f"base), got {merged['planner']!r}")
    caps = merged["tokens_per_bar"]
    if caps is not None:
        if not isinstance(caps, dict) or set(caps) - set(SUBTASKS):
            raise SongError(f"config: tokens_per_bar must map sub-tasks ({', '.join(SUBTASKS)}) to integers")
        for task, cap in caps.items():
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
                raise SongError(f"config: tokens_per_bar.{task} must be a non-negative integer, got {cap!r}")
    _deployment_options("ingress", merged["ingress"], DEPLOYMENT_KEYS)
    if not isinstance(merged["stages"], dict) or set(merged["stages"]) - set(STAGE_ENTRIES):
        raise SongError(f"config: stages: entries must be among {', '.join(STAGE_ENTRIES)}")
    for name, options in merged["stages"].items():
        _deployment_options(f"stages.{name}", options, STAGE_KEYS)
    return merged


def stage_options(config: dict, entry: str) -> dict:
    """The settings of one stage deployment (``default`` updated with the entry's own)."""
    options = _merge(config["stages"].get("default", {}), config["stages"].get(entry, {}))
    options.setdefault("max_batch_size", config["max_batch_size"])
    options.setdefault("batch_wait_timeout_s", config["batch_wait_timeout_s"])
    # A replica takes up to max_batch_size requests into a batch while the one before it decodes.
    options.setdefault("max_ongoing_requests", 2 * options["max_batch_size"])
    return options


def read_config_file(path: str | Path) -> tuple[dict, dict]:
    """(musicray settings, http options) of a Ray Serve config file or of a plain settings mapping."""
    import yaml  # here, not at the top: `musicray --help` reads this module's defaults and should not load yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise FileNotFoundError(f"--config: cannot read {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SongError(f"--config: {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SongError(f"--config: {path} must hold a mapping")
    if "applications" not in data:
        return data, {}
    apps = data["applications"] or []
    ours = [a for a in apps if isinstance(a, dict) and a.get("import_path", "").startswith("musicray.serve")]
    if not ours:
        raise SongError(f"--config: {path} has no application with import_path {IMPORT_PATH}")
    return dict(ours[0].get("args") or {}), dict(data.get("http_options") or {})

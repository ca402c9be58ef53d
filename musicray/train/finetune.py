"""Stage 1: the full fine-tune of the base LLM with the music vocabulary, on Ray Train under DeepSpeed.

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

and ``RUN_DIR/ray/stage1`` is the Ray Train run (``storage_path`` + ``name``): checkpoints
``checkpoint_000010/`` ... (each a DeepSpeed checkpoint: ``latest``, ``global_step10/`` with the per-rank
ZeRO shards) and the run snapshot that makes a later run with the same name and storage path resume.

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
Ray Train keeps the checkpoints there. Each rank writes its DeepSpeed shard to a local temporary directory
(``$TMPDIR``) before Ray Train copies it into the run, so point ``TMPDIR`` at a large local disk for big models.
The final export consolidates the fp32 weights on the driver (about 32 GB of host memory for 8B parameters).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import yaml

from musicray.song import SongError
from musicray.train.config import Config, config_to_dict

STAGE = "stage1"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Validation batches per rank at each checkpoint (when the data has a validation split).
VAL_BATCHES = 2
METRIC_COLUMNS = ("step", "loss", "learning_rate", "tokens_per_s", "labelled_tokens_per_s", "tokens",
                  "labelled_tokens", "step_s", "val_loss", "start_step", "time")
# Settings a resumed run must share with the run it continues (ZeRO shards and data order depend on them).
RESUME_FIXED = ("base_model", "data", "stage1.tasks", "stage1.num_workers", "stage1.micro_batch_size",
                "stage1.gradient_accumulation_steps", "stage1.seed")


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed configuration


def _torch_dtype(precision: str):
    import torch

    # Weights are loaded in bf16 for bf16 runs (half the host memory of an 8B model); DeepSpeed keeps fp32
    # master weights in the optimizer either way. fp16 runs load fp32 and let DeepSpeed cast.
    return torch.bfloat16 if precision == "bf16" else torch.float32


def deepspeed_json_path(config: Config) -> Path:
    path = Path(os.path.expanduser(config.stage1.deepspeed))
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def _scheduler(config: Config) -> dict:
    """DeepSpeed's warm-up schedulers: WarmupLR (then constant), WarmupDecayLR (linear), WarmupCosineLR."""
    s = config.stage1
    # DeepSpeed needs a positive warm-up; no warm-up is a "warm-up" from the peak to the peak.
    warmup = max(1, s.warmup_steps)
    if s.lr_schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": s.max_steps, "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_ratio": 0.0 if s.warmup_steps else 1.0, "cos_min_ratio": 0.0001}}
    params = {"warmup_min_lr": 0.0 if s.warmup_steps else s.learning_rate, "warmup_max_lr": s.learning_rate,
              "warmup_num_steps": warmup, "warmup_type": "linear"}
    if s.lr_schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {"total_num_steps": s.max_steps, **params}}
    return {"type": "WarmupLR", "params": params}


def deepspeed_config(config: Config) -> dict:
    """The DeepSpeed JSON of ``stage1.deepspeed`` with batch sizes, optimizer, schedule, precision and (if set)
    the ZeRO stage filled in from the musicray config, which owns them (values in the JSON are replaced)."""
    s = config.stage1
    path = deepspeed_json_path(config)
    if not path.exists():
        raise SongError(f"stage1.deepspeed: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SongError(f"stage1.deepspeed: {path} is not valid JSON: {err}") from err
    ds["train_micro_batch_size_per_gpu"] = s.micro_batch_size
    ds["gradient_accumulation_steps"] = s.gradient_accumulation_steps
    ds["train_batch_size"] = s.micro_batch_size * s.gradient_accumulation_steps * s.num_workers
    params = dict((ds.get("optimizer") or {}).get("params") or {})
    params.update(lr=s.learning_rate, weight_decay=s.weight_decay)
    params.setdefault("betas", [0.9, 0.999])
    params.setdefault("eps", 1e-8)
    # torch.optim.AdamW: no C++/CUDA op to build (DeepSpeed's CPU Adam / FusedAdam compile on first use).
    # Required on CPU; on GPU a JSON may ask for FusedAdam with "torch_adam": false.
    params["torch_adam"] = True if not s.use_gpu else params.get("torch_adam", True)
    ds["optimizer"] = {"type": "AdamW", "params": params}
    ds["scheduler"] = _scheduler(config)
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": s.precision == "bf16"}
    ds["fp16"] = {**(ds.get("fp16") or {}), "enabled": s.precision == "fp16"}
    if s.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = s.zero_stage
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# --------------------------------------------------------------------------------------------------------------
# Driver


def _get(config_dict: dict, dotted: str):
    node = config_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _check_run_dir(stage_dir: Path, config: Config, resume: bool) -> None:
    exists = stage_dir.is_dir() and any(stage_dir.iterdir())
    if exists and not resume:
        raise SongError(f"{stage_dir} already holds a stage-1 run; pass --resume to continue it from its latest "
                        "checkpoint, or choose a new --out")
    saved = stage_dir / "config.yaml"
    if exists and saved.exists():
        old, new = yaml.safe_load(saved.read_text()) or {}, config_to_dict(config)
        changed = [key for key in RESUME_FIXED if _get(old, key) != _get(new, key)]
        if changed:
            raise SongError(f"--resume: {', '.join(changed)} differ from the run in {stage_dir}; a resumed run "
                            "must keep them (its checkpoints and data order depend on them). Start a new --out "
                            "for a different setup.")


def _write_config(config: Config, path: Path) -> None:
    header = ("# The resolved configuration of this stage-1 run (load_config reads it back).\n")
    path.write_text(header + yaml.safe_dump(config_to_dict(config), sort_keys=False))


def build_init_model(config: Config, out: Path) -> Path:
    """Base LLM + music tokens, saved once so that every rank (and the final export) starts from it."""
    import torch

    from musicray.model import add_music_tokens, load_base, save_music_model
    from musicray.tokens import Vocabulary

    model, tokenizer = load_base(config.base_model, Path(config.cache_dir).expanduser(),
                                 _torch_dtype(config.stage1.precision))
    torch.manual_seed(config.stage1.seed)   # the new rows are sampled: same seed, same initial model
    if tokenizer.pad_token is None:   # Llama 3.1 Instruct has a reserved pad token but names none
        reserved = "<|finetune_right_pad_id|>"
        tokenizer.pad_token = reserved if reserved in tokenizer.get_vocab() else tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    music = add_music_tokens(model, tokenizer, Vocabulary(config.vocab))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_music_model(model, music, tmp, extra={"stage": "init", "base_model": config.base_model})
    tmp.rename(out)
    return out


class _ProgressTail(threading.Thread):
    """A tqdm bar on the driver, fed by the rows rank 0 appends to metrics.csv (worker output is not shown)."""

    def __init__(self, path: Path, total: int, enabled: bool):
        super().__init__(daemon=True)
        self.path, self.total, self.enabled = path, total, enabled
        self.offset = path.stat().st_size if path.exists() else 0
        self.done = threading.Event()

    def __enter__(self):
        if self.enabled:
            self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        if self.enabled:
            self.join(timeout=5)

    def _rows(self):
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [line.split(",") for line in complete.decode().splitlines() if line and not line.startswith("step")]

    def run(self):
        from tqdm import tqdm

        bar = None   # opened at the first row, so its rate is the training rate, not the start-up time
        try:
            while True:
                finished = self.done.wait(0.5)
                for row in self._rows():
                    values = dict(zip(METRIC_COLUMNS, row))
                    step = int(values["step"])
                    if bar is None:
                        bar = tqdm(total=self.total, initial=step - 1, desc=STAGE, unit="step", dynamic_ncols=True)
                    bar.n = step
                    postfix = {"loss": f"{float(values['loss']):.3f}",
                               "tok/s": f"{float(values['tokens_per_s']):.0f}"}
                    if values.get("val_loss"):
                        postfix["val"] = f"{float(values['val_loss']):.3f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.refresh()
                if finished:
                    return
        finally:
            if bar is not None:
                bar.close()


def train_stage1(config: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Full fine-tune on Ray Train + DeepSpeed; returns the final model dir ``run_dir/stage1/model``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from musicray.data.prepare import ensure_ray
    from musicray.train.data import resolve_data_dir

    s = config.stage1
    run_dir = Path(run_dir).expanduser().resolve()
    stage_dir = run_dir / STAGE
    _check_run_dir(stage_dir, config, resume)
    ds_config = deepspeed_config(config)
    ensure_ray()
    data_dir = resolve_data_dir(config, progress=progress)
    stage_dir.mkdir(parents=True, exist_ok=True)
    init_dir = stage_dir / "init"
    if not (init_dir / "config.json").exists():
        build_init_model(config, init_dir)
    _write_config(config, stage_dir / "config.yaml")

    env_vars = {} if s.use_gpu else {"DS_ACCELERATOR": "cpu"}
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"config": config, "data_dir": str(data_dir), "init_dir": str(init_dir),
                           "stage_dir": str(stage_dir), "ds_config": ds_config},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(name=STAGE, storage_path=str(run_dir / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=s.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             worker_runtime_env={"env_vars": env_vars}),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"))
    with _ProgressTail(stage_dir / "metrics.csv", s.max_steps, progress):
        result = trainer.fit()
    if result.checkpoint is None:
        raise SongError(f"stage 1 reported no checkpoint (max_steps: {s.max_steps})")
    return export_model(Path(result.checkpoint.path), init_dir, stage_dir / "model", s.precision)


# --------------------------------------------------------------------------------------------------------------
# Final model


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict:
    """fp32 weights of a DeepSpeed checkpoint dir (the ``latest`` tag), ZeRO shards merged."""
    if not os.environ.get("DS_ACCELERATOR"):
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    checkpoint_dir = Path(checkpoint_dir)
    tag = (checkpoint_dir / "latest").read_text().strip()
    if any((checkpoint_dir / tag).glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    # ZeRO stage 0: the whole module is in rank 0's model states.
    states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_model(checkpoint_dir: Path, init_dir: Path, out: Path, precision: str = "fp32") -> Path:
    """Load the checkpoint's consolidated weights into the initial model and save it with its tokenizer."""
    from musicray.model import load_music_model, save_music_model

    state = consolidated_state_dict(checkpoint_dir)
    model, music = load_music_model(init_dir, _torch_dtype(precision))
    expected = set(model.state_dict())
    missing = expected - set(state)
    if missing:
        raise SongError(f"checkpoint {checkpoint_dir}: weights missing for {sorted(missing)[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    tag = (checkpoint_dir / "latest").read_text().strip()
    step = int(tag.removeprefix("global_step")) if tag.startswith("global_step") else None
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_music_model(model, music, tmp, extra={"stage": 1, "step": step, "checkpoint": str(checkpoint_dir)})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------------------------------------------
# Worker


def _loss_fn(mask_loss: bool, music, device):
    from musicray.train.loss import causal_lm_loss

    if not mask_loss:
        return lambda logits, batch, labels: causal_lm_loss(logits, labels)
    from musicray.grammar import Grammar

    grammar = Grammar(music.vocab, device)
    return lambda logits, batch, labels: causal_lm_loss(
        logits, labels, grammar, batch["answer_start"], batch["streams"], batch["plans"], music.offset, music.eot_id)


class _MetricsLog:
    """metrics.csv and TensorBoard, on rank 0."""

    def __init__(self, stage_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        path = stage_dir / "metrics.csv"
        new = not path.exists() or path.stat().st_size == 0
        self.file = path.open("a", newline="")
        self.csv = csv.writer(self.file, lineterminator="\n")
        if new:
            self.csv.writerow(METRIC_COLUMNS)
            self.file.flush()
        # purge_step hides events a failed attempt logged after the checkpoint it restarts from.
        self.tb = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        self.csv.writerow(["" if row.get(c) is None else row[c] for c in METRIC_COLUMNS])
        self.file.flush()
        step = row["step"]
        for key in ("loss", "learning_rate", "tokens_per_s", "labelled_tokens_per_s"):
            self.tb.add_scalar(f"train/{key}", row[key], step)
        if row.get("val_loss") is not None:
            self.tb.add_scalar("val/loss", row["val_loss"], step)
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _train_loop_per_worker(loop: dict) -> None:
    config: Config = loop["config"]
    s = config.stage1
    if not s.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    import ray.train
    import torch
    import torch.distributed as dist

    from musicray.model import load_music_model
    from musicray.train.data import RenderedDataset, collate, load_examples, shuffled_batches

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    stage_dir = Path(loop["stage_dir"])
    if s.use_gpu:
        # DeepSpeed picks its device from LOCAL_RANK; make it the GPU Ray Train assigned to this worker.
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        os.environ["LOCAL_RANK"] = str(device.index)
    else:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (minutes, needs g++) that only its
        # inference all-reduce uses; training all-reduces go through gloo. Mark it unavailable so it is skipped.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # One intra-op thread per reserved CPU (Ray's OMP_NUM_THREADS is not reliable for reused processes).
        torch.set_num_threads(max(1, int(s.cpus_per_worker)))
    torch.manual_seed(s.seed)

    model, music = load_music_model(loop["init_dir"], _torch_dtype(s.precision))
    model.config.use_cache = False
    data_dir = loop["data_dir"]
    train_set = RenderedDataset(load_examples(data_dir, s.tasks, "train", music.vocab, config.data.max_bars), music,
                                config.data.max_length)
    if len(train_set) // world < s.micro_batch_size:
        raise SongError(f"stage 1: {len(train_set)} training examples cannot give {world} workers a micro-batch "
                        f"of {s.micro_batch_size}; use more data or fewer workers")
    try:
        val_set = RenderedDataset(load_examples(data_dir, s.tasks, "validation", music.vocab, config.data.max_bars),
                                  music, config.data.max_length)
    except (FileNotFoundError, KeyError, SongError):
        val_set = []
    # The same count on every rank (ZeRO-3 gathers parameters collectively in each forward).
    n_val = min(VAL_BATCHES, (len(val_set) // world) // s.micro_batch_size) if len(val_set) else 0
    # Padding is masked out of attention and labels; any id will do where the tokenizer names no pad token.
    pad_id = music.tokenizer.pad_token_id if music.tokenizer.pad_token_id is not None else music.eot_id
    val_batches = [collate(b, pad_id) for b in itertools.islice(
        shuffled_batches(val_set, s.micro_batch_size, s.seed, rank, world), n_val)] if n_val else []

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           config=loop["ds_config"], dist_init_required=False)
    device = engine.device
    scheduler = engine.lr_scheduler

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            loaded, client_state = engine.load_checkpoint(path)
        if loaded is None:
            raise SongError(f"stage 1: could not load the DeepSpeed checkpoint in {checkpoint.path}")
        start_step = int(client_state["step"])
    else:
        # Step k runs at the schedule's value for k-1 (warm-up starts at 0, as in transformers' schedules).
        scheduler.last_batch_iteration = 0
    scheduler.step(scheduler.last_batch_iteration)   # put the schedule's LR into the optimizer

    gas = s.gradient_accumulation_steps
    batches = shuffled_batches(train_set, s.micro_batch_size, s.seed, rank, world)
    for _ in range(start_step * gas):     # the data stream at the checkpoint's position
        next(batches)
    loss_fn = _loss_fn(s.mask_loss, music, device)
    log = _MetricsLog(stage_dir, start_step) if rank == 0 else None

    def forward_loss(batch):
        labels = batch["labels"].to(device)
        out = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return loss_fn(out.logits, batch, labels)

    def validation_loss():
        if not val_batches:
            return None
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in val_batches:
                total += torch.stack([forward_loss(batch).detach().double(), torch.ones((), device=device,
                                                                                       dtype=torch.float64)])
        engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    engine.train()
    for step in range(start_step + 1, s.max_steps + 1):
        started = time.perf_counter()
        learning_rate = engine.get_lr()[0]
        stats = torch.zeros(3, dtype=torch.float64, device=device)
        for _ in range(gas):
            batch = collate(next(batches), pad_id)
            loss = forward_loss(batch)
            engine.backward(loss)
            engine.step()
            stats[0] += loss.detach().double()     # summed on the device: no host sync per micro-batch
            stats[1] += int(batch["attention_mask"].sum())
            stats[2] += int((batch["labels"][:, 1:] != -100).sum())
        dist.all_reduce(stats)
        elapsed = time.perf_counter() - started
        loss_value = (stats[0] / (gas * world)).item()
        if not math.isfinite(loss_value):
            raise SongError(f"stage 1: loss is {loss_value} at step {step}")
        save = step % s.checkpoint_every == 0 or step == s.max_steps
        val_loss = validation_loss() if save else None
        if log is not None and (step % s.log_every == 0 or save):
            log.write({"step": step, "loss": loss_value, "learning_rate": learning_rate,
                       "tokens_per_s": stats[1].item() / elapsed, "labelled_tokens_per_s": stats[2].item() / elapsed,
                       "tokens": int(stats[1].item()), "labelled_tokens": int(stats[2].item()),
                       "step_s": round(elapsed, 6), "val_loss": val_loss, "start_step": start_step,
                       "time": round(time.time(), 3)})
        if save:
            tmp = tempfile.mkdtemp(prefix=f"musicray-stage1-rank{rank}-")
            try:
                engine.save_checkpoint(tmp, tag=f"global_step{step}", client_state={"step": step})
                metrics = {"step": step, "loss": loss_value, **({"val_loss": val_loss} if val_loss is not None
                                                                 else {})}
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{step:06d}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        log.close()

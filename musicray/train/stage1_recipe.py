"""What each Ray Train worker of stage 1 runs, as a recipe in the style of torchtune's: ``setup`` (model, data,
DeepSpeed engine, the checkpoint to continue from), ``train_step`` (one optimizer step of ``gradient_accumulation``
micro-batches), ``validate``, ``save`` (a DeepSpeed checkpoint reported to Ray Train) and ``run`` (the loop).

The worker loads the initial model, wraps it in a DeepSpeed engine on the process group Ray Train has already
set up (gloo on CPU, nccl on GPU), and trains on its share of a seeded batch stream. A restarted or resumed run
loads the latest checkpoint (model, optimizer, LR-schedule state) and skips the batch stream to the saved step, so
it continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import time
import warnings

from musicray.errors import SongError
from musicray.run import RunDir
from musicray.train.config import Config
from musicray.train.stage1_metrics import MetricsLog
from musicray.train.stage1_models import torch_dtype, zero3_loading

# Validation batches per rank at each checkpoint (when the data has a validation split).
VAL_BATCHES = 2


def masked_or_plain_loss(mask_loss: bool, music, device):
    """The loss function of a batch: plain causal LM, or with the grammar mask (``stage1.mask_loss``)."""
    from musicray.train.loss import causal_lm_loss

    if not mask_loss:
        return lambda logits, batch, labels: causal_lm_loss(logits, labels)
    from musicray.grammar import Grammar

    grammar = Grammar(music.vocab, device)
    return lambda logits, batch, labels: causal_lm_loss(
        logits, labels, grammar, batch["answer_start"], batch["streams"], batch["plans"], music.offset, music.eot_id,
        batch.get("segment_rows"))


class Stage1Recipe:
    """One Ray Train worker of the stage-1 full fine-tune. ``loop`` is the trainer's ``train_loop_config``:
    ``config``, ``data_dir``, ``init_dir``, ``run_dir`` and ``ds_config`` (the filled-in DeepSpeed JSON)."""

    def __init__(self, loop: dict):
        self.config: Config = loop["config"]
        self.settings = self.config.stage1
        self.data_dir, self.init_dir = loop["data_dir"], loop["init_dir"]
        self.run_dir = RunDir(loop["run_dir"])
        self.ds_config = loop["ds_config"]

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        s = self.settings
        if not s.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import deepspeed.ops
        import ray.train
        import torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
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

        from musicray.model import load_music_model, prepare_for_training

        # ZeRO-3: loaded partitioned, inside deepspeed.zero.Init (kept for the worker's life, see zero3_loading).
        self.zero3 = zero3_loading(self.ds_config)
        model, self.music = load_music_model(self.init_dir, torch_dtype(s.precision))
        prepare_for_training(model, s.gradient_checkpointing)
        self._setup_data()
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                                   if p.requires_grad],
                                                    config=self.ds_config, dist_init_required=False)
        self.device = self.engine.device
        self.start_step = self._load_checkpoint()
        self.batches = self._skip_to(self.start_step)
        self.loss_fn = masked_or_plain_loss(s.mask_loss, self.music, self.device)
        self.log = MetricsLog(self.run_dir, self.start_step) if self.rank == 0 else None

    def _setup_data(self) -> None:
        from musicray.train.data import (
            RenderedDataset, collate, load_examples, pack, shuffled_batches, validation_examples,
        )

        s, data = self.settings, self.config.data
        vocab = self.music.vocab
        self.train_set = RenderedDataset(load_examples(self.data_dir, s.tasks, "train", vocab, data.max_bars),
                                         self.music, data.max_length, s.train_on_inputs)
        units = (len(pack(self.train_set.items, data.max_length)), "packed rows") if s.packing else \
            (len(self.train_set), "training examples")
        if units[0] // self.world < s.micro_batch_size:
            raise SongError(f"stage 1: {units[0]} {units[1]} cannot give {self.world} workers a micro-batch of "
                            f"{s.micro_batch_size}; use more data or fewer workers")
        examples, missing = validation_examples(self.data_dir, s.tasks, vocab, data.max_bars)
        val_set = RenderedDataset(examples, self.music, data.max_length) if examples else []
        # The same count on every rank (ZeRO-3 gathers parameters collectively in each forward).
        n_val = min(VAL_BATCHES, (len(val_set) // self.world) // s.micro_batch_size) if len(val_set) else 0
        # Without validation batches the metrics' val_loss stays empty: the reason goes into their val_missing
        # column (the driver warns with it after training) and into this worker's log.
        self.val_missing = None
        if n_val == 0:
            self.val_missing = missing or (f"{len(val_set)} validation examples cannot give {self.world} workers a "
                                           f"micro-batch of {s.micro_batch_size}")
            if self.rank == 0:
                warnings.warn(f"stage 1: no validation loss: {self.val_missing}", stacklevel=1)
        # Padding is masked out of attention and labels; any id will do where the tokenizer names no pad token.
        tokenizer = self.music.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.music.eot_id
        self.val_batches = [collate(b, self.pad_id) for b in itertools.islice(
            shuffled_batches(val_set, s.micro_batch_size, s.seed, self.rank, self.world), n_val)] if n_val else []

    def _load_checkpoint(self) -> int:
        """The step to continue from: that of Ray Train's checkpoint (restart or resume), else 0."""
        import ray.train

        scheduler = self.engine.lr_scheduler
        start_step = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as path:
                loaded, client_state = self.engine.load_checkpoint(path)
            if loaded is None:
                raise SongError(f"stage 1: could not load the DeepSpeed checkpoint in {checkpoint.path}")
            start_step = int(client_state["step"])
        else:
            # Step k runs at the schedule's value for k-1 (warm-up starts at 0, as in transformers' schedules).
            scheduler.last_batch_iteration = 0
        scheduler.step(scheduler.last_batch_iteration)   # put the schedule's LR into the optimizer
        return start_step

    def _skip_to(self, step: int):
        """This rank's batch stream at the position of ``step`` (the data order of an uninterrupted run)."""
        from musicray.train.data import collated_batches

        s = self.settings
        batches = collated_batches(self.train_set, s.micro_batch_size, s.seed, self.rank, self.world, self.pad_id,
                                   self.config.data.max_length if s.packing else None)
        for _ in range(step * s.gradient_accumulation_steps):
            next(batches)
        return batches

    # -- steps -------------------------------------------------------------------------------------------------
    def forward_loss(self, batch):
        device = self.device
        labels = batch["labels"].to(device)
        # Padded batches carry an attention mask; packed rows carry position ids that restart per example.
        inputs = {key: batch[key].to(device) for key in ("attention_mask", "position_ids") if key in batch}
        out = self.engine(input_ids=batch["input_ids"].to(device), **inputs)
        return self.loss_fn(out.logits, batch, labels)

    def train_step(self, step: int) -> dict:
        """One optimizer step; returns its metrics row (loss averaged over ranks and micro-batches)."""
        import torch
        import torch.distributed as dist

        gas = self.settings.gradient_accumulation_steps
        started = time.perf_counter()
        learning_rate = self.engine.get_lr()[0]
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        for _ in range(gas):
            batch = next(self.batches)
            loss = self.forward_loss(batch)
            self.engine.backward(loss)
            self.engine.step()
            stats[0] += loss.detach().double()     # summed on the device: no host sync per micro-batch
            stats[1] += batch["tokens"]
            stats[2] += int((batch["labels"][:, 1:] != -100).sum())
        dist.all_reduce(stats)
        elapsed = time.perf_counter() - started
        loss_value = (stats[0] / (gas * self.world)).item()
        if not math.isfinite(loss_value):
            raise SongError(f"stage 1: loss is {loss_value} at step {step}")
        return {"step": step, "loss": loss_value, "learning_rate": learning_rate,
                "tokens_per_s": stats[1].item() / elapsed, "labelled_tokens_per_s": stats[2].item() / elapsed,
                "tokens": int(stats[1].item()), "labelled_tokens": int(stats[2].item()),
                "step_s": round(elapsed, 6), "val_loss": None, "start_step": self.start_step}

    def validate(self) -> float | None:
        """Token-count-weighted validation loss over every rank's fixed validation batches (None without any)."""
        import torch
        import torch.distributed as dist

        if not self.val_batches:
            return None
        device = self.device
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in self.val_batches:
                total += torch.stack([self.forward_loss(batch).detach().double(),
                                      torch.ones((), device=device, dtype=torch.float64)])
        self.engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def save(self, step: int, loss: float, val_loss: float | None) -> None:
        """A DeepSpeed checkpoint of this rank, reported to Ray Train (which copies it into the run)."""
        import ray.train

        tmp = tempfile.mkdtemp(prefix=f"musicray-stage1-rank{self.rank}-")
        try:
            self.engine.save_checkpoint(tmp, tag=f"global_step{step}", client_state={"step": step})
            metrics = {"step": step, "loss": loss, **({"val_loss": val_loss} if val_loss is not None else {})}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{step:06d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        s = self.settings
        self.engine.train()
        for step in range(self.start_step + 1, s.max_steps + 1):
            row = self.train_step(step)
            save = step % s.checkpoint_every == 0 or step == s.max_steps
            row["val_loss"] = self.validate() if save else None
            row["val_missing"] = self.val_missing if save else None
            if self.log is not None and (step % s.log_every == 0 or save):
                self.log.write({**row, "time": round(time.time(), 3)})
            if save:
                self.save(step, row["loss"], row["val_loss"])
        if self.log is not None:
            self.log.close()


def train_loop_per_worker(loop: dict) -> None:
    """The ``TorchTrainer`` loop: set the recipe up and run it."""
    recipe = Stage1Recipe(loop)
    recipe.setup()
    recipe.run()

"""The DeepSpeed JSON of a stage-1 run: the file ``stage1.deepspeed`` names, with the fields the musicray config
owns (batch sizes, optimizer, LR schedule, precision, ZeRO stage) filled in from that config."""

from __future__ import annotations

import json
import os
from pathlib import Path

from musicray.errors import SongError
from musicray.train.config import Config

REPO_ROOT = Path(__file__).resolve().parents[2]


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

"""The models stage 1 starts from and ends with: the initial model (base LLM + music tokens, saved once so that
every rank and the final export start from the same weights) and the exported fine-tuned model (fp32 weights
consolidated from the last DeepSpeed checkpoint, loaded into the initial model, saved with its tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from musicray.errors import SongError
from musicray.quiet import silenced_stdout
from musicray.train.config import Config


def torch_dtype(precision: str):
    import torch

    # Weights are loaded in bf16 for bf16 runs (half the host memory of an 8B model); DeepSpeed keeps fp32
    # master weights in the optimizer either way. fp16 runs load fp32 and let DeepSpeed cast.
    return torch.bfloat16 if precision == "bf16" else torch.float32


def zero3_loading(ds_config: dict):
    """Under ZeRO-3, what makes ``from_pretrained`` build the model inside ``deepspeed.zero.Init``: transformers'
    ``HfDeepSpeedConfig``. Each parameter is then partitioned over the ranks as it is created and the checkpoint is
    read into each rank's shard layer by layer, so no rank ever holds the whole model (16 GB per worker for an 8B
    model in bf16, 128 GB of one node's host memory with 8 workers, otherwise). Returns None below ZeRO-3.

    The caller keeps the returned object for as long as its model lives: transformers holds it through a weak
    reference and asks it whether ZeRO-3 is on (when it saves, resizes or ties weights). The torch process group
    must be up (Ray Train's); DeepSpeed's communication wraps it."""
    if (ds_config.get("zero_optimization") or {}).get("stage") != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    # DeepSpeed checks the total batch against the world size its own communication reports, which is 1 until
    # deepspeed.initialize sets it up: the total is left out here (DeepSpeed derives it from the per-rank sizes).
    return HfDeepSpeedConfig({key: value for key, value in ds_config.items() if key != "train_batch_size"})


def build_init_model(config: Config, out: Path) -> Path:
    """Base LLM + music tokens, saved once so that every rank (and the final export) starts from it."""
    import torch

    from musicray.model import add_music_tokens, load_base, save_music_model
    from musicray.tokens import Vocabulary

    model, tokenizer = load_base(config.base_model, Path(config.cache_dir).expanduser(),
                                 torch_dtype(config.stage1.precision))
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

        # It prints what it parses (six lines and a progress bar per export): shown only with --verbose.
        with silenced_stdout(stderr=True):
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    # ZeRO stage 0: the whole module is in rank 0's model states.
    states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_model(checkpoint_dir: Path, init_dir: Path, out: Path, precision: str = "fp32") -> Path:
    """Load the checkpoint's consolidated weights into the initial model and save it with its tokenizer."""
    from musicray.model import load_music_model, save_music_model

    state = consolidated_state_dict(checkpoint_dir)
    model, music = load_music_model(init_dir, torch_dtype(precision))
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

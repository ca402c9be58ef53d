"""The models stage 1 starts from: under ZeRO-3 a worker loads the initial model partitioned (inside
``deepspeed.zero.Init``), never whole; below ZeRO-3 as it was saved."""

from __future__ import annotations

import socket

import pytest
import torch

from musicray.model import add_music_tokens, load_base, load_music_model, save_music_model
from musicray.tokens import Vocabulary
from musicray.train.stage1_models import zero3_loading

pytest.importorskip("deepspeed")


@pytest.fixture()
def one_rank_group(monkeypatch):
    """A torch process group of one gloo rank, as Ray Train sets up for each worker (torn down afterwards)."""
    import torch.distributed as dist

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    import deepspeed.ops

    # As Stage1Recipe.setup does on CPU: DeepSpeed would JIT-compile a shared-memory all-reduce op it does not need.
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", False)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    import deepspeed.comm.comm as ds_comm

    ds_comm.cdb = None          # DeepSpeed's handle on the group goes with it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def init_model(tmp_path_factory):
    """The tiny base with the music tokens, saved as stage 1's initial model."""
    path = tmp_path_factory.mktemp("init")
    model, tokenizer = load_base("tiny", path / "cache")
    save_music_model(model, add_music_tokens(model, tokenizer, Vocabulary()), path / "model")
    return path / "model"


def zero_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}}


@pytest.mark.parametrize("stage", [0, 2])
def test_below_zero3_the_model_loads_as_saved(stage):
    assert zero3_loading(zero_config(stage)) is None


def test_under_zero3_each_parameter_is_partitioned_as_it_loads_and_holds_the_saved_weights(one_rank_group,
                                                                                             init_model):
    import deepspeed

    saved = load_music_model(init_model)[0].state_dict()
    keep = zero3_loading(zero_config(3))
    model, _ = load_music_model(init_model)
    parameters = dict(model.named_parameters())
    # Partitioned: the module's tensors are empty placeholders, the rank's shard lives in ds_tensor.
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in parameters.values())
    assert sum(p.ds_numel for p in parameters.values()) == sum(
        t.numel() for name, t in saved.items() if name in parameters)
    with deepspeed.zero.GatheredParameters(list(parameters.values())):
        for name, parameter in parameters.items():
            torch.testing.assert_close(parameter.data, saved[name], rtol=0, atol=0)
        # The music rows (added on the driver, before any rank starts) are there too.
        assert parameters["model.embed_tokens.weight"].shape[0] == len(saved["model.embed_tokens.weight"]) > 1020
    del keep

"""Stage 1 on real Ray Train and real DeepSpeed (CPU, gloo): ZeRO-2 and ZeRO-3, the exported model, the loss,
resuming a stopped run, a worker killed mid-run, and the grammar-masked loss.

One reference run (ZeRO-2, constant learning rate after a short warm-up, 40 steps, checkpoints every 10) is
shared: with the same seed, data and initial weights, every other run must reproduce its losses step for step
(ZeRO-3), and a run that was stopped and resumed, or that lost a worker and restarted from a checkpoint, must
end with its loss and weights.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from musicray.cli import main
from musicray.model import load_music_model
from musicray.run import RunDir
from musicray.song import SongError
from musicray.train.config import load_config
from musicray.train.data import RenderedDataset, collate, load_examples, resolve_data_dir
from musicray.train.deepspeed_config import deepspeed_config
from musicray.train.finetune import train_stage1
from musicray.train.loss import causal_lm_loss
from .stage1_runs import metrics, stage1_settings

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS, EVERY = 40, 10


def overrides(cache_dir: Path, **extra) -> list[str]:
    return stage1_settings(cache_dir, **{"stage1.learning_rate": 0.002, "stage1.warmup_steps": 2,
                                         "stage1.max_steps": STEPS, "stage1.checkpoint_every": EVERY,
                                         "stage1.keep_checkpoints": 2, "stage1.max_failures": 2}, **extra)


def tiny_config(cache_dir: Path, **extra):
    return load_config(TINY, overrides(cache_dir, **extra))


def fixed_batch_loss(model_dir: Path, data_dir: Path, masked: bool = False) -> float:
    """The loss of the first four training examples (the same batch for every model)."""
    model, music = load_music_model(model_dir)
    model.eval()
    examples = load_examples(data_dir, ["song", "chord", "melody", "secondary", "dynamics", "tempo"], "train",
                             music.vocab)[:4]
    batch = collate(RenderedDataset(examples, music, 256).items, music.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if not masked:
        return causal_lm_loss(logits, batch["labels"]).item()
    from musicray.grammar import Grammar

    return causal_lm_loss(logits, batch["labels"], Grammar(music.vocab, torch.device("cpu")), batch["answer_start"],
                          batch["streams"], batch["plans"], music.offset, music.eot_id).item()


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    state_a, state_b = load_music_model(a)[0].state_dict(), load_music_model(b)[0].state_dict()
    assert state_a.keys() == state_b.keys()
    worst = max((state_a[k] - state_b[k]).abs().max().item() for k in state_a)
    assert worst <= atol, f"weights differ by up to {worst}"


def test_deepspeed_config_is_filled_from_the_config():
    config = load_config(TINY, ["stage1.micro_batch_size=3", "stage1.gradient_accumulation_steps=4",
                                "stage1.learning_rate=0.0005", "stage1.weight_decay=0.1", "stage1.zero_stage=3",
                                "stage1.warmup_steps=7", "stage1.max_steps=90"])
    ds = deepspeed_config(config)
    sizes = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert sizes == (3, 4, 24)
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 0.0005, "weight_decay": 0.1, "betas": [0.9, 0.999],
                                                           "eps": 1e-8, "torch_adam": True}}
    assert ds["zero_optimization"]["stage"] == 3 and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 90 and ds["scheduler"]["params"]["warmup_num_steps"] == 7
    kinds = {name: deepspeed_config(load_config(TINY, [f"stage1.lr_schedule={name}"]))["scheduler"]["type"]
             for name in ("constant", "linear", "cosine")}
    assert kinds == {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}
    big = deepspeed_config(load_config(ROOT / "configs" / "llama3_8b.yaml"))
    assert big["zero_optimization"]["stage"] == 3 and big["bf16"]["enabled"] and big["train_batch_size"] == 64


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("musicray-cache")


@pytest.fixture(scope="module")
def reference(ray_cluster, cache_dir, tmp_path_factory) -> Path:
    """The uninterrupted ZeRO-2 run every other run is compared with."""
    run_dir = tmp_path_factory.mktemp("reference")
    train_stage1(tiny_config(cache_dir), run_dir, progress=False)
    return run_dir


@pytest.mark.parametrize("zero", [2, 3])
def test_stage1_trains_and_exports(zero, request, cache_dir, tmp_path):
    ref_rows = metrics(request.getfixturevalue("reference"))
    if zero == 2:
        run_dir, steps = request.getfixturevalue("reference"), STEPS
    else:   # through the job's command line, with the ZeRO-3 JSON
        run_dir, steps = tmp_path / "run", 6
        sets = overrides(cache_dir, stage1__deepspeed="configs/deepspeed/zero3.json", stage1__max_steps=steps,
                         stage1__checkpoint_every=3)
        assert main(["train", "--config", str(TINY), "--out", str(run_dir), "--no-progress",
                     *[arg for value in sets for arg in ("--set", value)]]) == 0
    run = RunDir(run_dir)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["start_step"] == 0 and r["tokens_per_s"] > 0 and r["labelled_tokens_per_s"] > 0 for r in rows)
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [s for s in range(1, steps + 1)
                                                                      if s % (EVERY if zero == 2 else 3) == 0]
    # Same seed, data and initial weights: ZeRO-3 takes the same steps as ZeRO-2.
    for row, ref in zip(rows, ref_rows):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert row["learning_rate"] == pytest.approx(ref["learning_rate"])
    checkpoints = sorted(p.name for p in RunDir(run_dir).ray_experiment("stage1").glob("checkpoint_0*"))
    assert checkpoints[-1] == f"checkpoint_{steps:06d}" and len(checkpoints) <= 2
    assert run.stage1_config.exists() and load_config(run.stage1_config).stage1.max_steps == steps
    assert any(run.stage1_tensorboard.iterdir())

    model, music = load_music_model(run.stage1_model)   # from_pretrained, tokenizer, vocabulary.json
    vocab = music.vocab
    ids = music.tokenizer.encode("".join(vocab.tokens), add_special_tokens=False)
    assert ids == list(range(music.offset, music.offset + len(vocab)))
    assert model.get_input_embeddings().weight.shape[0] == len(music.tokenizer) >= music.offset + len(vocab)
    assert json.loads((run.stage1_model / "musicray.json").read_text())["step"] == steps
    init = load_music_model(run.stage1_init)[0].state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, init[k])]
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed


def test_stage1_without_a_validation_split_says_so(ray_cluster, cache_dir, tmp_path):
    """Six synthetic songs (seed 0) put none in the validation split: stage 1 trains on, and says so in its
    metrics and on the driver (a worker's own warning stays in its log)."""
    config = tiny_config(cache_dir, data__songs=6, stage1__max_steps=2, stage1__checkpoint_every=2)
    with pytest.warns(UserWarning, match="stage 1: trained without a validation loss: .* no songs in its validation "
                                         "split"):
        train_stage1(config, tmp_path / "run", progress=False)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(r["val_loss"] is None for r in rows)
    assert rows[0]["val_missing"] is None   # step 1 does not validate
    assert rows[1]["val_missing"].endswith("has no songs in its validation split")


@pytest.mark.parametrize("mask_loss", [False, True], ids=["plain-padded", "masked-packed"])
def test_loss_falls(mask_loss, request, cache_dir, tmp_path):
    """The plain loss on padded batches (the reference run), and the grammar-masked loss on packed rows."""
    if not mask_loss:
        run_dir = request.getfixturevalue("reference")
    else:
        request.getfixturevalue("ray_cluster")
        run_dir = tmp_path / "run"
        train_stage1(tiny_config(cache_dir, stage1__mask_loss=True, stage1__packing=True, stage1__max_steps=12,
                                 stage1__checkpoint_every=12), run_dir, progress=False)
        # packed rows are nearly full: 2 workers x 2 rows of up to 256 tokens
        assert all(r["tokens"] > 0.8 * 2 * 2 * 256 for r in metrics(run_dir))
    data_dir = resolve_data_dir(tiny_config(cache_dir), progress=False)
    before = fixed_batch_loss(RunDir(run_dir).stage1_init, data_dir, masked=mask_loss)
    after = fixed_batch_loss(RunDir(run_dir).stage1_model, data_dir, masked=mask_loss)
    print(f"fixed-batch loss ({'masked' if mask_loss else 'plain'}): {before:.4f} -> {after:.4f}")
    assert after < before - 0.3, (before, after)
    rows = metrics(run_dir)
    first, last = rows[:3], rows[-3:]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)


def test_resume_matches_uninterrupted(reference, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    train_stage1(tiny_config(cache_dir, stage1__max_steps=STEPS // 2), run_dir, progress=False)
    with pytest.raises(SongError, match="--resume"):
        train_stage1(tiny_config(cache_dir), run_dir, progress=False)
    with pytest.raises(SongError, match="stage1.num_workers"):
        train_stage1(tiny_config(cache_dir, stage1__num_workers=1), run_dir, resume=True, progress=False)

    train_stage1(tiny_config(cache_dir), run_dir, resume=True, progress=False)
    rows, ref = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert {r["start_step"] for r in rows[STEPS // 2:]} == {STEPS // 2}
    for row, ref_row in zip(rows, ref):
        assert row["loss"] == pytest.approx(ref_row["loss"], rel=1e-5), row["step"]
    assert rows[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=1e-5)
    assert_same_weights(RunDir(run_dir).stage1_model, RunDir(reference).stage1_model)


def _train_workers() -> list[int]:
    """PIDs of the Ray Train workers of this test's Ray instance (descendants of this process only)."""
    import psutil

    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def _registered_checkpoints(run_dir: Path) -> list[str]:
    snapshot = RunDir(run_dir).ray_experiment("stage1") / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except OSError:
        return []
    return sorted({part.split('"')[0] for part in text.split("checkpoint_0")[1:]})


def test_killed_worker_restarts_from_checkpoint(reference, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    outcome: dict = {}

    def run():
        try:
            outcome["model"] = train_stage1(tiny_config(cache_dir), run_dir, progress=False)
        except Exception as err:  # noqa: BLE001 - re-raised by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    killed, deadline = None, time.time() + 600
    while thread.is_alive() and killed is None and time.time() < deadline:
        if _registered_checkpoints(run_dir):     # a checkpoint Ray Train can restart from
            workers = _train_workers()
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed = workers[-1]
        time.sleep(0.05)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None, "the run ended before a worker could be killed"

    rows, ref = metrics(run_dir), metrics(reference)
    restarts = sorted({r["start_step"] for r in rows} - {0})
    assert len(restarts) == 1 and restarts[0] % EVERY == 0, restarts
    restart = int(restarts[0])
    after = [r for r in rows if r["start_step"] == restart]
    assert [r["step"] for r in after] == list(range(restart + 1, STEPS + 1))
    for row in after:   # the restarted workers continue exactly where the checkpoint left off
        assert row["loss"] == pytest.approx(ref[int(row["step"]) - 1]["loss"], rel=1e-5), row["step"]
    assert_same_weights(RunDir(run_dir).stage1_model, RunDir(reference).stage1_model)

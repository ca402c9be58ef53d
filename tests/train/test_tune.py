"""Stage 2: the per-sub-task ASHA scheduler, and a real Ray Tune run of five sub-tasks x two trials."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from musicray.run import RunDir
from musicray.train.config import Config, DataConfig, Stage2Config
from musicray.cli import main
from musicray.train.per_subtask_scheduler import PerSubtaskScheduler
from musicray.train.tune import search_space, tune_adapters
from musicray.tokens import SUBTASKS

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


# -- the scheduler, with Ray Tune's own Trial objects ---------------------------------------------------------
def _trials(subtask, n):
    return [Trial("train_adapter", config={"subtask": subtask}, stub=True) for _ in range(n)]


def _report(scheduler, trial, iteration, loss):
    return scheduler.on_trial_result(None, trial, {"training_iteration": iteration, "val_loss": loss})


def _asha_kwargs():
    return {"metric": "val_loss", "mode": "min", "max_t": 4, "grace_period": 1, "reduction_factor": 2}


def test_scheduler_never_compares_sub_tasks_but_still_halves_within_one():
    scheduler = PerSubtaskScheduler(key="subtask", **_asha_kwargs())
    b1, b2 = _trials("chord", 2)          # an easy sub-task: low losses
    a1, a2 = _trials("dynamics", 2)       # a hard one: losses ten times higher
    for trial in (b1, a1, b2, a2):
        scheduler.on_trial_add(None, trial)
    assert set(scheduler.schedulers) == {"chord", "dynamics"}

    assert _report(scheduler, b1, 1, 1.0) == CONTINUE
    assert _report(scheduler, b2, 1, 1.3) == STOP        # worse than its own sub-task's rung: stopped
    # Far above every chord loss, but the first of its sub-task at this rung: it goes on.
    assert _report(scheduler, a1, 1, 10.0) == CONTINUE
    assert _report(scheduler, a2, 1, 14.0) == STOP       # clearly worse than a1 at the same rung
    assert _report(scheduler, a1, 2, 9.0) == CONTINUE    # first at rung 2 of dynamics
    assert _report(scheduler, b1, 2, 0.9) == CONTINUE
    assert _report(scheduler, a1, 3, 8.5) == CONTINUE
    assert _report(scheduler, a1, 4, 8.0) == STOP        # max_t reached: the trial is done
    scheduler.on_trial_complete(None, a1, {"training_iteration": 4, "val_loss": 8.0})
    scheduler.on_trial_complete(None, a2, {"training_iteration": 1, "val_loss": 14.0})
    scheduler.on_trial_complete(None, b2, {"training_iteration": 1, "val_loss": 1.3})
    assert "dynamics" in scheduler.debug_string() and "chord" in scheduler.debug_string()

    # The same reports through one global ASHA: the hard sub-task's best trial is stopped by the easy one's.
    single = ASHAScheduler(**_asha_kwargs())
    b1, b2 = _trials("chord", 2)
    a1, a2 = _trials("dynamics", 2)
    for trial in (b1, a1, b2, a2):
        single.on_trial_add(None, trial)
    assert _report(single, b1, 1, 1.0) == CONTINUE
    assert _report(single, b2, 1, 1.3) == STOP
    assert _report(single, a1, 1, 10.0) == STOP


def test_scheduler_routes_removal_errors_and_state(tmp_path):
    scheduler = PerSubtaskScheduler(**_asha_kwargs())
    a1, a2, a3 = _trials("melody", 3)
    (t1,) = _trials("tempo", 1)
    for trial in (a1, a2, a3, t1):
        scheduler.on_trial_add(None, trial)
    assert _report(scheduler, a1, 1, 2.0) == CONTINUE
    scheduler.on_trial_remove(None, a3)                  # pending trial removed
    scheduler.on_trial_error(None, t1)                   # running trial failed
    assert "tempo" in scheduler.schedulers and t1.trial_id not in scheduler.schedulers["tempo"]._trial_info

    scheduler.save(str(tmp_path / "scheduler.pkl"))
    restored = PerSubtaskScheduler(**_asha_kwargs())
    restored.restore(str(tmp_path / "scheduler.pkl"))
    assert _report(restored, a2, 1, 3.0) == STOP         # the restored rung still holds a1's 2.0

    with pytest.raises(ValueError, match="subtask"):
        scheduler.on_trial_add(None, Trial("train_adapter", config={}, stub=True))
    # Tune passes TuneConfig's metric/mode through set_search_properties: refused when already set.
    assert scheduler.set_search_properties(None, None) is True
    assert scheduler.set_search_properties("val_loss", "min") is False
    late = PerSubtaskScheduler(max_t=4)
    with pytest.raises(ValueError, match="metric"):
        late.on_trial_add(None, a1)
    assert late.set_search_properties("val_loss", "min") is True
    late.on_trial_add(None, a1)


def test_search_space():
    from ray import tune

    space = search_space(Stage2Config(subtasks=["chord", "tempo"], seed=3))
    assert space["subtask"] == tune.grid_search(["chord", "tempo"])
    assert isinstance(space["learning_rate"], tune.search.sample.Float)
    assert space["seed"] == 3
    fixed = search_space(Stage2Config(search={"rank": 4, "learning_rate": [1e-3, 1e-3],
                                              "target_modules": ["q_proj", "v_proj"]}))
    assert fixed["rank"] == 4 and fixed["learning_rate"] == 1e-3 and fixed["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(Exception, match="unknown"):
        search_space(Stage2Config(search={"ranks": [4]}))


@pytest.mark.parametrize("config_file", ["configs/tiny.yaml", "configs/pop909_tiny.yaml", "configs/pop909_small.yaml",
                                         "configs/pop909_smol.yaml", "configs/llama3_8b.yaml"])
def test_every_shipped_configs_search_space_is_valid(config_file):
    """Stage 2 reads its search space only when it starts, after stage 1's hours: a preset's mistake shows here."""
    from pathlib import Path

    from musicray.train.config import load_config

    space = search_space(load_config(Path(__file__).resolve().parents[2] / config_file).stage2)
    assert space["subtask"]["grid_search"] and space["learning_rate"]


def test_missing_stage1_model_says_to_train_first(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="musicray train"):
        tune_adapters(Config(cache_dir=str(tmp_path / "cache")), tmp_path / "run")
    assert main(["tune", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "musicray train" in capsys.readouterr().err


# -- a real Tune run -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    import ray

    from musicray.model import add_music_tokens, load_base, save_music_model
    from musicray.tokens import Vocabulary

    root = tmp_path_factory.mktemp("stage2")
    cache, run_dir = root / "cache", root / "run"
    model, tokenizer = load_base("tiny", cache)
    music = add_music_tokens(model, tokenizer, Vocabulary())
    save_music_model(model, music, RunDir(run_dir).stage1_model)     # stands in for stage 1
    config = Config(cache_dir=str(cache), data=DataConfig(songs=8, max_length=320),
                    stage2=Stage2Config(trials_per_subtask=2, max_steps=4, eval_every=2, eval_batches=1,
                                        micro_batch_size=2, cpus_per_trial=1, seed=0))
    try:
        adapters = tune_adapters(config, run_dir, progress=False)
    finally:
        ray.shutdown()
    return run_dir, adapters


def test_five_adapters_exported_and_change_the_model(tuned):
    from peft import PeftModel

    from musicray.model import load_music_model

    run_dir, adapters = tuned
    assert list(adapters) == list(SUBTASKS)
    base, music = load_music_model(RunDir(run_dir).stage1_model)
    base.eval()
    ids = torch.tensor([music.to_llm(list(range(1, 40)))])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    for subtask in SUBTASKS:
        out = RunDir(run_dir).adapter(subtask)
        assert adapters[subtask] == out
        assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
        chosen = json.loads(RunDir(run_dir).hyperparameters(subtask).read_text())
        assert chosen["subtask"] == subtask and chosen["val_loss"] > 0
        assert set(chosen) >= {"rank", "alpha", "dropout", "learning_rate", "target_modules"}
        assert json.loads((out / "adapter_config.json").read_text())["r"] == chosen["rank"]
        fresh, _ = load_music_model(RunDir(run_dir).stage1_model)
        adapted = PeftModel.from_pretrained(fresh, out).eval()
        with torch.no_grad():
            after = adapted(input_ids=ids).logits
        assert after.shape == before.shape
        assert not torch.allclose(after, before, atol=1e-6), f"{subtask}: the adapter does not change the output"


def test_trials_table(tuned):
    run_dir, _ = tuned
    table = pd.read_csv(RunDir(run_dir).trials_csv)
    assert len(table) == 10
    assert sorted(table["subtask"].unique()) == sorted(SUBTASKS)
    assert (table.groupby("subtask").size() == 2).all()
    assert (table.groupby("subtask")["chosen"].sum() == 1).all()
    assert (table["status"] == "done").all()
    assert table["best_val_loss"].notna().all()
    assert table["steps"].between(2, 4).all()
    assert (table["stopped_early"] == (table["steps"] < 4)).all()
    for subtask, rows in table.groupby("subtask"):
        chosen = rows[rows["chosen"]].iloc[0]
        assert chosen["best_val_loss"] == rows["best_val_loss"].min()
        exported = json.loads(RunDir(run_dir).hyperparameters(subtask).read_text())
        assert exported["val_loss"] == pytest.approx(chosen["best_val_loss"])
        assert exported["trial_id"] == chosen["trial_id"]
        assert exported["val_source"] == chosen["val_source"]
    # Each trial says where its validation loss came from (test_validation_falls_back_to_held_out_train: why).
    sources = table.groupby("subtask")["val_source"].unique()
    assert list(sources["chord"]) == ["validation"] and list(sources["dynamics"]) == ["train (held out)"]
    markdown = RunDir(run_dir).trials_md.read_text()
    assert markdown.startswith("| trial_id | subtask |") and len(markdown.strip().splitlines()) == 12


def test_validation_falls_back_to_held_out_train(tuned):
    from musicray.model import load_music_model
    from musicray.song import SongError
    from musicray.train.tune import subtask_datasets

    run_dir, _ = tuned
    _, music = load_music_model(RunDir(run_dir).stage1_model)
    data_dir = json.loads(RunDir(run_dir).hyperparameters("chord").read_text())["data_dir"]
    train, val, source = subtask_datasets(data_dir, "chord", music, 320)
    assert source == "validation" and len(val) > 0
    # The synthetic validation song's dynamics prompts are longer than 320 tokens: held out from train instead.
    train, val, source = subtask_datasets(data_dir, "dynamics", music, 320)
    assert source == "train (held out)" and len(val) >= 1 and len(train) >= 2
    with pytest.raises(SongError, match="max_length=40"):
        subtask_datasets(data_dir, "chord", music, 40)


@pytest.mark.slow
def test_a_trial_on_a_lost_node_is_run_again_and_finishes(tmp_path):
    """benchmarks/node_loss.py --stage2 in a fresh interpreter (a Ray cluster of its own): two trials, one per node;
    the second node is removed after both have reported once; the lost trial is started again (FailureConfig) from
    its checkpoint, and both sub-tasks end with every step and an exported adapter."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "benchmarks/node_loss.py", "--stage2", "--steps", "30", "--every", "10",
                           "--out", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, check=False,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(report))
    assert report["trials_before"] == {"head": 1, "second": 1}
    assert sorted(report["adapters"]) == ["chord", "melody"]
    assert sorted((t["subtask"], t["status"], t["steps"]) for t in report["trials"]) == [
        ("chord", "done", 30), ("melody", "done", 30)]
    # The lost trial went on from its checkpoint: no step was reported twice.
    assert report["reported_steps"] == {"chord": [10, 20, 30], "melody": [10, 20, 30]}

"""Re-runs: a stage is skipped only when its saved config hash equals the requested one; otherwise it is
refused with the reason and the way on (--resume, --force), or run as the flags say."""

from __future__ import annotations

import json

import pytest

from musicray.errors import StageConflict
from musicray.rerun import RESUME, RUN, SKIP, Saved, changed_keys, config_hash, decide, stage_keys, write_done
from musicray.run import RunDir
from musicray.train.config import config_to_dict, load_config

OLD = {"stage1.max_steps": 200, "stage1.learning_rate": 0.003}
NEW = {"stage1.max_steps": 100, "stage1.learning_rate": 0.003}
NOTHING = Saved(started=False, finished=False, keys=None)
FINISHED = Saved(started=True, finished=True, keys=OLD)
UNFINISHED = Saved(started=True, finished=False, keys=None)
LEGACY = Saved(started=True, finished=True, keys=None)      # finished by a musicray that saved no hash

# (what the run dir holds, requested keys, resume, force, resumable) -> decision, or the error's words
CASES = [
    ("empty run dir", NOTHING, NEW, False, False, True, RUN),
    ("empty run dir, --resume", NOTHING, NEW, True, False, True, RUN),
    ("same config", FINISHED, OLD, False, False, True, SKIP),
    ("same config, --resume", FINISHED, OLD, True, False, True, SKIP),
    ("same config, --force", FINISHED, OLD, False, True, True, RUN),
    ("other config", FINISHED, NEW, False, False, True, "stage1.max_steps: 200 -> 100.*--resume.*--force"),
    ("other config, --resume", FINISHED, NEW, True, False, True, RESUME),
    ("other config, --force", FINISHED, NEW, False, True, True, RUN),
    ("unfinished", UNFINISHED, NEW, False, False, True, "unfinished run; pass --resume.*--force"),
    ("unfinished, --resume", UNFINISHED, NEW, True, False, True, RESUME),
    ("unfinished, --force", UNFINISHED, NEW, False, True, True, RUN),
    ("no saved hash", LEGACY, NEW, False, False, True, "no saved config hash"),
    ("no saved hash, --resume", LEGACY, NEW, True, False, True, RESUME),
    ("--resume and --force", FINISHED, NEW, True, True, True, "choose one"),
    # stage 2 (not resumable): adapters of another config are never replaced silently
    ("sweep, same config", FINISHED, OLD, False, False, False, SKIP),
    ("sweep, other config", FINISHED, NEW, False, False, False, "stage1.max_steps: 200 -> 100.*--force"),
    ("sweep, other config, --force", FINISHED, NEW, False, True, False, RUN),
    ("sweep, unfinished", UNFINISHED, NEW, False, False, False, RUN),
    ("sweep, --resume", FINISHED, NEW, True, False, False, "cannot continue"),
]


@pytest.mark.parametrize("saved, requested, resume, force, resumable, expected",
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_decide(tmp_path, saved, requested, resume, force, resumable, expected):
    stage = "stage1" if resumable else "stage2"
    if expected in (RUN, SKIP, RESUME):
        assert decide(stage, tmp_path, saved, requested, resume, force, resumable) == expected
    else:
        with pytest.raises(StageConflict, match=expected):
            decide(stage, tmp_path, saved, requested, resume, force, resumable)


def test_only_the_settings_a_stage_depends_on_count():
    base = config_to_dict(load_config())
    stage1, stage2 = stage_keys(base, "stage1"), stage_keys(base, "stage2")
    for change, changes_stage1, changes_stage2 in [
        (["stage1.learning_rate=0.1"], True, False),     # stage 2 sees stage 1 through its model's hash
        (["stage2.max_steps=3"], False, True),
        (["data.songs=7"], True, True),
        (["eval.songs=9"], False, False),
        (["cache_dir=/elsewhere", "stage1.max_failures=9", "stage2.max_concurrent_trials=1"], False, False),
        (["stage1.placement_strategy=SPREAD", "ray_storage=s3://bucket/runs"], False, False),   # where, not what
    ]:
        changed = config_to_dict(load_config(None, change))
        assert (config_hash(stage_keys(changed, "stage1")) != config_hash(stage1)) == changes_stage1, change
        assert (config_hash(stage_keys(changed, "stage2")) != config_hash(stage2)) == changes_stage2, change
    assert changed_keys({"a": 1, "b": 2}, {"a": 1, "c": 3}) == ["b: 2 -> unset", "c: unset -> 3"]


def test_stage_plans_read_the_run_dir(tmp_path):
    from musicray.train.finetune import stage1_keys, stage1_plan
    from musicray.train.tune import stage2_keys, stage2_plan

    run = RunDir(tmp_path / "run")
    config, other = load_config(), load_config(None, ["stage1.max_steps=3", "stage2.max_steps=3"])
    assert stage1_plan(config, run) == RUN and stage2_plan(config, run) == RUN
    run.stage1_model.mkdir(parents=True)
    with pytest.raises(StageConflict, match="unfinished"):
        stage1_plan(config, run)
    write_done(run.stage1_done, "stage1", stage1_keys(config))
    assert json.loads(run.stage1_done.read_text())["config_hash"] == config_hash(stage1_keys(config))
    assert stage1_plan(config, run) == SKIP
    with pytest.raises(StageConflict, match="stage1.max_steps: 40 -> 3"):
        stage1_plan(other, run)
    for subtask in config.stage2.subtasks:
        run.adapter(subtask).mkdir(parents=True)
        (run.adapter(subtask) / "adapter_config.json").write_text("{}")
    write_done(run.tune_done, "stage2", stage2_keys(config, run))
    assert stage2_plan(config, run) == SKIP
    with pytest.raises(StageConflict, match="stage2.max_steps: 20 -> 3.*--force"):
        stage2_plan(load_config(None, ["stage2.max_steps=3"]), run)
    # Stage 1 trained again (another hash): the adapters trained on the old model are stale.
    write_done(run.stage1_done, "stage1", stage1_keys(other))
    with pytest.raises(StageConflict, match="stage1.model_hash"):
        stage2_plan(config, run)
    assert stage2_plan(config, run, force=True) == RUN

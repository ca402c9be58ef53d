"""`musicray pipeline` into a run dir that already holds stages: it refuses, with the reason and the way on,
rather than keep (or overwrite) a stage made with other settings."""

from __future__ import annotations

from pathlib import Path

from musicray.cli import main
from musicray.rerun import write_done
from musicray.run import RunDir
from musicray.tokens import SUBTASKS
from musicray.train.config import load_config
from musicray.train.finetune import stage1_keys

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_pipeline_refuses_a_stage_made_with_other_settings(tmp_path, make_random_run, capsys):
    import ray

    run = RunDir(tmp_path / "run")
    make_random_run(run.root, SUBTASKS, tmp_path / "cache")
    sets = [f"cache_dir={tmp_path / 'cache'}", "data.songs=8"]
    write_done(run.stage1_done, "stage1", stage1_keys(load_config(TINY, [*sets, "stage1.max_steps=7"])))
    try:
        status = main(["pipeline", "--config", str(TINY), "--out", str(run.root), "--quiet",
                       *[arg for value in sets for arg in ("--set", value)]])
    finally:
        ray.shutdown()
    out, err = capsys.readouterr()
    assert status == 2
    assert "stage1.max_steps: 7 -> 200" in err and "--resume" in err and "--force" in err, err
    assert "== data" in out and "== generate" not in out
    assert run.has_model() and run.has_adapter("melody")      # nothing was replaced

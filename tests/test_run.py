"""The run directory's one owner: the layout, and one clear error naming the missing part."""

from __future__ import annotations

import pytest

from musicray.errors import MissingRunPart, SongError
from musicray.data.layout import DataDir
from musicray.run import EvalDir, RunDir


def test_layout(tmp_path):
    run = RunDir(tmp_path / "run")
    parts = {
        run.stage1_init: "stage1/init", run.stage1_model: "stage1/model", run.stage1_config: "stage1/config.yaml",
        run.stage1_metrics: "stage1/metrics.csv", run.stage1_done: "stage1/done.json",
        run.adapter("melody"): "adapters/melody", run.trials_csv: "tune/trials.csv", run.trials_md: "tune/trials.md",
        run.tune_done: "tune/done.json", run.songs: "songs", run.eval_report: "eval/report.md",
        run.pipeline_json: "pipeline.json", run.ray: "ray",
        run.ablation(True).stage1_model: "ablations/mask_loss_on/stage1/model",
        run.ablation(False).root: "ablations/mask_loss_off",
        run.language_ablation("absolute").stage1_model: "ablations/language_absolute/stage1/model",
        run.stage1_tensorboard: "stage1/tensorboard", run.hyperparameters("tempo"): "adapters/tempo/hyperparameters.json",
        run.ray_experiment("stage1"): "ray/stage1", run.evaluation.report_json: "eval/report.json",
        run.evaluation.plot("piano_roll_real"): "eval/plots/piano_roll_real.png", run.evaluation.songs: "eval/songs",
    }
    for path, relative in parts.items():
        assert path == tmp_path / "run" / relative
    assert EvalDir(tmp_path / "out").report_md == tmp_path / "out" / "report.md"
    assert RunDir("~/x").root.is_absolute() and not str(RunDir("~/x")).startswith("~")


def test_data_layout(tmp_path):
    """The prepared-data folder: what ``musicray data prepare`` writes and training and the evaluation read."""
    data = DataDir(tmp_path)
    parts = {data.songs: "songs.parquet", data.table("melody"): "melody.parquet", data.table("song"): "song.parquet",
             data.vocabulary: "vocabulary.json", data.report: "report.json"}
    for path, relative in parts.items():
        assert path == tmp_path / relative
    assert not data.is_prepared()
    data.songs.write_bytes(b"")
    assert data.is_prepared()


@pytest.mark.parametrize("part, subtask, present, message", [
    ("stage-1 model", None, [], "has no stage-1 model"),
    ("stage-1 model", None, ["stage1/model/config.json"], "vocabulary.json missing"),
    ("adapter", "tempo", ["stage1/model/config.json"], "has no adapter of tempo"),
    ("sweep table", None, [], "musicray tune"),
    ("stage-1 metrics", None, [], "musicray train"),
])
def test_a_missing_part_is_one_clear_error(tmp_path, part, subtask, present, message):
    run = RunDir(tmp_path)
    for name in present:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    with pytest.raises(MissingRunPart, match=message) as error:
        run.require(part, subtask)
    # A user error (the CLI reports it in one line, exit status 2), and a missing file for callers that catch that.
    assert isinstance(error.value, SongError) and isinstance(error.value, FileNotFoundError)
    assert str(error.value).startswith(f"--run: {tmp_path}")


def test_a_present_part_is_its_path_and_a_missing_run_dir_says_so(tmp_path):
    run = RunDir(tmp_path)
    for name in ("config.json", "vocabulary.json"):
        (run.stage1_model).mkdir(parents=True, exist_ok=True)
        (run.stage1_model / name).write_text("{}")
    assert run.require("stage-1 model") == run.stage1_model and run.has_model()
    with pytest.raises(MissingRunPart, match="--out: .*nowhere does not exist"):
        RunDir(tmp_path / "nowhere").require("stage-1 model", field="--out")
    with pytest.raises(ValueError, match="unknown part"):
        run.require("tokenizer")

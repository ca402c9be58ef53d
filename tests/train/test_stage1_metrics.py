"""stage1/metrics.csv as runs write and read it."""

from musicray.run import RunDir
from musicray.train.stage1_metrics import METRIC_COLUMNS, MetricsLog, read_metrics

ROW = {"step": 3, "loss": 2.5, "learning_rate": 0.001, "tokens_per_s": 100.0, "labelled_tokens_per_s": 50.0,
       "tokens": 512, "labelled_tokens": 256, "step_s": 1.5, "val_loss": None, "start_step": 0, "time": 10.0,
       "val_missing": "no validation split"}


def test_a_new_log_writes_every_column(tmp_path):
    run = RunDir(tmp_path)
    run.stage1_metrics.parent.mkdir(parents=True)
    log = MetricsLog(run, 0)
    log.write(ROW)
    log.close()
    [row] = read_metrics(run.stage1_metrics)
    assert tuple(row) == METRIC_COLUMNS and row["val_missing"] == "no validation split" and row["loss"] == 2.5


def test_a_run_resumed_from_an_older_layout_keeps_its_files_columns(tmp_path):
    """A metrics file written before ``val_missing`` existed gets rows under its own header, so it stays readable."""
    run = RunDir(tmp_path)
    run.stage1_metrics.parent.mkdir(parents=True)
    old = METRIC_COLUMNS[:-1]
    run.stage1_metrics.write_text(",".join(old) + "\n" + ",".join(["1"] * len(old)) + "\n")
    log = MetricsLog(run, 1)
    log.write(ROW)
    log.close()
    rows = read_metrics(run.stage1_metrics)
    assert [tuple(row) for row in rows] == [old, old] and rows[1]["step"] == 3

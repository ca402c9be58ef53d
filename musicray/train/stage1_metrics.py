"""Stage 1's metrics: rank 0 appends a row per logged step to the run's ``stage1_metrics`` CSV (and TensorBoard:
``stage1_tensorboard``), and the driver tails that file into a progress bar (worker output is not shown on the
driver)."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

from musicray.run import RunDir

# ``val_missing``: why a step that validates has no ``val_loss`` (no validation split, or too few of its examples
# for every worker); empty where it has one. Last, so that its text never shifts the columns a reader splits.
METRIC_COLUMNS = ("step", "loss", "learning_rate", "tokens_per_s", "labelled_tokens_per_s", "tokens",
                  "labelled_tokens", "step_s", "val_loss", "start_step", "time", "val_missing")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics CSV: figures as floats, ``val_missing`` as text, None where a cell is empty."""
    with path.open(newline="") as f:
        return [{key: (value if key == "val_missing" else float(value)) if value else None
                 for key, value in row.items()} for row in csv.DictReader(f)]


def validation_missing(path: Path) -> str | None:
    """Why stage 1 logged no validation loss (the ``val_missing`` of its metrics), or None where it did."""
    reasons = [row.get("val_missing") for row in read_metrics(path)] if path.exists() else []
    return next((reason for reason in reversed(reasons) if reason), None)


class MetricsLog:
    """metrics.csv and TensorBoard, on rank 0."""

    def __init__(self, run: RunDir, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        path = run.stage1_metrics
        new = not path.exists() or path.stat().st_size == 0
        # A run resumed from before a column was added keeps its file's columns: rows stay under their header.
        self.columns = METRIC_COLUMNS if new else tuple(path.read_text().splitlines()[0].split(","))
        self.file = path.open("a", newline="")
        self.csv = csv.writer(self.file, lineterminator="\n")
        if new:
            self.csv.writerow(self.columns)
            self.file.flush()
        # purge_step hides events a failed attempt logged after the checkpoint it restarts from.
        self.tb = SummaryWriter(str(run.stage1_tensorboard), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        self.csv.writerow(["" if row.get(c) is None else row[c] for c in self.columns])
        self.file.flush()
        step = row["step"]
        for key in ("loss", "learning_rate", "tokens_per_s", "labelled_tokens_per_s"):
            self.tb.add_scalar(f"train/{key}", row[key], step)
        if row.get("val_loss") is not None:
            self.tb.add_scalar("val/loss", row["val_loss"], step)
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


class ProgressTail(threading.Thread):
    """A tqdm bar on the driver, fed by the rows rank 0 appends to metrics.csv (worker output is not shown)."""

    def __init__(self, path: Path, total: int, enabled: bool, desc: str = "stage1"):
        super().__init__(daemon=True)
        self.path, self.total, self.enabled, self.desc = path, total, enabled, desc
        self.offset = path.stat().st_size if path.exists() else 0
        self.done = threading.Event()

    def __enter__(self):
        if self.enabled:
            self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        if self.enabled:
            self.join(timeout=5)

    def _rows(self):
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [line.split(",") for line in complete.decode().splitlines() if line and not line.startswith("step")]

    def run(self):
        from tqdm import tqdm

        bar = None   # opened at the first row, so its rate is the training rate, not the start-up time
        try:
            while True:
                finished = self.done.wait(0.5)
                for row in self._rows():
                    values = dict(zip(METRIC_COLUMNS, row))
                    step = int(values["step"])
                    if bar is None:
                        bar = tqdm(total=self.total, initial=step - 1, desc=self.desc, unit="step", dynamic_ncols=True)
                    bar.n = step
                    postfix = {"loss": f"{float(values['loss']):.3f}",
                               "tok/s": f"{float(values['tokens_per_s']):.0f}"}
                    if values.get("val_loss"):
                        postfix["val"] = f"{float(values['val_loss']):.3f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.refresh()
                if finished:
                    return
        finally:
            if bar is not None:
                bar.close()

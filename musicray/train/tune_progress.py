"""Stage 2's progress on the driver: one line per finished trial (Ray Tune's own trial tables are off unless
``--verbose``), and the per-sub-task table of the chosen trials at the end."""

from __future__ import annotations

import math
import sys

from ray.tune import Callback

VALIDATION = "validation"   # the split a trial's val_loss comes from when the data has one that fits


class TrialLines(Callback):
    """Prints ``[3/10] melody trial 1a2b: val_loss 2.31 (best 2.28 at step 40), 80 steps, rank 8, lr 0.0031``
    when a trial finishes (completed, stopped early by ASHA, or failed)."""

    def __init__(self, total: int, max_steps: int, stream=None):
        self.total, self.max_steps, self.done = total, max_steps, 0
        self.stream = stream or sys.stdout
        self.best: dict[str, float] = {}     # trial id -> lowest val_loss seen

    def on_trial_result(self, iteration, trials, trial, result, **info):
        loss = result.get("val_loss")
        if loss is not None and loss < self.best.get(trial.trial_id, math.inf):
            self.best[trial.trial_id] = loss

    def _line(self, trial, outcome: str) -> None:
        self.done += 1
        config, last = trial.config or {}, trial.last_result or {}
        steps = last.get("step", 0)
        if outcome == "done" and steps and steps < self.max_steps:
            outcome = "stopped early"
        best = self.best.get(trial.trial_id)
        figures = (f"val_loss {last['val_loss']:.3f} (best {best:.3f}), {steps} steps"
                   if last.get("val_loss") is not None and best is not None else "no validation loss")
        if last.get("val_source") not in (None, VALIDATION):   # say where a substitute validation loss came from
            figures += f" (validated on {last['val_source']}: no validation example fits)"
        print(f"   [{self.done}/{self.total}] {config.get('subtask')} trial {trial.trial_id}: {outcome}; {figures}; "
              f"rank {config.get('rank')}, lr {float(config.get('learning_rate', math.nan)):.2g}",
              file=self.stream, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "failed")


def chosen_lines(table) -> list[str]:
    """The chosen trial of each sub-task, one line each (from ``trials_table``)."""
    if not len(table):
        return []
    rows = table[table["chosen"]]
    lines = [f"   {'sub-task':<10} {'trial':<12} {'val_loss':>8} {'steps':>5}  rank alpha dropout  lr"]
    for row in rows.itertuples(index=False):
        lines.append(f"   {str(row.subtask):<10} {str(row.trial_id):<12} {row.best_val_loss:>8.3f} {row.steps:>5}  "
                     f"{row.rank:>4} {row.alpha:>5} {row.dropout:>7}  {row.learning_rate:.2g}")
    return lines

"""Stage 2's progress: one line per finished trial, and the chosen trial of each sub-task."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pandas as pd

from musicray.train.tune_progress import TrialLines, chosen_lines


def trial(trial_id, subtask, step, loss, val_source="validation"):
    return SimpleNamespace(trial_id=trial_id, config={"subtask": subtask, "rank": 4, "learning_rate": 0.003},
                           last_result={"step": step, "val_loss": loss, "val_source": val_source})


def test_one_line_per_finished_trial():
    out = io.StringIO()
    lines = TrialLines(total=3, max_steps=80, stream=out)
    done, early = trial("a_0", "melody", 80, 2.5), trial("a_1", "melody", 20, 3.0)
    failed = trial("a_2", "tempo", 0, None)
    lines.on_trial_result(0, [], done, {"val_loss": 2.4})
    lines.on_trial_result(0, [], done, {"val_loss": 2.5})
    lines.on_trial_result(0, [], early, {"val_loss": 3.0})
    lines.on_trial_complete(0, [], done)
    lines.on_trial_complete(0, [], early)
    lines.on_trial_error(0, [], failed)
    text = out.getvalue().splitlines()
    assert len(text) == 3
    assert text[0].strip().startswith("[1/3] melody trial a_0: done; val_loss 2.500 (best 2.400), 80 steps")
    assert "stopped early" in text[1] and "[2/3]" in text[1]
    assert "[3/3] tempo trial a_2: failed; no validation loss" in text[2]
    assert all("validated on" not in line for line in text)


def test_a_trial_validated_on_held_out_train_says_so():
    out = io.StringIO()
    lines = TrialLines(total=1, max_steps=80, stream=out)
    held_out = trial("d_0", "dynamics", 80, 2.5, "train (held out)")
    lines.on_trial_result(0, [], held_out, {"val_loss": 2.5})
    lines.on_trial_complete(0, [], held_out)
    assert "val_loss 2.500 (best 2.500), 80 steps (validated on train (held out): no validation example fits)" \
        in out.getvalue()


def test_chosen_lines():
    table = pd.DataFrame([
        {"trial_id": "a_0", "subtask": "chord", "rank": 4, "alpha": 8, "dropout": 0.0, "learning_rate": 0.001,
         "best_val_loss": 2.0, "steps": 80, "chosen": True},
        {"trial_id": "a_1", "subtask": "chord", "rank": 8, "alpha": 16, "dropout": 0.05, "learning_rate": 0.002,
         "best_val_loss": 2.5, "steps": 20, "chosen": False}])
    lines = chosen_lines(table)
    assert len(lines) == 2 and "sub-task" in lines[0] and "a_0" in lines[1] and "2.000" in lines[1]
    assert chosen_lines(table.iloc[0:0]) == []

"""A Ray Tune scheduler that runs ASHA separately per group of trials (musicray: per sub-task).

The sub-tasks' losses live on different scales (a dynamics answer is long and hard, a chord answer short and
easy), so one ASHA over all trials would stop the hard sub-task's trials for being on a harder task. Nothing here
knows about music: the group is whatever ``trial.config[key]`` holds.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Optional

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

if TYPE_CHECKING:  # pragma: no cover
    from ray.tune.experiment import Trial


class PerSubtaskScheduler(FIFOScheduler):
    """ASHA run separately for each sub-task: trials are only ever compared with trials of their own sub-task.

    Every trial callback is routed to the ``ASHAScheduler`` of ``trial.config[key]`` (created on the first
    trial of that sub-task, all with the same settings), so each sub-task has its own rungs and cutoffs. Trial
    choice stays FIFO (one queue for all sub-tasks; the search generator interleaves them).
    """

    def __init__(self, metric: Optional[str] = None, mode: Optional[str] = None, key: str = "subtask",
                 time_attr: str = "training_iteration", max_t: int = 100, grace_period: int = 1,
                 reduction_factor: float = 2, stop_last_trials: bool = True):
        super().__init__()
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self._metric, self._mode, self._key = metric, mode, key
        self._asha_kwargs = {"time_attr": time_attr, "max_t": max_t, "grace_period": grace_period,
                             "reduction_factor": reduction_factor, "stop_last_trials": stop_last_trials}
        # Fail now, not on the first trial, if the ASHA settings are invalid.
        ASHAScheduler(metric="_", mode="min", **self._asha_kwargs)
        self._schedulers: dict[str, ASHAScheduler] = {}
        self._group_of: dict[str, str] = {}     # trial id -> sub-task

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        for scheduler in self._schedulers.values():
            scheduler.set_search_properties(metric, mode, **spec)
        return True

    @property
    def schedulers(self) -> dict[str, ASHAScheduler]:
        """The ASHA of each sub-task seen so far."""
        return dict(self._schedulers)

    def group(self, trial: "Trial") -> str:
        config = trial.config or {}
        if self._key not in config:
            raise ValueError(f"{type(self).__name__}: trial {trial.trial_id} has no {self._key!r} in its config; "
                             f"every trial must name its {self._key}")
        return str(config[self._key])

    def _asha(self, trial: "Trial", controller=None) -> ASHAScheduler:
        group = self._group_of.get(trial.trial_id)
        if group is None:            # a trial we have not seen (e.g. after a restore): add it first
            self.on_trial_add(controller, trial)
            group = self._group_of[trial.trial_id]
        return self._schedulers[group]

    def on_trial_add(self, tune_controller, trial: "Trial") -> None:
        if not self._metric or not self._mode:
            raise ValueError(f"{type(self).__name__} needs a metric and a mode (pass them to it or to TuneConfig)")
        group = self.group(trial)
        if group not in self._schedulers:
            self._schedulers[group] = ASHAScheduler(metric=self._metric, mode=self._mode, **self._asha_kwargs)
        self._group_of[trial.trial_id] = group
        self._schedulers[group].on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: "Trial", result: dict) -> str:
        return self._asha(trial, tune_controller).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: "Trial", result: dict) -> None:
        self._asha(trial, tune_controller).on_trial_complete(tune_controller, trial, result)
        self._group_of.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller, trial: "Trial") -> None:
        group = self._group_of.pop(trial.trial_id, None)
        if group is not None:
            self._schedulers[group]._trial_info.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial: "Trial") -> None:
        group = self._group_of.pop(trial.trial_id, None)
        if group is not None:
            self._schedulers[group].on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        lines = [f"Using ASHA per {self._key} ({len(self._schedulers)} groups):"]
        for group, scheduler in sorted(self._schedulers.items()):
            lines.append(f"[{group}] " + scheduler.debug_string().replace("\n", f"\n[{group}] "))
        return "\n".join(lines)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))

"""The run directory: one owner for its layout. Every command that reads or writes a run asks a ``RunDir`` for
the path of a part, and ``RunDir.require`` raises one clear error (``MissingRunPart``) when a part is missing.

Layout of ``RUN/``::

    stage1/config.yaml     the resolved configuration of stage 1 (load_config reads it back)
    stage1/init/           base model + music tokens, before training (every worker starts from it)
    stage1/model/          the fine-tuned model (save_music_model)
    stage1/metrics.csv     one row per logged step; stage1/tensorboard/ the same for TensorBoard
    stage1/done.json       the config hash of the finished stage (re-runs compare with it: musicray.rerun)
    adapters/<subtask>/    the best LoRA adapter per sub-task (PEFT) + hyperparameters.json
    tune/trials.csv, .md   every trial of the sweeps; tune/done.json the config hash of the finished stage 2
    songs/                 the pipeline's demo songs (MIDI + JSON report)
    ablations/mask_loss_<on|off>/   a run dir of its own: stage 1 with stage1.mask_loss flipped
    ablations/language_<name>/      a run dir of its own: stage 1 in the contrasting music language
    eval/                  the evaluation report (``EvalDir``: report.md, report.json, plots/, songs/)
    pipeline.json          the pipeline's seconds per stage
    ray/                   Ray Train / Tune experiment state (stage1/ checkpoints, stage2/ trials)

The prepared-data folder has its own owner, ``musicray.data.layout.DataDir``.

Only the standard library is imported here, so any module (the CLI included) may use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from musicray.errors import MissingRunPart

ABLATIONS = "ablations"
# What makes each part, for the error that says it is missing.
MADE_BY = {
    "stage-1 model": "`musicray train --out RUN` (or `musicray pipeline --out RUN`)",
    "stage-1 initial model": "`musicray train --out RUN`",
    "adapter": "`musicray tune --out RUN` (or `musicray pipeline --out RUN`)",
    "sweep table": "`musicray tune --out RUN`",
    "stage-1 metrics": "`musicray train --out RUN`",
}


@dataclass(frozen=True, init=False)
class _Folder:
    """A folder whose parts a subclass names (its root resolved; nothing is created or checked until asked)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).expanduser().resolve())

    def __str__(self) -> str:
        return str(self.root)


@dataclass(frozen=True, init=False)
class RunDir(_Folder):
    """The paths of a run directory's parts (nothing is created or checked until asked)."""

    # -- stage 1 -------------------------------------------------------------------------------------------------
    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def stage1_config(self) -> Path:
        return self.stage1 / "config.yaml"

    @property
    def stage1_init(self) -> Path:
        return self.stage1 / "init"

    @property
    def stage1_model(self) -> Path:
        return self.stage1 / "model"

    @property
    def stage1_metrics(self) -> Path:
        return self.stage1 / "metrics.csv"

    @property
    def stage1_tensorboard(self) -> Path:
        return self.stage1 / "tensorboard"

    @property
    def stage1_done(self) -> Path:
        return self.stage1 / "done.json"

    # -- stage 2 -------------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    def adapter(self, subtask: str) -> Path:
        return self.adapters / subtask

    def hyperparameters(self, subtask: str) -> Path:
        """The chosen trial's settings, beside its adapter."""
        return self.adapter(subtask) / "hyperparameters.json"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def trials_csv(self) -> Path:
        return self.tune / "trials.csv"

    @property
    def trials_md(self) -> Path:
        return self.tune / "trials.md"

    @property
    def tune_done(self) -> Path:
        return self.tune / "done.json"

    # -- Ray's experiment state ----------------------------------------------------------------------------------
    @property
    def ray(self) -> Path:
        """``storage_path`` of the Ray Train (``stage1``) and Ray Tune (``stage2``) runs."""
        return self.root / "ray"

    def ray_experiment(self, stage: str) -> Path:
        """Ray's local state of one experiment (``stage1``: Train checkpoints; ``stage2``: Tune trials), when
        ``ray_storage`` keeps it in the run dir."""
        return self.ray / stage

    # -- what comes after training -------------------------------------------------------------------------------
    @property
    def songs(self) -> Path:
        return self.root / "songs"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def evaluation(self) -> "EvalDir":
        """The evaluation report's folder as ``musicray pipeline`` writes it (``musicray eval --out`` may put one
        anywhere)."""
        return EvalDir(self.eval)

    @property
    def eval_report(self) -> Path:
        return self.evaluation.report_md

    @property
    def pipeline_json(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def ablations(self) -> Path:
        return self.root / ABLATIONS

    def ablation(self, mask_loss: bool) -> "RunDir":
        """The run dir of the loss-mask ablation arm ``mask_loss`` (stage 1 only)."""
        return RunDir(self.ablations / f"mask_loss_{'on' if mask_loss else 'off'}")

    def language_ablation(self, language: str) -> "RunDir":
        """The run dir of the language ablation arm (stage 1 only) in ``language`` (``VocabConfig.language``)."""
        return RunDir(self.ablations / f"language_{language.replace(',', '_').replace('=', '-')}")

    # -- what is there ---------------------------------------------------------------------------------------------
    def has_model(self) -> bool:
        return (self.stage1_model / "config.json").exists() and (self.stage1_model / "vocabulary.json").exists()

    def has_init_model(self) -> bool:
        return (self.stage1_init / "config.json").exists()

    def has_adapter(self, subtask: str) -> bool:
        return (self.adapter(subtask) / "adapter_config.json").exists()

    def adapters_present(self, subtasks) -> list[str]:
        """The sub-tasks among ``subtasks`` that have a trained adapter here, in their order."""
        return [task for task in subtasks if self.has_adapter(task)]

    def require(self, part: str, subtask: str | None = None, field: str = "--run") -> Path:
        """The path of ``part`` (``stage-1 model``, ``stage-1 initial model``, ``adapter``, ``sweep table``,
        ``stage-1 metrics``), or ``MissingRunPart`` naming the field, the path and the command that makes it."""
        checks = {
            "stage-1 model": (self.stage1_model, self.has_model, "config.json and vocabulary.json"),
            "stage-1 initial model": (self.stage1_init, self.has_init_model, "config.json"),
            "adapter": (self.adapter(subtask or ""), lambda: self.has_adapter(subtask or ""), "adapter_config.json"),
            "sweep table": (self.trials_csv, self.trials_csv.exists, "the file"),
            "stage-1 metrics": (self.stage1_metrics, self.stage1_metrics.exists, "the file"),
        }
        if part not in checks:
            raise ValueError(f"RunDir.require: unknown part {part!r}; known: {', '.join(checks)}")
        path, present, what = checks[part]
        if present():
            return path
        name = f"{part} of {subtask}" if subtask else part
        made_by = MADE_BY[part].replace("RUN", str(self.root))
        if not self.root.is_dir():
            raise MissingRunPart(f"{field}: {self.root} does not exist (it needs a {name}: make one with {made_by}, "
                                 "or pass the run dir that holds it)")
        raise MissingRunPart(f"{field}: {self.root} has no {name} ({path}: {what} missing); make it with {made_by} "
                             "or pass the run dir that holds it")


@dataclass(frozen=True, init=False)
class EvalDir(_Folder):
    """The paths of an evaluation report's folder (``musicray eval --out``; ``RUN/eval`` in a pipeline run)."""

    @property
    def report_json(self) -> Path:
        """Every figure of the evaluation."""
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        """The tables, with links to the plots."""
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def plot(self, name: str) -> Path:
        return self.plots / f"{name}.png"

    @property
    def songs(self) -> Path:
        """The composed windows and their real counterparts, as MIDI (and each composed one's stage report)."""
        return self.root / "songs"

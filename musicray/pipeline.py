"""``musicray pipeline``: data -> stage-1 fine-tune -> five LoRA sweeps -> generated songs -> evaluation report,
on one Ray cluster.

Each stage is the library call its own command makes (``musicray data``, ``train``, ``tune``, ``generate``,
``eval``). A training stage already in the run dir is skipped when its saved config hash equals the requested
one, so an interrupted pipeline continues where it stopped; made with other settings, it is refused unless
``--resume`` or ``--force`` says what to do (``musicray.rerun``). The data dir is resolved once and handed to every
stage; every path comes from the run dir's owner, ``musicray.run.RunDir``. With ``eval.mask_loss_ablation`` a
second stage-1 model is trained with ``stage1.mask_loss`` flipped (into ``RUN/ablations/mask_loss_<on|off>``) for
the report's loss-mask ablation; with ``eval.language_ablation`` one in the contrasting music language
(``RUN/ablations/language_absolute`` for the relative language) for its relative-vs-absolute row.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from musicray.errors import SongError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESETS: dict[str, str] = {"tiny": "configs/tiny.yaml", "pop909-tiny": "configs/pop909_tiny.yaml",
                           "pop909-small": "configs/pop909_small.yaml", "pop909-smol": "configs/pop909_smol.yaml",
                           "rehearsal": "configs/rehearsal.yaml"}
DEMO_SONGS: tuple[dict, ...] = (
    {"form": "i2A4B4o2", "key": "C:maj", "metre": "4/4", "tempo": 96},
    {"form": "A4B4A4", "key": "A:min", "metre": "4/4", "tempo": 80},
    {"form": "i2A4b2A4", "key": "G:maj", "metre": "3/4", "tempo": 120},
)


def preset_config(preset: str) -> Path:
    if preset not in PRESETS:
        raise SongError(f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    path = PROJECT_ROOT / PRESETS[preset]
    if not path.exists():
        raise SongError(f"--preset: {path} is missing (presets live in the repository's configs/)")
    return path


def run_pipeline(config_path: Path, run_dir: Path, overrides: list[str] | None = None, progress: bool = True,
                 resume: bool = False, force: bool = False, verbose: bool = False) -> dict:
    """Every stage into ``run_dir``; a training stage already there is kept when its saved config hash equals the
    requested one, and otherwise refused unless ``resume`` or ``force`` says what to do (``musicray.rerun``)."""
    from musicray.compose import Composer
    from musicray.request import Request
    from musicray.data.prepare import ensure_ray
    from musicray.eval.report import evaluate_run
    from musicray.midi import write_midi
    from musicray.rerun import RESUME, SKIP
    from musicray.run import RunDir
    from musicray.train.config import load_config
    from musicray.train.data import resolve_data_dir
    from musicray.train.finetune import stage1_plan, train_stage1
    from musicray.train.tune import stage2_plan, tune_adapters

    config = load_config(config_path, overrides)
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    summary: dict = {"config": str(config_path), "run_dir": str(run.root), "stages": {}}

    def stage(name: str, work, plan=lambda: None, why_skipped: str = "finished with the same config") -> None:
        """One line per stage; ``plan`` says whether the stage is skipped (SKIP) and may refuse (StageConflict)."""
        started = time.perf_counter()
        skipped = plan() == SKIP
        print(f"== {name}{f' (skipped: {why_skipped})' if skipped else ''}", flush=True)
        if not skipped:
            work()
        summary["stages"][name] = {"seconds": round(time.perf_counter() - started, 1), "skipped": skipped}

    ensure_ray()
    # The data dir is resolved once here and handed to every stage that reads it.
    stage("data", lambda: summary.update(data_dir=str(resolve_data_dir(config, progress))))
    data_dir = Path(summary["data_dir"])

    def train(config, run, name):
        plan = {}
        stage(name, lambda: train_stage1(config, run.root, resume=plan["stage1"] == RESUME, force=force,
                                         progress=progress, data_dir=data_dir),
              lambda: plan.setdefault("stage1", stage1_plan(config, run, resume, force)))

    train(config, run, "stage 1: full fine-tune (Ray Train + DeepSpeed)")
    stage("stage 2: LoRA sweeps (Ray Tune)",
          lambda: tune_adapters(config, run.root, progress=progress, force=force, data_dir=data_dir, verbose=verbose),
          lambda: stage2_plan(config, run, force))

    def compose_demo_songs() -> None:
        composer = Composer(run.root)
        run.songs.mkdir(exist_ok=True)
        for i, spec in enumerate(DEMO_SONGS):
            song, report = composer.compose(Request(seed=i, **spec))
            path = run.songs / f"song{i}_{spec['form']}.mid"
            write_midi(song, path)
            path.with_suffix(".json").write_text(json.dumps(report, indent=1))
            print(f"   {path.name}: {song.n_bars} bars, {sum(len(n) for n in song.tracks.values())} notes, "
                  f"composed in {report['seconds']} s", flush=True)

    stage("generate", compose_demo_songs)

    # The loss-mask ablation: the same stage 1 (config, seed, steps) with the mask in the loss flipped.
    flipped = not config.stage1.mask_loss
    ablation_name = f"ablation: stage 1 with stage1.mask_loss={str(flipped).lower()}"
    if config.eval.mask_loss_ablation:
        ablation = dataclasses.replace(config, stage1=dataclasses.replace(config.stage1, mask_loss=flipped))
        train(ablation, run.ablation(flipped), ablation_name)
    else:
        stage(ablation_name, lambda: None, lambda: SKIP, "eval.mask_loss_ablation is false")
    # The language ablation: the same stage 1 with the music written in the contrasting language.
    contrast = config.vocab.contrast()
    language_name = f"ablation: stage 1 in the {contrast.language} music language"
    if config.eval.language_ablation:
        train(dataclasses.replace(config, vocab=contrast), run.language_ablation(contrast.language), language_name)
    else:
        stage(language_name, lambda: None, lambda: SKIP, "eval.language_ablation is false")
    stage("evaluate", lambda: evaluate_run(run.root, data_dir, run.eval, config.eval, progress=progress))
    summary["eval_report"] = str(run.eval_report)
    run.pipeline_json.write_text(json.dumps(summary, indent=1))
    return summary

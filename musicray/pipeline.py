"""``musicray pipeline``: data -> stage-1 fine-tune -> five LoRA sweeps -> generated songs -> evaluation report,
on one Ray cluster.

Each stage is the library call its own command makes (``musicray data``, ``train``, ``tune``, ``generate``,
``eval``); a stage whose output is already in the run dir is skipped, so an interrupted pipeline continues where
it stopped. With ``eval.mask_loss_ablation`` a second stage-1 model is trained with ``stage1.mask_loss`` flipped
(into ``RUN/ablations/mask_loss_<on|off>``) for the report's loss-mask ablation; with ``eval.language_ablation``
one in the contrasting music language (``RUN/ablations/language_absolute`` for the relative language) for its
relative-vs-absolute row.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from musicray.song import SongError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESETS: dict[str, str] = {"tiny": "configs/tiny.yaml", "pop909-tiny": "configs/pop909_tiny.yaml",
                           "pop909-small": "configs/pop909_small.yaml"}
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


def run_pipeline(config_path: Path, run_dir: Path, overrides: list[str] | None = None, progress: bool = True) -> dict:
    from musicray.compose import Composer, Request
    from musicray.data.prepare import ensure_ray
    from musicray.eval.report import evaluate_run, language_dir, mask_loss_dir
    from musicray.midi import write_midi
    from musicray.train.config import load_config
    from musicray.train.data import resolve_data_dir
    from musicray.train.finetune import train_stage1
    from musicray.train.tune import tune_adapters

    config = load_config(config_path, overrides)
    run_dir = Path(run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"config": str(config_path), "run_dir": str(run_dir), "stages": {}}

    def stage(name: str, done: bool, work, why_skipped: str = "already done") -> None:
        started = time.perf_counter()
        print(f"== {name}{f' ({why_skipped}, skipped)' if done else ''}", flush=True)
        if not done:
            work()
        summary["stages"][name] = {"seconds": round(time.perf_counter() - started, 1), "skipped": done}

    ensure_ray()
    stage("data", False, lambda: summary.update(data_dir=str(resolve_data_dir(config, progress))))
    stage("stage 1: full fine-tune (Ray Train + DeepSpeed)", (run_dir / "stage1" / "model" / "config.json").exists(),
          lambda: train_stage1(config, run_dir, progress=progress))
    stage("stage 2: LoRA sweeps (Ray Tune)", (run_dir / "tune" / "trials.csv").exists(),
          lambda: tune_adapters(config, run_dir, progress=progress))

    def compose_demo_songs() -> None:
        composer = Composer(run_dir)
        out = run_dir / "songs"
        out.mkdir(exist_ok=True)
        for i, spec in enumerate(DEMO_SONGS):
            song, report = composer.compose(Request(seed=i, **spec))
            path = out / f"song{i}_{spec['form']}.mid"
            write_midi(song, path)
            path.with_suffix(".json").write_text(json.dumps(report, indent=1))
            print(f"   {path.name}: {song.n_bars} bars, {sum(len(n) for n in song.tracks.values())} notes, "
                  f"composed in {report['seconds']} s", flush=True)

    stage("generate", False, compose_demo_songs)

    # The loss-mask ablation: the same stage 1 (config, seed, steps) with the mask in the loss flipped.
    flipped = not config.stage1.mask_loss
    ablation_dir = mask_loss_dir(run_dir, flipped)
    ablation = dataclasses.replace(config, stage1=dataclasses.replace(config.stage1, mask_loss=flipped))
    stage(f"ablation: stage 1 with stage1.mask_loss={str(flipped).lower()}",
          not config.eval.mask_loss_ablation or (ablation_dir / "stage1" / "model" / "config.json").exists(),
          lambda: train_stage1(ablation, ablation_dir, progress=progress),
          "already done" if config.eval.mask_loss_ablation else "eval.mask_loss_ablation is false")
    # The language ablation: the same stage 1 with the music written in the contrasting language.
    contrast = config.vocab.contrast()
    language_arm = language_dir(run_dir, contrast.language)
    stage(f"ablation: stage 1 in the {contrast.language} music language",
          not config.eval.language_ablation or (language_arm / "stage1" / "model" / "config.json").exists(),
          lambda: train_stage1(dataclasses.replace(config, vocab=contrast), language_arm, progress=progress),
          "already done" if config.eval.language_ablation else "eval.language_ablation is false")
    stage("evaluate", False, lambda: evaluate_run(run_dir, summary["data_dir"], run_dir / "eval", config.eval,
                                                  progress=progress))
    summary["eval_report"] = str(run_dir / "eval" / "report.md")
    (run_dir / "pipeline.json").write_text(json.dumps(summary, indent=1))
    return summary

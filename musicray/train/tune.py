"""Stage 2: one LoRA adapter per sub-task, every sub-task's sweep in one Ray Tune run.

The stage-1 model (``RUN_DIR/stage1/model``) is the frozen base. One ``Tuner`` holds all sweeps at once: the
sub-task is a grid axis of the search space and the LoRA hyperparameters are sampled per trial, so
``len(subtasks) x trials_per_subtask`` trials share the cluster. Early stopping is ASHA, but one ASHA per
sub-task (``PerSubtaskScheduler``, in ``per_subtask_scheduler``): the sub-tasks' losses live on different scales
(a dynamics answer is long and hard, a chord answer short and easy), so a trial is only ever compared with trials
of its own sub-task.

Each trial trains a LoRA adapter on its sub-task's train split, reports ``val_loss`` on the validation split
every ``eval_every`` steps with the adapter as checkpoint, and Tune keeps each trial's best checkpoint. The
best trial of each sub-task is exported to ``RUN_DIR/adapters/<subtask>/`` in PEFT format with the chosen
hyperparameters, and every trial is listed in ``RUN_DIR/tune/trials.csv`` and ``trials.md``.

On a multi-node cluster the run dir and the data dir must be on storage every node sees (the trials read the
stage-1 model and the prepared data by path); Tune writes checkpoints under ``RUN_DIR/ray``, or under
``ray_storage`` when it names a bucket (``musicray.train.storage``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

from musicray.errors import SongError
from musicray.quiet import silenced_stdout
from musicray.rerun import SKIP, STAGE1_MODEL, decide, read_saved, stage_keys, write_done
from musicray.run import RunDir
from musicray.train.config import DEFAULT_MAX_BARS, Config, Stage2Config, config_to_dict
from musicray.train.per_subtask_scheduler import PerSubtaskScheduler
from musicray.train.storage import ray_storage

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINER_STATE = "trainer_state.pt"   # beside a trial checkpoint's adapter: its step and optimizer state
HYPERPARAMETERS = ("rank", "alpha", "dropout", "learning_rate", "target_modules")
SEARCH_KEYS = HYPERPARAMETERS
METRIC, MODE = "val_loss", "min"
STAGE = "stage2"    # the Tune experiment's name in the run's Ray storage


# -- search space --------------------------------------------------------------------------------------------
def search_space(stage2: Stage2Config) -> dict:
    """Tune's param_space: the sub-task as a grid axis, the LoRA hyperparameters sampled.

    ``rank``, ``alpha``, ``dropout``: a list is a choice among its values, a scalar is fixed.
    ``learning_rate``: ``[low, high]`` is log-uniform (a scalar, or low == high, is fixed).
    ``target_modules``: a list of lists is a choice among module sets; a list of names or a string
    (e.g. ``all-linear``) is fixed.
    """
    from ray import tune

    defaults = Stage2Config().search
    unknown = set(stage2.search) - set(SEARCH_KEYS)
    if unknown:
        raise SongError(f"stage2.search: unknown key(s) {sorted(unknown)}; known: {', '.join(SEARCH_KEYS)}")
    search = {**defaults, **stage2.search}

    def choice(name, value):
        if isinstance(value, (list, tuple)):
            if not value:
                raise SongError(f"stage2.search.{name}: empty list")
            return tune.choice(list(value)) if len(value) > 1 else value[0]
        return value

    rate = search["learning_rate"]
    if isinstance(rate, (list, tuple)):
        if len(rate) != 2 or not all(isinstance(x, (int, float)) and x > 0 for x in rate) or rate[0] > rate[1]:
            raise SongError(f"stage2.search.learning_rate: expected [low, high] with 0 < low <= high, got {rate}")
        rate = tune.loguniform(float(rate[0]), float(rate[1])) if rate[0] < rate[1] else float(rate[0])
    modules = search["target_modules"]
    if isinstance(modules, (list, tuple)) and modules and all(isinstance(m, (list, tuple)) for m in modules):
        modules = tune.choice([list(m) for m in modules]) if len(modules) > 1 else list(modules[0])
    elif not isinstance(modules, (str, list, tuple)) or not modules:
        raise SongError(f"stage2.search.target_modules: expected module names or a list of lists, got {modules!r}")
    return {"subtask": tune.grid_search(list(stage2.subtasks)),
            "rank": choice("rank", search["rank"]), "alpha": choice("alpha", search["alpha"]),
            "dropout": choice("dropout", search["dropout"]), "learning_rate": rate, "target_modules": modules,
            "seed": int(stage2.seed)}


def _check_stage2(stage2: Stage2Config) -> None:
    for name in ("trials_per_subtask", "max_steps", "eval_every", "eval_batches", "micro_batch_size",
                 "grace_period"):
        if int(getattr(stage2, name)) < 1:
            raise SongError(f"stage2.{name}: must be at least 1, got {getattr(stage2, name)}")
    if stage2.reduction_factor <= 1:
        raise SongError(f"stage2.reduction_factor: must be > 1, got {stage2.reduction_factor}")
    if not stage2.subtasks:
        raise SongError("stage2.subtasks: empty")
    if int(stage2.max_failures) < 0:
        raise SongError(f"stage2.max_failures: must be at least 0, got {stage2.max_failures}")
    if stage2.max_concurrent_trials is not None and stage2.max_concurrent_trials < 1:
        raise SongError(f"stage2.max_concurrent_trials: must be at least 1, got {stage2.max_concurrent_trials}")


def report_count(stage2: Stage2Config) -> int:
    """Reports per full trial (every eval_every steps, and at the last step): ASHA's max_t."""
    return math.ceil(stage2.max_steps / stage2.eval_every)


# -- one trial -----------------------------------------------------------------------------------------------
def subtask_datasets(data_dir, subtask: str, music, max_length: int, min_train: int = 1,
                     max_bars: int | None = DEFAULT_MAX_BARS):
    """(train, validation, where the validation came from) rendered for ``subtask``.

    When nothing of the validation split fits (small synthetic data, or every prompt longer than
    ``max_length``), the last tenth of the train examples (song order: roughly the last songs) is held out.
    """
    from musicray.train.data import RenderedDataset, load_examples

    train = RenderedDataset(load_examples(data_dir, [subtask], "train", music.vocab, max_bars), music, max_length)
    val = RenderedDataset(load_examples(data_dir, [subtask], "validation", music.vocab, max_bars), music, max_length)
    source = "validation"
    if len(val) == 0:
        held = max(1, len(train) // 10)
        val = copy.copy(train)
        val.items, train.items = train.items[-held:], train.items[:-held]
        source = "train (held out)"
    if len(train) < min_train or len(val) == 0:
        raise SongError(f"{subtask}: too few examples fit data.max_length={max_length} ({len(train)} to train on, "
                        f"{len(val)} to validate on, from {source}); use more songs or a larger data.max_length")
    return train, val, source


def evaluate(model, dataset, batch_size: int, batches: int, pad_id: int, device) -> float:
    """Token-weighted mean loss on the first ``batches`` batches of ``dataset`` (a fixed slice)."""
    import torch

    from musicray.train.data import collate
    from musicray.train.loss import causal_lm_loss

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(batches):
            items = dataset.items[b * batch_size:(b + 1) * batch_size]
            if not items:
                break
            batch = collate(items, pad_id)
            labels = batch["labels"].to(device)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            n = int((labels[:, 1:] != -100).sum())
            total += float(causal_lm_loss(logits, labels)) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def train_adapter(config: dict, settings: dict) -> None:
    """Tune function trainable: one LoRA adapter for ``config["subtask"]`` on the stage-1 model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from ray import tune

    from musicray.model import load_music_model, prepare_for_training
    from musicray.train.data import collate, shuffled_batches
    from musicray.train.loss import causal_lm_loss

    subtask, seed = config["subtask"], int(config.get("seed", 0))
    # reuse_actors: before this actor takes the next trial, Tune waits this long for the last one's thread to end
    # (default 2 s) and fails the next trial when it has not; a loaded machine or a large model needs longer. Read
    # in this actor's process at its next reset, so it is set here.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")
    torch.set_num_threads(max(1, int(settings["cpus_per_trial"])))
    use_gpu = settings["gpus_per_trial"] > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    random.seed(seed)
    torch.manual_seed(seed)

    model, music = load_music_model(settings["stage1"])
    prepare_for_training(model, settings["gradient_checkpointing"])
    lora = LoraConfig(r=int(config["rank"]), lora_alpha=config["alpha"], lora_dropout=float(config["dropout"]),
                      target_modules=config["target_modules"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).to(device)
    model.train()

    batch_size = int(settings["micro_batch_size"])
    # Where the validation loss comes from goes into every report: the held-out tenth of train is another measure.
    train, val, val_source = subtask_datasets(settings["data_dir"], subtask, music, settings["max_length"],
                                              max_bars=settings["max_bars"])
    batch_size = min(batch_size, len(train))
    pad_id = music.tokenizer.pad_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=float(config["learning_rate"]), weight_decay=0.0)
    batches = shuffled_batches(train, batch_size, seed)
    max_steps, eval_every = int(settings["max_steps"]), int(settings["eval_every"])
    # A trial restarted after its process or node died (FailureConfig) goes on from its last reported checkpoint:
    # the adapter's weights, the optimizer's state and the position in the same batch stream.
    start = _restore(model, optimizer, tune.get_checkpoint())
    for _ in range(start):
        next(batches)
    losses: list[float] = []
    for step in range(start + 1, max_steps + 1):
        batch = collate(next(batches), pad_id)
        labels = batch["labels"].to(device)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        loss = causal_lm_loss(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % eval_every == 0 or step == max_steps:
            val_loss = evaluate(model, val, batch_size, int(settings["eval_batches"]), pad_id, device)
            metrics = {"val_loss": val_loss, "val_source": val_source, "train_loss": sum(losses) / len(losses),
                       "step": step, "subtask": subtask}
            losses = []
            with tempfile.TemporaryDirectory() as tmp:
                # save_embedding_layers=False: the adapter is LoRA only (the vocabulary lives in the stage-1
                # model), and PEFT does not go looking for the base model's config to decide.
                model.save_pretrained(tmp, save_embedding_layers=False)
                torch.save({"step": step, "optimizer": optimizer.state_dict()}, Path(tmp) / TRAINER_STATE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _restore(model, optimizer, checkpoint) -> int:
    """Load a trial checkpoint's adapter and optimizer state into ``model`` and ``optimizer``; its step (0: none)."""
    if checkpoint is None:
        return 0
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with checkpoint.as_directory() as path:
        set_peft_model_state_dict(model, load_file(str(Path(path) / "adapter_model.safetensors")))
        state = torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


# -- the run -------------------------------------------------------------------------------------------------
def stage2_keys(config: Config, run: RunDir) -> dict:
    """The settings the adapters depend on, with the hash of the stage-1 model they are trained on."""
    keys = stage_keys(config_to_dict(config), "stage2")
    done = json.loads(run.stage1_done.read_text()) if run.stage1_done.exists() else {}
    keys[STAGE1_MODEL] = done.get("config_hash", "unknown")
    return keys


def stage2_plan(config: Config, run: RunDir, force: bool = False) -> str:
    """RUN or SKIP for stage 2 in ``run`` (``musicray.rerun.decide``), or a ``StageConflict``: finished adapters
    made with other settings are never replaced without ``force``."""
    subtasks = config.stage2.subtasks
    started = run.tune.exists() or any(run.has_adapter(t) for t in subtasks)
    # Finished: done.json, or (a run dir of an older musicray) the sweep table and every adapter.
    finished = run.tune_done.exists() or (run.trials_csv.exists() and all(run.has_adapter(t) for t in subtasks))
    saved = read_saved(run.tune_done, started, finished)
    return decide("stage2", run.adapters, saved, stage2_keys(config, run), force=force, resumable=False)


def tune_adapters(config: Config, run_dir: Path, progress: bool = True, force: bool = False,
                  data_dir: Path | None = None, verbose: bool = False) -> dict[str, Path]:
    """Sweep LoRA hyperparameters for every sub-task in one Tune run; export the best adapter of each.

    Returns sub-task -> ``RUN_DIR/adapters/<subtask>`` (PEFT ``adapter_config.json`` and
    ``adapter_model.safetensors``, plus ``hyperparameters.json``). Finished adapters made with the same settings
    are kept; made with other settings, they are only replaced with ``force`` (``musicray.rerun``).
    ``data_dir``: the prepared data, when the caller has resolved it; ``progress``: one line per finished trial;
    ``verbose``: Ray Tune's own trial tables as well.
    """
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from musicray.data.prepare import ensure_ray
    from musicray.train.data import resolve_data_dir
    from musicray.train.tune_progress import TrialLines, chosen_lines

    run = RunDir(run_dir)
    stage1 = run.require("stage-1 model", field="--out")
    stage2 = config.stage2
    _check_stage2(stage2)
    param_space = search_space(stage2)
    if stage2_plan(config, run, force) == SKIP:
        return {subtask: run.adapter(subtask) for subtask in stage2.subtasks}
    storage = ray_storage(config, run)
    for path in (run.tune, *(run.adapter(t) for t in stage2.subtasks)):
        shutil.rmtree(path, ignore_errors=True)     # an unfinished sweep, or --force
    storage.remove(STAGE)
    data_dir = Path(data_dir or resolve_data_dir(config, progress=progress)).expanduser().resolve()
    ensure_ray()
    # Tune warns when its experiment snapshots come faster than every 5 s, which num_to_keep forces on every
    # checkpoint: expected with short trials, and harmless.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    max_t = report_count(stage2)
    scheduler = PerSubtaskScheduler(metric=METRIC, mode=MODE, key="subtask", time_attr="training_iteration",
                                    max_t=max_t, grace_period=min(stage2.grace_period, max_t),
                                    reduction_factor=stage2.reduction_factor)
    settings = {"stage1": str(stage1), "data_dir": str(data_dir), "max_length": config.data.max_length,
                "max_bars": config.data.max_bars,
                "max_steps": stage2.max_steps, "eval_every": stage2.eval_every, "eval_batches": stage2.eval_batches,
                "micro_batch_size": stage2.micro_batch_size, "cpus_per_trial": stage2.cpus_per_trial,
                "gpus_per_trial": stage2.gpus_per_trial, "gradient_checkpointing": stage2.gradient_checkpointing}
    trainable = tune.with_resources(tune.with_parameters(train_adapter, settings=settings),
                                    {"cpu": stage2.cpus_per_trial, "gpu": stage2.gpus_per_trial})
    # The concurrency cap goes on the search generator: Tune ignores TuneConfig.max_concurrent_trials when a
    # BasicVariantGenerator is given (which we need for its seeded random_state).
    searcher = BasicVariantGenerator(max_concurrent=stage2.max_concurrent_trials or 0, random_state=stage2.seed)
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        # reuse_actors: a trial's actor imports torch/transformers/peft once and runs trial after trial.
        tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=searcher, reuse_actors=True,
                                    num_samples=stage2.trials_per_subtask),
        run_config=tune.RunConfig(
            # Tune's trial tables (hundreds of lines) only with --verbose; otherwise one line per finished trial.
            name=STAGE, **storage.run_config(), verbose=1 if verbose else 0,
            callbacks=[TrialLines(len(stage2.subtasks) * stage2.trials_per_subtask, stage2.max_steps)]
            if progress and not verbose else None,
            # A trial whose actor dies with its node (or is killed) is started again elsewhere, up to max_failures.
            failure_config=tune.FailureConfig(max_failures=stage2.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                                    checkpoint_score_order=MODE)))
    # Tune prints its experiment header even at verbose=0; TrialLines keeps the stdout it was made with.
    with silenced_stdout() if not verbose else contextlib.nullcontext():
        results = tuner.fit()

    table, best = trials_table(results, stage2)
    write_table(table, run)
    if progress:
        print("\n".join(chosen_lines(table)), flush=True)
    missing = [s for s in stage2.subtasks if s not in best]
    if missing:
        errors = {f"{r.config.get('subtask')}: {_last_line(r.error)}" for r in results if r.error is not None}
        raise SongError(f"stage 2: no trial of {', '.join(missing)} reported a validation loss"
                        + (f" ({'; '.join(sorted(errors))})" if errors else "") + f"; see {storage.location(STAGE)}")
    adapters = {}
    for subtask in stage2.subtasks:
        result, checkpoint, metrics = best[subtask]
        adapters[subtask] = export_adapter(checkpoint, run, subtask, {
            "subtask": subtask, **{k: result.config[k] for k in HYPERPARAMETERS}, "val_loss": metrics[METRIC],
            "val_source": metrics.get("val_source"), "step": metrics.get("step"), "trial_id": _trial_id(result), "seed": result.config.get("seed"),
            "stage1_model": str(stage1), "data_dir": str(data_dir)})
    write_done(run.tune_done, "stage2", stage2_keys(config, run))
    return adapters


def _last_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name)


def _best_report(result) -> tuple[object, dict] | None:
    """(checkpoint, metrics) of the trial's lowest-val_loss checkpoint, or None if it never reported."""
    candidates = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if m.get(METRIC) is not None]
    if not candidates:
        return None
    return min(candidates, key=lambda cm: cm[1][METRIC])


def trials_table(results, stage2: Stage2Config):
    """(one row per trial, sub-task -> (result, checkpoint, metrics) of its chosen trial)."""
    import pandas as pd

    rows, best, chosen_ids = [], {}, {}
    for result in results:
        cfg = result.config or {}
        frame = result.metrics_dataframe
        reported = frame is not None and len(frame) > 0 and METRIC in frame
        steps = int(frame["step"].max()) if reported and "step" in frame else 0
        top = _best_report(result)
        best_loss = float(top[1][METRIC]) if top else float(frame[METRIC].min()) if reported else float("nan")
        trial_id = _trial_id(result)
        modules = cfg.get("target_modules")
        rows.append({"trial_id": trial_id, "subtask": cfg.get("subtask"), "rank": cfg.get("rank"),
                     "alpha": cfg.get("alpha"), "dropout": cfg.get("dropout"),
                     "learning_rate": cfg.get("learning_rate"),
                     "target_modules": ",".join(modules) if isinstance(modules, list) else modules,
                     "best_val_loss": best_loss, "best_step": top[1].get("step") if top else None,
                     "val_source": top[1].get("val_source") if top else None,
                     "steps": steps, "stopped_early": result.error is None and steps < stage2.max_steps,
                     "status": "error" if result.error is not None else "done", "chosen": False})
        subtask = cfg.get("subtask")
        if top is not None and (subtask not in best or top[1][METRIC] < best[subtask][2][METRIC]):
            best[subtask], chosen_ids[subtask] = (result, top[0], top[1]), trial_id
    table = pd.DataFrame(rows)
    if len(table):
        table["chosen"] = table["trial_id"].isin(set(chosen_ids.values()))
        order = {s: i for i, s in enumerate(stage2.subtasks)}
        table["_order"] = table["subtask"].map(order)
        table = table.sort_values(["_order", "trial_id"]).drop(columns="_order").reset_index(drop=True)
    return table, best


def to_markdown(table) -> str:
    """A GitHub markdown table (without needing ``tabulate``)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return "" if value is None else str(value).replace("|", "\\|")

    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(table, run: RunDir) -> None:
    run.tune.mkdir(parents=True, exist_ok=True)
    table.to_csv(run.trials_csv, index=False)
    run.trials_md.write_text(to_markdown(table))


def export_adapter(checkpoint, run: RunDir, subtask: str, hyperparameters: dict) -> Path:
    """Copy the PEFT adapter files of a Tune checkpoint to the run's adapter of ``subtask``, with its
    ``hyperparameters``."""
    out = run.adapter(subtask)
    with checkpoint.as_directory() as source:
        source = Path(source)
        missing = [name for name in ADAPTER_FILES if not (source / name).exists()]
        if missing:
            raise RuntimeError(f"{source}: the checkpoint has no {', '.join(missing)}")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copy2(source / name, out / name)
    run.hyperparameters(subtask).write_text(json.dumps(hyperparameters, indent=1, default=str))
    return out

"""Re-runs: whether a training stage already in the run dir is kept, continued, redone or refused.

A finished stage saves the hash of the configuration it was made with (``done.json`` in its folder). A later run
of the stage (``musicray train``, ``tune`` or ``pipeline``) compares it with the hash of the configuration it is
asked for:

=================================  ==============  =================================  ==========================
what the run dir holds             flags           decision                           why
=================================  ==============  =================================  ==========================
nothing                            any             run                                –
finished, same config              none            skip                               nothing would change
finished, same config              --resume        skip                               nothing left to continue
finished, other config             none            refuse: names the changed keys     keeps the old result
finished, other config             --resume        resume (stage 1: more steps etc.)  checkpoints continue
unfinished (interrupted)           none            refuse (stage 1) / run (stage 2)   stage 1 has checkpoints
unfinished                         --resume        resume                             –
anything                           --force         run from scratch (old one removed) –
=================================  ==============  =================================  ==========================

Stage 2 has nothing to continue (its trials are short): an unfinished sweep is run again, and ``--resume`` is
refused for it. Only the keys a stage's result depends on count (``stage_keys``): changing ``eval.songs`` keeps
both training stages, changing ``stage1.learning_rate`` redoes stage 1 and everything trained on it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from musicray.errors import StageConflict

RUN, SKIP, RESUME = "run", "skip", "resume"
# Settings that cannot change a stage's result (where things are cached, how many restarts or checkpoints are
# kept, how often rows are logged, how many trials run at once, how workers are placed on nodes, whether activations
# are recomputed): a change to them keeps a finished stage.
IGNORED = {"cache_dir", "stage1.max_failures", "stage1.keep_checkpoints", "stage1.log_every",
           "stage1.placement_strategy", "stage1.gradient_checkpointing", "stage2.max_concurrent_trials",
           "stage2.max_failures", "stage2.gradient_checkpointing"}
# The config sections each stage depends on. Stage 2 also depends on the stage-1 model it trains on: its caller adds
# that model's hash (``STAGE1_MODEL``), so a stage 1 trained again makes every sweep on the old one stale.
SECTIONS = {"stage1": ("base_model", "vocab", "data", "stage1"), "stage2": ("data", "stage2")}
STAGE1_MODEL = "stage1.model_hash"


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "search":
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def stage_keys(config: dict, stage: str) -> dict:
    """The flattened settings of ``config`` (``config_to_dict``) that stage ``stage`` depends on."""
    if stage not in SECTIONS:
        raise ValueError(f"stage_keys: unknown stage {stage!r}; known: {', '.join(SECTIONS)}")
    chosen = {section: config.get(section) for section in SECTIONS[stage]}
    return {key: value for key, value in flatten(chosen).items() if key not in IGNORED}


def config_hash(keys: dict) -> str:
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every key whose value differs (a key missing on one side is ``unset``)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "unset") != new.get(key, "unset"):
            out.append(f"{key}: {old.get(key, 'unset')} -> {new.get(key, 'unset')}")
    return out


@dataclass(frozen=True)
class Saved:
    """What a run dir holds of a stage: whether it started and finished, and the settings it finished with."""

    started: bool
    finished: bool
    keys: dict | None      # the settings of the finished stage; None when unknown (not finished, or no done.json)


def read_saved(done_file: Path, started: bool, finished: bool) -> Saved:
    keys = None
    if finished and done_file.exists():
        keys = json.loads(done_file.read_text()).get("config")
    return Saved(started, finished, keys)


def write_done(done_file: Path, stage: str, keys: dict) -> None:
    """Mark a stage finished with the settings it was made with (the last thing a stage writes)."""
    done_file.parent.mkdir(parents=True, exist_ok=True)
    done_file.write_text(json.dumps({"stage": stage, "config_hash": config_hash(keys), "config": keys,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1, default=str))


def decide(stage: str, where: Path, saved: Saved, requested: dict, resume: bool = False, force: bool = False,
           resumable: bool = True) -> str:
    """RUN, SKIP or RESUME for stage ``stage`` (``stage1`` or ``stage2``) whose output is at ``where``; or
    ``StageConflict`` saying why it refuses and how to proceed. ``requested`` is ``stage_keys`` of the config
    asked for; ``resumable``: whether the stage can continue from a checkpoint (stage 1) or not (stage 2)."""
    name = {"stage1": "stage 1", "stage2": "stage 2"}.get(stage, stage)
    if resume and force:
        raise StageConflict("--resume and --force: choose one (--resume continues the run in the run dir, --force "
                            "replaces it)")
    if resume and not resumable:
        raise StageConflict(f"--resume: {name} cannot continue an earlier sweep; run it again with --force (its "
                            f"results in {where} are replaced) or without --resume")
    if force or not saved.started:
        return RUN
    if saved.finished:
        if saved.keys is None:
            differences = ["(no saved config hash: made by an older musicray)"]
        elif config_hash(saved.keys) == config_hash(requested):
            return SKIP
        else:
            differences = changed_keys(saved.keys, requested)
        if resume:
            return RESUME
        how = (f"pass --resume to continue it from its latest checkpoint with the new settings, --force to "
               f"{'train' if resumable else 'sweep'} it again from scratch (replacing it), or choose another --out")
        if not resumable:
            how = "pass --force to sweep again (its adapters are replaced), or choose another --out"
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise StageConflict(f"{name}: {where} was made with another configuration ({shown}); {how}")
    if resume or not resumable:
        return RESUME if resume else RUN
    raise StageConflict(f"{name}: {where} holds an unfinished run; pass --resume to continue it from its latest "
                        "checkpoint, --force to start it again from scratch, or choose another --out")

"""A tiny run to evaluate (random weights, no training, as in tests/test_compose.py) and a small prepared data dir."""

import csv
import shutil

import pytest
import torch

from musicray.model import add_music_tokens, load_base, save_music_model
from musicray.run import RunDir
from musicray.tokens import LEGACY_LANGUAGE, SUBTASKS, VocabConfig, Vocabulary

# Synthetic songs whose id hashes into the test split (split_of), and one train song.
TEST_SONGS = ("synth-0000", "synth-0034", "synth-0050")
TRAIN_SONGS = ("synth-0001",)
ADAPTED = SUBTASKS[:3]   # the other two sub-tasks run on the stage-1 model alone


def write_data(out, song_ids) -> None:
    """Prepared tables of the given synthetic songs, through the preparation job's own per-song step (no Ray)."""
    from musicray.data.prepare import SynthSource, prepare_one, write_tables

    vocab = Vocabulary()
    source = SynthSource(len(song_ids))
    out.mkdir(parents=True, exist_ok=True)
    write_tables([prepare_one(source, song_id, vocab) for song_id in song_ids], out, vocab)


def write_training_records(run) -> None:
    """stage1/metrics.csv and tune/trials.csv in the columns finetune.py and tune.py write."""
    from musicray.train.stage1_metrics import METRIC_COLUMNS

    with RunDir(run).stage1_metrics.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METRIC_COLUMNS)
        for step in range(1, 6):
            writer.writerow([step, 6.0 - step * 0.3, 1e-3, 900, 400, 512, 200, 0.5, 5.5 if step == 5 else "", 0,
                             1_700_000_000 + step])
    RunDir(run).tune.mkdir()
    with RunDir(run).trials_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "subtask", "rank", "alpha", "dropout", "learning_rate", "target_modules",
                         "best_val_loss", "best_step", "steps", "stopped_early", "status", "chosen"])
        for i, subtask in enumerate(SUBTASKS):
            for j, loss in enumerate((3.1, 2.9)):
                writer.writerow([f"t{i}{j}", subtask, 4, 8, 0.0, 1e-3, "q_proj,v_proj", loss - i * 0.1, 10, 10,
                                 False, "done", j == 1])


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-data")
    write_data(out, TEST_SONGS + TRAIN_SONGS)
    return out


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory, make_random_run):
    """stage1/model + LoRA adapters of three sub-tasks (random, non-zero), training records, and a second stage-1
    model in ablations/mask_loss_on (the loss-mask arm; the run's own config says mask_loss: false) and one in the
    absolute music language in ablations/language_absolute (the language arm)."""
    run = tmp_path_factory.mktemp("eval-run")
    model, music = make_random_run(run, ADAPTED, run / "cache")
    write_training_records(run)
    torch.manual_seed(99)
    with torch.no_grad():   # another stage-1 model: this one with its embeddings moved
        embeddings = model.get_input_embeddings().weight
        embeddings.add_(0.5 * embeddings.std() * torch.randn_like(embeddings))
    save_music_model(model, music, RunDir(run).ablation(True).stage1_model)
    base, tokenizer = load_base("tiny", run / "cache")
    absolute = add_music_tokens(base, tokenizer, Vocabulary(VocabConfig(**LEGACY_LANGUAGE)))
    save_music_model(base, absolute, RunDir(run).language_ablation("absolute").stage1_model)
    shutil.rmtree(run / "cache")
    return run

"""Pretrained vs random initialisation: SmolLM2-135M-Instruct, the same architecture with fresh weights, and the
built-in presets (``small``).

Each base (``musicray.pretrained.SHIPPED``: the same config, tokenizer and chat template, only the weights differ;
or a built-in random-init LLaMA) gets the music tokens (mean-resized rows, same seed) and is trained with a plain
PyTorch loop (the loss and the packed data stream of ``musicray.train``, the prompts' music labelled as in the
``pop909-smol`` preset; no Ray, so the runs differ in nothing but the base) on POP909's train split, for ``--steps``
steps or until ``--budget-seconds`` of training (the same wall-clock budget). ``--stage1 lora`` trains LoRA
matrices on every linear layer and the music tokens' embedding rows (PEFT's ``trainable_token_indices``) instead
of every weight. Then, on the test split:

* teacher-forced loss and accuracy per sub-task, plain and under the grammar mask (``musicray.eval.teacher_forced``);
* teacher-forced relations (``musicray.eval.relations``): probability on chord tones and on the key's scale at
  melody pitch positions, probability of holding the previous bar's tempo, chord probability in the key's scale;
* the relation of form (``return_copy_scores``): on test melody windows of up to ``--copy-max-bars`` bars that hold
  a returning section, the probability of the real token inside bars that repeat their first occurrence, against
  those first occurrences (does the base's attention copy a section's return?);
* with ``--compose N``: the model saved as a run's stage-1 model, then chords and melody composed for the first N
  test songs' form windows (``--compose-bars`` bars holding a return, the evaluation's ``form`` windows; mask on,
  harmony guard off: the model's own choices) and measured by ``musicray.eval.structure`` against the real windows
  (means with 95 % bootstrap intervals over songs);
* the loss curves of every base in one figure (``<out>/loss_curves.png``: loss against labelled tokens and seconds).

    .venv/bin/python benchmarks/pretrained_experiment.py --steps 20 --out runs/pretrained
    # or one process per base, side by side:
    .venv/bin/python benchmarks/pretrained_experiment.py --bases smollm2-135m-instruct --threads 1 --out runs/pre-smol &
    .venv/bin/python benchmarks/pretrained_experiment.py --bases smollm2-135m-random --threads 1 --out runs/pre-random

Needs the shipped base's packages (``musicray.pretrained.INSTALL``). Writes ``<out>/pretrained_experiment.json``
and prints a Markdown table (docs/results.md keeps the figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch

from musicray.compose import Composer
from musicray.eval.generation import compose_batch, eval_windows, split_songs
from musicray.eval.plots import compared_loss_curves
from musicray.eval.relations import relation_scores, return_copy_scores
from musicray.eval.structure import structure_report
from musicray.eval.teacher_forced import held_out_dataset, teacher_forced
from musicray.grammar import Grammar
from musicray.model import BUILT_IN, add_music_tokens, load_base, save_music_model
from musicray.pretrained import SHIPPED
from musicray.run import RunDir
from musicray.tokens import Vocabulary
from musicray.train.config import load_config
from musicray.train.data import RenderedDataset, collated_batches, load_examples, resolve_data_dir
from musicray.train.loss import causal_lm_loss

TASKS = ["chord", "melody", "tempo"]
EVAL_TASKS = ["chord", "melody", "tempo"]   # the relations' sub-tasks
COMPOSED_STAGES = ("chord", "melody")        # what --compose writes: the stages the structure measures read
COMPOSED_MEASURES = ("same_label_similarity", "different_label_similarity", "returning_bars_identical",
                     "chord_time_in_scale", "scale_consistency_melody", "chord_tone_ratio")


def with_lora(model, music, args):
    """``model`` under LoRA on every linear layer, with the music tokens' input and output rows trainable (PEFT
    keeps the two tied where the base ties them)."""
    from peft import LoraConfig, get_peft_model

    rows = list(range(music.offset, music.offset + len(music.vocab)))
    trainable_rows = {"embed_tokens": rows}
    if not model.config.tie_word_embeddings:
        trainable_rows["lm_head"] = rows
    config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear",
                        trainable_token_indices=trainable_rows)
    return get_peft_model(model, config)


def arm_name(base: str, args) -> str:
    return f"{base}-{args.stage1}"


def compose_and_measure(run_dir: Path, args, data_dir: Path) -> dict:
    """Chords and melody for the first ``--compose`` test form windows, composed on the run's stage-1 model;
    the structure measures' rows (generated and real: mean with interval) and the seconds it took."""
    composer = Composer(run_dir, adapters=())
    windows = eval_windows(split_songs(data_dir), args.compose, args.compose_bars, composer.music.vocab, args.seed,
                           kind="form")
    requests = [dataclasses.replace(w.request, stages=COMPOSED_STAGES, harmony_guard=False) for w in windows]
    started, composed = time.perf_counter(), []
    for start in range(0, len(requests), args.compose_batch):
        composed += compose_batch(composer, requests[start:start + args.compose_batch])
    report = structure_report([c.song for c in composed], [w.song for w in windows], seed=args.seed)
    return {"songs": len(windows), "bars": sum(w.song.n_bars for w in windows),
            "seconds": round(time.perf_counter() - started, 1),
            "rows": {row["measure"]: {"generated": row["generated"], "real": row["real"]}
                     for row in report["rows"] if row["measure"] in COMPOSED_MEASURES}}


def train(base: str, args, data_dir: Path) -> dict:
    model, tokenizer = load_base(base, args.cache)
    torch.manual_seed(args.seed)
    music = add_music_tokens(model, tokenizer, Vocabulary())
    if args.stage1 == "lora":
        model = with_lora(model, music, args)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_set = RenderedDataset(load_examples(data_dir, TASKS, "train", music.vocab, args.max_bars, args.train_songs),
                                music, args.max_length, train_on_inputs=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                                 (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    batches = collated_batches(train_set, args.batch_size, args.seed, 0, 1, music.tokenizer.pad_token_id,
                               args.max_length)
    model.train()
    started, losses, tokens, curve = time.perf_counter(), [], 0, []
    for step in range(args.steps):
        if args.budget_seconds and time.perf_counter() - started >= args.budget_seconds:
            break
        batch = next(batches)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = causal_lm_loss(logits, batch["labels"], segment_rows=batch.get("segment_rows"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
        tokens += int((batch["labels"] != -100).sum())
        curve.append((tokens, round(time.perf_counter() - started, 2), losses[-1]))
        print(f"  {base} step {step + 1}/{args.steps} loss {losses[-1]:.3f} "
              f"({tokens / (time.perf_counter() - started):.0f} labelled tokens/s)", flush=True)
    train_seconds = time.perf_counter() - started
    del optimizer
    model.eval()
    grammar = Grammar(music.vocab)
    held_out = {task: held_out_dataset(data_dir, task, music, args.max_length, args.max_bars, args.eval_examples)
                for task in EVAL_TASKS}
    scores = {task: teacher_forced(model, music, held_out[task], grammar, args.eval_batch).to_dict()
              for task in EVAL_TASKS}
    relations = relation_scores(model, music, held_out["melody"], held_out["tempo"], args.eval_batch,
                                held_out["chord"])
    returning = held_out_dataset(data_dir, "melody", music, args.max_length, args.copy_max_bars)
    copies = return_copy_scores(model, music, returning, args.eval_batch, args.copy_examples)
    composed = None
    if args.compose:
        run_dir = Path(args.out) / arm_name(base, args)
        save_music_model(model.merge_and_unload() if args.stage1 == "lora" else model, music,
                         RunDir(run_dir).stage1_model)
        del model
        composed = compose_and_measure(run_dir, args, data_dir)
    return {"base": base, "stage1": args.stage1, "lr": args.lr, "seed": args.seed, "trainable_parameters": trainable,
            "total_parameters": total, "steps": len(losses),
            "train_rows": len(losses) * args.batch_size, "labelled_tokens": tokens,
            "labelled_tokens_per_s": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
            "train_seconds": round(train_seconds, 1), "losses": losses, "curve": curve,
            "last_loss": round(statistics.mean(losses[-5:]), 4), "teacher_forced": scores,
            "relations": relations.to_dict(), "return_copy": copies.to_dict(), "composed": composed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/pretrained")
    parser.add_argument("--cache", default="~/.cache/musicray", help="where the bases are converted")
    parser.add_argument("--bases", nargs="+", default=list(SHIPPED), choices=[*SHIPPED, *BUILT_IN])
    parser.add_argument("--stage1", choices=("full", "lora"), default="full",
                        help="train every weight, or LoRA matrices and the music tokens' embedding rows")
    parser.add_argument("--lora-rank", type=int, default=16, help="with --stage1 lora (alpha is twice the rank)")
    parser.add_argument("--steps", type=int, default=20, help="the most steps")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="stop training after this many seconds (a wall-clock budget); the warm-up and cosine "
                             "schedule still span --steps, so set --steps near what the budget allows")
    parser.add_argument("--batch-size", type=int, default=1, help="packed rows of --max-length tokens per step")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-bars", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--train-songs", type=int, default=100, help="the first N songs of the train split")
    parser.add_argument("--eval-examples", type=int, default=16, help="test examples per sub-task")
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--copy-max-bars", type=int, default=16,
                        help="window length of the test melody examples the copy relation reads (returns need "
                             "several sections in one window)")
    parser.add_argument("--copy-examples", type=int, default=32, help="test windows with a copyable bar, at most")
    parser.add_argument("--compose", type=int, default=0,
                        help="compose chords and melody for this many test form windows and measure them (0: none)")
    parser.add_argument("--compose-bars", type=int, default=16, help="bars per composed window")
    parser.add_argument("--compose-batch", type=int, default=8, help="songs per decode call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (run one process per base with 1)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a prepared data dir (default: POP909 from $POP909_DIR, prepared into the cache)")
    parser.add_argument("--tables-from", type=Path, nargs="+", default=None, metavar="OUT",
                        help="train nothing: put the results of these earlier --out folders (e.g. one process per "
                             "base, side by side) into one set of tables and one loss figure under --out")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.tables_from:
        results = []
        for folder in args.tables_from:
            saved = json.loads((folder / "pretrained_experiment.json").read_text())
            # Results written before they carried their seed and learning rate take them from the run's arguments.
            results += [{"seed": saved["args"]["seed"], "lr": saved["args"]["lr"], **r} for r in saved["results"]]
        write_figures(results, Path(args.out))
        return 0
    torch.set_num_threads(args.threads)
    data_dir = args.data or resolve_data_dir(load_config(None, ["data.source=pop909", f"cache_dir={args.cache}"]))
    results = []
    for base in args.bases:
        print(f"== {base}", flush=True)
        results.append(train(base, args, data_dir))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("losses", "curve")}, indent=1),
              flush=True)
    (Path(args.out) / "pretrained_experiment.json").write_text(
        json.dumps({"args": vars(args), "results": results}, default=str, indent=1))
    write_figures(results, Path(args.out))
    return 0


def arm_label(result: dict) -> str:
    """A result's arm in a table column or a figure's legend."""
    return (f"{result['base']} {result['stage1']}, {result['steps']} steps"
            + (f", seed {result['seed']}" if result.get("seed") else ""))


def write_figures(results: list[dict], out: Path) -> None:
    """The loss figure under ``out`` and the tables printed."""
    compared_loss_curves({arm_label(r): r["curve"] for r in results}, out / "loss_curves.png")
    print(markdown(results))


def _interval(entry: dict | None) -> str:
    if not entry:
        return "–"
    spread = f" [{entry['low']:.2f}, {entry['high']:.2f}]" if entry.get("low") is not None else ""
    return f"{entry['mean']:.2f}{spread}"


def markdown(results: list[dict]) -> str:
    """The relations' table, the copy relation's and (with --compose) the composed windows' table."""
    lines = []
    out = lines.append
    out("| base | stage 1 | steps | last loss (train) | test loss chord / melody / tempo | masked accuracy melody | "
        "chord-tone mass (real) | scale mass (real) | tempo hold p (real) | chords in the key (real) | "
        "labelled tokens/s |")
    out("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rel, tf = r["relations"], r["teacher_forced"]
        test_losses = " / ".join(f"{tf[task]['loss']:.3f}" for task in EVAL_TASKS)
        out(f"| {r['base']} | {r['stage1']} | {r['steps']} | {r['last_loss']} | {test_losses} | "
            f"{tf['melody']['masked_accuracy']:.3f} | {rel['chord_tone_mass']} ({rel['real_chord_tone']}) | "
            f"{rel['scale_mass']} ({rel['real_in_scale']}) | {rel['tempo_hold']} ({rel['real_tempo_hold']}) | "
            f"{rel['diatonic_chord_mass']} ({rel['real_diatonic_chord']}) | {r['labelled_tokens_per_s']} |")
    out("")
    out("| base | stage 1 | p(real token) in copyable bars | p in their first occurrences | top-1 copyable / first | "
        "copyable bars (of returning) | windows |")
    out("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        c = r["return_copy"]
        out(f"| {r['base']} | {r['stage1']} | {c['copy_p']} | {c['first_p']} | {c['copy_accuracy']} / "
            f"{c['first_accuracy']} | {c['copyable_bars']} ({c['returning_bars']}) | {c['examples']} |")
    composed = [r for r in results if r["composed"]]
    if composed:
        out("")
        out("| measure | real (same windows) | " + " | ".join(arm_label(r) for r in composed) + " |")
        out("|---|---:|" + "---:|" * len(composed))
        for measure in COMPOSED_MEASURES:
            out(f"| {measure} | {_interval(composed[0]['composed']['rows'][measure]['real'])} | "
                + " | ".join(_interval(r["composed"]["rows"][measure]["generated"]) for r in composed) + " |")
        out("| seconds to compose | – | " + " | ".join(str(r["composed"]["seconds"]) for r in composed) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

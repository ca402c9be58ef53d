"""Relative vs absolute music language: the same model, data, seed and budget, trained once per language.

For each language (``VocabConfig``: chords as degrees or pitch classes, pitches over the sounding chord or
absolute, bar tempi as changes or absolute) a small random-init LLaMA gets the music tokens and is trained with a
plain PyTorch loop (the loss and data of ``musicray.train``; no Ray, so the two runs differ in nothing but the
language) on the melody and tempo tasks of POP909's train split. Then, on the test split:

* teacher-forced relations (``musicray.eval.relations``): probability on chord tones and on the key's scale at
  melody pitch positions, probability of holding the previous bar's tempo;
* generated: grammar-masked melodies for test windows (their real chords given) -> chord-tone ratio; generated
  tempo streams (their real melody given) -> share of bar boundaries that change tempo.

    .venv/bin/python benchmarks/language_experiment.py --steps 200 --out runs/language
    # or one process per language, side by side:
    .venv/bin/python benchmarks/language_experiment.py --languages absolute --threads 1 --out runs/language-absolute &
    .venv/bin/python benchmarks/language_experiment.py --languages relative --threads 1 --out runs/language-relative

Writes ``<out>/language_experiment.json`` and prints a Markdown table (docs/results.md keeps the figures).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from musicray.data.layout import DataDir
from musicray.encoding import decode_body, encode_quantized
from musicray.engine.decode import generate
from musicray.eval.metrics import chord_tone_ratio, tempo_change_stats
from musicray.eval.relations import relation_scores
from musicray.grammar import Grammar, Plan
from musicray.model import TinyConfig, add_music_tokens, build_tiny, load_base
from musicray.sampling import Sampling
from musicray.song import TRACKS, Song, Tempo
from musicray.tokens import LEGACY_LANGUAGE, VocabConfig, Vocabulary
from musicray.train.config import load_config
from musicray.train.data import RenderedDataset, collate, load_examples, resolve_data_dir, shuffled_batches
from musicray.train.loss import causal_lm_loss
from musicray.windows import section_windows

LANGUAGES = {"absolute": VocabConfig(**LEGACY_LANGUAGE), "relative": VocabConfig()}
TASKS = ["melody", "tempo"]


def train(language: str, args, data_dir: Path) -> dict:
    torch.manual_seed(args.seed)
    base = Path(args.out) / "base"
    if not (base / "config.json").exists():
        build_tiny(base, TinyConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                    num_hidden_layers=args.layers, num_attention_heads=args.hidden // args.head_dim,
                                    num_key_value_heads=args.hidden // args.head_dim, seed=args.seed))
    model, tokenizer = load_base(str(base), args.out)
    torch.manual_seed(args.seed)
    music = add_music_tokens(model, tokenizer, Vocabulary(LANGUAGES[language]))
    train_set = RenderedDataset(load_examples(data_dir, TASKS, "train", music.vocab, args.max_bars,
                                              args.train_songs), music, args.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 *
                                                 (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    batches = shuffled_batches(train_set, args.batch_size, args.seed)
    pad = music.tokenizer.pad_token_id
    model.train()
    started, losses, tokens = time.perf_counter(), [], 0
    for step in range(args.steps):
        batch = collate(next(batches), pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = causal_lm_loss(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        if (step + 1) % 50 == 0:
            print(f"  {language} step {step + 1}/{args.steps} loss {statistics.mean(losses[-50:]):.3f} "
                  f"({tokens / (time.perf_counter() - started):.0f} tokens/s)", flush=True)
    train_seconds = time.perf_counter() - started
    model.eval()
    tests = {task: load_examples(data_dir, [task], "test", music.vocab, args.max_bars, 30)[:args.eval_examples]
             for task in TASKS}
    melody, tempo = (RenderedDataset(tests[task], music, args.max_length) for task in TASKS)
    relations = relation_scores(model, music, melody, tempo)
    generated = generate_windows(model, music, data_dir, args)
    return {"language": language, "vocab": asdict(music.vocab.config), "train_examples": len(train_set),
            "train_seconds": round(train_seconds, 1), "final_loss": round(statistics.mean(losses[-50:]), 4),
            "tokens_processed": tokens, "relations": relations.to_dict(), "generated": generated}


def generate_windows(model, music, data_dir: Path, args) -> dict:
    """Melody over real chords, and tempo for the real melody, for the first test windows with a melody."""
    import pandas as pd

    from musicray.song import song_from_dict

    vocab = music.vocab
    grammar = Grammar(vocab)
    table = pd.read_parquet(DataDir(data_dir).songs)
    windows = []
    for text in table[table["split"] == "test"]["song_json"]:
        for window in section_windows(song_from_dict(json.loads(text)), args.max_bars):
            if window.tracks["MELODY"] and len(windows) < args.generate:
                windows.append(window)
    ratios, real_ratios, changes, real_changes = [], [], [], []
    for task, field in (("melody", "MELODY"), ("tempo", "tempo")):
        for start in range(0, len(windows), 8):
            group = windows[start:start + 8]
            examples = [encode_quantized(w, task, vocab) for w in group]
            plans = [Plan.from_prompt(e.prompt, vocab) for e in examples]
            minimum = grammar.tokens_to_finish(grammar.start([task] * len(plans), plans)).tolist()
            budgets = [m + (96 * p.n_bars if task == "melody" else 0) for m, p in zip(minimum, plans)]
            out = generate(model, music, grammar, [music.prompt_ids(e) for e in examples], [task] * len(group),
                           plans, budgets, [args.seed + start + i for i in range(len(group))], Sampling())
            for window, tokens in zip(group, out.tokens):
                song = Song("gen", window.key, window.metre, list(window.sections), chords=list(window.chords),
                            tracks={name: list(window.tracks[name]) if name == "MELODY" and task == "tempo" else []
                                    for name in TRACKS},
                            tempos=[Tempo(0, 0, window.tempos[0].bpm if window.tempos else 120.0)])
                decode_body(tokens[:-1], task, song, vocab)
                if task == "melody":
                    ratios.append(chord_tone_ratio(song))
                    real_ratios.append(chord_tone_ratio(window))
                else:
                    changes.append(tempo_change_stats(song)["change_rate"])
                    real_changes.append(tempo_change_stats(window)["change_rate"])

    def mean(values):
        values = [v for v in values if v is not None]
        return round(statistics.mean(values), 4) if values else None

    return {"windows": len(windows), "chord_tone_ratio": mean(ratios), "real_chord_tone_ratio": mean(real_ratios),
            "tempo_change_rate": mean(changes), "real_tempo_change_rate": mean(real_changes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/language")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--max-bars", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--train-songs", type=int, default=300, help="the first N songs of the train split")
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--generate", type=int, default=32, help="test windows to generate melody and tempo for")
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES), choices=list(LANGUAGES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (run one process per language with 1)")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(load_config(None, ["data.source=pop909"]))
    results = []
    for language in args.languages:
        print(f"== {language}", flush=True)
        results.append(train(language, args, data_dir))
        print(json.dumps(results[-1], indent=1), flush=True)
    (Path(args.out) / "language_experiment.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                                        indent=1))
    print("\n| language | final loss | chord-tone mass (real) | scale mass (real) | tempo hold p (real) | "
          "generated chord-tone ratio (real) | generated tempo change rate (real) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rel, gen = r["relations"], r["generated"]
        print(f"| {r['language']} | {r['final_loss']} | {rel['chord_tone_mass']} ({rel['real_chord_tone']}) | "
              f"{rel['scale_mass']} ({rel['real_in_scale']}) | {rel['tempo_hold']} ({rel['real_tempo_hold']}) | "
              f"{gen['chord_tone_ratio']} ({gen['real_chord_tone_ratio']}) | {gen['tempo_change_rate']} "
              f"({gen['real_tempo_change_rate']}) |")


if __name__ == "__main__":
    main()

"""Music languages compared: the same model, data, seed and budget, trained once per language.

For each language (``VocabConfig``: chords as degrees of the key, degrees of its relative major or pitch classes,
pitches over the sounding chord or absolute, bar tempi as changes or absolute) a small random-init LLaMA gets the
music tokens and is trained with a plain PyTorch loop (the loss and data of ``musicray.train``; no Ray, so the runs
differ in nothing but the language) on some tasks of POP909's train split (``--tasks``: melody and tempo by default;
add chord for the chord languages). Then, on the test split:

* teacher-forced relations (``musicray.eval.relations``): probability on chord tones and on the key's scale at
  melody pitch positions, probability of holding the previous bar's tempo, and (chord task) probability on chords
  whose tones are all in the key's scale, per key mode;
* generated: grammar-masked melodies for test windows (their real chords given) -> chord-tone ratio; generated
  tempo streams (their real melody given) -> share of bar boundaries that change tempo; generated chord streams
  (form and key given) -> chord time whose tones are all in the key's scale, per key mode.

    .venv/bin/python benchmarks/language_experiment.py --steps 200 --out runs/language
    # or one process per language, side by side:
    .venv/bin/python benchmarks/language_experiment.py --languages absolute --threads 1 --out runs/language-absolute &
    .venv/bin/python benchmarks/language_experiment.py --languages relative --threads 1 --out runs/language-relative
    # chords counted from the tonic in both modes, against the default (a minor key from its relative major):
    .venv/bin/python benchmarks/language_experiment.py --tasks chord melody --languages tonic-degree ...

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

from musicray.compose import token_budgets
from musicray.data.layout import DataDir
from musicray.encoding import decode_body, encode_quantized
from musicray.engine.decode import generate
from musicray.eval.metrics import chord_tone_ratio, tempo_change_stats
from musicray.eval.relations import relation_scores
from musicray.eval.structure import bootstrap_interval, chord_time_in_scale
from musicray.grammar import Grammar, Plan
from musicray.harmony import parse_key
from musicray.model import TinyConfig, add_music_tokens, build_tiny, load_base
from musicray.sampling import Sampling
from musicray.song import TRACKS, Song, Tempo
from musicray.streams import decode_header
from musicray.tasks import subtask
from musicray.tokens import LEGACY_LANGUAGE, VocabConfig, Vocabulary
from musicray.train.config import load_config
from musicray.train.data import RenderedDataset, collate, load_examples, resolve_data_dir, shuffled_batches
from musicray.train.loss import causal_lm_loss
from musicray.windows import section_windows

# "relative" is the default (chords as degrees of the key's relative major since issue 17); "tonic-degree" the
# relative language before it (chords as degrees of the key's own tonic).
LANGUAGES = {"absolute": VocabConfig(**LEGACY_LANGUAGE), "relative": VocabConfig(),
             "tonic-degree": VocabConfig(chords="degree")}
TASKS = ("chord", "melody", "tempo")
MODES = ("maj", "min")


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
    train_set = RenderedDataset(load_examples(data_dir, args.tasks, "train", music.vocab, args.max_bars,
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
             for task in args.tasks}
    rendered = {task: RenderedDataset(examples, music, args.max_length) for task, examples in tests.items()}
    relations = relation_scores(model, music, rendered.get("melody"), rendered.get("tempo")).to_dict()
    # Chords per key mode: the question is whether each mode's diatonic chords are learnt, not their average.
    for mode in MODES if "chord" in tests else ():
        examples = [e for e in tests["chord"] if parse_key(decode_header(e.prompt, music.vocab).key)[1] == mode]
        scores = relation_scores(model, music, None, None, chord=RenderedDataset(examples, music, args.max_length))
        relations[f"diatonic_chord_mass_{mode}"] = scores.diatonic_chord_mass
        relations[f"real_diatonic_chord_{mode}"] = scores.real_diatonic_chord
    generated = generate_windows(model, music, data_dir, args)
    return {"language": language, "vocab": asdict(music.vocab.config), "train_examples": len(train_set),
            "train_seconds": round(train_seconds, 1), "final_loss": round(statistics.mean(losses[-50:]), 4),
            "tokens_processed": tokens, "relations": relations, "generated": generated}


def generate_windows(model, music, data_dir: Path, args) -> dict:
    """Melody over real chords, tempo for the real melody, and chords for the form and key, for the first test
    windows with a melody (each for the tasks trained)."""
    import pandas as pd

    from musicray.song import song_from_dict

    vocab = music.vocab
    grammar = Grammar(vocab)
    table = pd.read_parquet(DataDir(data_dir).songs)
    windows = []
    for text in table[table["split"] == "test"]["song_json"]:
        # At most --windows-per-song from each song, so that the windows cover many songs' keys.
        with_melody = [w for w in section_windows(song_from_dict(json.loads(text)), args.max_bars)
                       if w.tracks["MELODY"]]
        windows += with_melody[:args.windows_per_song][:max(0, args.generate - len(windows))]
    ratios, real_ratios, changes, real_changes = [], [], [], []
    in_scale = {(source, mode): [] for source in ("generated", "real") for mode in MODES}
    for task in args.tasks:
        for start in range(0, len(windows), 8):
            group = windows[start:start + 8]
            examples = [encode_quantized(w, task, vocab) for w in group]
            plans = [Plan.from_prompt(e.prompt, vocab) for e in examples]
            budgets = token_budgets(grammar, task, plans, subtask(task).tokens_per_bar)
            out = generate(model, music, grammar, [music.prompt_ids(e) for e in examples], [task] * len(group),
                           plans, budgets, [args.seed + start + i for i in range(len(group))], Sampling())
            for window, tokens in zip(group, out.tokens):
                song = Song("gen", window.key, window.metre, list(window.sections),
                            chords=[] if task == "chord" else list(window.chords),
                            tracks={name: list(window.tracks[name]) if name == "MELODY" and task == "tempo" else []
                                    for name in TRACKS},
                            tempos=[Tempo(0, 0, window.tempos[0].bpm if window.tempos else 120.0)])
                decode_body(tokens[:-1], task, song, vocab)
                if task == "melody":
                    ratios.append(chord_tone_ratio(song))
                    real_ratios.append(chord_tone_ratio(window))
                elif task == "chord":
                    mode = parse_key(window.key)[1]
                    in_scale["generated", mode].append(chord_time_in_scale(song))
                    in_scale["real", mode].append(chord_time_in_scale(window))
                else:
                    changes.append(tempo_change_stats(song)["change_rate"])
                    real_changes.append(tempo_change_stats(window)["change_rate"])

    def mean(values):
        values = [v for v in values if v is not None]
        return round(statistics.mean(values), 4) if values else None

    def interval(values):
        found = bootstrap_interval(values)
        return None if found is None or found.low is None else [round(found.low, 4), round(found.high, 4)]

    return {"windows": len(windows), "chord_tone_ratio": mean(ratios), "real_chord_tone_ratio": mean(real_ratios),
            "tempo_change_rate": mean(changes), "real_tempo_change_rate": mean(real_changes),
            **{f"chord_time_in_scale_{mode}" + ("" if source == "generated" else "_real"): mean(values)
               for (source, mode), values in in_scale.items()},
            # 95 % bootstrap intervals over windows, and every window's value
            **{f"chord_time_in_scale_{mode}_interval": interval(in_scale["generated", mode]) for mode in MODES},
            **{f"chord_time_in_scale_{mode}_real_interval": interval(in_scale["real", mode]) for mode in MODES},
            "chord_time_in_scale_per_window": {f"{source}_{mode}": values
                                               for (source, mode), values in in_scale.items()},
            "windows_per_mode": {mode: len(in_scale["real", mode]) for mode in MODES}}


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--windows-per-song", type=int, default=None,
                        help="take at most this many of a test song's windows (default: all, in order)")
    parser.add_argument("--languages", nargs="+", default=["absolute", "relative"], choices=list(LANGUAGES))
    parser.add_argument("--tasks", nargs="+", default=["melody", "tempo"], choices=TASKS,
                        help="the tasks trained and measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (run one process per language with 1)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a prepared data dir (default: POP909 from $POP909_DIR, prepared into the cache)")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    data_dir = args.data or resolve_data_dir(load_config(None, ["data.source=pop909"]))
    results = []
    for language in args.languages:
        print(f"== {language}", flush=True)
        results.append(train(language, args, data_dir))
        print(json.dumps(results[-1], indent=1), flush=True)
    (Path(args.out) / "language_experiment.json").write_text(
        json.dumps({"args": vars(args), "results": results}, default=str, indent=1))
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    """One Markdown row per language: each measure with the real songs' value in brackets ('-' where the task was
    not trained)."""
    columns = [("chord-tone mass", "relations", "chord_tone_mass", "real_chord_tone"),
               ("scale mass", "relations", "scale_mass", "real_in_scale"),
               ("tempo hold p", "relations", "tempo_hold", "real_tempo_hold"),
               ("diatonic chord mass, major", "relations", "diatonic_chord_mass_maj", "real_diatonic_chord_maj"),
               ("diatonic chord mass, minor", "relations", "diatonic_chord_mass_min", "real_diatonic_chord_min"),
               ("generated chord-tone ratio", "generated", "chord_tone_ratio", "real_chord_tone_ratio"),
               ("generated tempo change rate", "generated", "tempo_change_rate", "real_tempo_change_rate"),
               ("generated chord time in scale, major", "generated", "chord_time_in_scale_maj",
                "chord_time_in_scale_maj_real"),
               ("generated chord time in scale, minor", "generated", "chord_time_in_scale_min",
                "chord_time_in_scale_min_real")]
    print("\n| language | final loss | " + " | ".join(f"{name} (real)" for name, *_ in columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for r in results:
        cells = [f"{r[part].get(key)} ({r[part].get(real)})" if r[part].get(key) is not None else "-"
                 for _, part, key, real in columns]
        print(f"| {r['language']} | {r['final_loss']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())

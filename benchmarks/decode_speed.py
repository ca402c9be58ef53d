"""Decoding speed: the grammar mask's cost against unmasked decoding, and per-token time as the context grows.

One run measures, on one random-weight model (``--size``: the tiny preset, or a LLaMA-3-shaped 1B / 8B with the
tiny tokenizer, for a GPU) and the same prompts and seeds:

    masked vs unmasked   ``musicray.engine.decode.generate`` with and without the mask: decode tokens/s (rows x steps
                         over the decode loop's time, the prompt's prefill excluded) at each batch size;
                         goal: masked >= 0.95 x unmasked at batch 32; also masked on the tensor engine alone
                         (``Grammar(row_batch=0)``, the grammar before the row engine), side by side
    mask per token       the mask's own time (``Generated.mask_seconds``: masking the scores and stepping every
                         row's grammar state) per token per sequence; goal <= 20 us (XGrammar reports < 40 us
                         per token for JSON grammars)
    grammar alone        the same mask + step replayed over real encoded songs without a model, per batch size,
                         on both engines: the automaton's cost with nothing else on the machine's cores
    context              seconds per decoded token (KV cache) with a short context (a melody prompt, ~150
                         tokens) and a long one (a whole 48-bar song already in the cache, ~2,700 tokens);
                         goal: long <= 1.5 x short
    jump-forward         infilling (every other bar of a 16-bar melody given): the step-by-step loop against
                         jump-forward (a forced run fed in one forward pass), model forward calls per chosen
                         token and tokens/s; both decode the same tokens

Prompts are melody-task prompts of seeded synthetic songs with long forms, so that masked rows do not close
their song within ``--tokens`` steps and both runs decode the same number of steps. Runs are interleaved
``--repeat`` times; the tables give the median with the range of the runs. On CPU every run uses ``--threads``
torch threads (default 1, as the serve replicas do).

    python benchmarks/decode_speed.py [--size tiny] [--device cpu] [--batch 1 8 32] [--tokens 128]
                                      [--repeat 3] [--threads 1] [--no-docs] [--no-context] [--no-jump]

About two minutes on two cores with the defaults. Prints a table and writes it as the "Decoding (SIZE model)" section
of docs/benchmarks.md (replacing an earlier section of that name only).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from docs_section import write_section
from musicray.data.synth import synth_song
from musicray.encoding import bar_contents, encode
from musicray.engine.decode import generate
from musicray.grammar import Grammar, Plan
from musicray.model import TinyConfig, add_music_tokens, build_tiny
from musicray.quantize import quantized
from musicray.sampling import Sampling
from musicray.song import Section
from musicray.tokens import Vocabulary

SIZES: dict[str, TinyConfig] = {
    "tiny": TinyConfig(),
    # Big enough that the weights, not per-op overhead, dominate a decode step on CPU (~30 M parameters).
    "small": TinyConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4),
    # LLaMA-3.2-1B and LLaMA-3.1-8B shapes (random weights; the vocabulary is the tiny tokenizer's + music).
    "1b": TinyConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
    "8b": TinyConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8),
}


def build_model(size: str, device: str, dtype: torch.dtype, workdir: Path):
    """A random-weight model of ``size`` through save_pretrained/from_pretrained, with the music tokens added."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny(workdir / f"base-{size}", SIZES[size])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    music = add_music_tokens(model, tokenizer, Vocabulary())
    return model.to(device).eval(), music


def long_form_songs(count: int, vocab: Vocabulary) -> list:
    """Seeded synthetic songs, longest first (more bars than the decode steps can fill)."""
    songs = [quantized(synth_song(seed, f"bench-{seed}"), vocab) for seed in range(count * 3)]
    return sorted(songs, key=lambda s: -s.n_bars)[:count]


# Decoding modes, run interleaved: without the mask, with it (the grammar steps small batches on Python rows, see
# ``Grammar.row_batch``), and with it on the tensor engine alone (the grammar before the row engine), side by side.
MODES: dict[str, dict] = {"unmasked": {"use_mask": False}, "masked": {"use_mask": True},
                          "masked, tensors": {"use_mask": True, "engine": "tensors"}}


def engines(vocab: Vocabulary, device) -> dict[str, Grammar]:
    return {"rows": Grammar(vocab, device), "tensors": Grammar(vocab, device, row_batch=0)}


def decode_run(model, music, grammars, examples, tokens: int, seed: int, use_mask: bool, engine: str = "rows"):
    prompts = [music.prompt_ids(e) for e in examples]
    plans = [Plan.from_prompt(e.prompt, music.vocab) for e in examples]
    return generate(model, music, grammars[engine], prompts, ["melody"] * len(examples), plans,
                    [tokens] * len(examples), [seed + i for i in range(len(examples))], Sampling(), use_mask=use_mask)


def masked_vs_unmasked(model, music, grammars, songs, batches, tokens, repeat) -> list[dict]:
    """Per batch size: tokens/s of each mode (median run), the masked/unmasked ratios of each interleaved run
    (median and range) and the grammar's time per token per sequence (median and range) in each masked mode."""
    rows = []
    for batch in batches:
        examples = [encode(songs[i % len(songs)], "melody", music.vocab) for i in range(batch)]
        for engine in grammars:   # warm-up (allocator, caches)
            decode_run(model, music, grammars, examples, tokens, 0, use_mask=True, engine=engine)
        runs: dict[str, list[dict]] = {name: [] for name in MODES}
        for r in range(repeat):
            for name, mode in MODES.items():
                out = decode_run(model, music, grammars, examples, tokens, 100 * r, **mode)
                decode_seconds = out.seconds - out.prefill_seconds
                runs[name].append({"tokens_per_s": batch * out.new_tokens / decode_seconds, "steps": out.new_tokens,
                                   "mask_us": 1e6 * out.mask_seconds / (batch * out.new_tokens)})
        row = {"batch": batch, "steps": {name: runs[name][0]["steps"] for name in MODES}}
        for name in MODES:
            row[name] = statistics.median(x["tokens_per_s"] for x in runs[name])
            ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[name], runs["unmasked"])]
            row[f"{name} ratio"] = spread(ratios)
            row[f"{name} mask_us"] = spread([x["mask_us"] for x in runs[name]])
        rows.append(row)
    return rows


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest)."""
    return statistics.median(values), min(values), max(values)


def grammar_alone(grammars, songs, batches, repeat) -> list[dict]:
    """Replay real encodings through mask + step on each engine, interleaved: the automaton's cost per token per
    sequence (median and range of the runs)."""
    vocab = grammars["rows"].vocab
    examples = [encode(s, "melody", vocab) for s in songs]
    rows = []
    for batch in batches:
        chosen = [examples[i % len(examples)] for i in range(batch)]
        length = min(len(e.target) for e in chosen)
        plans = [Plan.from_prompt(e.prompt, vocab) for e in chosen]
        times: dict[str, list[float]] = {name: [] for name in grammars}
        for _ in range(repeat):
            for name, grammar in grammars.items():
                targets = torch.tensor([e.target[:length] for e in chosen], device=grammar.device)
                state = grammar.start(["melody"] * batch, plans)
                started = time.perf_counter()
                for step in range(length):
                    grammar.mask(state)
                    grammar.step(state, targets[:, step])
                if grammar.device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(1e6 * (time.perf_counter() - started) / (length * batch))
        rows.append({"batch": batch, "steps": length, **{name: spread(t) for name, t in times.items()}})
    return rows


def context_scaling(model, music, tokens: int, repeat: int) -> dict:
    """Seconds per decoded token with a short and with a long context already in the KV cache (unmasked: the
    mask's cost does not depend on the context)."""
    vocab = music.vocab
    song = quantized(synth_song(2, "bench-long"), vocab)  # 48 bars: i2A8A8B8b4A8B8o2
    short = encode(song, "melody", vocab)
    whole = encode(song, "song", vocab)
    contexts = {"short": music.prompt_ids(short),
                "long": music.prompt_ids(whole) + music.to_llm(whole.target[:-1])}
    plan = Plan.from_prompt(short.prompt, vocab)
    grammar = Grammar(vocab, next(model.parameters()).device)
    result = {}
    for name, prompt in contexts.items():
        times = []
        for r in range(repeat):
            out = generate(model, music, grammar, [prompt], ["melody"], [plan], [tokens], [r], Sampling(),
                           use_mask=False)
            times.append((out.seconds - out.prefill_seconds) / out.new_tokens)
        result[name] = {"context": len(prompt), "s_per_token": min(times)}
    result["ratio"] = result["long"]["s_per_token"] / result["short"]["s_per_token"]
    return result


def jump_forward(model, music, grammar, songs, batch: int, repeat: int) -> dict:
    """Infilling with every other bar given: forward calls per token and tokens/s, step by step vs jump-forward."""
    vocab = music.vocab
    examples, plans = [], []
    for song in songs[:batch]:
        window = song.replace(sections=[Section("A", 16)], chords=[c for c in song.chords if c.bar < 16],
                              tracks={n: [x for x in notes if x.bar < 16] for n, notes in song.tracks.items()},
                              tempos=[t for t in song.tempos if t.bar < 16])
        window.tracks = {n: [window.inside_form(x) for x in notes] for n, notes in window.tracks.items()}
        example = encode(window, "melody", vocab)
        bars = bar_contents(example.target, vocab)
        plan = Plan.from_prompt(example.prompt, vocab)
        examples.append(example)
        plans.append(Plan(plan.sections, plan.metre, forced=tuple((b + 1, tuple(bars[b])) for b in range(0, 16, 2))))
    budgets = [int(x) + 96 * 8 for x in grammar.tokens_to_finish(grammar.start(["melody"] * len(plans), plans))]
    prompts = [music.prompt_ids(e) for e in examples]
    result = {}
    for name, jump in (("step by step", False), ("jump-forward", True)):
        best = None
        for r in range(repeat):
            out = generate(model, music, grammar, prompts, ["melody"] * len(plans), plans, budgets,
                           list(range(len(plans))), Sampling(), jump_forward=jump)
            tokens = sum(len(t) + 1 for t in out.tokens)   # + <|eot_id|>
            run = {"tokens": tokens, "forward_calls": out.forward_calls, "calls_per_token": out.forward_calls /
                   max(1, out.new_tokens), "tokens_per_s": tokens / (out.seconds - out.prefill_seconds),
                   "output": out.tokens}
            best = run if best is None or run["tokens_per_s"] > best["tokens_per_s"] else best
        result[name] = best
    result["same tokens"] = result["step by step"].pop("output") == result["jump-forward"].pop("output")
    result["speed-up"] = result["jump-forward"]["tokens_per_s"] / result["step by step"]["tokens_per_s"]
    result["batch"] = len(plans)
    return result


def fmt(values: tuple[float, float, float], digits: int) -> str:
    median, low, high = values
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def markdown(args, rows, alone, context, env, jump=None) -> str:
    lines = [
        f"## Decoding ({args.size} model)",
        "",
        f"`python benchmarks/decode_speed.py --size {args.size} --device {args.device} --batch "
        f"{' '.join(map(str, args.batch))} --tokens {args.tokens} --repeat {args.repeat} --threads {args.threads}` "
        f"on {env['machine']} ({env['date']}, load average {env['load']}).",
        "",
        f"Masked vs unmasked decoding (same model, prompts, seeds and steps; {args.repeat} interleaved runs of each: "
        "tokens/s the median run, ratios and mask times the median with the range in brackets). *masked* is the "
        "grammar as it runs (batches up to `Grammar.row_batch` on Python rows), *tensors* the tensor engine alone "
        "(the grammar before the row engine). Goals: masked/unmasked >= 0.95 at batch 32, mask <= 20 us per "
        "token per sequence.",
        "",
        "| batch | unmasked tok/s | masked tok/s | ratio | mask us/token/seq | tensors tok/s | tensors ratio | "
        "tensors mask us/token/seq | steps |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['unmasked']:.0f} | {r['masked']:.0f} | {fmt(r['masked ratio'], 3)} | "
                     f"{fmt(r['masked mask_us'], 1)} | {r['masked, tensors']:.0f} | "
                     f"{fmt(r['masked, tensors ratio'], 3)} | {fmt(r['masked, tensors mask_us'], 1)} | "
                     f"{'/'.join(str(v) for v in r['steps'].values())} |")
    lines += ["", "The grammar alone (mask + step replayed over encoded songs, no model; us per token per sequence, "
              "median of the interleaved runs with the range):", "",
              "| batch | rows engine (as it runs) | tensor engine | tensor / as it runs |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {fmt(r['rows'], 1)} | {fmt(r['tensors'], 1)} | {r['tensors'][0] / r['rows'][0]:.1f}x |"
              for r in alone]
    lines.append("")
    if context:
        lines += [f"Per-token decode time with the KV cache: {context['short']['context']} tokens of context "
                  f"{1e3 * context['short']['s_per_token']:.2f} ms, {context['long']['context']} tokens "
                  f"{1e3 * context['long']['s_per_token']:.2f} ms: ratio **{context['ratio']:.2f}** (goal <= 1.5).", ""]
    if jump:
        lines += [f"Jump-forward on infilling (batch {jump['batch']}, 16-bar melodies, every other bar given; the two "
                  f"loops decode the same tokens: {jump['same tokens']}):", "",
                  "| loop | tokens | forward calls | calls per decode step | tokens/s |", "|---|---:|---:|---:|---:|"]
        for name in ("step by step", "jump-forward"):
            r = jump[name]
            lines.append(f"| {name} | {r['tokens']} | {r['forward_calls']} | {r['calls_per_token']:.2f} | "
                         f"{r['tokens_per_s']:.0f} |")
        lines += ["", f"Speed-up: **{jump['speed-up']:.2f}x**.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    parser.add_argument("--tokens", type=int, default=128, help="decode steps per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--no-context", action="store_true", help="skip the context-length measurement")
    parser.add_argument("--no-jump", action="store_true", help="skip the jump-forward measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    with tempfile.TemporaryDirectory() as workdir:
        model, music = build_model(args.size, args.device, dtype, Path(workdir))
        grammars = engines(music.vocab, args.device)
        songs = long_form_songs(8, music.vocab)
        rows = masked_vs_unmasked(model, music, grammars, songs, args.batch, args.tokens, args.repeat)
        alone = grammar_alone(grammars, songs, args.batch, args.repeat)
        context = context_scaling(model, music, args.tokens, args.repeat) if not args.no_context else None
        jump = jump_forward(model, music, grammars["rows"], long_form_songs(8, music.vocab),
                            min(8, max(args.batch)), args.repeat) if not args.no_jump else None
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s)"
    env = {"machine": f"{args.size} model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
                      f"{str(dtype).removeprefix('torch.')}) on {device_name}",
           "date": datetime.date.today().isoformat(),
           "load": f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"}
    section = markdown(args, rows, alone, context, env, jump)
    print(section)
    print({"sampling": asdict(Sampling())})
    if not args.no_docs:
        write_section(section)


if __name__ == "__main__":
    main()

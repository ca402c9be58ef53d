"""The ``musicray`` command line: it owns argument parsing, and each command is a thin shell over the library.

Only the standard library and musicray's light modules (errors, song, tokens, instruments) load before the
arguments are parsed, so ``--help`` and argument errors answer at once: torch, transformers, Ray and the MIDI
libraries are imported inside the commands that need them. No library module imports this one; the job scripts
(``jobs/*.py``) call ``main`` with their command's name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from musicray.errors import SongError
from musicray.pipeline import PRESETS
from musicray.tempo_direction import TEMPO_DIRECTION_HELP, TEMPO_DIRECTIONS


def _data_prepare(args: argparse.Namespace) -> None:
    from musicray.data.pop909 import default_pop909_dir
    from musicray.data.prepare import Pop909Source, prepare

    if args.roles and not args.midi:
        raise SongError("--roles: assigns the tracks of a --midi folder; pass --midi DIR")
    if args.midi:
        from musicray.data.midi_folder import MidiFolderSource, read_roles

        if not args.midi.is_dir():
            raise SongError(f"--midi: {args.midi} is not a folder")
        source = MidiFolderSource(str(args.midi), read_roles(args.roles) if args.roles else {})
        if not source.ids():
            raise SongError(f"--midi: {args.midi} holds no .mid or .midi file (searched recursively)")
        _print_report(prepare(source, args.out, limit=args.limit, num_cpus=args.num_cpus), args.out)
        return
    root = args.pop909 or default_pop909_dir()
    if not (root / "POP909").is_dir():
        raise SongError(f"--pop909: {root} has no POP909/ folder (set POP909_DIR or pass --pop909 DIR)")
    report = prepare(Pop909Source(str(root)), args.out, limit=args.limit, num_cpus=args.num_cpus)
    _print_report(report, args.out)


def _data_synth(args: argparse.Namespace) -> None:
    from musicray.data.prepare import SynthSource, prepare

    report = prepare(SynthSource(args.songs, args.seed), args.out, num_cpus=args.num_cpus)
    _print_report(report, args.out)


def _print_report(report: dict, out) -> None:
    summary = {k: v for k, v in report.items() if k != "skipped_songs"}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


def _data_inspect(args: argparse.Namespace) -> None:
    from musicray.data.inspect import render, summarize

    print(render(summarize(args.data_dir), examples=args.songs))


# The command line's names of ``request_from_fields``'s fields, for its messages.
GENERATE_OPTIONS = {"form": "--form", "key": "--key", "metre": "--metre", "tempo": "--tempo", "chords": "--chords",
                    "melody": "--melody", "given": "--song", "regenerate": "--regenerate",
                    "regenerate_bars": "--regenerate-bars", "continue_bars": "--continue",
                    "regenerate_tracks": "--regenerate-tracks",
                    "temperature": "--temperature", "top_k": "--top-k",
                    "top_p": "--top-p", "stage_settings": "--stage-sampling", "variation": "--variation",
                    "prompt": "--prompt", "tempo_direction": "--tempo-direction"}


def _generate(args: argparse.Namespace) -> None:
    from musicray.compose import Composer
    from musicray.midi import read_midi, write_midi
    from musicray.request import request_from_fields
    from musicray.tokens import SUBTASKS
    from musicray.train.config import run_defaults

    chords = args.chords.read_text() if args.chords and args.chords.exists() else \
        (str(args.chords) if args.chords else None)
    request = request_from_fields(
        args.form, args.key, args.metre, args.tempo, args.seed, chords,
        melody=read_midi(args.melody).tracks["MELODY"] if args.melody else None,
        given=read_midi(args.song) if args.song else None, regenerate=args.regenerate,
        regenerate_bars=args.regenerate_bars, continue_bars=args.continue_bars,
        regenerate_tracks=args.regenerate_tracks, stages=args.stages,
        temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, stage_settings=_stage_settings(args.stage_sampling), use_mask=not args.no_mask,
        allow_missing_adapters=args.no_adapters or args.allow_missing_adapters, variation=args.variation,
        harmony_guard=not args.no_harmony_guard, tempo_direction=args.tempo_direction, defaults=run_defaults(args.run),
        prompt=args.prompt, planner=_planner(args), names=GENERATE_OPTIONS)
    adapters = () if args.no_adapters else SUBTASKS
    if args.stream:
        from musicray.engine.streaming import compose_streaming

        song, report = compose_streaming(args.run, request, adapters=adapters)
    else:
        song, report = Composer(args.run, adapters=adapters).compose(request)
    write_midi(song, args.out, instruments=dict(args.instrument))
    report_path = args.out.with_suffix(".json")
    report_path.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({song.n_bars} bars, form {song.form}; {_stage_summary(report['stages'])}) and "
          f"{report_path}")
    if request.from_run:
        print(f"as the run's evaluation composed (its config's eval settings): {json.dumps(request.taken_from_run())}")
    if request.plan is not None:
        print(f"from the --prompt's plan: {_plan_summary(request)}")
    if request.plan is not None or request.tempo_direction != "steady":
        print(request.tempo_direction_line(report["stages"]))


def _planner(args: argparse.Namespace):
    """What reads ``generate --prompt``: the --base instruct model, else the base the run was fine-tuned from
    (``load_planner``); loaded only when a prompt is read."""
    def plan(prompt: str, max_bars: int | None):
        from musicray.prompt_plan import load_planner

        return load_planner(args.base, None if args.base else args.run, args.cache_dir).plan(prompt, max_bars)
    return plan


def _plan_summary(request) -> str:
    """The fields taken from the plan with their values, then those stated instead of it."""
    taken = ", ".join(f"{name} {getattr(request, name)}" for name in request.from_plan) or "nothing"
    stated = [name for name in ("form", "key", "metre", "tempo") if name not in request.from_plan]
    direction = request.plan["tempo_direction"]
    return (f"{taken}{'; stated instead: ' + ', '.join(stated) if stated else ''}; tempo direction {direction}"
            f"{'' if direction == request.tempo_direction else ' (stated instead: ' + request.tempo_direction + ')'}")


def _stage_summary(stages: dict[str, dict]) -> str:
    """Each stage's tokens and seconds; a stage that ran without its adapter says so."""
    return ", ".join(f"{task} {info['new_tokens']} tokens {info['seconds']}s"
                     f"{'' if info.get('adapter') else ' (no adapter: stage-1 model alone)'}"
                     for task, info in stages.items())


# Set by Ray's job supervisor for every job driver (it carries the job's runtime_env).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _pipeline(args: argparse.Namespace) -> None:
    if os.environ.get(RAY_JOB_ENV) and not Path(args.out).expanduser().is_absolute():
        raise SongError(f"--out {args.out}: under `ray job submit` give an absolute path on storage every node "
                        "sees (a relative one lands in the job's temporary copy of the repository)")
    from musicray.pipeline import preset_config, run_pipeline

    config = args.config or preset_config(args.preset)
    summary = run_pipeline(config, args.out, args.set, progress=not args.quiet, resume=args.resume, force=args.force,
                           verbose=args.verbose)
    for name, info in summary["stages"].items():
        print(f"{name}: {info['seconds']} s{' (skipped)' if info['skipped'] else ''}")
    print(f"run dir: {summary['run_dir']}")


def _eval(args: argparse.Namespace) -> None:
    from musicray.eval.report import evaluate_run, settings_for
    from musicray.run import EvalDir
    from musicray.sampling import checked_settings

    sampling = checked_settings(_stage_settings(args.stage_sampling), "--stage-sampling")
    settings = settings_for(args.run, songs=args.songs, max_bars=args.max_bars, max_examples=args.max_examples,
                            batch_size=args.batch_size, seed=args.seed, sampling=sampling or None,
                            window=args.window, variation=args.variation, guard_ablation=args.guard_ablation,
                            sampling_ablation=args.sampling_ablation, ablation_windows=args.ablation_windows)
    report = evaluate_run(args.run, args.data, args.out, settings, args.device, progress=not args.quiet)
    drawn = [path for path in report["plots"].values() if not path.startswith("skipped")]
    out = EvalDir(args.out)
    print(f"wrote {out.report_md}, {out.report_json.name} and {len(drawn)} plots ({report['seconds']['total']} s)")


def _plan(args: argparse.Namespace) -> None:
    from musicray.prompt_plan import DEFAULT_BASE, load_planner, plan_json

    if args.music_tuned and not args.run:
        raise SongError("--music-tuned: plans with a run's stage-1 model; give --run")
    planner = load_planner(args.base or (None if args.run else DEFAULT_BASE), args.run, args.cache_dir,
                           music_tuned=args.music_tuned)
    print(plan_json(planner.plan(args.prompt)))


def _render(args: argparse.Namespace) -> None:
    from musicray.render import RenderError, render

    try:
        rendered = render(args.midi, args.out, args.soundfont, args.sample_rate, args.gain, args.renderer,
                          dict(args.instrument))
    except RenderError as error:
        raise CommandFailed(str(error)) from None
    print(f"wrote {rendered.path} ({rendered.seconds:.1f} s: the song's {rendered.song_seconds:.1f} s and its release, "
          f"at {rendered.sample_rate} Hz) with renderer {rendered.renderer}, soundfont {rendered.soundfont}")


def _export(args: argparse.Namespace) -> None:
    from musicray.musicxml import read_song, write_musicxml

    song = read_song(args.song)
    path = write_musicxml(song, args.musicxml, lead_sheet=args.lead_sheet)
    staves = "1 staff (MELODY, the lead sheet)" if args.lead_sheet else "3 staves (MELODY, BRIDGE, PIANO)"
    print(f"wrote {path}: {song.n_bars} bars of {song.metre} in {song.key}, {staves}, {len(song.chords)} chord "
          f"symbols, {len(song.sections)} rehearsal marks")


def _train(args: argparse.Namespace) -> None:
    from musicray.rerun import SKIP
    from musicray.run import RunDir
    from musicray.train.config import load_config
    from musicray.train.finetune import stage1_plan, train_stage1

    config = load_config(args.config, args.set)
    if stage1_plan(config, RunDir(args.out), args.resume, args.force) == SKIP:
        print(f"kept {RunDir(args.out).stage1_model}: stage 1 finished there with the same config (--force trains it "
              "again)")
        return
    model_dir = train_stage1(config, args.out, resume=args.resume, progress=not args.no_progress, force=args.force)
    print(f"wrote {model_dir}")


def _tune(args: argparse.Namespace) -> None:
    from musicray.rerun import SKIP
    from musicray.run import RunDir
    from musicray.train.config import load_config
    from musicray.train.tune import stage2_plan, tune_adapters

    config, run = load_config(args.config, args.set), RunDir(args.out)
    if run.has_model() and stage2_plan(config, run, args.force) == SKIP:
        print(f"kept {run.adapters}: stage 2 finished there with the same config (--force sweeps again)")
        return
    adapters = tune_adapters(config, args.out, progress=not args.quiet, force=args.force, verbose=args.verbose)
    print(f"wrote {len(adapters)} adapters to {run.adapters}; every trial: {run.trials_md}")


def _serve(args: argparse.Namespace) -> None:
    from musicray.serve.app import serve_forever

    serve_forever(args.run, args.config, host=args.host, port=args.port, multiplexed=args.multiplexed,
                  engine=args.engine, num_cpus=args.num_cpus)


def _instrument(text: str) -> tuple[str, int]:
    from musicray.instruments import parse_instrument

    try:
        return parse_instrument(text)
    except SongError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--instrument: ")) from None


def _stage_settings(entries: list[str]) -> dict[str, dict[str, str]]:
    """``--stage-sampling melody:temperature=0.8,top_p=0.9`` (repeatable) as {stage: {setting: value}}; the values
    are checked by ``musicray.sampling.checked_settings``."""
    settings: dict[str, dict[str, str]] = {}
    for entry in entries:
        stage, sep, assignments = entry.partition(":")
        pairs = [pair.partition("=") for pair in assignments.split(",")]
        if not sep or not all(name and eq and value for name, eq, value in pairs):
            raise SongError(f"--stage-sampling: {entry!r} is not STAGE:SETTING=VALUE[,SETTING=VALUE], "
                            "e.g. melody:temperature=0.8")
        settings.setdefault(stage.strip(), {}).update({name.strip(): value.strip() for name, _, value in pairs})
    return settings


def _add_stage_sampling_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--stage-sampling", action="append", default=[], metavar="STAGE:SETTING=VALUE[,...]",
                        help=f"one stage's own sampling {what}, e.g. melody:temperature=0.8 (repeatable)")


def _add_instrument_option(parser: argparse.ArgumentParser, what: str) -> None:
    from musicray.instruments import DEFAULT_INSTRUMENTS, GM_PROGRAMS

    defaults = ", ".join(f"{track}={GM_PROGRAMS[program]} ({program})" for track, program in DEFAULT_INSTRUMENTS.items())
    parser.add_argument("--instrument", action="append", default=[], type=_instrument, metavar="TRACK=INSTRUMENT",
                        help=f"{what}: a General MIDI program 0-127 or its name, e.g. MELODY=flute (repeatable; "
                             f"defaults: {defaults})")


def _audio_setting(kind, low: float, high: float):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low:g}..{high:g}")
        return value
    return parse


def _add_rerun_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue stage 1 in --out from its latest checkpoint (also with changed settings)")
    parser.add_argument("--force", action="store_true",
                        help="train again from scratch what --out holds with another config (it is replaced)")


def build_parser() -> argparse.ArgumentParser:
    from musicray.tokens import SUBTASKS

    parser = argparse.ArgumentParser(prog="musicray", description="Structured, expressive pop music with an LLM on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="prepare and inspect datasets").add_subparsers(dest="data_command",
                                                                                            required=True)
    prep = data.add_parser("prepare", help="ingest POP909 (or any --midi folder) into Parquet tables of every task")
    prep.add_argument("--pop909", type=Path, help="POP909 folder (default: $POP909_DIR or ../shared/datasets/pop909)")
    prep.add_argument("--midi", type=Path,
                      help="a folder of any MIDI files (searched recursively) instead of POP909: bars, key, chords, "
                           "track roles and sections are estimated from the notes (docs/own_music.md)")
    prep.add_argument("--roles", type=Path,
                      help="with --midi: a JSON file {song id: {MELODY: instrument, BRIDGE: ...}} naming each song's "
                           "instruments (track name or index) per role, instead of the estimate")
    prep.add_argument("--out", type=Path, required=True, help="output folder")
    prep.add_argument("--limit", type=int, help="only the first N songs")
    prep.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    prep.set_defaults(handler=_data_prepare)

    synth = data.add_parser("synth", help="generate structured synthetic songs into Parquet tables of every task")
    synth.add_argument("--songs", type=int, default=200, help="number of songs")
    synth.add_argument("--seed", type=int, default=0, help="seed of the first song")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    synth.set_defaults(handler=_data_synth)

    inspect = data.add_parser("inspect", help="print songs, sequence lengths, vocabulary coverage, skipped songs")
    inspect.add_argument("data_dir", type=Path)
    inspect.add_argument("--songs", type=int, default=5, help="songs to list")
    inspect.set_defaults(handler=_data_inspect)

    pipe = commands.add_parser("pipeline", help="data -> stage 1 -> stage 2 -> generated songs, in one run dir")
    pipe.add_argument("--preset", default="tiny",
                      help=f"a config of configs/: {', '.join(PRESETS)} (tiny: synthetic songs; pop909-*: real POP909)")
    pipe.add_argument("--config", type=Path, help="a YAML config instead of a preset")
    pipe.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run dir (default runs/tiny)")
    pipe.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE", help="override a config value")
    pipe.add_argument("--quiet", action="store_true", help="no progress bars")
    pipe.add_argument("--verbose", action="store_true", help="Ray Tune's trial tables and the libraries' start-up "
                                                             "messages as well")
    _add_rerun_options(pipe)
    pipe.set_defaults(handler=_pipeline)

    gen = commands.add_parser("generate", help="compose a song with the trained model and adapters")
    gen.add_argument("--run", type=Path, required=True, help="run dir with stage1/model and adapters/")
    gen.add_argument("--form", help="sections as label + bars, e.g. i4A8B8A8o4 (default: the --song's form, else "
                                    "the --prompt's plan)")
    gen.add_argument("--key", help="ROOT:maj or ROOT:min (default: the --song's key, else the --prompt's plan, "
                                   "else C:maj)")
    gen.add_argument("--metre", help="4/4, 3/4, 2/4, 12/8 or 6/8 (default: the --song's metre, else the --prompt's "
                                     "plan, else 4/4)")
    gen.add_argument("--tempo", type=int, help="base tempo, bpm (default: the --song's first tempo, else the "
                                               "--prompt's plan, else 100)")
    gen.add_argument("--prompt", help='the song in words, e.g. "a gentle ballad in 3/4, verse-chorus-verse": an '
                                      'instruct model plans form, key, metre and tempo (as musicray plan); the '
                                      'options above override the plan')
    gen.add_argument("--tempo-direction", choices=tuple(TEMPO_DIRECTIONS),
                     help=TEMPO_DIRECTION_HELP + " (default: the --prompt's plan, else steady)")
    gen.add_argument("--base", help="the instruct model that plans --prompt: a name (smollm2-135m-instruct) or a "
                                    "directory (default: the base the run was fine-tuned from)")
    gen.add_argument("--cache-dir", default="~/.cache/musicray", help="where a named --base is converted")
    gen.add_argument("--chords", type=Path, help="chords (file or inline): one per bar, cycled; C:maj,G:maj splits a bar")
    gen.add_argument("--melody", type=Path, help="your own melody (MIDI); its MELODY track replaces the melody stage")
    gen.add_argument("--song", type=Path,
                     help="a whole song (MIDI with MELODY, BRIDGE, PIANO tracks; chords from its chord markers): what "
                          "it has replaces its stages, e.g. with --stages dynamics tempo to perform it")
    gen.add_argument("--regenerate", metavar="LABELS",
                     help="infilling: rewrite the sections with these labels (e.g. B or A,B) of the --song; every "
                          "other bar stays as given, note for note")
    gen.add_argument("--regenerate-bars", metavar="RANGES",
                     help="infilling: rewrite these bars (1-based, e.g. 9-16 or 1-4,9) of the --song")
    gen.add_argument("--regenerate-tracks", nargs="+", metavar="TRACK",
                     help="infilling by track: rewrite only these of MELODY, BRIDGE, PIANO in the chosen bars (their "
                          "stages and dynamics run; PIANO is voiced anew from the chords); chords, tempo and the "
                          "other tracks stay as given")
    gen.add_argument("--continue", dest="continue_bars", metavar="BARS|FORM",
                     help="continue the --song: extend its form (--form, default the song's) by this many bars or "
                          "by a form string of the new part (e.g. B8A8) and compose only the new bars; every given "
                          "bar stays as it is, note for note")
    gen.add_argument("--stages", nargs="+", default=list(SUBTASKS), choices=SUBTASKS,
                     help="stages to run (with --regenerate: the parts rewritten in the chosen bars)")
    gen.add_argument("--variation", type=float,
                     help="how much a returning section varies its first occurrence, 0..1: 0 = every return "
                          "repeats it (chords, melodies, velocities), 1 = written anew (default: as the model "
                          "writes it)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--temperature", type=float,
                     help="0 = greedy (default 1; with no sampling option at all, each stage samples as the run's "
                          "evaluation did: the run config's eval.sampling)")
    gen.add_argument("--top-k", type=int, help="0 = no cut (default)")
    gen.add_argument("--top-p", type=float, help="1 = no cut (default)")
    _add_stage_sampling_option(gen, "instead of --temperature/--top-k/--top-p")
    gen.add_argument("--no-mask", action="store_true", help="ablation: decode without the grammar mask")
    gen.add_argument("--no-adapters", action="store_true", help="ablation: the stage-1 model for every stage")
    gen.add_argument("--allow-missing-adapters", action="store_true",
                     help="run a stage whose adapter the run lacks on the stage-1 model alone (refused otherwise)")
    gen.add_argument("--no-harmony-guard", action="store_true",
                     help="let the model leave the key: no chord, scale and register guard at generation")
    gen.add_argument("--stream", action="store_true",
                     help="compose on the vLLM engine and print each bar as it is generated (needs vllm)")
    gen.add_argument("--out", type=Path, required=True, help="output MIDI path (a .json report is written beside it)")
    _add_instrument_option(gen, "a track's instrument in the MIDI file")
    gen.set_defaults(handler=_generate)

    pl = commands.add_parser("plan", help="a song's plan (form, key, metre, tempo, tempo direction) from words, as "
                                          "JSON, written by an instruct model under the plan grammar")
    pl.add_argument("--prompt", required=True, help='the song in words, e.g. "a gentle ballad in 3/4, '
                                                    'verse-chorus-verse, slowing at the end"')
    planner = pl.add_mutually_exclusive_group()
    planner.add_argument("--base", help="an instruct base model: a name (smollm2-135m-instruct) or a directory "
                                        "(default: smollm2-135m-instruct)")
    planner.add_argument("--run", type=Path, help="a run dir: plan as its `generate --prompt` does, with the base "
                                                  "model it was fine-tuned from")
    pl.add_argument("--music-tuned", action="store_true",
                    help="with --run: plan with the run's stage-1 model itself (a full fine-tune on music tokens "
                         "loses most of the text skill: docs/results.md)")
    pl.add_argument("--cache-dir", default="~/.cache/musicray", help="where named base models are converted")
    pl.add_argument("--verbose", action="store_true", help="the libraries' start-up messages as well")
    pl.set_defaults(handler=_plan, base=None)

    ev = commands.add_parser("eval", help="evaluation report: generated vs real test songs, teacher-forced scores, "
                                          "ablations, plots")
    ev.add_argument("--run", type=Path, required=True, help="run dir with stage1/model and adapters/")
    ev.add_argument("--data", type=Path, required=True, help="the prepared data dir the run was trained on (its "
                                                             "test split is evaluated)")
    ev.add_argument("--out", type=Path, required=True, help="report dir: report.json, report.md, plots/, songs/")
    ev.add_argument("--songs", type=int, help="test songs to compose again, one window each (default: the run "
                                              "config's eval.songs)")
    ev.add_argument("--max-bars", type=int, help="bars per composed window (default: eval.max_bars)")
    ev.add_argument("--window", choices=("sections", "form"),
                    help="sections: whole sections up to --max-bars; form: the songs' first --max-bars bars, with a "
                         "returning section in them (default: eval.window)")
    ev.add_argument("--variation", type=float,
                    help="how much returning sections vary their first occurrence, 0..1 (default: eval.variation)")
    ev.add_argument("--max-examples", type=int, help="test examples per sub-task for the teacher-forced scores, "
                                                     "0 = all (default: eval.max_examples)")
    ev.add_argument("--batch-size", type=int, help="examples per forward pass (default: eval.batch_size)")
    ev.add_argument("--seed", type=int, help="seed of the first composed window (default: eval.seed)")
    _add_stage_sampling_option(ev, "for the composed windows (default: eval.sampling; other stages at temperature 1)")
    ev.add_argument("--guard-ablation", action=argparse.BooleanOptionalAction, default=None,
                    help="also compose the windows with the harmony guard off (default: eval.guard_ablation)")
    ev.add_argument("--sampling-ablation", action=argparse.BooleanOptionalAction, default=None,
                    help="also compose the windows with every stage at temperature 1 when the stage sampling sets "
                         "other values (default: eval.sampling_ablation)")
    ev.add_argument("--ablation-windows", type=int,
                    help="windows of the mask-off and single-stage ablations, the first N (default: "
                         "eval.ablation_windows, all)")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--quiet", action="store_true", help="no progress lines")
    ev.set_defaults(handler=_eval)

    # The render module keeps its top-level imports to the standard library, so its settings are cheap to show.
    from musicray.render import AUTO, DEFAULT_GAIN, DEFAULT_SAMPLE_RATE, RELEASE_TAIL_S, RENDERERS, SOUNDFONT_ENV

    ren = commands.add_parser("render", help="render a MIDI file to WAV with a General MIDI soundfont (FluidSynth "
                                             "if installed, else the pip-installed midirenderer)")
    ren.add_argument("midi", type=Path, help="MIDI file (e.g. from musicray generate)")
    ren.add_argument("--out", type=Path, required=True,
                     help=f"output WAV path: 16-bit stereo, as long as the song plus at most {RELEASE_TAIL_S:g} s of "
                          "release")
    ren.add_argument("--soundfont", type=Path,
                     help=f"a .sf2 soundfont (default: ${SOUNDFONT_ENV}, else the system's General MIDI soundfont, "
                          "else the TimGM6mb.sf2 that the pretty_midi package ships)")
    ren.add_argument("--renderer", choices=(AUTO, *RENDERERS), default=AUTO,
                     help="fluidsynth (the program, a system package; the better sound), midirenderer (a pip "
                          "package, installed with musicray) or auto: fluidsynth when on PATH, else midirenderer")
    ren.add_argument("--sample-rate", type=_audio_setting(int, 8000, 192000), default=DEFAULT_SAMPLE_RATE,
                     help=f"Hz (default {DEFAULT_SAMPLE_RATE})")
    ren.add_argument("--gain", type=_audio_setting(float, 0.01, 10), default=DEFAULT_GAIN,
                     help=f"master gain (FluidSynth's; midirenderer is scaled to match; default {DEFAULT_GAIN})")
    _add_instrument_option(ren, "play a track with this instrument instead of the file's")
    ren.set_defaults(handler=_render)

    export = commands.add_parser("export", help="write a song as a MusicXML score for a score editor (MuseScore...)")
    export.add_argument("song", type=Path,
                        help="a musicray MIDI file (its markers carry the chords, sections and key) or a song JSON "
                             "(the `song` of an HTTP answer)")
    export.add_argument("--musicxml", type=Path, required=True, help="output .musicxml path")
    export.add_argument("--lead-sheet", action="store_true",
                        help="only the MELODY staff with the chord symbols (default: the full score, three staves "
                             "MELODY, BRIDGE, PIANO); both have key and time signatures and a rehearsal mark per "
                             "section")
    export.set_defaults(handler=_export)

    train = commands.add_parser("train", help="stage 1: full fine-tune on Ray Train under DeepSpeed")
    train.add_argument("--config", type=Path, help="YAML config (default: the built-in defaults)")
    train.add_argument("--out", type=Path, required=True, help="run directory (RUN_DIR/stage1/model at the end)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set stage1.max_steps=100 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--verbose", action="store_true", help="the libraries' start-up messages as well")
    _add_rerun_options(train)
    train.set_defaults(handler=_train)

    from musicray.serve.config import DEFAULT_HOST, DEFAULT_PORT

    srv = commands.add_parser("serve", help="serve the composer over HTTP on Ray Serve (POST /v1/generate)")
    srv.add_argument("--run", type=Path, required=True, help="run dir with stage1/model and adapters/")
    srv.add_argument("--config", type=Path,
                     help="Serve config file (e.g. configs/serve/app.yaml: its args and http_options) or a "
                          "mapping of settings; default: the built-in defaults")
    srv.add_argument("--host", help=f"address to bind (default: the config's, else {DEFAULT_HOST})")
    srv.add_argument("--port", type=int, help=f"HTTP port (default: the config's, else {DEFAULT_PORT})")
    layout = srv.add_mutually_exclusive_group()
    layout.add_argument("--multiplexed", action="store_true", default=None,
                        help="one deployment holding the base model once with all five adapters (the default on a "
                             "local instance of fewer than 6 CPUs, unless the --config says otherwise, and under "
                             "--engine vllm)")
    layout.add_argument("--per-adapter", dest="multiplexed", action="store_false",
                        help="one deployment per sub-task, each with the model and its adapter")
    srv.add_argument("--engine", choices=("auto", "vllm", "native"),
                     help="vllm: vLLM's engine (continuous batching, multi-LoRA, streaming bars; pip install -e "
                          "\".[vllm]\"); native: musicray's own decoding loop; default: the config's, else auto "
                          "(vllm where installed)")
    srv.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    srv.set_defaults(handler=_serve)

    tune = commands.add_parser("tune", help="stage 2: one LoRA adapter per sub-task, all sweeps in one Ray Tune run")
    tune.add_argument("--config", type=Path, help="YAML config (default: the built-in defaults)")
    tune.add_argument("--out", type=Path, required=True, help="run dir holding stage1/model; adapters go here")
    tune.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                      help="override a config value (repeatable), e.g. --set stage2.max_steps=40")
    tune.add_argument("--quiet", action="store_true", help="no progress output")
    tune.add_argument("--verbose", action="store_true", help="Ray Tune's trial tables as well")
    tune.add_argument("--force", action="store_true",
                      help="sweep again even when adapters made with another config are in --out (they are replaced)")
    tune.set_defaults(handler=_tune)
    return parser


class CommandFailed(Exception):
    """A command that could not do its work for a reason outside the user's input (e.g. the synthesizer failed);
    reported as one line and exit status 1."""


def report_errors(handler, args: argparse.Namespace) -> int:
    """Run a command; a user error (bad input, missing file) is one line on stderr and exit status 2."""
    try:
        handler(args)
    except (SongError, FileNotFoundError) as err:
        print(f"musicray: error: {err}", file=sys.stderr)
        return 2
    except CommandFailed as err:
        print(f"musicray: error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``musicray ARGS``; a job script passes its command first (``main(["train", *sys.argv[1:]])``)."""
    args = build_parser().parse_args(argv)
    from musicray.quiet import quiet_libraries

    quiet_libraries(getattr(args, "verbose", False))   # before the command loads torch, transformers or Ray
    return report_errors(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())

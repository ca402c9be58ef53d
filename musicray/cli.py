"""The ``musicray`` command line: thin shells over the library."""

from __future__ import annotations

import argparse
import json
import sys

from musicray.song import SongError


def _data_prepare(args: argparse.Namespace) -> None:
    from musicray.data.pop909 import default_pop909_dir
    from musicray.data.prepare import Pop909Source, prepare

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


def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="musicray", description="Structured, expressive pop music with an LLM on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="prepare and inspect datasets").add_subparsers(dest="data_command",
                                                                                            required=True)
    prep = data.add_parser("prepare", help="ingest POP909 into Parquet tables of every task")
    prep.add_argument("--pop909", type=Path, help="POP909 folder (default: $POP909_DIR or ../shared/datasets/pop909)")
    prep.add_argument("--out", type=Path, required=True, help="output folder")
    prep.add_argument("--limit", type=int, help="only the first N songs")
    prep.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    prep.set_defaults(run=_data_prepare)

    synth = data.add_parser("synth", help="generate structured synthetic songs into Parquet tables of every task")
    synth.add_argument("--songs", type=int, default=200, help="number of songs")
    synth.add_argument("--seed", type=int, default=0, help="seed of the first song")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    synth.set_defaults(run=_data_synth)

    inspect = data.add_parser("inspect", help="print songs, sequence lengths, vocabulary coverage, skipped songs")
    inspect.add_argument("data_dir", type=Path)
    inspect.add_argument("--songs", type=int, default=5, help="songs to list")
    inspect.set_defaults(run=_data_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (SongError, FileNotFoundError) as err:
        print(f"musicray: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

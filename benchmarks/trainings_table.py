"""Several evaluation reports of the same preset side by side: the "Structure and key" table of each
(``musicray eval``'s ``report.json``), one column per training and per variant, the real songs of the same forms
once, each goal and whether each training meets it (its whole 95 % interval clears the goal).

    .venv/bin/python benchmarks/trainings_table.py "seed 0=runs/small-s0/eval" "seed 1=runs/small-s1/eval"

Prints a Markdown table (docs/results.md keeps it). The reports must have composed the same windows (the same
test songs, bars and seeds): the script refuses reports whose windows differ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from musicray.run import EvalDir


def _interval(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    if entry.get("low") is None:
        return f"{entry['mean']:.3g}"
    return f"{entry['mean']:.3g} [{entry['low']:.3g}, {entry['high']:.3g}]"


def _met(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "–"}[value]


def load(spec: str) -> tuple[str, dict]:
    label, _, folder = spec.partition("=")
    if not folder:
        raise SystemExit(f"{spec!r}: expected LABEL=REPORT_DIR")
    path = EvalDir(folder).report_json
    if not path.exists():
        raise SystemExit(f"{label}: no report at {path}")
    return label, json.loads(path.read_text())


def table(reports: list[tuple[str, dict]]) -> str:
    windows = [[(w["source_song"], w["form"], w["seed"]) for w in report["windows"]] for _, report in reports]
    if any(w != windows[0] for w in windows[1:]):
        raise SystemExit("the reports composed different windows; compare reports of the same eval settings")
    columns = []   # (header, report, variant label or None)
    for label, report in reports:
        columns.append((label, report, None))
        for variant in report["structure"].get("variants", {}):
            columns.append((f"{label}, {variant}", report, variant))
    first = reports[0][1]["structure"]["rows"]
    header = ["measure", "real (same forms)", *[c[0] for c in columns], "goal", *[f"met: {label}" for label, _ in reports]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(first):
        cells = [row["measure"], _interval(row["real"])]
        for _, report, variant in columns:
            mine = report["structure"]["rows"][i]
            cells.append(_interval(mine["generated"] if variant is None else mine["variants"][variant]["interval"]))
        cells.append(row["goal"] or "–")
        cells += [_met(report["structure"]["rows"][i]["met"]) for _, report in reports]
        lines.append("| " + " | ".join(cells) + " |")
    accuracy = ["real vs generated (classifier accuracy)", "–"]
    for _, report, variant in columns:
        value = report["structure"]["classifier"]["accuracy"] if variant is None else \
            report["structure"]["variants"][variant]
        accuracy.append("–" if value is None else f"{value:.2f}")
    lines.append("| " + " | ".join(accuracy + ["0.5 = indistinguishable"] + [""] * len(reports)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="LABEL=REPORT_DIR (musicray eval's --out)")
    args = parser.parse_args(argv)
    print(table([load(spec) for spec in args.reports]))


if __name__ == "__main__":
    main()

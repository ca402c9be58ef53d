"""``musicray data inspect DIR``: what a prepared dataset holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from musicray.data.prepare import load_report, load_table
from musicray.tokens import FAMILIES, TASKS, Vocabulary


def summarize(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    report = load_report(data_dir)
    vocab = Vocabulary.load(data_dir)
    songs = load_table(data_dir, "songs")
    lengths, used, samples = {}, Counter(), {}
    for task in TASKS:
        table = load_table(data_dir, task)
        if len(table):
            samples[task] = (table.song_id[0], vocab.describe(list(table.prompt[0])[:12]),
                             vocab.describe(list(table.target[0])[:16]))
        total = (table["prompt_len"] + table["target_len"]).to_numpy()
        lengths[task] = {f"p{q}": int(np.percentile(total, q)) for q in (50, 90, 99, 100)} if len(total) else {}
        lengths[task]["examples"] = len(table)
        for column in ("prompt", "target"):
            for ids in table[column]:
                used.update(np.unique(ids).tolist())
    coverage = {}
    for family in FAMILIES:
        ids = vocab.ids_of[family]
        coverage[family] = (sum(1 for i in ids if used[i]), len(ids))
    return {"report": report, "songs": songs, "lengths": lengths, "coverage": coverage, "vocab": vocab,
            "samples": samples}


def render(summary: dict, examples: int = 5) -> str:
    report, songs = summary["report"], summary["songs"]
    lines = [f"songs: {report['kept']} kept of {report['total']}  splits: "
             + ", ".join(f"{k} {v}" for k, v in report["splits"].items())]
    if report["skipped"]:
        lines.append("skipped by reason: " + ", ".join(f"{k} {v}" for k, v in report["skipped"].items()))
        for skipped in report["skipped_songs"][:examples]:
            lines.append(f"  {skipped['message']}")
    if len(songs):
        lines.append("metres: " + ", ".join(f"{k} {v}" for k, v in songs["metre"].value_counts().items()))
        lines.append("first songs:")
        for row in songs.head(examples).itertuples():
            lines.append(f"  {row.song_id:<12} {row.split:<10} {row.key:<7} {row.metre:<5} {row.base_tempo:>3} bpm "
                         f"{row.bars:>3} bars  {row.form}")
    lines.append("tokens (first of the prompt | first of the target, one song per task):")
    for task, (song_id, prompt, target) in summary["samples"].items():
        lines.append(f"  {task:<10} {song_id}: {prompt}.. | {target}..")
    lines.append("sequence length (prompt + target, tokens):")
    for task, stats in summary["lengths"].items():
        lines.append(f"  {task:<10} " + "  ".join(f"{k} {v}" for k, v in stats.items()))
    used = sum(u for u, _ in summary["coverage"].values())
    lines.append(f"vocabulary coverage: {used} of {len(summary['vocab'])} tokens used")
    lines.append("  " + ", ".join(f"{fam} {u}/{n}" for fam, (u, n) in summary["coverage"].items()))
    return "\n".join(lines)

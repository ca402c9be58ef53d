"""Are two prepared data folders the same? For checking that a change to the preparation job left its output alone.

Compares every Parquet table the job writes (``songs`` and one per task): the pandas frames must be equal (every
value, ``song_json`` and ``stats_json`` included, prompt and target token ids, dtypes and column order) and the
Arrow tables too, schema metadata included; ``vocabulary.json`` must be equal, and ``report.json`` less its
timing field (``seconds``).

    python benchmarks/compare_prepared.py OLD_DIR NEW_DIR

Prints one line per file and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from musicray.data.layout import SONGS_TABLE, DataDir
from musicray.tokens import TASKS

TIMING_FIELDS = ("seconds",)


def compare_table(old: Path, new: Path) -> str | None:
    """None if equal, else what differs."""
    import pandas as pd
    import pyarrow.parquet as pq

    old_frame, new_frame = pd.read_parquet(old), pd.read_parquet(new)
    try:
        pd.testing.assert_frame_equal(old_frame, new_frame, check_exact=True)
    except AssertionError as err:
        return str(err).splitlines()[0] + " ..."
    # Lists of token ids come back as arrays, which assert_frame_equal compares as objects: compare them one by one.
    for column in old_frame.columns:
        if old_frame[column].dtype == object and len(old_frame) and hasattr(old_frame[column].iloc[0], "tolist"):
            for row, (a, b) in enumerate(zip(old_frame[column], new_frame[column])):
                if a.tolist() != b.tolist():
                    return f"column {column}, row {row} differs"
    if not pq.read_table(old).equals(pq.read_table(new), check_metadata=True):
        return "Arrow tables differ (schema or metadata)"
    return None


def compare_json(old: Path, new: Path, ignore: tuple[str, ...] = ()) -> str | None:
    a, b = (json.loads(path.read_text()) for path in (old, new))
    for field in ignore:
        a.pop(field, None)
        b.pop(field, None)
    if a == b:
        return None
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return f"fields differ: {keys}"


def compare(old_dir: Path, new_dir: Path) -> dict[str, str | None]:
    """File name -> None (equal) or what differs."""
    results = {}
    old, new = DataDir(old_dir), DataDir(new_dir)
    for name in (SONGS_TABLE, *TASKS):
        results[new.table(name).name] = compare_table(old.table(name), new.table(name))
    results[new.vocabulary.name] = compare_json(old.vocabulary, new.vocabulary)
    results[new.report.name] = compare_json(old.report, new.report, TIMING_FIELDS)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="a prepared data folder")
    parser.add_argument("new", type=Path, help="another one")
    args = parser.parse_args(argv)
    results = compare(args.old, args.new)
    for name, difference in results.items():
        print(f"{name}: {'identical' if difference is None else 'DIFFERS: ' + difference}")
    sys.exit(0 if all(d is None for d in results.values()) else 1)


if __name__ == "__main__":
    main()

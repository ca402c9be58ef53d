"""Dataset preparation on Ray: songs -> quantized songs -> examples of every task -> Parquet tables.

The output directory's layout is ``musicray.data.layout.DataDir``'s: the songs table (one row per kept song: id,
split, key, metre, form, counts, the song as JSON), whole-song sequences (stage 1), one table per sub-task, the
vocabulary, and the report (total, kept, skipped songs by reason with each song's message, split sizes, the kept
songs' bars and notes and what was dropped inside them by reason).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from musicray.data.layout import SONGS_TABLE, DataDir
from musicray.encoding import SongTokens
from musicray.quantize import CANONICAL_FORMAT, quantized
from musicray.song import TRACKS, Song, SongError, song_to_dict
from musicray.tokens import TASKS, Vocabulary

SPLITS: tuple[tuple[str, float], ...] = (("train", 0.90), ("validation", 0.05), ("test", 0.05))


def split_of(song_id: str) -> str:
    """Deterministic split from the song id alone, so a song never changes split when others are skipped."""
    fraction = int(hashlib.sha256(song_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    cumulative = 0.0
    for name, share in SPLITS:
        cumulative += share
        if fraction < cumulative:
            return name
    return SPLITS[-1][0]


# A source of songs: ``ids()``, ``load(song_id)`` (a checked Song and its stats, or SongError),
# ``split_key(song_id)``: what ``split_of`` hashes for the song, and ``for_workers()``: the source as the Ray tasks
# get it (with what the driver has read once for all songs).
@dataclass(frozen=True)
class Pop909Source:
    root: str
    # index.xlsx's metre fields by song id (``pop909.metre_rows``); None: each process reads the index itself.
    metres: dict[str, dict] | None = field(default=None, repr=False, compare=False)

    def ids(self) -> list[str]:
        from musicray.data.pop909 import song_ids

        return song_ids(Path(self.root))

    def split_key(self, song_id: str) -> str:
        return song_id

    def for_workers(self) -> "Pop909Source":
        from musicray.data.pop909 import metre_rows

        return replace(self, metres=metre_rows(Path(self.root)))

    def load(self, song_id: str) -> tuple[Song, dict]:
        from musicray.data.pop909 import load_song

        return load_song(Path(self.root), song_id, self.metres.get(song_id) if self.metres else None)


@dataclass(frozen=True)
class SynthSource:
    songs: int
    seed: int = 0

    def ids(self) -> list[str]:
        return [f"synth-{self.seed + i:04d}" for i in range(self.songs)]

    def split_key(self, song_id: str) -> str:
        return song_id

    def for_workers(self) -> "SynthSource":
        return self

    def load(self, song_id: str) -> tuple[Song, dict]:
        from musicray.data.synth import synth_song

        return synth_song(int(song_id.split("-")[1]), song_id), {}


@contextlib.contextmanager
def cyclic_gc_paused():
    """Python's cyclic garbage collector off for a while. Preparing a song allocates tens of thousands of
    objects (Notes, their dicts, lists) that reference counting frees; with the collector on, those allocations
    trigger collections that scan everything alive, which was a quarter of the CPU per POP909 song."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def prepare_one(source, song_id: str, vocab: Vocabulary) -> dict:
    """Everything the tables need from one song, or the reason it was skipped. Never raises SongError."""
    with cyclic_gc_paused():
        return _prepare_one(source, song_id, vocab)


def _prepare_one(source, song_id: str, vocab: Vocabulary) -> dict:
    try:
        song, stats = source.load(song_id)  # a checked song: both sources call Song.check
        canonical = quantized(song, vocab)
        # The song is canonical already: encoding it as it is (not through ``encode``, which quantizes again)
        # gives the same examples, quantization being idempotent. One SongTokens shares the work of the six.
        tokens = SongTokens(canonical, vocab)
        examples = [tokens.example(task) for task in TASKS]
    except SongError as err:
        return {"song_id": song_id, "skipped": getattr(err, "reason", "invalid_song"), "message": str(err)}
    split = split_of(source.split_key(song_id))
    song_row = {
        "song_id": song_id, "split": split, "key": canonical.key, "metre": canonical.metre,
        "form": canonical.form, "bars": canonical.n_bars, "base_tempo": tokens.bpm,
        **{f"{name.lower()}_notes": len(notes) for name, notes in canonical.tracks.items()},
        "chords": len(canonical.chords), "song_json": json.dumps(song_to_dict(canonical)),
        "stats_json": json.dumps(stats, default=float),
    }
    rows = {ex.task: {"song_id": song_id, "split": split, "prompt": token_array(ex.prompt),
                      "target": token_array(ex.target), "prompt_len": len(ex.prompt), "target_len": len(ex.target)}
            for ex in examples}
    return {"song_id": song_id, "song": song_row, "examples": rows}


def token_array(ids: list[int]) -> np.ndarray:
    """Token ids as int64, the type of the tables' list columns. Arrays, not lists of Python ints: they pickle
    from a Ray worker to the driver and convert to Arrow in bulk; with lists, unpickling the results and
    building the tables took the driver about 10 s of the 2 cores for POP909 (docs/benchmarks.md)."""
    return np.array(ids, dtype=np.int64)


@ray.remote
def _prepare_chunk(source, song_ids: list[str], vocab_json: dict) -> list[dict]:
    from musicray.tokens import VocabConfig

    vocab = Vocabulary(VocabConfig(**vocab_json["config"]))
    return [prepare_one(source, song_id, vocab) for song_id in song_ids]


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster this process was started on (``ray job submit``), else start a local one."""
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


def prepare(source, out: str | Path, vocab: Vocabulary | None = None, limit: int | None = None,
            chunk_size: int = 8, num_cpus: int | None = None, progress: bool = True) -> dict:
    """Prepare every song of ``source`` in parallel Ray tasks and write the tables; returns the report."""
    vocab = vocab or Vocabulary()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = source.ids()[:limit] if limit else source.ids()
    started = time.perf_counter()
    ensure_ray(num_cpus)
    vocab_json = vocab.to_json()
    source = ray.put(source.for_workers())   # once in the object store, not pickled into every task
    pending = [_prepare_chunk.remote(source, ids[i:i + chunk_size], vocab_json) for i in range(0, len(ids), chunk_size)]
    results: list[dict] = []
    with tqdm(total=len(ids), desc="prepare", unit="song", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            chunk = ray.get(done[0])
            results += chunk
            bar.update(len(chunk))
    results.sort(key=lambda r: r["song_id"])
    report = write_tables(results, out, vocab)
    report["seconds"] = round(time.perf_counter() - started, 2)
    DataDir(out).report.write_text(json.dumps(report, indent=1))
    return report


def write_tables(results: list[dict], out: Path, vocab: Vocabulary) -> dict:
    import pandas as pd   # here and in load_table only: the Ray workers, which import this module, never need it

    data = DataDir(out)
    kept = [r for r in results if "song" in r]
    skipped = [r for r in results if "skipped" in r]
    pd.DataFrame([r["song"] for r in kept]).to_parquet(data.songs, index=False)
    for task in TASKS:
        pd.DataFrame([r["examples"][task] for r in kept]).to_parquet(data.table(task), index=False)
    vocab.save(data.vocabulary)
    splits = Counter(r["song"]["split"] for r in kept)
    # What a source dropped inside the songs it kept, by reason (a source's stats may say, as ``dropped``).
    dropped: Counter = Counter()
    for r in kept:
        dropped.update(json.loads(r["song"]["stats_json"]).get("dropped", {}))
    return {
        "canonical_format": CANONICAL_FORMAT,
        "total": len(results),
        "kept": len(kept),
        "kept_bars": int(sum(r["song"]["bars"] for r in kept)),
        "kept_notes": int(sum(r["song"][f"{name.lower()}_notes"] for r in kept for name in TRACKS)),
        "dropped_in_kept_songs": dict(sorted(dropped.items())),
        "skipped": dict(sorted(Counter(r["skipped"] for r in skipped).items())),
        "skipped_songs": [{k: r[k] for k in ("song_id", "skipped", "message")} for r in skipped],
        "splits": {name: splits.get(name, 0) for name, _ in SPLITS},
        "tables": [SONGS_TABLE, *TASKS],
    }


def load_report(data_dir: str | Path) -> dict:
    return json.loads(DataDir(data_dir).report.read_text())


def load_table(data_dir: str | Path, name: str, split: str | None = None) -> "pandas.DataFrame":
    """A prepared table ("songs" or a task), optionally one split only."""
    import pandas as pd

    path = DataDir(data_dir).table(name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such table; run `musicray data prepare` or `musicray data synth` first")
    table = pd.read_parquet(path)
    return table[table["split"] == split].reset_index(drop=True) if split else table

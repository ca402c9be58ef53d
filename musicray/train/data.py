"""Training examples: prepared songs -> section windows -> task examples -> chat-rendered token ids."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from musicray.data.layout import DataDir
from musicray.data.prepare import Pop909Source, SynthSource, load_table, prepare
from musicray.encoding import encode_quantized
from musicray.grammar import Plan
from musicray.model import MusicTokenizer
from musicray.quantize import CANONICAL_FORMAT
from musicray.song import SongError, song_from_dict
from musicray.streams import TASK_TARGET, Example, available_inputs
from musicray.train.config import DEFAULT_MAX_BARS, Config
from musicray.windows import section_windows


def resolve_data_dir(config: Config, progress: bool = True) -> Path:
    """The prepared data the config names; synthetic and POP909 data are prepared once into the cache."""
    data = config.data
    cache = Path(config.cache_dir).expanduser() / "data"
    if data.source == "synth":
        out = cache / f"synth-{data.songs}-{data.seed}"
        source = SynthSource(data.songs, data.seed)
    elif data.source == "pop909":
        from musicray.data.pop909 import default_pop909_dir

        out = cache / f"pop909-{data.limit or 'all'}"
        source = Pop909Source(str(default_pop909_dir()))
    else:
        out = Path(data.source).expanduser()
        if not DataDir(out).is_prepared():
            raise SongError(f"data.source: {out} is not a prepared data dir (no {DataDir(out).songs.name}); "
                            "use synth, pop909 or run `musicray data prepare`")
        return out
    report = DataDir(out).report
    if not report.exists() or json.loads(report.read_text()).get("canonical_format") != CANONICAL_FORMAT:
        prepare(source, out, limit=data.limit, progress=progress)   # absent, or cached by an older musicray
    return out


def load_examples(data_dir: str | Path, tasks: list[str], split: str, vocab, max_bars: int | None = DEFAULT_MAX_BARS,
                  songs: int | None = None) -> list[Example]:
    """Examples of ``tasks`` from every section window of every song in ``split`` (the first ``songs`` only,
    if given); a task with optional inputs (``OPTIONAL_INPUTS``: chords for a given melody) gets one example
    without them and one with each."""
    examples = []
    table = load_table(data_dir, "songs", split)
    for row in (table.head(songs) if songs else table).itertuples():
        song = song_from_dict(json.loads(row.song_json))
        for window in section_windows(song, max_bars):
            for task in tasks:
                examples.append(encode_quantized(window, task, vocab))
                examples += [encode_quantized(window, task, vocab, (name,)) for name in available_inputs(window, task)]
    return examples


def validation_examples(data_dir: str | Path, tasks: list[str], vocab, max_bars: int | None = DEFAULT_MAX_BARS
                        ) -> tuple[list[Example], str | None]:
    """The validation split's examples, and why there are none when there are none (no prepared table, or no
    song in the split): training goes on without a validation loss, and whoever trains says so."""
    try:
        examples = load_examples(data_dir, tasks, "validation", vocab, max_bars)
    except FileNotFoundError as err:
        return [], str(err)
    return examples, None if examples else f"{data_dir} has no songs in its validation split"


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    answer_start: int
    stream: str
    plan: Plan
    prompt: list[int]     # the example's prompt in music ids (the context its answer is read against)


class RenderedDataset(torch.utils.data.Dataset):
    """Chat-rendered examples cut to ``max_length``; examples whose prompt leaves no room are dropped. With
    ``train_on_inputs`` the prompts' music tokens are labelled too (``MusicTokenizer.render``)."""

    def __init__(self, examples: list[Example], music: MusicTokenizer, max_length: int,
                 train_on_inputs: bool = False):
        self.items: list[Rendered] = []
        self.dropped = 0
        for example in examples:
            input_ids, labels = music.render(example, train_on_inputs)
            start = len(input_ids) - len(example.target) - 1   # the answer's first token
            if start >= max_length - 1:
                self.dropped += 1
                continue
            self.items.append(Rendered(input_ids[:max_length], labels[:max_length], start,
                                       TASK_TARGET[example.task], Plan.from_prompt(example.prompt, music.vocab),
                                       example.prompt))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Rendered:
        return self.items[index]


def collate(items: list[Rendered], pad_id: int) -> dict:
    """Right-padded tensors plus what the grammar-masked loss needs (streams, plans, answer starts)."""
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[i, :n] = torch.tensor(item.input_ids)
        labels[i, :n] = torch.tensor(item.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "answer_start": torch.tensor([item.answer_start for item in items]),
            "streams": [item.stream for item in items], "plans": [item.plan for item in items],
            "tokens": int(attention_mask.sum())}


# Rows still open to new examples while packing: first-fit over these fills rows to ~95 % where next-fit (one open
# row) leaves a third empty when examples are long against max_length; bounded, so packing stays linear.
OPEN_ROWS = 64


def pack(items: list[Rendered], max_length: int) -> list[list[Rendered]]:
    """Whole items, in their order, into rows of at most ``max_length`` tokens: each goes into the first of the
    ``OPEN_ROWS`` newest rows with room for it, else starts a row."""
    rows: list[list[Rendered]] = []
    room: list[int] = []
    for item in items:
        n = len(item.input_ids)
        first_open = max(0, len(rows) - OPEN_ROWS)
        row = next((r for r in range(first_open, len(rows)) if room[r] >= n), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(item)
        room[row] -= n
    return rows


def collate_packed(rows: list[list[Rendered]], pad_id: int) -> dict:
    """Packed rows: each row holds several examples back to back, ``position_ids`` restart at 0 for each, and no
    ``attention_mask`` is given, so the model attends within each example only (transformers reads the segments
    from the positions). The padding at a row's end is one more segment, unlabelled. ``segment_rows`` and
    ``answer_start`` (a position in its row) place each example for the grammar-masked loss."""
    length = max(sum(len(item.input_ids) for item in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    segment_rows, answer_start, streams, plans = [], [], [], []
    for r, row in enumerate(rows):
        at = 0
        for item in row:
            n = len(item.input_ids)
            input_ids[r, at:at + n] = torch.tensor(item.input_ids)
            labels[r, at:at + n] = torch.tensor(item.labels)
            position_ids[r, at:at + n] = torch.arange(n)
            segment_rows.append(r)
            answer_start.append(at + item.answer_start)
            streams.append(item.stream)
            plans.append(item.plan)
            at += n
        position_ids[r, at:] = torch.arange(length - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
            "segment_rows": torch.tensor(segment_rows), "answer_start": torch.tensor(answer_start),
            "streams": streams, "plans": plans, "tokens": sum(len(item.input_ids) for row in rows for item in row)}


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s permutation of ``size`` examples, the same on every rank."""
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def shuffled_batches(dataset: RenderedDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """An endless, seeded stream of batches; epoch e is a permutation shared by all ranks, split by rank."""
    epoch = 0
    while True:
        mine = epoch_order(len(dataset), seed, epoch)[rank::world_size]
        for start in range(0, len(mine) - batch_size + 1, batch_size):
            yield [dataset[i] for i in mine[start:start + batch_size]]
        epoch += 1


def packed_batches(dataset: RenderedDataset, rows_per_batch: int, max_length: int, seed: int, rank: int = 0,
                   world_size: int = 1):
    """An endless, seeded stream of batches of packed rows (``pack``): epoch e's permutation (as in
    ``shuffled_batches``) packed into rows, the rows split by rank. Every row is nearly full, so the ranks' steps
    cost about the same whatever the examples' lengths."""
    epoch = 0
    while True:
        mine = pack([dataset[i] for i in epoch_order(len(dataset), seed, epoch)], max_length)[rank::world_size]
        for start in range(0, len(mine) - rows_per_batch + 1, rows_per_batch):
            yield mine[start:start + rows_per_batch]
        epoch += 1


def collated_batches(dataset: RenderedDataset, batch_size: int, seed: int, rank: int, world_size: int, pad_id: int,
                     packed_length: int | None = None):
    """The training stream of collated batches: ``batch_size`` padded examples (``shuffled_batches``), or, with
    ``packed_length``, ``batch_size`` rows of that many tokens packed with whole examples (``packed_batches``)."""
    if packed_length is None:
        for items in shuffled_batches(dataset, batch_size, seed, rank, world_size):
            yield collate(items, pad_id)
    else:
        for rows in packed_batches(dataset, batch_size, packed_length, seed, rank, world_size):
            yield collate_packed(rows, pad_id)

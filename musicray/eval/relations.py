"""Teacher-forced relation scores: does a model put its probability where music puts its notes?

Per answer position of held-out examples (the training pipeline's own, ``musicray.train.data``):

* melody pitches: the share of the probability given to pitch tokens that lands on the sounding chord's tones
  (``chord_tone_mass``) and on the key's scale (``scale_mass``), whatever the language writes pitches as;
* bar tempi: the probability of keeping the previous bar's tempo (``tempo_hold``), counting every token that
  decodes to it (``<TempoChange_0>``, or ``<Tempo_x>`` with x the previous tempo);
* chords: the share of the probability given to chord tokens that lands on chords whose tones are all in the key's
  scale (``diatonic_chord_mass``), at the positions where the real song writes a chord (not ``N``).

And one relation of form (``return_copy_scores``), on melody examples whose window holds a returning section: the
probability of the real next token inside each *copyable* bar (a bar of a returning melodic section whose tokens
repeat the same bar of the label's first occurrence exactly) against the same bars' first occurrences, where
nothing earlier in the window tells the model what comes. A model that reads a section's return off its first
occurrence (the copying a pretrained LLM's attention does for text) gives the copyable bars far more.

Each score comes with the same share for the real next tokens (``real_*``), the value a model that had learnt the
relation exactly would give. These are the figures behind docs/results.md's relative-vs-absolute comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from musicray.encoding import SoundingChords, decode_body
from musicray.harmony import chord_label, chord_pitch_classes, reference_pitch_class, scale_pitch_classes
from musicray.model import MusicTokenizer
from musicray.song import TRACKS, Song, Tempo, form_returns
from musicray.streams import decode_header
from musicray.train.data import RenderedDataset, collate


@dataclass
class RelationScores:
    chord_tone_mass: float | None
    scale_mass: float | None
    tempo_hold: float | None
    real_chord_tone: float | None
    real_in_scale: float | None
    real_tempo_hold: float | None
    pitch_positions: int
    tempo_positions: int
    diatonic_chord_mass: float | None = None
    real_diatonic_chord: float | None = None
    chord_positions: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CopyScores:
    copy_p: float | None            # mean probability of the real next token inside copyable bars
    first_p: float | None           # the same inside those bars' first occurrences
    copy_accuracy: float | None     # share of copyable-bar tokens the model ranks first
    first_accuracy: float | None
    copy_positions: int
    first_positions: int
    returning_bars: int             # complete bars of returning melodic sections in all the examples
    copyable_bars: int              # of which repeat their first occurrence token for token
    examples: int                   # the examples scored (those with a copyable bar, at most max_examples)

    def to_dict(self) -> dict:
        return asdict(self)


def _context_song(item_prompt: list[int], music: MusicTokenizer) -> Song:
    """The song an example's prompt describes (its inputs decoded in order, as ``encoding.decode`` does)."""
    vocab = music.vocab
    header = decode_header(item_prompt, vocab)
    song = Song("context", header.key, header.metre, header.sections, tracks={name: [] for name in TRACKS},
                tempos=[Tempo(0, 0, float(header.bpm))])
    for name, ids in header.inputs.items():
        decode_body(ids, name, song, vocab)
    return song


def _pitch_classes_of_pitch_tokens(music: MusicTokenizer, reference: int) -> torch.Tensor:
    """[pitch tokens]: the pitch class each ``Pitch`` token stands for under ``reference``."""
    values = torch.tensor([music.vocab.value[i] for i in music.vocab.ids_of["Pitch"]])
    shift = reference if music.vocab.config.pitch == "chord" else 0
    return (values + shift) % 12


def _diatonic_chord_tokens(music: MusicTokenizer, key: str) -> torch.Tensor:
    """[chord tokens]: whether each ``Chord`` token of ``key`` has all its tones in the key's scale."""
    vocab, scale = music.vocab, set(scale_pitch_classes(key))
    return torch.tensor([set(chord_pitch_classes(chord_label(vocab.chord_root(i, key), vocab.chord_quality(i))))
                         <= scale for i in vocab.ids_of["Chord"]])


@torch.no_grad()
def relation_scores(model, music: MusicTokenizer, melody: RenderedDataset | None, tempo: RenderedDataset | None,
                    batch_size: int = 4, chord: RenderedDataset | None = None) -> RelationScores:
    """Scores over a melody-task, a tempo-task and a chord-task dataset (any may be None)."""
    vocab = music.vocab
    device = next(model.parameters()).device
    model.eval()
    pitch_ids = torch.tensor(vocab.ids_of["Pitch"]) + music.offset
    tempo_ids = torch.tensor(vocab.ids_of["Tempo"]) + music.offset
    change_ids = torch.tensor(vocab.ids_of["TempoChange"]) + music.offset
    chord_ids = torch.tensor(vocab.ids_of["Chord"]) + music.offset
    chord_index = {token: k for k, token in enumerate(vocab.ids_of["Chord"])}
    sums = {"chord": 0.0, "scale": 0.0, "hold": 0.0, "real_chord": 0, "real_scale": 0, "real_hold": 0,
            "diatonic": 0.0, "real_diatonic": 0}
    n_pitch = n_tempo = n_chord = 0
    diatonic_by_key: dict[str, torch.Tensor] = {}   # a key's chord tokens in its scale, built once per key
    pad = music.tokenizer.pad_token_id if music.tokenizer.pad_token_id is not None else music.eot_id
    for dataset, kind in ((melody, "melody"), (tempo, "tempo"), (chord, "chord")):
        if dataset is None:
            continue
        for start in range(0, len(dataset), batch_size):
            items = dataset.items[start:start + batch_size]
            batch = collate(items, pad)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
            probs = torch.softmax(logits, dim=-1)
            for row, item in enumerate(items):
                song = _context_song(item.prompt, music)
                sounding = SoundingChords(song.chords)
                scale = set(scale_pitch_classes(song.key))
                if kind == "chord" and song.key not in diatonic_by_key:
                    diatonic_by_key[song.key] = _diatonic_chord_tokens(music, song.key)
                diatonic = diatonic_by_key.get(song.key)
                bar, position, bpm = -1, 0, None
                for t in range(item.answer_start, len(item.input_ids)):
                    token = item.input_ids[t]
                    if not music.is_music(token):
                        continue
                    music_id = token - music.offset
                    family, value = vocab.family[music_id], vocab.value[music_id]
                    p = probs[row, t - 1]   # the distribution this token was drawn from
                    if family == "Bar":
                        bar, position = bar + 1, 0
                    elif family == "Pos":
                        position = value
                    elif family == "Pitch" and kind == "melody":
                        chord = sounding.at(bar, position)
                        tones = set(chord_pitch_classes(chord)) if chord else set()
                        if not tones:
                            continue
                        reference = reference_pitch_class(chord, song.key)
                        classes = _pitch_classes_of_pitch_tokens(music, reference)
                        mass = p[pitch_ids]
                        total = float(mass.sum())
                        if total <= 0:
                            continue
                        on_chord = torch.tensor([int(c) in tones for c in classes])
                        in_scale = torch.tensor([int(c) in scale for c in classes])
                        sums["chord"] += float(mass[on_chord].sum()) / total
                        sums["scale"] += float(mass[in_scale].sum()) / total
                        true_class = int(classes[value])
                        sums["real_chord"] += true_class in tones
                        sums["real_scale"] += true_class in scale
                        n_pitch += 1
                    elif family == "Chord" and kind == "chord":
                        mass = p[chord_ids]
                        total = float(mass.sum())
                        if total > 0:
                            sums["diatonic"] += float(mass[diatonic].sum()) / total
                            sums["real_diatonic"] += bool(diatonic[chord_index[music_id]])
                            n_chord += 1
                    elif family in ("Tempo", "TempoChange") and kind == "tempo":
                        new_bpm = value if family == "Tempo" else (bpm or 0) + value
                        if bpm is not None:
                            total = float(p[tempo_ids].sum() + p[change_ids].sum())
                            hold = float(p[change_ids[vocab.config.max_tempo_change]])
                            if vocab.config.tempo_min <= bpm <= vocab.config.tempo_max:
                                hold += float(p[tempo_ids[bpm - vocab.config.tempo_min]])
                            if total > 0:
                                sums["hold"] += hold / total
                                sums["real_hold"] += new_bpm == bpm
                                n_tempo += 1
                        bpm = new_bpm

    def mean(key: str, n: int) -> float | None:
        return round(sums[key] / n, 4) if n else None

    return RelationScores(mean("chord", n_pitch), mean("scale", n_pitch), mean("hold", n_tempo),
                          mean("real_chord", n_pitch), mean("real_scale", n_pitch), mean("real_hold", n_tempo),
                          n_pitch, n_tempo, mean("diatonic", n_chord), mean("real_diatonic", n_chord), n_chord)


def _bars_of_answer(item, music: MusicTokenizer) -> tuple[dict[int, list[int]], dict[int, list[int]], set[int]]:
    """(positions, token ids, complete bars) per bar of an example's answer: the positions after each ``Bar``
    token up to the next; a bar is complete when a later ``Bar`` or the answer's end token follows it (a row cut at
    ``max_length`` leaves its last bar incomplete)."""
    positions: dict[int, list[int]] = {}
    tokens: dict[int, list[int]] = {}
    complete: set[int] = set()
    bar = -1
    for t in range(item.answer_start, len(item.input_ids)):
        token = item.input_ids[t]
        if not music.is_music(token):
            break
        family = music.vocab.family[token - music.offset]
        if family == "Bar":
            if bar >= 0:
                complete.add(bar)
            bar += 1
            positions[bar], tokens[bar] = [], []
        elif family == "End":
            if bar >= 0:
                complete.add(bar)
            break
        elif bar >= 0:
            positions[bar].append(t)
            tokens[bar].append(token)
    return positions, tokens, complete


def copyable_bars(item, music: MusicTokenizer) -> tuple[list[tuple[int, int]], int]:
    """([(returning bar, its first occurrence's bar)] whose tokens agree exactly and are not empty, the number of
    complete returning bars) of a melody example: the bars ``form_returns`` matches with the label's first
    occurrence, in melodic (upper-case) sections."""
    return _copyable(item, music, _bars_of_answer(item, music))


def _copyable(item, music: MusicTokenizer, bars) -> tuple[list[tuple[int, int]], int]:
    """``copyable_bars`` of an answer already cut into bars (``_bars_of_answer``)."""
    _, tokens, complete = bars
    sections = decode_header(item.prompt, music.vocab).sections
    label_of_bar = [section.label for section in sections for _ in range(section.bars)]
    pairs, returning = [], 0
    for bar, earlier in form_returns(sections):
        if label_of_bar[bar].isupper() and bar in complete and earlier in complete:
            returning += 1
            if tokens[bar] and tokens[bar] == tokens[earlier]:
                pairs.append((bar, earlier))
    return pairs, returning


@torch.no_grad()
def return_copy_scores(model, music: MusicTokenizer, melody: RenderedDataset, batch_size: int = 4,
                       max_examples: int | None = None) -> CopyScores:
    """``CopyScores`` over the melody examples of ``melody`` that hold a copyable bar (the first ``max_examples``
    of them); ``returning_bars`` and ``copyable_bars`` count every example's (what the data holds)."""
    device = next(model.parameters()).device
    model.eval()
    pad = music.tokenizer.pad_token_id if music.tokenizer.pad_token_id is not None else music.eot_id
    parsed = [(item, _bars_of_answer(item, music)) for item in melody.items]
    found = [(item, bars[0], *_copyable(item, music, bars)) for item, bars in parsed]
    returning_total = sum(returning for *_, returning in found)
    copyable_total = sum(len(pairs) for _, _, pairs, _ in found)
    scored = [(item, positions, pairs) for item, positions, pairs, _ in found if pairs][:max_examples]
    sums = {"copy": 0.0, "first": 0.0, "copy_top": 0, "first_top": 0}
    counts = {"copy": 0, "first": 0}
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        batch = collate([item for item, _, _ in chunk], pad)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
        probs = torch.softmax(logits, dim=-1)
        for row, (item, positions, pairs) in enumerate(chunk):
            # A first occurrence copied by two later sections counts once.
            bars = {"copy": [bar for bar, _ in pairs], "first": sorted({earlier for _, earlier in pairs})}
            for kind, kind_bars in bars.items():
                for t in (t for bar in kind_bars for t in positions[bar]):
                    p = probs[row, t - 1]   # the distribution this token was drawn from
                    sums[kind] += float(p[item.input_ids[t]])
                    sums[f"{kind}_top"] += int(p.argmax()) == item.input_ids[t]
                    counts[kind] += 1

    def mean(key: str, kind: str) -> float | None:
        return round(sums[key] / counts[kind], 4) if counts[kind] else None

    return CopyScores(mean("copy", "copy"), mean("first", "first"), mean("copy_top", "copy"),
                      mean("first_top", "first"), counts["copy"], counts["first"], returning_total, copyable_total,
                      len(scored))

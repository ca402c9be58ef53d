"""The music vocabulary: token families, their values, binning of expression, JSON save/load.

Every token is a string such as ``<Bar>`` or ``<Pos_12>`` that cannot collide with text, and becomes one added
token of a Hugging Face tokenizer. Run ``python -m musicray.tokens`` to print the layout.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from musicray.errors import SongError
from musicray.harmony import (CANONICAL_BASS_DEGREES, CHORD_QUALITIES, DEGREE_NAMES, KEY_MODES, NO_CHORD,
                              PITCH_CLASS_NAMES, parse_key)
from musicray.song import MAX_SECTION_BARS, METRES, SECTION_LABELS, TRACKS

SUBTASKS: tuple[str, ...] = ("chord", "melody", "secondary", "dynamics", "tempo")
TASKS: tuple[str, ...] = ("song",) + SUBTASKS
# What a prompt may carry as input for a sub-task: the chords, the main melody, or all notes (for dynamics).
INPUTS: tuple[str, ...] = ("chord", "melody", "notes")


# How chords, pitches and bar tempi are written (docs/tokens.md, "The relative language"). The relative choices
# write musical relations into the tokens (chord tone, key, steady tempo), so that a model that learns token
# frequencies learns those relations; docs/results.md measures them against the absolute ones.
LANGUAGE_CHOICES: dict[str, tuple[str, ...]] = {
    "chords": ("relative_major", "degree", "absolute"),
    "pitch": ("chord", "absolute"),
    "tempo": ("change", "absolute"),
}
# What vocabularies saved before the language fields existed wrote.
LEGACY_LANGUAGE = {"chords": "absolute", "pitch": "absolute", "tempo": "absolute"}
# How velocities are written: as MIDI velocities, or relative to the track's usual level (docs/tokens.md).
VELOCITY_CHOICES: tuple[str, ...] = ("absolute", "track")
# POP909's train split (785 songs): mean note velocity MELODY 95.7, BRIDGE 88.5, PIANO 81.2, all notes 85.2; each
# track's offset is its mean less the mean of all notes, rounded.
POP909_TRACK_VELOCITY_OFFSETS: tuple[int, ...] = (10, 3, -4)
# Relative pitches are semitones above a reference pitch class 0..11, so 0..116 keeps every absolute pitch in
# 0..127; MIDI pitches 11..116 are representable under any reference (others are moved by octaves).
RELATIVE_PITCH_MAX = 116
REPRESENTABLE_PITCHES = (11, 116)


@dataclass(frozen=True)
class VocabConfig:
    """Sizes, bins and language of the vocabulary. Saved with every dataset and model; changing it changes
    token ids or their meaning."""

    max_duration: int = field(default=64, metadata={"help": "longest note in grid steps; longer notes are clipped"})
    velocity_bins: int = field(default=32, metadata={"help": "number of equal-width velocity bins over 1..127"})
    tempo_min: int = field(default=30, metadata={"help": "slowest tempo token, bpm; slower tempi are clipped"})
    tempo_max: int = field(default=240, metadata={"help": "fastest tempo token, bpm; faster tempi are clipped"})
    chords: str = field(default="relative_major", metadata={
        "help": "'relative_major': chord roots as degrees of the key's relative major (<Chord_IV:maj>; A minor "
                "counts from C: its tonic chord is <Chord_VI:min>), so the chords in the key's scale are one set of "
                "tokens in both modes; 'degree': as degrees of the key's own tonic (A minor's tonic chord is "
                "<Chord_I:min>); 'absolute': as pitch classes (<Chord_F:maj>)"})
    pitch: str = field(default="chord", metadata={
        "help": "'chord': a note's pitch as semitones above the root of the chord sounding at its onset, or above "
                "the key's tonic where no chord sounds or none is known yet (<Rel_19>); 'absolute': MIDI pitch"})
    tempo: str = field(default="change", metadata={
        "help": "'change': a bar's tempo as the change from the previous bar (<TempoChange_+1>; the body's first "
                "bar and larger changes absolute); 'absolute': every bar an absolute <Tempo>"})
    max_tempo_change: int = field(default=8, metadata={"help": "largest bar-to-bar change written as a change, bpm"})
    velocity: str = field(default="absolute", metadata={
        "help": "'track': a note's velocity written relative to its track's usual level (<Vel_v> sounds at v plus "
                "the track's offset, track_velocity_offsets), so a model that writes every track alike still plays "
                "the melody above the accompaniment; 'absolute': the MIDI velocity"})
    track_velocity_offsets: tuple[int, ...] = field(default=POP909_TRACK_VELOCITY_OFFSETS, metadata={
        "help": "with velocity 'track': how much louder than the common level each track (MELODY, BRIDGE, PIANO) "
                "usually plays, in MIDI velocity; the default is POP909's train split"})

    def __post_init__(self):
        for name, choices in LANGUAGE_CHOICES.items():
            if getattr(self, name) not in choices:
                raise SongError(f"vocab.{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}")
        if not 0 <= self.max_tempo_change <= 60:
            raise SongError(f"vocab.max_tempo_change: {self.max_tempo_change} is outside 0..60")
        if self.velocity not in VELOCITY_CHOICES:
            raise SongError(f"vocab.velocity: {self.velocity!r} is not one of {', '.join(VELOCITY_CHOICES)}")
        offsets = self.track_velocity_offsets
        if (not isinstance(offsets, (list, tuple)) or len(offsets) != len(TRACKS)
                or not all(isinstance(o, int) and -40 <= o <= 40 for o in offsets)):
            raise SongError(f"vocab.track_velocity_offsets: {offsets!r}; expected {len(TRACKS)} whole numbers in "
                            f"-40..40 (one per track: {', '.join(TRACKS)})")
        object.__setattr__(self, "track_velocity_offsets", tuple(offsets))   # YAML and JSON give lists

    def contrast(self) -> "VocabConfig":
        """The language the report's language ablation compares this one with: absolute for a relative or mixed
        language, relative for the absolute one (sizes, bins and ``velocity`` kept: the ablation compares the
        chord, pitch and tempo languages only)."""
        if self.language == "absolute":
            return replace(self, **{name: choices[0] for name, choices in LANGUAGE_CHOICES.items()})
        return replace(self, **LEGACY_LANGUAGE)

    def chord_origin(self, key: str) -> int:
        """The pitch class chord roots are written from in ``key`` (0 in the absolute language): the tonic, or the
        relative major's tonic (a minor third above a minor key's tonic)."""
        tonic, mode = parse_key(key)
        if self.chords == "absolute":
            return 0
        return (tonic + 3) % 12 if self.chords == "relative_major" and mode == "min" else tonic

    @property
    def language(self) -> str:
        """One word for the language: relative, absolute, or the mix (e.g. chords=degree,pitch=absolute,..)."""
        values = {name: getattr(self, name) for name in LANGUAGE_CHOICES}
        if all(values[n] == choices[0] for n, choices in LANGUAGE_CHOICES.items()):
            return "relative"
        if all(values[n] == "absolute" for n in LANGUAGE_CHOICES):
            return "absolute"
        return ",".join(f"{n}={v}" for n, v in values.items())


# Token families in id order. The grammar speaks of these names.
FAMILIES: tuple[str, ...] = (
    "End", "Task", "Input", "Key", "Metre", "Sec", "Bar", "Pos", "NoChord", "Chord", "Bass", "Track", "Pitch", "Dur",
    "Vel", "Tempo", "TempoChange",
)


class Vocabulary:
    """Token strings with their family and (for numeric families) their value."""

    def __init__(self, config: VocabConfig | None = None):
        self.config = config or VocabConfig()
        self.velocity_values = self._velocity_bin_values(self.config.velocity_bins)
        self.tokens: list[str] = []
        self.family: list[str] = []
        self.value: list[int] = []
        self._build()
        self.index = {token: i for i, token in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise AssertionError("duplicate token strings in the vocabulary")
        self.ids_of: dict[str, list[int]] = {name: [] for name in FAMILIES}
        for i, fam in enumerate(self.family):
            self.ids_of[fam].append(i)
        self.max_positions = max(m.positions_per_bar for m in METRES.values())
        self._token_ids: dict[tuple[str, object], int] = {}
        self._ids_by_value: dict[str, "numpy.ndarray"] = {}

    # -- layout ---------------------------------------------------------------------------------------------
    def _add(self, family: str, text: str, value: int = -1, prefix: str | None = None) -> None:
        prefix = prefix or family
        self.tokens.append(f"<{prefix}_{text}>" if text else f"<{prefix}>")
        self.family.append(family)
        self.value.append(value)

    def _build(self) -> None:
        c = self.config
        self._add("End", "")
        for i, task in enumerate(TASKS):
            self._add("Task", task, i)
        for i, name in enumerate(INPUTS):
            self._add("Input", name, i)
        for mode in KEY_MODES:
            for pc, name in enumerate(PITCH_CLASS_NAMES):
                self._add("Key", f"{name}:{mode}", pc)
        for i, name in enumerate(METRES):
            self._add("Metre", name, i)
        for label in SECTION_LABELS:
            for bars in range(1, MAX_SECTION_BARS + 1):
                self._add("Sec", f"{label}{bars}", bars)
        self._add("Bar", "")
        for pos in range(max(m.positions_per_bar for m in METRES.values())):
            self._add("Pos", str(pos), pos)
        # No-chord is a family of its own so that the grammar can forbid a slash bass after it.
        self._add("NoChord", NO_CHORD, prefix="Chord")
        # Chord values are the root's semitones above the key's chord_origin (a pitch class in the absolute language).
        root_names = PITCH_CLASS_NAMES if c.chords == "absolute" else DEGREE_NAMES
        for root in range(12):
            for quality in CHORD_QUALITIES:
                self._add("Chord", f"{root_names[root]}:{quality}", root)
        for i, degree in enumerate(CANONICAL_BASS_DEGREES):
            self._add("Bass", degree, i)
        for i, name in enumerate(TRACKS):
            self._add("Track", name, i)
        if c.pitch == "chord":
            for interval in range(RELATIVE_PITCH_MAX + 1):
                self._add("Pitch", str(interval), interval, prefix="Rel")
        else:
            for pitch in range(128):
                self._add("Pitch", str(pitch), pitch)
        for dur in range(1, c.max_duration + 1):
            self._add("Dur", str(dur), dur)
        for velocity in self.velocity_values:
            self._add("Vel", str(velocity), velocity)
        for bpm in range(c.tempo_min, c.tempo_max + 1):
            self._add("Tempo", str(bpm), bpm)
        # Present in every language (a change is always readable); only the 'change' language writes them.
        for change in range(-c.max_tempo_change, c.max_tempo_change + 1):
            self._add("TempoChange", f"{change:+d}" if change else "0", change)

    # -- binning --------------------------------------------------------------------------------------------
    @staticmethod
    def _velocity_bin_values(n: int) -> tuple[int, ...]:
        """The velocity of each bin: the middle of equal-width bins over 1..127."""
        width = 127 / n
        return tuple(min(127, max(1, round(1 + width * (i + 0.5) - 0.5))) for i in range(n))

    # The array forms import numpy where they run: the CLI's --help imports this module and loads no heavy library.
    def quantize_velocity(self, velocity: int, track: int = 0) -> int:
        return int(self.quantize_velocities(velocity, track))

    def velocity_offsets(self) -> "numpy.ndarray":
        """Per track index: what a ``Vel`` token's value is short of the velocity it sounds at (0 in 'absolute')."""
        import numpy as np

        offsets = self.config.track_velocity_offsets if self.config.velocity == "track" else (0,) * len(TRACKS)
        return np.asarray(offsets, dtype=np.int64)

    def quantize_velocities(self, velocities: "numpy.ndarray", tracks: "numpy.ndarray | int" = 0) -> "numpy.ndarray":
        """Velocities binned as the vocabulary writes them for notes of ``tracks`` (track indices, one per velocity
        or one for all). In 'track' language a velocity is binned relative to its track's level (value less the
        offset) and only to bins that sound inside 1..127 there, so that every quantized velocity has a token."""
        import numpy as np

        n = self.config.velocity_bins
        centres = np.asarray(self.velocity_values, dtype=np.int64)
        offset = self.velocity_offsets()[np.asarray(tracks, dtype=np.int64)]
        relative = np.asarray(velocities) - offset
        bin_index = np.clip(((relative - 1) * n / 127).astype(np.int64), 0, n - 1)   # astype truncates, as int()
        lowest = np.searchsorted(centres, 1 - offset, side="left")           # first bin sounding at >= 1
        highest = np.searchsorted(centres, 127 - offset, side="right") - 1   # last bin sounding at <= 127
        return centres[np.clip(bin_index, lowest, highest)] + offset

    def sounding_velocity(self, value: int, track: int) -> int:
        """The MIDI velocity a ``Vel`` token of ``value`` sounds at on track index ``track`` (1..127)."""
        offset = self.config.track_velocity_offsets[track] if self.config.velocity == "track" else 0
        return min(127, max(1, value + offset))

    def quantize_tempo(self, bpm: float) -> int:
        return int(min(self.config.tempo_max, max(self.config.tempo_min, round(bpm))))

    def quantize_duration(self, duration: int) -> int:
        return int(self.quantize_durations(duration))

    def quantize_durations(self, durations: "numpy.ndarray") -> "numpy.ndarray":
        import numpy as np

        return np.clip(durations, 1, self.config.max_duration)

    # -- lookups --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        try:
            return self.index[token]
        except KeyError:
            raise SongError(f"token: {token!r} is not in the vocabulary") from None

    def token(self, family: str, text: object = "") -> int:
        """Id of ``<Family_text>`` (``<Family>`` when text is empty)."""
        # Encoding asks this once per token (hundreds of thousands of times per dataset): remember the answers
        # instead of formatting the token's text each time.
        try:
            return self._token_ids[family, text]
        except KeyError:
            token = self.id(f"<{family}_{text}>" if text != "" else f"<{family}>")
            self._token_ids[family, text] = token
            return token

    def ids_by_value(self, family: str) -> "numpy.ndarray":
        """The ids of a family with values >= 0 (Pos, Dur, Vel, Tempo, ..) indexed by value, -1 for a value it
        lacks: the encoder looks up a song's tokens of one family at once."""
        import numpy as np

        if family not in self._ids_by_value:
            ids = self.ids_of[family]
            table = np.full(max(self.value[i] for i in ids) + 1, -1, dtype=np.int64)
            table[[self.value[i] for i in ids]] = ids
            self._ids_by_value[family] = table
        return self._ids_by_value[family]

    def chord_quality(self, token: int) -> str:
        """The quality of a ``Chord`` token (``<Chord_IV:maj7>`` -> ``maj7``)."""
        return self.tokens[token][1:-1].split(":", 1)[1]

    # The chord language's one rule, both ways: a chord token's value is its root's semitones above the key's chord
    # origin (``VocabConfig.chord_origin``). Encoding, decoding, the harmony guard and the relations all go through
    # these two.
    def chord_token(self, root: int, quality: str, key: str) -> int:
        """The ``Chord`` token of a chord with root pitch class ``root`` and ``quality`` in ``key``."""
        written = (root - self.config.chord_origin(key)) % 12
        return self.ids_of["Chord"][written * len(CHORD_QUALITIES) + tuple(CHORD_QUALITIES).index(quality)]

    def chord_root(self, token: int, key: str) -> int:
        """The root pitch class a ``Chord`` token stands for in ``key``."""
        return (self.config.chord_origin(key) + self.value[token]) % 12

    def describe(self, ids: list[int]) -> str:
        return "".join(self.tokens[i] for i in ids)

    def parse(self, text: str) -> list[int]:
        """Ids of a string of concatenated tokens, e.g. ``<Bar><Pos_0>``; whitespace between tokens is allowed."""
        ids, i = [], 0
        text = text.strip()
        while i < len(text):
            if text[i].isspace():
                i += 1
                continue
            if text[i] != "<" or ">" not in text[i:]:
                raise SongError(f"tokens: expected '<' at character {i} of the token string")
            j = text.index(">", i) + 1
            ids.append(self.id(text[i:j]))
            i = j
        return ids

    # -- persistence ----------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": "musicray-vocabulary/1", "config": asdict(self.config), "tokens": self.tokens}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "vocabulary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        if path.is_dir():
            path = path / "vocabulary.json"
        data = json.loads(path.read_text())
        vocab = cls(VocabConfig(**{**LEGACY_LANGUAGE, **data["config"]}))
        if vocab.tokens != data["tokens"]:
            raise SongError(f"{path}: saved tokens differ from those this musicray builds from the same config")
        return vocab

    def layout(self) -> list[tuple[str, int, int, str, str]]:
        """(family, first id, count, first token, last token) per family."""
        rows = []
        for fam in FAMILIES:
            ids = self.ids_of[fam]
            rows.append((fam, ids[0], len(ids), self.tokens[ids[0]], self.tokens[ids[-1]]))
        return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m musicray.tokens", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the vocabulary JSON instead of the layout")
    parser.add_argument("--absolute", action="store_true", help="the absolute language (chords, pitches, tempi)")
    args = parser.parse_args(argv)
    vocab = Vocabulary(VocabConfig(**LEGACY_LANGUAGE) if args.absolute else None)
    if args.json:
        print(json.dumps(vocab.to_json(), indent=1))
        return
    print(f"musicray vocabulary: {len(vocab)} tokens, {vocab.config.language} language")
    for key, value in asdict(vocab.config).items():
        print(f"  {key} = {value}")
    print(f"{'family':<11} {'ids':>11} {'count':>6}  first .. last")
    for fam, first, count, first_token, last_token in vocab.layout():
        print(f"{fam:<11} {first:>5}-{first + count - 1:<5} {count:>6}  {first_token} .. {last_token}")


if __name__ == "__main__":
    main()

"""Keys and chord labels (Harte notation, as in POP909's chord_midi.txt) in canonical spelling."""

from __future__ import annotations

import functools

from musicray.errors import SongError

# One spelling per pitch class so that enharmonic labels (C#:maj, Db:maj) share a token.
PITCH_CLASS_NAMES: tuple[str, ...] = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
_NATURALS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}

KEY_MODES: tuple[str, ...] = ("maj", "min")
# Chord roots as semitones above the key's tonic, Roman-numeral style (minor keys count from their own tonic).
DEGREE_NAMES: tuple[str, ...] = ("I", "bII", "II", "bIII", "III", "IV", "#IV", "V", "bVI", "VI", "bVII", "VII")

# Chord qualities found in POP909 (all 909 songs' chord_midi.txt), with their intervals above the root.
CHORD_QUALITIES: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "dim": (0, 3, 6),
    "aug": (0, 4, 8),
    "sus2": (0, 2, 7),
    "sus4": (0, 5, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "minmaj7": (0, 3, 7, 11),
    "hdim7": (0, 3, 6, 10),
    "dim7": (0, 3, 6, 9),
    "maj6": (0, 4, 7, 9),
    "min6": (0, 3, 7, 9),
    "sus4(b7)": (0, 5, 7, 10),
}

# Bass degrees of slash chords (Harte: the bass as a scale degree above the root).
BASS_DEGREES: dict[str, int] = {
    "b2": 1, "2": 2, "b3": 3, "3": 4, "4": 5, "#4": 6, "b5": 6, "5": 7, "#5": 8, "b6": 8, "6": 9, "b7": 10, "7": 11,
}
CANONICAL_BASS_DEGREES: tuple[str, ...] = ("b2", "2", "b3", "3", "4", "b5", "5", "b6", "6", "b7", "7")
_BASS_BY_SEMITONES = {semitones: name for name, semitones in BASS_DEGREES.items() if name in CANONICAL_BASS_DEGREES}

NO_CHORD = "N"


def pitch_class(name: str) -> int:
    """Pitch class of a note name such as ``Eb``, ``F#``, ``Cb`` or ``B#``."""
    if not name or name[0] not in _NATURALS:
        raise SongError(f"pitch name: cannot read {name!r}")
    value = _NATURALS[name[0]]
    for accidental in name[1:]:
        if accidental == "#":
            value += 1
        elif accidental == "b":
            value -= 1
        else:
            raise SongError(f"pitch name: cannot read {name!r}")
    return value % 12


# The parsers are pure and the encoder asks them about the same few keys and chords for every note of a song (about
# 90,000 times per 30 POP909 songs): caching them takes a fifth off encoding.
@functools.lru_cache(maxsize=4096)
def parse_key(label: str) -> tuple[int, str]:
    """``Gb:maj`` -> (6, "maj")."""
    root, sep, mode = str(label).strip().partition(":")
    if not sep or mode not in KEY_MODES:
        raise SongError(f"key: cannot read {label!r}; expected ROOT:maj or ROOT:min, e.g. C:maj")
    return pitch_class(root), mode


def canonical_key(label: str) -> str:
    tonic, mode = parse_key(label)
    return f"{PITCH_CLASS_NAMES[tonic]}:{mode}"


@functools.lru_cache(maxsize=4096)
def parse_chord(label: str) -> tuple[int | None, str, str]:
    """``F#:maj7/5`` -> (6, "maj7", "5"); ``N`` -> (None, "N", ""). A bare root means a major triad."""
    text = str(label).strip()
    if text == NO_CHORD:
        return None, NO_CHORD, ""
    root, _, rest = text.partition(":")
    if not rest:
        rest = "maj"
        root, _, bass = root.partition("/")
        if bass:
            rest = f"maj/{bass}"
    quality, _, bass = rest.partition("/")
    if quality not in CHORD_QUALITIES:
        raise SongError(f"chord: unknown quality {quality!r} in {label!r}; known: {', '.join(CHORD_QUALITIES)}")
    if bass and bass not in BASS_DEGREES:
        raise SongError(f"chord: unknown bass degree {bass!r} in {label!r}")
    bass_name = _BASS_BY_SEMITONES[BASS_DEGREES[bass]] if bass else ""
    return pitch_class(root), quality, bass_name


def chord_label(root: int | None, quality: str, bass: str = "") -> str:
    if root is None:
        return NO_CHORD
    return f"{PITCH_CLASS_NAMES[root]}:{quality}" + (f"/{bass}" if bass else "")


def canonical_chord(label: str) -> str:
    return chord_label(*parse_chord(label))


def chord_pitch_classes(label: str) -> tuple[int, ...]:
    """Pitch classes sounding in a chord (bass included); empty for no-chord."""
    root, quality, bass = parse_chord(label)
    if root is None:
        return ()
    tones = {(root + step) % 12 for step in CHORD_QUALITIES[quality]}
    if bass:
        tones.add((root + BASS_DEGREES[bass]) % 12)
    return tuple(sorted(tones))


def chord_bass_pitch_class(label: str) -> int | None:
    root, _, bass = parse_chord(label)
    if root is None:
        return None
    return (root + BASS_DEGREES[bass]) % 12 if bass else root


def scale_pitch_classes(key: str) -> tuple[int, ...]:
    tonic, mode = parse_key(key)
    steps = (0, 2, 4, 5, 7, 9, 11) if mode == "maj" else (0, 2, 3, 5, 7, 8, 10)
    return tuple((tonic + s) % 12 for s in steps)


def key_tonic(key: str) -> int:
    return parse_key(key)[0]


def chord_root(label: str) -> int | None:
    """Pitch class of a chord's root; None for no-chord."""
    return parse_chord(label)[0]


def reference_pitch_class(chord: str | None, key: str) -> int:
    """What a relative pitch counts from: the sounding chord's root, or the key's tonic where no chord sounds
    (``N``) or none is known (``None``)."""
    root = chord_root(chord) if chord is not None else None
    return key_tonic(key) if root is None else root

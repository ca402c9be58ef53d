"""A seeded generator of small, structured, expressive pop songs.

It stands in for POP909 where no data is at hand (the tiny preset, tests): the songs have the structure the
model is meant to learn, at a size that trains in seconds. Each section label gets one plan (a diatonic chord
progression, a melody whose rhythm repeats in two-bar motifs and whose strong beats are chord tones, a sparser
BRIDGE line a third to a sixth under it, a PIANO pattern), so repeated labels repeat their music; velocities
(section level, crescendo over each phrase, downbeat accents, jitter) and tempo (one per beat with rubato,
ritardandi at section ends and always at the end) are drawn fresh at every occurrence, as a player would.

Everything comes from one ``random.Random(seed)``: the same seed gives the same song on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from musicray.harmony import (
    PITCH_CLASS_NAMES, chord_bass_pitch_class, chord_label, chord_pitch_classes, parse_key, scale_pitch_classes,
)
from musicray.song import METRES, TRACKS, Chord, Metre, Note, Section, Song, Tempo, parse_form

# -- musical tables -------------------------------------------------------------------------------------------------
# Pop forms in POP909's phrase letters: upper case sections carry the melody, lower case ones (intro, bridge
# interlude, outro) are instrumental.
FORMS: tuple[str, ...] = (
    "i4A8B8A8B8o4",
    "i2A8A8B8b4A8B8o2",
    "A4B4A4B4",
    "i4A8B8x4A8B8B8o4",
    "A8A8B8A8",
    "i1A16B16o2",
    "i2A4A4B4B4o1",
    "i4A8B8C4B8o4",
    "A2B2A2B2",
    "i2A6B6A6B6o2",
    "A12B12",
    "i1A8B8X4B8o3",
    "A8B8C8A8",
    "i4A8A8B16o4",
    "A32",
    "i3A5B7o1",
)

METRE_WEIGHTS: dict[str, float] = {"4/4": 0.75, "3/4": 0.17, "12/8": 0.08}
# Beats per minute of the metre's beat; a 12/8 beat is a dotted quarter, so its range is lower.
BPM_RANGE: dict[str, tuple[int, int]] = {"4/4": (60, 160), "3/4": (60, 160), "12/8": (60, 100)}
MAJOR_KEY_WEIGHT = 0.6

# Diatonic chords by scale degree: (semitones above the tonic, triad, seventh chord). Minor keys take the major
# dominant of harmonic minor, as pop songs in minor do.
DIATONIC: dict[str, dict[int, tuple[int, str, str]]] = {
    "maj": {1: (0, "maj", "maj7"), 2: (2, "min", "min7"), 3: (4, "min", "min7"), 4: (5, "maj", "maj7"),
            5: (7, "maj", "7"), 6: (9, "min", "min7"), 7: (11, "dim", "hdim7")},
    "min": {1: (0, "min", "min7"), 2: (2, "dim", "hdim7"), 3: (3, "maj", "maj7"), 4: (5, "min", "min7"),
            5: (7, "maj", "7"), 6: (8, "maj", "maj7"), 7: (10, "maj", "7")},
}
PROGRESSIONS: dict[str, tuple[tuple[int, ...], ...]] = {
    "maj": ((1, 5, 6, 4), (1, 6, 4, 5), (6, 4, 1, 5), (1, 4, 5, 1), (4, 5, 3, 6), (1, 4, 6, 5), (2, 5, 1, 6),
            (1, 3, 4, 5), (4, 1, 5, 6)),
    "min": ((1, 6, 3, 7), (1, 4, 7, 3), (1, 6, 7, 1), (1, 4, 5, 1), (6, 7, 1, 1), (1, 6, 4, 5), (4, 5, 1, 6)),
}
SEVENTH_CHANCE = 0.2
# Suspensions that replace a triad on these degrees now and then.
SUSPENSIONS: dict[int, tuple[str, ...]] = {1: ("sus2", "sus4"), 5: ("sus4", "sus4(b7)")}
SUSPENSION_CHANCE = 0.08
TWO_CHORDS_PER_BAR_CHANCE = 0.3

# Where chords change inside a bar: one chord on the downbeat, or two (the second on the middle beat).
CHORD_SLOTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "4/4": ((0,), (0, 8)), "3/4": ((0,), (0, 8)), "12/8": ((0,), (0, 6)),
}

# Melody rhythms, one bar each: (position, duration) in grid steps.
RHYTHMS: dict[str, tuple[tuple[tuple[int, int], ...], ...]] = {
    "4/4": (
        ((0, 4), (4, 4), (8, 4), (12, 4)),
        ((0, 6), (6, 2), (8, 4), (12, 4)),
        ((0, 2), (2, 2), (4, 4), (8, 2), (10, 2), (12, 4)),
        ((0, 8), (8, 4), (12, 4)),
        ((0, 4), (4, 2), (6, 2), (8, 8)),
        ((0, 4), (6, 2), (8, 4), (12, 2), (14, 2)),
        ((0, 3), (3, 3), (6, 2), (8, 4), (12, 4)),
    ),
    "3/4": (
        ((0, 4), (4, 4), (8, 4)),
        ((0, 6), (6, 2), (8, 4)),
        ((0, 2), (2, 2), (4, 4), (8, 4)),
        ((0, 8), (8, 4)),
        ((0, 4), (4, 2), (6, 2), (8, 4)),
    ),
    "12/8": (
        ((0, 3), (3, 3), (6, 3), (9, 3)),
        ((0, 2), (2, 1), (3, 3), (6, 2), (8, 1), (9, 3)),
        ((0, 6), (6, 3), (9, 3)),
        ((0, 3), (3, 1), (4, 1), (5, 1), (6, 6)),
        ((0, 1), (1, 1), (2, 1), (3, 3), (6, 6)),
    ),
}
# Rhythms that close a phrase: long notes, room to breathe.
CADENCE_RHYTHMS: dict[str, tuple[tuple[tuple[int, int], ...], ...]] = {
    "4/4": (((0, 12),), ((0, 4), (4, 12)), ((0, 8), (8, 6))),
    "3/4": (((0, 12),), ((0, 4), (4, 8)), ((0, 8),)),
    "12/8": (((0, 12),), ((0, 6), (6, 6)), ((0, 3), (3, 9))),
}
PHRASE_BARS = 4
MOTIF_BARS = 2

MELODY_RANGE = (60, 84)
BRIDGE_RANGE = (52, 72)
BASS_RANGE = (36, 47)
VOICING_FLOOR = 55  # lowest note of the piano's chord voicing
MELODY_LEAPS = (-5, -4, -2, -1, 0, 1, 2, 4, 5)
PASSING_TONE_CHANCE = 0.65
BRIDGE_NOTE_CHANCE = 0.75
BRIDGE_INTERVALS = range(3, 10)  # a minor third to a major sixth below the melody

# Dynamics: a level per section label, offsets per track, and shaping inside a phrase.
SECTION_LEVELS: dict[str, int] = {
    "i": 52, "A": 68, "B": 84, "C": 78, "D": 74, "E": 72, "X": 70, "b": 64, "x": 60, "o": 54,
}
TRACK_LEVELS: dict[str, int] = {"MELODY": 10, "BRIDGE": -2, "PIANO": -12}
SONG_LEVEL_SPREAD = 8
BASS_ACCENT = 4
DOWNBEAT_ACCENT = 8
BEAT_ACCENT = 3
PHRASE_CRESCENDO = 10
VELOCITY_JITTER = 3.0

# Tempo: small rubato on every beat, ritardandi (fraction of tempo lost by the last beat) over section ends.
RUBATO = 0.008
SECTION_RIT_CHANCE = 0.3
SECTION_RIT = (0.06, 0.12)
FINAL_RIT = (0.12, 0.25)


# -- plans ----------------------------------------------------------------------------------------------------------
Slot = tuple[int, str]  # (position, chord label)
Line = tuple[int, int, int]  # (position, pitch, duration)


@dataclass
class SectionPlan:
    """The music of one section label, bar by bar; every occurrence of the label plays it."""

    chords: list[list[Slot]]
    melody: list[list[Line]] = field(default_factory=list)
    bridge: list[list[Line]] = field(default_factory=list)
    piano: str = "block"


@dataclass
class Context:
    rng: random.Random
    key: str
    spec: Metre

    @property
    def tonic(self) -> int:
        return parse_key(self.key)[0]

    @property
    def mode(self) -> str:
        return parse_key(self.key)[1]


def _pitches(pitch_classes, low: int, high: int) -> list[int]:
    return [p for p in range(low, high + 1) if p % 12 in pitch_classes]


def _nearest(candidates: list[int], target: float) -> int:
    return min(candidates, key=lambda p: (abs(p - target), p))


def chord_at(slots: list[Slot], position: int) -> str:
    """The chord sounding at ``position`` of a bar whose changes are ``slots``."""
    return [label for start, label in slots if start <= position][-1]


def _slot_spans(slots: list[Slot], bar_length: int) -> list[tuple[int, int, str]]:
    """(start, end, label) of each chord of a bar."""
    ends = [start for start, _ in slots[1:]] + [bar_length]
    return [(start, end, label) for (start, label), end in zip(slots, ends)]


def _chord_for_degree(ctx: Context, degree: int) -> str:
    semitones, triad, seventh = DIATONIC[ctx.mode][degree]
    quality = triad
    if degree in SUSPENSIONS and ctx.rng.random() < SUSPENSION_CHANCE:
        quality = ctx.rng.choice(SUSPENSIONS[degree])
    elif ctx.rng.random() < SEVENTH_CHANCE:
        quality = seventh
    return chord_label((ctx.tonic + semitones) % 12, quality)


def plan_chords(ctx: Context, bars: int, progression: tuple[int, ...]) -> list[list[Slot]]:
    labels = [_chord_for_degree(ctx, degree) for degree in progression]
    slots = CHORD_SLOTS[ctx.spec.name][ctx.rng.random() < TWO_CHORDS_PER_BAR_CHANCE]
    plan, step = [], 0
    for _ in range(bars):
        plan.append([(position, labels[(step + i) % len(labels)]) for i, position in enumerate(slots)])
        step += len(slots)
    return plan


def _melody_rhythms(ctx: Context, bars: int) -> list[tuple[tuple[int, int], ...]]:
    """A two-bar motif repeated through each phrase, the phrase's last bar a cadence."""
    motif = [ctx.rng.choice(RHYTHMS[ctx.spec.name]) for _ in range(MOTIF_BARS)]
    cadence = ctx.rng.choice(CADENCE_RHYTHMS[ctx.spec.name])
    return [cadence if bar % PHRASE_BARS == PHRASE_BARS - 1 or bar == bars - 1 else motif[bar % MOTIF_BARS]
            for bar in range(bars)]


def _strong_pitch(ctx: Context, chord: str, previous: int) -> int:
    """A chord tone a small leap from the previous note, pulled back toward the middle of the range."""
    low, high = MELODY_RANGE
    target = previous + ctx.rng.choice(MELODY_LEAPS)
    middle = (low + high) / 2
    if abs(target - middle) > (high - low) / 3:
        target += 5 if target < middle else -5
    return _nearest(_pitches(chord_pitch_classes(chord), low, high), target)


def _weak_pitch(ctx: Context, chord: str, previous: int) -> int:
    """A passing scale step from the previous note, or else another chord tone."""
    low, high = MELODY_RANGE
    if ctx.rng.random() >= PASSING_TONE_CHANCE:
        return _strong_pitch(ctx, chord, previous)
    scale = _pitches(scale_pitch_classes(ctx.key), low, high)
    upward = ctx.rng.random() < (0.7 if previous < (low + high) / 2 else 0.3)
    steps = [p for p in scale if p > previous] if upward else [p for p in scale if p < previous]
    return (min(steps) if upward else max(steps)) if steps else _nearest(scale, previous)


def plan_melody(ctx: Context, chords: list[list[Slot]], start_pitch: int) -> list[list[Line]]:
    melody, previous = [], start_pitch
    for slots, rhythm in zip(chords, _melody_rhythms(ctx, len(chords))):
        bar = []
        for position, duration in rhythm:
            chord = chord_at(slots, position)
            on_beat = position % ctx.spec.positions_per_beat == 0
            previous = (_strong_pitch if on_beat else _weak_pitch)(ctx, chord, previous)
            bar.append((position, previous, duration))
        melody.append(bar)
    return melody


def _bridge_under(chord: str, melody_pitch: int) -> int | None:
    """The chord tone a third to a sixth under the melody, inside the BRIDGE range."""
    low, high = BRIDGE_RANGE
    below = [p for p in _pitches(chord_pitch_classes(chord), low, high) if melody_pitch - p in BRIDGE_INTERVALS]
    return max(below) if below else None


def plan_bridge(ctx: Context, chords: list[list[Slot]], melody: list[list[Line]]) -> list[list[Line]]:
    """Half-bar notes: under the melody where it sings, a slow chord-tone line of its own where it does not."""
    low, high = BRIDGE_RANGE
    bar_length = ctx.spec.positions_per_bar
    half_bars = CHORD_SLOTS[ctx.spec.name][1]
    bridge, previous = [], (low + high) // 2 + 3
    for bar, slots in enumerate(chords):
        sung = {position: pitch for position, pitch, _ in melody[bar]} if melody else {}
        line = []
        for start, end in zip(half_bars, half_bars[1:] + (bar_length,)):
            if ctx.rng.random() >= BRIDGE_NOTE_CHANCE:
                continue
            chord = chord_at(slots, start)
            pitch = _bridge_under(chord, sung[start]) if start in sung else None
            if pitch is None and not sung:
                pitch = _nearest(_pitches(chord_pitch_classes(chord), low + 3, high), previous)
            if pitch is not None:
                line.append((start, pitch, end - start))
                previous = pitch
        bridge.append(line)
    return bridge


def plan_section(ctx: Context, label: str, bars: int, progression: tuple[int, ...]) -> SectionPlan:
    chords = plan_chords(ctx, bars, progression)
    melodic = label.isupper()
    melody = plan_melody(ctx, chords, ctx.rng.randint(66, 74)) if melodic else []
    return SectionPlan(chords=chords, melody=melody, bridge=plan_bridge(ctx, chords, melody),
                       piano=ctx.rng.choice(tuple(PIANO_PATTERNS)))


def final_cadence(ctx: Context, plan: SectionPlan, bars: int) -> SectionPlan:
    """The plan with its bar ``bars - 1`` resolved: the tonic chord held, the melody landing on the tonic."""
    last = bars - 1
    bar_length = ctx.spec.positions_per_bar
    tonic_chord = chord_label(ctx.tonic, DIATONIC[ctx.mode][1][1])
    tones = chord_pitch_classes(tonic_chord)
    chords = plan.chords[:last] + [[(0, tonic_chord)]]
    melody = plan.melody[:last]
    if plan.melody:
        previous = next((line[-1][1] for line in reversed(melody) if line), sum(MELODY_RANGE) // 2)
        landing = _nearest(_pitches({ctx.tonic}, *MELODY_RANGE), previous)
        melody.append([(0, landing, bar_length)])
    bridge = plan.bridge[:last]
    if plan.bridge:
        under = _bridge_under(tonic_chord, melody[-1][0][1]) if melody else None
        bridge.append([(0, under or _pitches(tones, *BRIDGE_RANGE)[-1], bar_length)])
    return SectionPlan(chords=chords, melody=melody, bridge=bridge, piano="block")


# -- piano patterns: (bar slots, metre) -> notes as (position, pitch, duration, is_bass) --------------------------
def _bass(label: str) -> int:
    return _pitches({chord_bass_pitch_class(label)}, *BASS_RANGE)[0]


def _voicing(label: str) -> list[int]:
    return sorted(_pitches({pc}, VOICING_FLOOR, VOICING_FLOOR + 11)[0] for pc in chord_pitch_classes(label))


def _block(start: int, end: int, label: str, spec: Metre) -> list[tuple[int, int, int, bool]]:
    return [(start, _bass(label), end - start, True)] + [(start, p, end - start, False) for p in _voicing(label)]


def _pulse(start: int, end: int, label: str, spec: Metre) -> list[tuple[int, int, int, bool]]:
    beat = spec.positions_per_beat
    chords = [(t, p, min(beat, end - t), False) for t in range(start, end, beat) for p in _voicing(label)]
    return [(start, _bass(label), end - start, True)] + chords


def _oompah(start: int, end: int, label: str, spec: Metre) -> list[tuple[int, int, int, bool]]:
    beat = spec.positions_per_beat
    chords = [(t, p, min(beat, end - t), False) for t in range(start + beat, end, beat) for p in _voicing(label)]
    return [(start, _bass(label), min(beat, end - start), True)] + chords


def _arpeggio(start: int, end: int, label: str, spec: Metre) -> list[tuple[int, int, int, bool]]:
    # Eighth notes in simple metres, the compound metre's own eighths in 12/8.
    step = max(1, spec.positions_per_beat // 2) if spec.positions_per_beat % 2 == 0 else 1
    voicing = _voicing(label)
    order = voicing + voicing[-2:0:-1]  # up and back down
    notes = [(t, order[i % len(order)], min(step, end - t), False) for i, t in enumerate(range(start, end, step))]
    return [(start, _bass(label), end - start, True)] + notes


PIANO_PATTERNS = {"block": _block, "pulse": _pulse, "oompah": _oompah, "arpeggio": _arpeggio}


# -- performance ----------------------------------------------------------------------------------------------------
def _velocity(rng: random.Random, level: float, track: str, bar_in_section: int, position: int, spec: Metre,
              accent: int = 0) -> int:
    phrase_length = PHRASE_BARS * spec.positions_per_bar
    progress = ((bar_in_section % PHRASE_BARS) * spec.positions_per_bar + position) / phrase_length
    if position == 0:
        accent += DOWNBEAT_ACCENT
    elif position % spec.positions_per_beat == 0:
        accent += BEAT_ACCENT
    value = level + TRACK_LEVELS[track] + PHRASE_CRESCENDO * progress + accent + rng.gauss(0, VELOCITY_JITTER)
    return int(min(127, max(1, round(value))))


def _beat_tempos(rng: random.Random, spec: Metre, base: float, start: int, bars: int, rit_bars: int,
                 rit: float) -> list[Tempo]:
    beats = [(bar, beat) for bar in range(start, start + bars) for beat in range(spec.beats_per_bar)]
    rit_beats = rit_bars * spec.beats_per_bar
    tempos = []
    for index, (bar, beat) in enumerate(beats):
        into_rit = index - (len(beats) - rit_beats) + 1
        slowing = rit * into_rit / rit_beats if into_rit > 0 else 0.0
        bpm = base * (1 - slowing) * (1 + rng.gauss(0, RUBATO))
        tempos.append(Tempo(bar, beat * spec.positions_per_beat, round(bpm, 2)))
    return tempos


def _ritardando(rng: random.Random, section: Section, last: bool) -> tuple[int, float]:
    """(bars, depth) of the ritardando closing a section: always at the end of the song, sometimes elsewhere."""
    if last:
        return min(section.bars, rng.choice((1, 2))), rng.uniform(*FINAL_RIT)
    if rng.random() < SECTION_RIT_CHANCE:
        return 1, rng.uniform(*SECTION_RIT)
    return 0, 0.0


def _dedupe_chords(chords: list[Chord]) -> list[Chord]:
    """Only the changes: a chord that goes on into the next slot is not struck again."""
    changes: list[Chord] = []
    for chord in chords:
        if not changes or chord.label != changes[-1].label:
            changes.append(chord)
    return changes


def _choose_metre(rng: random.Random) -> str:
    return rng.choices(tuple(METRE_WEIGHTS), weights=tuple(METRE_WEIGHTS.values()))[0]


def _choose_key(rng: random.Random) -> str:
    mode = "maj" if rng.random() < MAJOR_KEY_WEIGHT else "min"
    return f"{PITCH_CLASS_NAMES[rng.randrange(12)]}:{mode}"


def synth_song(seed: int, song_id: str | None = None) -> Song:
    """A song drawn from ``seed``; ``song_id`` defaults to ``synth-<seed>`` (four digits at least)."""
    rng = random.Random(seed)
    sections = parse_form(rng.choice(FORMS))
    spec = METRES[_choose_metre(rng)]
    ctx = Context(rng=rng, key=_choose_key(rng), spec=spec)
    base_bpm = rng.uniform(*BPM_RANGE[spec.name])
    song_level = rng.uniform(-SONG_LEVEL_SPREAD, SONG_LEVEL_SPREAD)

    labels = list(dict.fromkeys(s.label for s in sections))
    progressions = rng.sample(PROGRESSIONS[ctx.mode], k=min(len(labels), len(PROGRESSIONS[ctx.mode])))
    longest = {label: max(s.bars for s in sections if s.label == label) for label in labels}
    plans = {label: plan_section(ctx, label, longest[label], progressions[i % len(progressions)])
             for i, label in enumerate(labels)}

    chords: list[Chord] = []
    tracks: dict[str, list[Note]] = {name: [] for name in TRACKS}
    tempos: list[Tempo] = []
    starts = [sum(s.bars for s in sections[:i]) for i in range(len(sections))]
    for index, (section, start) in enumerate(zip(sections, starts)):
        last = index == len(sections) - 1
        plan = final_cadence(ctx, plans[section.label], section.bars) if last else plans[section.label]
        level = SECTION_LEVELS[section.label] + song_level
        for offset in range(section.bars):
            bar = start + offset
            chords += [Chord(bar, position, label) for position, label in plan.chords[offset]]
            for track, lines in (("MELODY", plan.melody), ("BRIDGE", plan.bridge)):
                for position, pitch, duration in (lines[offset] if lines else []):
                    velocity = _velocity(rng, level, track, offset, position, spec)
                    tracks[track].append(Note(bar, position, pitch, duration, velocity))
            for begin, end, label in _slot_spans(plan.chords[offset], spec.positions_per_bar):
                for position, pitch, duration, is_bass in PIANO_PATTERNS[plan.piano](begin, end, label, spec):
                    velocity = _velocity(rng, level, "PIANO", offset, position, spec, BASS_ACCENT if is_bass else 0)
                    tracks["PIANO"].append(Note(bar, position, pitch, duration, velocity))
        rit_bars, rit = _ritardando(rng, section, last)
        tempos += _beat_tempos(rng, spec, base_bpm, start, section.bars, rit_bars, rit)

    song = Song(song_id=song_id or f"synth-{seed:04d}", key=ctx.key, metre=spec.name, sections=sections,
                chords=_dedupe_chords(chords), tracks={name: sorted(notes) for name, notes in tracks.items()},
                tempos=tempos)
    song.check()
    return song


def synth_songs(n: int, seed: int = 0) -> list[Song]:
    """``n`` songs, the i-th drawn from ``seed + i`` and named ``synth-<seed + i>``: ids name their songs."""
    return [synth_song(seed + i) for i in range(n)]

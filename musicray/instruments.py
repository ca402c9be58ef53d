"""General MIDI instruments of musicray's tracks: which program each of MELODY, BRIDGE and PIANO is written with.

A track's instrument is a General MIDI program, written into the MIDI file as the track's program change, so a
sequencer or ``musicray render`` plays each track with its own sound. The defaults give the three tracks three
distinct voices: MELODY a lead synth, BRIDGE (the secondary melody) strings, PIANO a grand piano. Any of them can
be changed with a mapping (``{"MELODY": "Flute"}``) or on the command line (``--instrument MELODY=flute``).

Programs are numbered 0-127 as MIDI stores them (General MIDI's own tables count 1-128: its program 74, Flute,
is 73 here); an instrument may be given by number or by its General MIDI name, case, spaces and punctuation
ignored ("lead 1 (square)", "Lead1Square" and 80 are the same).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from musicray.errors import SongError
from musicray.song import TRACKS

# The 128 General MIDI level 1 melodic instruments, by program number (0-127).
GM_PROGRAMS: tuple[str, ...] = (
    "Acoustic Grand Piano", "Bright Acoustic Piano", "Electric Grand Piano", "Honky-tonk Piano",        # 0
    "Electric Piano 1", "Electric Piano 2", "Harpsichord", "Clavinet",                                  # 4
    "Celesta", "Glockenspiel", "Music Box", "Vibraphone",                                               # 8
    "Marimba", "Xylophone", "Tubular Bells", "Dulcimer",                                                # 12
    "Drawbar Organ", "Percussive Organ", "Rock Organ", "Church Organ",                                  # 16
    "Reed Organ", "Accordion", "Harmonica", "Tango Accordion",                                          # 20
    "Acoustic Guitar (nylon)", "Acoustic Guitar (steel)", "Electric Guitar (jazz)", "Electric Guitar (clean)",# 24
    "Electric Guitar (muted)", "Overdriven Guitar", "Distortion Guitar", "Guitar Harmonics",            # 28
    "Acoustic Bass", "Electric Bass (finger)", "Electric Bass (pick)", "Fretless Bass",                 # 32
    "Slap Bass 1", "Slap Bass 2", "Synth Bass 1", "Synth Bass 2",                                       # 36
    "Violin", "Viola", "Cello", "Contrabass",                                                           # 40
    "Tremolo Strings", "Pizzicato Strings", "Orchestral Harp", "Timpani",                               # 44
    "String Ensemble 1", "String Ensemble 2", "Synth Strings 1", "Synth Strings 2",                     # 48
    "Choir Aahs", "Voice Oohs", "Synth Choir", "Orchestra Hit",                                         # 52
    "Trumpet", "Trombone", "Tuba", "Muted Trumpet",                                                     # 56
    "French Horn", "Brass Section", "Synth Brass 1", "Synth Brass 2",                                   # 60
    "Soprano Sax", "Alto Sax", "Tenor Sax", "Baritone Sax",                                             # 64
    "Oboe", "English Horn", "Bassoon", "Clarinet",                                                      # 68
    "Piccolo", "Flute", "Recorder", "Pan Flute",                                                        # 72
    "Blown Bottle", "Shakuhachi", "Whistle", "Ocarina",                                                 # 76
    "Lead 1 (square)", "Lead 2 (sawtooth)", "Lead 3 (calliope)", "Lead 4 (chiff)",                      # 80
    "Lead 5 (charang)", "Lead 6 (voice)", "Lead 7 (fifths)", "Lead 8 (bass + lead)",                    # 84
    "Pad 1 (new age)", "Pad 2 (warm)", "Pad 3 (polysynth)", "Pad 4 (choir)",                            # 88
    "Pad 5 (bowed)", "Pad 6 (metallic)", "Pad 7 (halo)", "Pad 8 (sweep)",                               # 92
    "FX 1 (rain)", "FX 2 (soundtrack)", "FX 3 (crystal)", "FX 4 (atmosphere)",                          # 96
    "FX 5 (brightness)", "FX 6 (goblins)", "FX 7 (echoes)", "FX 8 (sci-fi)",                            # 100
    "Sitar", "Banjo", "Shamisen", "Koto",                                                               # 104
    "Kalimba", "Bagpipe", "Fiddle", "Shanai",                                                           # 108
    "Tinkle Bell", "Agogo", "Steel Drums", "Woodblock",                                                 # 112
    "Taiko Drum", "Melodic Tom", "Synth Drum", "Reverse Cymbal",                                        # 116
    "Guitar Fret Noise", "Breath Noise", "Seashore", "Bird Tweet",                                      # 120
    "Telephone Ring", "Helicopter", "Applause", "Gunshot",                                              # 124
)
DEFAULT_INSTRUMENTS: dict[str, int] = {"MELODY": 80, "BRIDGE": 48, "PIANO": 0}  # lead, strings, piano


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_NAME: dict[str, int] = {_key(name): program for program, name in enumerate(GM_PROGRAMS)}


def program_of(instrument: int | str, what: str = "instrument") -> int:
    """The program number (0-127) of an instrument given by number or General MIDI name."""
    if isinstance(instrument, bool):
        raise SongError(f"{what}: {instrument!r} is not an instrument")
    if isinstance(instrument, int) or (isinstance(instrument, str) and instrument.strip().isdigit()):
        program = int(instrument)
        if not 0 <= program <= 127:
            raise SongError(f"{what}: program {program} is outside 0..127 (General MIDI programs counted from 0)")
        return program
    if isinstance(instrument, str) and _key(instrument) in _BY_NAME:
        return _BY_NAME[_key(instrument)]
    close = [name for name in GM_PROGRAMS if _key(str(instrument)) and _key(str(instrument)) in _key(name)][:6]
    hint = f"; did you mean: {', '.join(close)}" if close else "; see musicray.instruments.GM_PROGRAMS for the names"
    raise SongError(f"{what}: {instrument!r} is not a General MIDI instrument (a program 0..127 or a name such as "
                    f"'Flute')" + hint)


def instrument_programs(instruments: Mapping[str, int | str] | None = None) -> dict[str, int]:
    """One program per track: ``DEFAULT_INSTRUMENTS`` with the tracks in ``instruments`` replaced."""
    programs = dict(DEFAULT_INSTRUMENTS)
    for track, instrument in (instruments or {}).items():
        name = str(track).strip().upper()
        if name not in TRACKS:
            raise SongError(f"instrument: unknown track {track!r}; the tracks are {', '.join(TRACKS)}")
        programs[name] = program_of(instrument, f"instrument of {name}")
    return programs


def parse_instrument(text: str) -> tuple[str, int]:
    """``"MELODY=flute"`` or ``"bridge=40"`` -> (track, program): the command line's ``--instrument``."""
    track, sep, instrument = text.partition("=")
    if not sep or not track.strip() or not instrument.strip():
        raise SongError(f"--instrument: {text!r} is not TRACK=INSTRUMENT (e.g. MELODY=flute or PIANO=0)")
    name = track.strip().upper()
    if name not in TRACKS:
        raise SongError(f"--instrument: unknown track {track.strip()!r}; the tracks are {', '.join(TRACKS)}")
    return name, program_of(instrument.strip(), f"--instrument {name}")


def program_name(program: int) -> str:
    return GM_PROGRAMS[program]

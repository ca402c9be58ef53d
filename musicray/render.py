"""Audio preview: a MIDI file rendered to WAV by the FluidSynth command-line synthesizer and a General MIDI
soundfont, both system packages (``sudo apt-get install fluidsynth fluid-soundfont-gm`` on Debian/Ubuntu).

The soundfont is, in order: the one passed in, ``$MUSICRAY_SOUNDFONT``, or the first of ``SOUNDFONT_LOCATIONS``
that exists (where Debian, Ubuntu, Fedora, Arch and Homebrew packages put a GM soundfont). A soundfont named
explicitly must exist: a typo should not silently fall back to another sound.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

from musicray.midi import read_midi

FLUIDSYNTH = "fluidsynth"
SOUNDFONT_ENV = "MUSICRAY_SOUNDFONT"
INSTALL_HINT = "sudo apt-get install fluidsynth fluid-soundfont-gm"
SOUNDFONT_LOCATIONS: tuple[Path, ...] = tuple(Path(p) for p in (
    "/usr/share/sounds/sf2/default-GM.sf2",  # Debian/Ubuntu alternatives symlink (any sf2-soundfont-gm package)
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",  # Debian/Ubuntu fluid-soundfont-gm
    "/usr/share/sounds/sf3/default-GM.sf3",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",    # Debian/Ubuntu timgm6mb-soundfont (6 MB)
    "/usr/share/soundfonts/default.sf2",     # Fedora, Arch
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/local/share/soundfonts/default.sf2",
    "/opt/homebrew/share/soundfonts/default.sf2",
))
DEFAULT_SAMPLE_RATE = 44100
# FluidSynth's own default gain (0.2) leaves a three-track pop song peaking near -17 dBFS; 0.5 brings POP909
# songs to about -7..-4 dBFS without clipping.
DEFAULT_GAIN = 0.5


class RendererUnavailable(FileNotFoundError):
    """fluidsynth or a usable soundfont is missing; the message says which and how to install it."""


class RenderError(RuntimeError):
    """fluidsynth ran but produced no audio file; the message carries its output."""


@dataclass(frozen=True)
class Rendered:
    path: Path
    soundfont: Path
    seconds: float
    sample_rate: int


def find_fluidsynth() -> str:
    executable = shutil.which(FLUIDSYNTH)
    if executable is None:
        raise RendererUnavailable(f"render: the '{FLUIDSYNTH}' program is not installed (not on PATH); "
                                  f"install it with: {INSTALL_HINT}")
    return executable


def is_soundfont(path: Path) -> bool:
    """A SoundFont 2 (or compressed SF3) file is a RIFF chunk of form type 'sfbk'."""
    try:
        with path.open("rb") as file:
            header = file.read(12)
    except OSError:
        return False
    return header[:4] == b"RIFF" and header[8:12] == b"sfbk"


def find_soundfont(soundfont: str | Path | None = None,
                   locations: tuple[Path, ...] | None = None) -> Path:
    """The soundfont to render with: ``soundfont``, else $MUSICRAY_SOUNDFONT, else the first standard location."""
    if soundfont is not None or os.environ.get(SOUNDFONT_ENV):
        path, source = (Path(soundfont), "--soundfont") if soundfont is not None \
            else (Path(os.environ[SOUNDFONT_ENV]), f"${SOUNDFONT_ENV}")
        if not path.is_file():
            raise RendererUnavailable(f"render: soundfont {path} (from {source}) does not exist; point it at a "
                                      f"General MIDI .sf2 file, or install one with: {INSTALL_HINT}")
        if not is_soundfont(path):
            raise RendererUnavailable(f"render: {path} (from {source}) is not a SoundFont file "
                                      f"(no RIFF 'sfbk' header)")
        return path
    candidates = SOUNDFONT_LOCATIONS if locations is None else locations
    for candidate in candidates:
        if candidate.is_file() and is_soundfont(candidate):
            return candidate
    raise RendererUnavailable(f"render: no General MIDI soundfont found (looked in "
                              f"{', '.join(map(str, candidates)) or 'no locations'}; set ${SOUNDFONT_ENV} or pass "
                              f"--soundfont); install one with: {INSTALL_HINT}")


def wav_seconds(path: str | Path) -> float:
    with wave.open(str(path), "rb") as audio:
        return audio.getnframes() / audio.getframerate()


def render(midi_path: str | Path, out: str | Path, soundfont: str | Path | None = None,
           sample_rate: int = DEFAULT_SAMPLE_RATE, gain: float = DEFAULT_GAIN) -> Rendered:
    """Render ``midi_path`` to a 16-bit stereo WAV at ``out``.

    The MIDI is read with musicray's reader first: fluidsynth skips a file it cannot parse and still writes a
    silent WAV with exit status 0, so a corrupt file would otherwise pass unnoticed. The same holds for a bad
    soundfont, hence the header check in ``find_soundfont``.
    """
    if not 8000 <= sample_rate <= 192000:
        raise ValueError(f"sample_rate: {sample_rate} Hz is outside 8000..192000")
    if not 0 < gain <= 10:
        raise ValueError(f"gain: {gain} is outside (0, 10]")
    midi_path, out = Path(midi_path), Path(out)
    read_midi(midi_path)
    executable = find_fluidsynth()
    font = find_soundfont(soundfont)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [executable, "-n", "-i", "-q", "-F", str(out), "-T", "wav", "-O", "s16", "-r", str(sample_rate),
               "-g", str(gain), str(font), str(midi_path)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        output = (result.stderr.strip() or result.stdout.strip() or "no output")[-2000:]
        raise RenderError(f"render: fluidsynth exited with status {result.returncode} and wrote no audio to {out}: "
                          f"{output}")
    return Rendered(out, font, wav_seconds(out), sample_rate)

"""Audio preview: a MIDI file rendered to a 16-bit stereo WAV with a General MIDI SoundFont.

Two renderers, in order of preference (``renderer="auto"``):

* ``fluidsynth``: the FluidSynth program, when it is on PATH (a system package: ``sudo apt-get install
  fluidsynth fluid-soundfont-gm`` on Debian/Ubuntu). The better sound: reverb, chorus and the full SoundFont 2
  modulator model, with its own master gain.
* ``midirenderer``: a pip package (a dependency of musicray, so the plain ``pip install`` brings it): a
  self-contained wheel around the rustysynth SoundFont synthesizer, no system library needed. It renders at
  48 kHz; musicray scales its output by the same gain (relative to FluidSynth's default level) and resamples it to
  the requested rate.

The soundfont is, in order: the one passed in, ``$MUSICRAY_SOUNDFONT``, the first of ``SOUNDFONT_LOCATIONS`` that
exists (where Debian, Ubuntu, Fedora, Arch and Homebrew packages put a GM soundfont), else the General MIDI
SoundFont that the pretty_midi package ships (TimGM6mb.sf2, 6 MB; pretty_midi is a dependency of musicray). A
soundfont named explicitly must exist: a typo should not silently fall back to another sound.

The WAV lasts as long as the song (its last bar for a musicray file, its last note for another MIDI file) plus the
last notes' release: at most ``RELEASE_TAIL_S`` seconds, cut where it falls below -60 dBFS, faded out if still
sounding at the limit. The tracks sound with the General MIDI programs the file holds (musicray writes one per
track, ``musicray.instruments``); ``instruments`` replaces them for this rendering only.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

FLUIDSYNTH = "fluidsynth"
MIDIRENDERER = "midirenderer"
AUTO = "auto"
RENDERERS: tuple[str, ...] = (FLUIDSYNTH, MIDIRENDERER)
SOUNDFONT_ENV = "MUSICRAY_SOUNDFONT"
INSTALL_HINT = "sudo apt-get install fluidsynth fluid-soundfont-gm"
PIP_INSTALL_HINT = f"pip install {MIDIRENDERER} pretty_midi"
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
# The General MIDI SoundFont a registry package ships: pretty_midi's wheel carries TimGM6mb.sf2 (GPL-2.0 soundfont by
# Tim Brechbill, as Debian's timgm6mb-soundfont package).
BUNDLED_SOUNDFONT = ("pretty_midi", "TimGM6mb.sf2")
DEFAULT_SAMPLE_RATE = 44100
# FluidSynth's own default gain (0.2) leaves a three-track pop song peaking near -17 dBFS; 0.5 brings POP909
# songs to about -7..-4 dBFS without clipping.
DEFAULT_GAIN = 0.5
MIDIRENDERER_RATE = 48000  # midirenderer renders at this rate only
# midirenderer's level at DEFAULT_GAIN is raised by this factor (+4 dB): POP909 songs then peak about -12..-4 dBFS,
# near FluidSynth's level at its default gain. Louder songs are scaled down just below full scale, never clipped.
MIDIRENDERER_MAKEUP = 10 ** (4 / 20)
FULL_SCALE = 0.999
RELEASE_TAIL_S = 1.0   # the most a WAV lasts past the song's end
SILENCE = 10 ** (-60 / 20)  # a tail below -60 dBFS is cut
FADE_S = 0.05  # a tail still sounding at RELEASE_TAIL_S is faded out over its last 50 ms
END_MARKER = "musicray:render-end"


class RendererUnavailable(FileNotFoundError):
    """No renderer or no usable soundfont; the message says which and how to install it."""


class RenderError(RuntimeError):
    """The renderer ran but produced no audio; the message carries its output."""


@dataclass(frozen=True)
class Rendered:
    path: Path
    soundfont: Path
    seconds: float        # the WAV's length
    sample_rate: int
    renderer: str         # "fluidsynth" or "midirenderer"
    song_seconds: float   # the song's length: the WAV is as long, plus the last notes' release


# -- what renders --------------------------------------------------------------------------------------------------
def find_fluidsynth() -> str:
    executable = shutil.which(FLUIDSYNTH)
    if executable is None:
        raise RendererUnavailable(f"render: the '{FLUIDSYNTH}' program is not installed (not on PATH); "
                                  f"install it with: {INSTALL_HINT}")
    return executable


def midirenderer_available() -> bool:
    return importlib.util.find_spec(MIDIRENDERER) is not None


def choose_renderer(renderer: str = AUTO) -> str:
    """The renderer to use: FluidSynth if on PATH, else midirenderer (``auto``), or the one named."""
    if renderer == FLUIDSYNTH:
        find_fluidsynth()
        return FLUIDSYNTH
    if renderer == MIDIRENDERER:
        if not midirenderer_available():
            raise RendererUnavailable(f"render: the '{MIDIRENDERER}' package is not installed; install it with: "
                                      f"{PIP_INSTALL_HINT}")
        return MIDIRENDERER
    if renderer != AUTO:
        raise ValueError(f"renderer: {renderer!r} is not one of {AUTO}, {', '.join(RENDERERS)}")
    if shutil.which(FLUIDSYNTH):
        return FLUIDSYNTH
    if midirenderer_available():
        return MIDIRENDERER
    raise RendererUnavailable(f"render: no renderer: neither the '{FLUIDSYNTH}' program nor the '{MIDIRENDERER}' "
                              f"package is installed; install one with: {PIP_INSTALL_HINT} (or: {INSTALL_HINT})")


def is_soundfont(path: Path) -> bool:
    """A SoundFont 2 (or compressed SF3) file is a RIFF chunk of form type 'sfbk'."""
    try:
        with path.open("rb") as file:
            header = file.read(12)
    except OSError:
        return False
    return header[:4] == b"RIFF" and header[8:12] == b"sfbk"


def bundled_soundfont() -> Path | None:
    """pretty_midi's TimGM6mb.sf2, found without importing pretty_midi (a slow import); None if not installed."""
    package, name = BUNDLED_SOUNDFONT
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def find_soundfont(soundfont: str | Path | None = None,
                   locations: tuple[Path, ...] | None = None) -> Path:
    """The soundfont to render with: ``soundfont``, else $MUSICRAY_SOUNDFONT, else the first standard location,
    else the one pretty_midi ships."""
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
    bundled = bundled_soundfont()
    candidates = (SOUNDFONT_LOCATIONS if locations is None else locations) + ((bundled,) if bundled else ())
    for candidate in candidates:
        if candidate.is_file() and is_soundfont(candidate):
            return candidate
    raise RendererUnavailable(f"render: no General MIDI soundfont found (looked in "
                              f"{', '.join(map(str, candidates)) or 'no locations'} and the pretty_midi package; "
                              f"set ${SOUNDFONT_ENV} or pass --soundfont); install one with: pip install pretty_midi "
                              f"(or: {INSTALL_HINT})")


# -- the song's length ---------------------------------------------------------------------------------------------
def seconds_at(midi, tick: int) -> float:
    """Seconds from the start of ``midi`` (a miditoolkit MidiFile) to ``tick``, through its tempo changes."""
    seconds, last_tick, qpm = 0.0, 0, 120.0  # a MIDI file without tempo plays at 120 quarter notes per minute
    for change in sorted(midi.tempo_changes, key=lambda t: t.time):
        if change.time >= tick:
            break
        seconds += (change.time - last_tick) * 60.0 / (qpm * midi.ticks_per_beat)
        last_tick, qpm = change.time, change.tempo
    return seconds + (tick - last_tick) * 60.0 / (qpm * midi.ticks_per_beat)


def _ticks_after(midi, tick: int, seconds: float) -> int:
    """Ticks of ``seconds`` at the tempo in force at ``tick``."""
    qpm = 120.0
    for change in sorted(midi.tempo_changes, key=lambda t: t.time):
        if change.time <= tick:
            qpm = change.tempo
    return int(seconds * qpm * midi.ticks_per_beat / 60.0) + 1


def song_end_tick(midi, song) -> int:
    """The song's end: the end of its last bar in a musicray file, else the end of its last note."""
    from musicray.midi import FORMAT_MARKER, ticks_per_position

    end = max((note.end for instrument in midi.instruments for note in instrument.notes), default=0)
    if any(marker.text == FORMAT_MARKER for marker in midi.markers):
        spec = song.spec
        end = max(end, round(song.n_bars * spec.positions_per_bar * ticks_per_position(spec, midi.ticks_per_beat)))
    return end


# -- rendering -----------------------------------------------------------------------------------------------------
def _read_wav(data) -> tuple:
    """(float32 samples of shape (frames, 2) in [-1, 1], sample rate) of a 16-bit WAV (path or bytes)."""
    import io

    import numpy as np

    with wave.open(io.BytesIO(data) if isinstance(data, bytes) else str(data), "rb") as audio:
        if audio.getsampwidth() != 2:
            raise RenderError(f"render: expected 16-bit audio, got {8 * audio.getsampwidth()}-bit")
        frames = np.frombuffer(audio.readframes(audio.getnframes()), dtype="<i2").reshape(-1, audio.getnchannels())
        rate = audio.getframerate()
    samples = frames.astype(np.float32) / 32768.0
    if samples.shape[1] == 1:
        samples = np.repeat(samples, 2, axis=1)
    return samples[:, :2], rate


def _resample(samples, rate_in: int, rate_out: int):
    """Band-limited resampling (the spectrum cut or zero-padded), one channel at a time.

    The signal is zero-padded to ``down * 2**m`` frames (``rate_out / rate_in == up / down``), so both FFT
    lengths factor into small primes (fast) and are exact multiples of the ratio, and the padding keeps the end
    from wrapping round onto the start."""
    import math

    import numpy as np

    if rate_in == rate_out or not len(samples):
        return samples
    common = math.gcd(rate_in, rate_out)
    up, down = rate_out // common, rate_in // common
    blocks = 1 << max(0, math.ceil(math.log2((len(samples) + rate_in // 10) / down)))
    size_in, size_out = down * blocks, up * blocks
    frames = round(len(samples) * rate_out / rate_in)
    out = np.empty((frames, samples.shape[1]), dtype=np.float32)
    bins = min(size_in, size_out) // 2 + 1
    for channel in range(samples.shape[1]):
        spectrum = np.fft.rfft(samples[:, channel].astype(np.float64), n=size_in)[:bins]
        out[:, channel] = np.fft.irfft(spectrum, n=size_out)[:frames] * (size_out / size_in)
    return out


def _fit_to_song(samples, sample_rate: int, song_seconds: float):
    """The song's length, then its release tail up to RELEASE_TAIL_S (cut at silence, faded if still sounding)."""
    import numpy as np

    song_frames = round(song_seconds * sample_rate)
    if len(samples) < song_frames:
        samples = np.concatenate([samples, np.zeros((song_frames - len(samples), 2), dtype=samples.dtype)])
    level = np.abs(samples[song_frames:]).max(axis=1) if len(samples) > song_frames else np.zeros(0)
    limit = round(RELEASE_TAIL_S * sample_rate)
    audible = np.flatnonzero(level[:limit] > SILENCE)
    tail = int(audible[-1]) + 1 if audible.size else 0
    samples = samples[:song_frames + tail].copy()
    if tail and (level[tail:] > SILENCE).any():  # still sounding where the tail is cut: fade it out
        fade = min(tail, round(FADE_S * sample_rate))
        samples[len(samples) - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)[:, None]
    return samples


def _write_wav(samples, path: Path, sample_rate: int) -> None:
    import numpy as np

    frames = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as audio:
        audio.setnchannels(2)
        audio.setsampwidth(2)
        audio.setframerate(sample_rate)
        audio.writeframes(frames.tobytes())


def _render_fluidsynth(midi_path: Path, font: Path, sample_rate: int, gain: float, work: Path):
    executable = find_fluidsynth()
    wav = work / "fluidsynth.wav"
    command = [executable, "-n", "-i", "-q", "-F", str(wav), "-T", "wav", "-O", "s16", "-r", str(sample_rate),
               "-g", str(gain), str(font), str(midi_path)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0 or not wav.is_file() or wav.stat().st_size == 0:
        output = (result.stderr.strip() or result.stdout.strip() or "no output")[-2000:]
        raise RenderError(f"render: fluidsynth exited with status {result.returncode} and wrote no audio: {output}")
    samples, rate = _read_wav(wav)
    return _resample(samples, rate, sample_rate)


def _render_midirenderer(midi_bytes: bytes, font: Path, sample_rate: int, gain: float):
    import midirenderer
    import numpy as np

    try:
        data = midirenderer.render_wave_from(font.read_bytes(), midi_bytes)
    except BaseException as error:  # a Rust panic arrives as pyo3's PanicException, a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise RenderError(f"render: midirenderer failed with soundfont {font}: {error}") from None
    if not data:
        raise RenderError(f"render: midirenderer produced no audio with soundfont {font}")
    samples, rate = _read_wav(bytes(data))
    samples *= gain / DEFAULT_GAIN * MIDIRENDERER_MAKEUP
    samples = _resample(samples, rate, sample_rate)
    peak = float(np.abs(samples).max()) if len(samples) else 0.0
    if peak > FULL_SCALE:
        samples *= FULL_SCALE / peak
    return samples


def render(midi_path: str | Path, out: str | Path, soundfont: str | Path | None = None,
           sample_rate: int = DEFAULT_SAMPLE_RATE, gain: float = DEFAULT_GAIN, renderer: str = AUTO,
           instruments=None) -> Rendered:
    """Render ``midi_path`` to a 16-bit stereo WAV at ``out``; the result names the renderer and soundfont used.

    ``instruments`` (track -> General MIDI program or name) replaces the programs of those tracks for this
    rendering. The MIDI is read with musicray's reader first: fluidsynth skips a file it cannot parse and still
    writes a silent WAV with exit status 0, so a corrupt file would otherwise pass unnoticed. The same holds for a
    bad soundfont, hence the header check in ``find_soundfont``.
    """
    import io

    import miditoolkit

    from musicray.midi import read_midi, set_instruments

    if not 8000 <= sample_rate <= 192000:
        raise ValueError(f"sample_rate: {sample_rate} Hz is outside 8000..192000")
    if not 0 < gain <= 10:
        raise ValueError(f"gain: {gain} is outside (0, 10]")
    midi_path, out = Path(midi_path), Path(out)
    song = read_midi(midi_path)
    name = choose_renderer(renderer)
    font = find_soundfont(soundfont)
    midi = miditoolkit.MidiFile(str(midi_path))
    if instruments:
        set_instruments(midi, instruments)
    end = song_end_tick(midi, song)
    song_seconds = seconds_at(midi, end)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="musicray-render-") as work:
        if name == FLUIDSYNTH:
            source = midi_path
            if instruments:
                source = Path(work) / "song.mid"
                midi.dump(str(source))
            samples = _render_fluidsynth(source, font, sample_rate, gain, Path(work))
        else:
            # midirenderer stops at the file's last event: a marker past the song's end leaves room for the release.
            midi.markers.append(miditoolkit.Marker(END_MARKER, end + _ticks_after(midi, end, RELEASE_TAIL_S + 0.5)))
            buffer = io.BytesIO()
            midi.dump(file=buffer)
            samples = _render_midirenderer(buffer.getvalue(), font, sample_rate, gain)
    samples = _fit_to_song(samples, sample_rate, song_seconds)
    _write_wav(samples, out, sample_rate)
    return Rendered(out, font, wav_seconds(out), sample_rate, name, song_seconds)


def wav_seconds(path: str | Path) -> float:
    with wave.open(str(path), "rb") as audio:
        return audio.getnframes() / audio.getframerate()

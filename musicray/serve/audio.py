"""``POST /v1/render``: a MIDI file (a composed song, base64) rendered to a WAV the page can play and download.

Rendering is ``musicray.render`` (FluidSynth when on PATH, else the pip-installed midirenderer with
pretty_midi's soundfont). It is CPU work of seconds, so it runs in a worker thread (the ingress' event loop keeps
answering) and at most ``RENDERS_AT_ONCE`` at a time per ingress replica; a song longer than
``max_render_seconds`` is refused before any rendering (a WAV grows by ``sample_rate * 4`` bytes a second).
"""

from __future__ import annotations

import asyncio
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

from musicray.errors import SongError
from musicray.serve.schema import InputError, decode_midi_upload

RENDERS_AT_ONCE = 2  # each render holds a core for seconds; more at once only slows every one of them


class AudioUnavailable(Exception):
    """The server cannot render (no renderer or soundfont installed, or the renderer failed): a 5xx."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Audio:
    wav: bytes
    seconds: float
    renderer: str


def song_seconds(data: bytes) -> float:
    """How long the MIDI file plays (to its last bar for a musicray file); ``InputError`` on ``midi`` if it
    cannot be read."""
    import miditoolkit

    from musicray.midi import midi_to_song
    from musicray.render import seconds_at, song_end_tick

    try:
        song = midi_to_song(data)
    except SongError as err:
        raise InputError("midi", str(err)) from None
    midi = miditoolkit.MidiFile(file=io.BytesIO(data))  # parses: midi_to_song has just read the same bytes
    return seconds_at(midi, song_end_tick(midi, song))


def render_wav(data: bytes, sample_rate: int, max_seconds: float) -> Audio:
    """The WAV of a MIDI file (blocking; call it in a thread)."""
    from musicray.render import RenderError, RendererUnavailable, render

    length = song_seconds(data)
    if length > max_seconds:
        raise InputError("midi", f"the song lasts {length:.0f} s; this server renders at most "
                                 f"max_render_seconds={max_seconds:g} s", 413)
    with tempfile.TemporaryDirectory(prefix="musicray-serve-render-") as work:
        source, out = Path(work) / "song.mid", Path(work) / "song.wav"
        source.write_bytes(data)
        try:
            rendered = render(source, out, sample_rate=sample_rate)
        except RendererUnavailable as err:
            raise AudioUnavailable(503, str(err)) from None
        except RenderError as err:
            raise AudioUnavailable(500, str(err)) from None
        return Audio(out.read_bytes(), rendered.seconds, rendered.renderer)


class Renderer:
    """The ingress' audio: decodes the upload, bounds its size and length, renders off the event loop."""

    def __init__(self, max_midi_bytes: int, sample_rate: int, max_seconds: float):
        self.max_midi_bytes, self.sample_rate, self.max_seconds = max_midi_bytes, sample_rate, max_seconds
        self._slots = asyncio.Semaphore(RENDERS_AT_ONCE)

    async def render(self, midi_base64: str) -> Audio:
        data = decode_midi_upload(midi_base64, self.max_midi_bytes, "midi")
        async with self._slots:
            return await asyncio.to_thread(render_wav, data, self.sample_rate, self.max_seconds)

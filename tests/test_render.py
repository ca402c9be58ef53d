"""Audio preview: MIDI -> WAV through the fluidsynth program, and the messages when it cannot run."""

import os
import stat
import wave

import numpy as np
import pytest

from musicray import render as render_module
from musicray.cli import main
from musicray.midi import write_midi
from musicray.render import INSTALL_HINT, RenderError, RendererUnavailable, find_soundfont, render
from musicray.song import Note, Song, Tempo, parse_form

# Two bars at 120 bpm and two at 60 bpm in 4/4: 2 * 4 * 0.5 s + 2 * 4 * 1 s.
SONG_SECONDS = 12.0
# fluidsynth renders about 3 s past the end of the MIDI file (the last notes' release, then silence).
TAIL_S = 4.0
# The last notes' release fades below this level within a second (measured: about 0.3 s with FluidR3_GM).
AUDIBLE = 300


def four_bar_song() -> Song:
    melody = [Note(bar, beat * 4, 60 + 2 * beat + bar, 4, 70 + 10 * beat) for bar in range(4) for beat in range(4)]
    piano = [Note(bar, 0, pitch, 16, 80) for bar in range(4) for pitch in (48, 55, 64)]
    return Song("render-test", "C:maj", "4/4", parse_form("A4"),
                tracks={"MELODY": melody, "BRIDGE": [], "PIANO": piano},
                tempos=[Tempo(0, 0, 120.0), Tempo(2, 0, 60.0)])


def renderer_missing() -> str | None:
    try:
        render_module.find_fluidsynth()
        find_soundfont()
    except RendererUnavailable as missing:
        return str(missing)
    return None


needs_fluidsynth = pytest.mark.skipif(renderer_missing() is not None,
                                      reason=f"audio rendering unavailable: {renderer_missing()}")


@pytest.fixture
def midi_file(tmp_path):
    return write_midi(four_bar_song(), tmp_path / "song.mid")


@pytest.fixture
def no_default_soundfont(monkeypatch, tmp_path):
    monkeypatch.delenv(render_module.SOUNDFONT_ENV, raising=False)
    monkeypatch.setattr(render_module, "SOUNDFONT_LOCATIONS", (tmp_path / "nowhere" / "default-GM.sf2",))


def read_wav(path):
    with wave.open(str(path), "rb") as audio:
        params = audio.getparams()
        samples = np.frombuffer(audio.readframes(params.nframes), dtype="<i2").reshape(-1, params.nchannels)
    return params, samples


@needs_fluidsynth
def test_render_writes_a_wav_as_long_as_the_song_with_sound_throughout(midi_file, tmp_path):
    rendered = render(midi_file, tmp_path / "out" / "song.wav", sample_rate=22050)
    params, samples = read_wav(rendered.path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, 22050)
    seconds = params.nframes / params.framerate
    assert rendered.seconds == pytest.approx(seconds)
    assert SONG_SECONDS <= seconds <= SONG_SECONDS + TAIL_S
    # A note sounds on every beat: every half second of the song is audible, not only the file as a whole, and
    # the sound ends with the song (so both tempos were honoured).
    level = np.abs(samples.astype(np.int32)).max(axis=1)
    halves = level[: int(SONG_SECONDS * params.framerate)].reshape(-1, params.framerate // 2)
    assert (halves.max(axis=1) > AUDIBLE).all()
    last_audible_s = np.flatnonzero(level > AUDIBLE)[-1] / params.framerate
    assert SONG_SECONDS - 0.1 <= last_audible_s <= SONG_SECONDS + 1.0
    assert level.max() < 32767, "clipped"


@needs_fluidsynth
def test_render_command(midi_file, tmp_path, capsys):
    out = tmp_path / "song.wav"
    assert main(["render", str(midi_file), "--out", str(out), "--sample-rate", "16000"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert read_wav(out)[0].framerate == 16000


@needs_fluidsynth
def test_an_explicit_soundfont_wins_over_the_environment(midi_file, tmp_path, monkeypatch):
    real = find_soundfont()
    monkeypatch.setenv(render_module.SOUNDFONT_ENV, str(tmp_path / "missing.sf2"))
    assert render(midi_file, tmp_path / "song.wav", soundfont=real).soundfont == real


def test_a_corrupt_midi_file_is_named_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "broken.mid"
    bad.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    assert main(["render", str(bad), "--out", str(tmp_path / "song.wav")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("musicray: error:") and "broken.mid" in error and "MIDI" in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "song.wav").exists()


def test_missing_fluidsynth_says_how_to_install_it(midi_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert main(["render", str(midi_file), "--out", str(tmp_path / "song.wav")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "'fluidsynth' program is not installed" in error and error.endswith(INSTALL_HINT)


def test_no_soundfont_anywhere_says_where_it_looked_and_how_to_install_one(no_default_soundfont, tmp_path):
    with pytest.raises(RendererUnavailable, match="no General MIDI soundfont found") as missing:
        find_soundfont()
    assert str(tmp_path / "nowhere" / "default-GM.sf2") in str(missing.value)
    assert "MUSICRAY_SOUNDFONT" in str(missing.value) and str(missing.value).endswith(INSTALL_HINT)


def test_a_soundfont_named_in_the_environment_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(render_module.SOUNDFONT_ENV, str(tmp_path / "typo.sf2"))
    with pytest.raises(RendererUnavailable, match=r"typo.sf2 \(from \$MUSICRAY_SOUNDFONT\) does not exist"):
        find_soundfont()


def test_a_file_that_is_not_a_soundfont_is_refused(tmp_path):
    fake = tmp_path / "font.sf2"
    fake.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    with pytest.raises(RendererUnavailable, match="font.sf2 \\(from --soundfont\\) is not a SoundFont file"):
        find_soundfont(fake)


def test_the_first_standard_soundfont_that_exists_is_used(no_default_soundfont, monkeypatch, tmp_path):
    font = tmp_path / "FluidR3_GM.sf2"
    font.write_bytes(b"RIFF\x10\x00\x00\x00sfbkLIST")
    monkeypatch.setattr(render_module, "SOUNDFONT_LOCATIONS", (tmp_path / "absent.sf2", font))
    assert find_soundfont() == font


def test_a_failing_fluidsynth_is_reported_with_its_output(midi_file, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "fluidsynth"
    program.write_text("#!/bin/sh\necho 'fluidsynth: error: out of memory' >&2\nexit 3\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    font = tmp_path / "font.sf2"
    font.write_bytes(b"RIFF\x10\x00\x00\x00sfbkLIST")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RenderError, match="exited with status 3 .*out of memory"):
        render(midi_file, tmp_path / "song.wav", soundfont=font)


@pytest.mark.parametrize("setting, message", [({"sample_rate": 100}, "sample_rate"), ({"gain": 0}, "gain")])
def test_out_of_range_settings_are_refused(midi_file, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        render(midi_file, tmp_path / "song.wav", **setting)

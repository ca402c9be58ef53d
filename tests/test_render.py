"""Audio preview: MIDI -> WAV with the pip-installed renderer (midirenderer, pretty_midi's soundfont) or the
fluidsynth program, and the messages when neither can run."""

import os
import stat
import sys
import wave

import numpy as np
import pytest

from musicray import render as render_module
from musicray.cli import main
from musicray.instruments import DEFAULT_INSTRUMENTS
from musicray.midi import midi_instruments, write_midi
from musicray.render import (
    INSTALL_HINT, PIP_INSTALL_HINT, RELEASE_TAIL_S, RenderError, RendererUnavailable, bundled_soundfont,
    find_soundfont, is_soundfont, render,
)
from musicray.song import Note, Song, Tempo, parse_form

# Two bars at 120 bpm and two at 60 bpm in 4/4: 2 * 4 * 0.5 s + 2 * 4 * 1 s.
SONG_SECONDS = 12.0
# Level (16-bit) a note sounds above; the last notes' release falls below it within a second.
AUDIBLE = 300


def four_bar_song(bars_with_notes: int = 4) -> Song:
    melody = [Note(bar, beat * 4, 60 + 2 * beat + bar, 4, 70 + 10 * beat)
              for bar in range(bars_with_notes) for beat in range(4)]
    piano = [Note(bar, 0, pitch, 16, 80) for bar in range(bars_with_notes) for pitch in (48, 55, 64)]
    bridge = [Note(bar, 8, 72, 8, 60) for bar in range(bars_with_notes)]
    return Song("render-test", "C:maj", "4/4", parse_form("A4"),
                tracks={"MELODY": melody, "BRIDGE": bridge, "PIANO": piano},
                tempos=[Tempo(0, 0, 120.0), Tempo(2, 0, 60.0)])


def fluidsynth_missing() -> str | None:
    try:
        render_module.find_fluidsynth()
    except RendererUnavailable as missing:
        return str(missing)
    return None


needs_fluidsynth = pytest.mark.skipif(fluidsynth_missing() is not None,
                                      reason=f"the FluidSynth program is optional: {fluidsynth_missing()}")


@pytest.fixture
def midi_file(tmp_path):
    return write_midi(four_bar_song(), tmp_path / "song.mid")


@pytest.fixture
def no_default_soundfont(monkeypatch, tmp_path):
    monkeypatch.delenv(render_module.SOUNDFONT_ENV, raising=False)
    monkeypatch.setattr(render_module, "SOUNDFONT_LOCATIONS", (tmp_path / "nowhere" / "default-GM.sf2",))
    monkeypatch.setattr(render_module, "bundled_soundfont", lambda: None)


@pytest.fixture
def no_fluidsynth(monkeypatch, tmp_path):
    (tmp_path / "empty-bin").mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def read_wav(path):
    with wave.open(str(path), "rb") as audio:
        params = audio.getparams()
        samples = np.frombuffer(audio.readframes(params.nframes), dtype="<i2").reshape(-1, params.nchannels)
    return params, samples


def check_song_audio(rendered, sample_rate: int, song_seconds: float = SONG_SECONDS, sounding_until=SONG_SECONDS):
    """16-bit stereo at the rate asked for, as long as the song plus at most the release tail, sound on every
    half second while notes play (so both tempos were honoured), silence after, no clipping."""
    params, samples = read_wav(rendered.path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, sample_rate)
    seconds = params.nframes / params.framerate
    assert rendered.seconds == pytest.approx(seconds) and rendered.sample_rate == sample_rate
    assert rendered.song_seconds == pytest.approx(song_seconds)
    assert song_seconds <= seconds <= song_seconds + RELEASE_TAIL_S + 1e-3
    level = np.abs(samples.astype(np.int32)).max(axis=1)
    halves = level[: int(sounding_until * sample_rate)].reshape(-1, sample_rate // 2)
    assert (halves.max(axis=1) > AUDIBLE).all()
    last_audible_s = np.flatnonzero(level > AUDIBLE)[-1] / sample_rate
    assert sounding_until - 0.1 <= last_audible_s <= sounding_until + RELEASE_TAIL_S
    assert level.max() < 32767, "clipped"
    return samples


# -- the pip renderer ------------------------------------------------------------------------------------------------
def test_the_soundfont_pretty_midi_ships_is_found():
    font = bundled_soundfont()
    assert font is not None and font.name == "TimGM6mb.sf2" and is_soundfont(font)


def test_pip_renderer_writes_a_wav_as_long_as_the_song_with_sound_throughout(midi_file, tmp_path):
    rendered = render(midi_file, tmp_path / "out" / "song.wav", sample_rate=22050, renderer="midirenderer")
    assert rendered.renderer == "midirenderer" and rendered.soundfont == find_soundfont()
    check_song_audio(rendered, 22050)


def test_a_silent_last_bar_still_counts_and_a_foreign_file_ends_with_its_last_note(tmp_path):
    song = four_bar_song(bars_with_notes=3)  # bar 3 (12 s in) is silent: the song still lasts 12 s
    rendered = render(write_midi(song, tmp_path / "song.mid"), tmp_path / "song.wav", sample_rate=16000,
                      renderer="midirenderer")
    check_song_audio(rendered, 16000, sounding_until=8.0)
    import miditoolkit

    foreign = miditoolkit.MidiFile(str(tmp_path / "song.mid"))
    foreign.markers = []  # no musicray markers: a file from elsewhere, which ends with its last note (8 s)
    foreign.dump(str(tmp_path / "foreign.mid"))
    rendered = render(tmp_path / "foreign.mid", tmp_path / "foreign.wav", sample_rate=16000, renderer="midirenderer")
    check_song_audio(rendered, 16000, song_seconds=8.0, sounding_until=8.0)


def test_auto_renders_with_the_pip_renderer_without_fluidsynth(midi_file, tmp_path, no_fluidsynth, capsys):
    out = tmp_path / "song.wav"
    assert main(["render", str(midi_file), "--out", str(out), "--sample-rate", "16000"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "renderer midirenderer" in printed and "TimGM6mb.sf2" in printed
    assert read_wav(out)[0].framerate == 16000


def test_each_track_sounds_with_its_own_instrument(tmp_path):
    song = four_bar_song()
    paths = {name: write_midi(song, tmp_path / f"{name}.mid", instruments=instruments) for name, instruments in
             {"default": None, "all-piano": {"MELODY": 0, "BRIDGE": 0, "PIANO": 0}}.items()}
    assert midi_instruments(paths["default"]) == DEFAULT_INSTRUMENTS
    audio = {name: read_wav(render(path, tmp_path / f"{name}.wav", sample_rate=16000,
                                   renderer="midirenderer").path)[1].astype(np.float32) for name, path in paths.items()}
    # The same notes with another instrument sound different; --instrument on render replaces the file's.
    frames = min(len(a) for a in audio.values())
    assert np.abs(audio["default"][:frames] - audio["all-piano"][:frames]).mean() > 50
    replaced = render(paths["all-piano"], tmp_path / "replaced.wav", sample_rate=16000, renderer="midirenderer",
                      instruments=dict(DEFAULT_INSTRUMENTS))
    np.testing.assert_array_equal(read_wav(replaced.path)[1], read_wav(tmp_path / "default.wav")[1])


def test_render_command_takes_instruments_and_refuses_unknown_ones(midi_file, tmp_path, capsys):
    out = tmp_path / "song.wav"
    assert main(["render", str(midi_file), "--out", str(out), "--renderer", "midirenderer",
                 "--instrument", "melody=flute", "--instrument", "PIANO=4"]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["render", str(midi_file), "--out", str(out), "--instrument", "MELODY=kazoo"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "--instrument" in error and "'kazoo' is not a General MIDI instrument" in error


def test_gain_scales_the_pip_renderer_without_clipping(midi_file, tmp_path):
    peaks = {}
    for gain in (0.1, 0.5, 10.0):
        samples = read_wav(render(midi_file, tmp_path / f"{gain}.wav", sample_rate=16000, gain=gain,
                                  renderer="midirenderer").path)[1]
        peaks[gain] = int(np.abs(samples.astype(np.int32)).max())
    assert peaks[0.1] * 4 < peaks[0.5] < peaks[10.0] < 32767


def test_a_failing_pip_renderer_is_one_line_and_exit_status_1(midi_file, tmp_path, capsys):
    font = tmp_path / "font.sf2"
    font.write_bytes(b"RIFF\x10\x00\x00\x00sfbkLIST")  # a SoundFont header and nothing else
    with pytest.raises(RenderError, match="midirenderer failed with soundfont .*font.sf2"):
        render(midi_file, tmp_path / "song.wav", soundfont=font, renderer="midirenderer")
    assert main(["render", str(midi_file), "--out", str(tmp_path / "song.wav"), "--soundfont", str(font),
                 "--renderer", "midirenderer"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("musicray: error: render: midirenderer failed") and len(error.splitlines()) == 1
    assert not (tmp_path / "song.wav").exists()


# -- FluidSynth ------------------------------------------------------------------------------------------------------
@needs_fluidsynth
def test_fluidsynth_writes_a_wav_as_long_as_the_song_with_sound_throughout(midi_file, tmp_path):
    rendered = render(midi_file, tmp_path / "out" / "song.wav", sample_rate=22050, renderer="fluidsynth")
    assert rendered.renderer == "fluidsynth"
    check_song_audio(rendered, 22050)


@needs_fluidsynth
def test_an_explicit_soundfont_wins_over_the_environment(midi_file, tmp_path, monkeypatch):
    real = find_soundfont()
    monkeypatch.setenv(render_module.SOUNDFONT_ENV, str(tmp_path / "missing.sf2"))
    assert render(midi_file, tmp_path / "song.wav", soundfont=real, renderer="fluidsynth").soundfont == real


FAKE_FLUIDSYNTH = """#!{python}
# Stands in for fluidsynth: writes 3 s more than the song (a tone, then reverb-like noise) to -F at -r Hz.
import sys, wave
import numpy as np
args = sys.argv[1:]
out, rate = args[args.index("-F") + 1], int(args[args.index("-r") + 1])
open("{args_file}", "w").write(" ".join(args))
t = np.arange(int({seconds} * rate)) / rate
tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (t < {song})
tone += 0.01 * np.sin(2 * np.pi * 220 * t) * (t >= {song})  # still sounding past the song's end
frames = (np.stack([tone, tone], 1) * 32767).astype("<i2")
with wave.open(out, "wb") as w:
    w.setnchannels(2); w.setsampwidth(2); w.setframerate(rate); w.writeframes(frames.tobytes())
"""


def fake_fluidsynth(tmp_path, monkeypatch, script: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "fluidsynth"
    program.write_text(script)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_fluidsynth_is_preferred_and_its_tail_is_cut_to_the_release(midi_file, tmp_path, monkeypatch):
    args_file = tmp_path / "fluidsynth-args.txt"
    fake_fluidsynth(tmp_path, monkeypatch, FAKE_FLUIDSYNTH.format(python=sys.executable, seconds=SONG_SECONDS + 3,
                                                                  song=SONG_SECONDS, args_file=args_file))
    out = tmp_path / "song.wav"
    rendered = render(midi_file, out, sample_rate=8000, gain=0.7, instruments={"MELODY": "Flute"})
    assert rendered.renderer == "fluidsynth"
    assert rendered.seconds == pytest.approx(SONG_SECONDS + RELEASE_TAIL_S)
    args = args_file.read_text().split()
    assert args[args.index("-g") + 1] == "0.7" and args[-2] == str(rendered.soundfont)
    assert args[-1] != str(midi_file), "with --instrument fluidsynth plays a copy with those programs"
    samples = read_wav(out)[1].astype(np.int32)
    tail_level = np.abs(samples[-4000:-1000]).max()  # 0.01 of full scale: still sounding when cut...
    assert tail_level > 250 and np.abs(samples[-10:]).max() < tail_level / 20, "...so faded out"


def test_a_failing_fluidsynth_is_reported_with_its_output(midi_file, tmp_path, monkeypatch, capsys):
    fake_fluidsynth(tmp_path, monkeypatch, "#!/bin/sh\necho 'fluidsynth: error: out of memory' >&2\nexit 3\n")
    font = tmp_path / "font.sf2"
    font.write_bytes(b"RIFF\x10\x00\x00\x00sfbkLIST")
    with pytest.raises(RenderError, match="exited with status 3 .*out of memory"):
        render(midi_file, tmp_path / "song.wav", soundfont=font)
    assert main(["render", str(midi_file), "--out", str(tmp_path / "song.wav"), "--soundfont", str(font)]) == 1
    assert "out of memory" in capsys.readouterr().err


def test_missing_fluidsynth_asked_for_says_how_to_install_it(midi_file, tmp_path, no_fluidsynth, capsys):
    assert main(["render", str(midi_file), "--out", str(tmp_path / "song.wav"), "--renderer", "fluidsynth"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "'fluidsynth' program is not installed" in error and error.endswith(INSTALL_HINT)


def test_no_renderer_at_all_says_what_to_install(midi_file, tmp_path, no_fluidsynth, monkeypatch, capsys):
    monkeypatch.setattr(render_module, "midirenderer_available", lambda: False)
    assert main(["render", str(midi_file), "--out", str(tmp_path / "song.wav")]) == 2
    error = capsys.readouterr().err.strip()
    assert "no renderer" in error and PIP_INSTALL_HINT in error and INSTALL_HINT in error
    with pytest.raises(RendererUnavailable, match="'midirenderer' package is not installed"):
        render(midi_file, tmp_path / "song.wav", renderer="midirenderer")


# -- input and settings ----------------------------------------------------------------------------------------------
def test_a_corrupt_midi_file_is_named_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "broken.mid"
    bad.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    assert main(["render", str(bad), "--out", str(tmp_path / "song.wav")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("musicray: error:") and "broken.mid" in error and "MIDI" in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "song.wav").exists()


def test_no_soundfont_anywhere_says_where_it_looked_and_how_to_install_one(no_default_soundfont, tmp_path):
    with pytest.raises(RendererUnavailable, match="no General MIDI soundfont found") as missing:
        find_soundfont()
    assert str(tmp_path / "nowhere" / "default-GM.sf2") in str(missing.value)
    assert "MUSICRAY_SOUNDFONT" in str(missing.value) and "pip install pretty_midi" in str(missing.value)
    assert str(missing.value).endswith(INSTALL_HINT + ")")


def test_a_soundfont_named_in_the_environment_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(render_module.SOUNDFONT_ENV, str(tmp_path / "typo.sf2"))
    with pytest.raises(RendererUnavailable, match=r"typo.sf2 \(from \$MUSICRAY_SOUNDFONT\) does not exist"):
        find_soundfont()


def test_a_file_that_is_not_a_soundfont_is_refused(tmp_path):
    fake = tmp_path / "font.sf2"
    fake.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    with pytest.raises(RendererUnavailable, match="font.sf2 \\(from --soundfont\\) is not a SoundFont file"):
        find_soundfont(fake)


def test_a_system_soundfont_comes_before_the_bundled_one(no_default_soundfont, monkeypatch, tmp_path):
    font = tmp_path / "FluidR3_GM.sf2"
    font.write_bytes(b"RIFF\x10\x00\x00\x00sfbkLIST")
    monkeypatch.setattr(render_module, "SOUNDFONT_LOCATIONS", (tmp_path / "absent.sf2", font))
    monkeypatch.setattr(render_module, "bundled_soundfont", lambda: tmp_path / "bundled.sf2")
    assert find_soundfont() == font


@pytest.mark.parametrize("setting, message", [({"sample_rate": 100}, "sample_rate"), ({"gain": 0}, "gain"),
                                              ({"renderer": "timidity"}, "renderer")])
def test_out_of_range_settings_are_refused(midi_file, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        render(midi_file, tmp_path / "song.wav", **setting)

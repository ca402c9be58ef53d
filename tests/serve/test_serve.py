"""The Ray Serve graph on the tiny model: real Serve, HTTP on 127.0.0.1, MIDI read back with two parsers."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest

requests = pytest.importorskip("requests")
mido = pytest.importorskip("mido")
miditoolkit = pytest.importorskip("miditoolkit")

from musicray.run import RunDir  # noqa: E402
from musicray.tokens import SUBTASKS  # noqa: E402

from .conftest import serving  # noqa: E402

# Ray Serve's own config models use a pydantic v1-style Field argument; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

TICKS_PER_BAR_44 = 4 * 480
# Small and quick: short stage caps, a low bar limit and a small upload limit (so the limit tests are cheap).
CONFIG = {
    "engine": "native",   # musicray's own loop; the vLLM engine has its own module (test_serve_vllm.py)
    "max_bars": 16,
    "max_midi_bytes": 4096,
    "max_batch_size": 4,
    "batch_wait_timeout_s": 0.05,
    "tokens_per_bar": {"chord": 6, "melody": 10, "secondary": 10},
    "torch_threads": 1,
    "ingress": {"ray_actor_options": {"num_cpus": 0.1}},
    "stages": {"default": {"ray_actor_options": {"num_cpus": 0.25}}},
}




@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir without training: the tiny model with music tokens, and five random (non-zero) LoRA adapters."""
    import torch
    from peft import LoraConfig, get_peft_model

    from musicray.model import add_music_tokens, load_base, load_music_model, save_music_model
    from musicray.tokens import Vocabulary

    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    model, tokenizer = load_base("tiny", root / "cache")
    torch.manual_seed(0)  # the new music-token embeddings are drawn at random: the same model every run
    music = add_music_tokens(model, tokenizer, Vocabulary())
    save_music_model(model, music, RunDir(run).stage1_model)
    for i, subtask in enumerate(SUBTASKS):
        torch.manual_seed(100 + i)
        base, _ = load_music_model(RunDir(run).stage1_model)
        adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                  init_lora_weights=False))
        adapted.save_pretrained(RunDir(run).adapter(subtask))
    return run


@pytest.fixture(scope="module")
def serve_url(run_dir):
    with serving(run_dir, CONFIG, num_cpus=4) as url:
        yield url


@pytest.fixture(scope="module")
def mux_url(serve_url, run_dir):
    """The multiplexed layout as a second application of the same Serve instance."""
    from ray import serve

    from musicray.serve import build_app

    serve.run(build_app(run_dir, {**CONFIG, "multiplexed": True}), name="musicray-mux", route_prefix="/mux")
    yield serve_url + "/mux"
    serve.delete("musicray-mux")  # the per-adapter app keeps running for the tests after this one


def post(url: str, body, **kwargs):
    return requests.post(url + "/v1/generate", json=body, timeout=300, **kwargs)


def generate(url: str, body: dict) -> dict:
    response = post(url, body)
    assert response.status_code == 200, response.text
    return response.json()


# -- reading the MIDI back ---------------------------------------------------------------------------------------
def check_midi(data: bytes, form: str, key_signature: str = "C") -> dict:
    """Three named tracks, sections where the form puts them, notes inside the form, varied velocities, a tempo
    map; read with miditoolkit and with mido (independently). Returns facts for further checks."""
    from musicray.midi import midi_to_song
    from musicray.song import parse_form

    sections = parse_form(form)
    bars = sum(s.bars for s in sections)
    end = bars * TICKS_PER_BAR_44
    starts, bar = [], 0
    for section in sections:
        starts.append((f"section:{section.label}{section.bars}", bar * TICKS_PER_BAR_44))
        bar += section.bars

    midi = miditoolkit.MidiFile(file=io.BytesIO(data))
    assert midi.ticks_per_beat == 480
    assert [inst.name for inst in midi.instruments] == ["MELODY", "BRIDGE", "PIANO"]
    assert [(m.text, m.time) for m in midi.markers if m.text.startswith("section:")] == starts
    notes = [note for inst in midi.instruments for note in inst.notes]
    assert notes, "no notes at all"
    assert all(0 <= note.start < end for note in notes), "a note starts outside the form"
    velocities = [note.velocity for note in notes]
    assert all(1 <= v <= 127 for v in velocities) and len(set(velocities)) >= 3, velocities
    assert midi.tempo_changes and all(20 <= t.tempo <= 320 for t in midi.tempo_changes)
    assert [(ts.numerator, ts.denominator) for ts in midi.time_signature_changes] == [(4, 4)]
    assert midi.key_signature_changes[0].key_name == key_signature

    # mido: absolute ticks per track, straight from the events.
    parsed = mido.MidiFile(file=io.BytesIO(data))
    assert parsed.type == 1 and parsed.ticks_per_beat == 480
    names, onsets, tempos, markers, signatures = [], [], [], [], []
    for track in parsed.tracks:
        tick = 0
        for message in track:
            tick += message.time
            if message.type == "track_name":
                names.append(message.name)
            elif message.type == "note_on" and message.velocity > 0:
                onsets.append((tick, message.velocity))
            elif message.type == "set_tempo":
                tempos.append(mido.tempo2bpm(message.tempo))
            elif message.type == "marker":
                markers.append((message.text, tick))
            elif message.type == "time_signature":
                signatures.append((message.numerator, message.denominator))
    assert {"MELODY", "BRIDGE", "PIANO"} <= set(names)
    assert len(onsets) == len(notes) and sorted(v for _, v in onsets) == sorted(velocities)
    assert all(0 <= tick < end for tick, _ in onsets)
    assert tempos and signatures == [(4, 4)]
    assert [m for m in markers if m[0].startswith("section:")] == starts

    song = midi_to_song(data)
    assert song.form == form and song.n_bars == bars
    return {"midi": midi, "song": song, "end": end}


# -- good requests -----------------------------------------------------------------------------------------------
def test_generate_returns_a_three_track_midi_with_the_requested_form(serve_url):
    out = generate(serve_url, {"form": "A2B2", "key": "G:maj", "tempo": 96, "seed": 3})
    assert out["form"] == "A2B2" and out["bars"] == 4 and out["key"] == "G:maj" and out["seconds"] > 0
    assert list(out["stages"]) == list(SUBTASKS)
    for task, info in out["stages"].items():
        assert info["adapter"] == task and info["new_tokens"] > 0 and info["tokens"].endswith("<End>")
        assert info["seconds"] >= 0
    facts = check_midi(base64.b64decode(out["midi"]), "A2B2", key_signature="G")
    tempo_bpms = {t.bpm for t in facts["song"].tempos}
    assert tempo_bpms and all(20 <= bpm <= 300 for bpm in tempo_bpms)


def test_given_chords_fill_every_bar_of_every_section(serve_url):
    """Chords for each bar skip the chord stage; the voiced PIANO then sounds in exactly the form's bars."""
    form = "i1A2B3"
    chords = ["C:maj", "A:min", "F:maj,G:maj", "C:maj", "D:min7", "G:7"]
    out = generate(serve_url, {"form": form, "seed": 5, "chords": chords})
    assert "chord" not in out["stages"] and list(out["stages"]) == ["melody", "secondary", "dynamics", "tempo"]
    facts = check_midi(base64.b64decode(out["midi"]), form)
    piano = facts["midi"].instruments[2].notes
    assert {n.start // TICKS_PER_BAR_44 for n in piano} == set(range(6))
    assert max(n.end for n in piano) == facts["end"]
    song = facts["song"]
    assert [c.label for c in song.chords] == ["C:maj", "A:min", "F:maj", "G:maj", "C:maj", "D:min7", "G:7"]
    # The string form of the same chords gives the same song.
    again = generate(serve_url, {"form": form, "seed": 5, "chords": " ".join(chords)})
    assert again["midi"] == out["midi"]


def test_uploaded_melody_replaces_the_melody_stage(serve_url):
    from musicray.midi import midi_to_song, song_to_midi
    from musicray.song import Note, Song, parse_form

    melody = [Note(bar, pos, 60 + (bar * 3 + pos) % 12, 4, 90) for bar in range(4) for pos in (0, 8)]
    mine = Song("mine", "C:maj", "4/4", parse_form("A4"), tracks={"MELODY": melody, "BRIDGE": [], "PIANO": []})
    buffer = io.BytesIO()
    song_to_midi(mine).dump(file=buffer)
    upload = base64.b64encode(buffer.getvalue()).decode()
    out = generate(serve_url, {"form": "A2B2", "seed": 2, "melody_midi": upload, "stages": ["chord", "melody",
                                                                                             "secondary", "tempo"]})
    assert list(out["stages"]) == ["chord", "secondary", "tempo"]
    assert out["stages"]["chord"]["inputs"] == ["melody"]  # chords written for the uploaded tune
    song = midi_to_song(base64.b64decode(out["midi"]))
    assert [(n.bar, n.position, n.pitch, n.duration) for n in song.tracks["MELODY"]] == \
        [(n.bar, n.position, n.pitch, n.duration) for n in melody]
    assert song.form == "A2B2"


def test_accept_audio_midi_returns_midi_bytes(serve_url):
    body = {"form": "A2B2", "seed": 11}
    response = post(serve_url, body, headers={"Accept": "audio/midi"})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/midi"
    assert response.content.startswith(b"MThd") and response.headers["x-musicray-form"] == "A2B2"
    check_midi(response.content, "A2B2")
    by_query = requests.post(serve_url + "/v1/generate?format=midi", json=body, timeout=300)
    assert by_query.headers["content-type"] == "audio/midi"
    # Same request and seed: the same song, whichever way it is asked for.
    assert by_query.content == response.content
    assert base64.b64decode(generate(serve_url, body)["midi"]) == response.content


def burst(url: str, seeds: range) -> list[dict]:
    """Post one A2B2 request per seed, all at once; every answer is a 200 with a valid song."""
    start = threading.Barrier(len(seeds))
    results: dict[int, requests.Response] = {}

    def client(seed: int) -> None:
        start.wait()
        results[seed] = post(url, {"form": "A2B2", "seed": seed})

    threads = [threading.Thread(target=client, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(results) == list(seeds)
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    outs = [r.json() for r in results.values()]
    for out in outs:
        check_midi(base64.b64decode(out["midi"]), "A2B2")
    assert len({out["midi"] for out in outs}) == len(seeds)  # per-row seeds: different songs
    return outs


def test_concurrent_requests_all_succeed_and_are_batched(serve_url):
    outs = burst(serve_url, range(20, 24))
    # Four requests arriving together share at least one decode batch.
    assert max(info["batch"] for out in outs for info in out["stages"].values()) >= 2


def test_multiplexed_batches_whole_songs_through_their_stages(mux_url):
    outs = burst(mux_url, range(24, 28))
    # A song batched with others stays with them through all five stages: one batch size per song.
    assert all(len({info["batch"] for info in out["stages"].values()}) == 1 for out in outs)
    assert max(info["batch"] for out in outs for info in out["stages"].values()) >= 2


def test_mixed_sampling_settings_are_decoded_in_separate_groups(serve_url):
    """A burst with different sampling settings: each settings group is its own decode, so greedy requests stay
    greedy (identical songs whatever their seeds) and a lone sampling setting is a batch of one."""
    bodies = {40: {"temperature": 0.0}, 41: {"temperature": 0.0}, 42: {}, 43: {"top_k": 5}}
    start = threading.Barrier(len(bodies))
    results: dict[int, requests.Response] = {}

    def client(seed: int) -> None:
        start.wait()
        results[seed] = post(serve_url, {"form": "A2B2", "seed": seed, **bodies[seed]})

    threads = [threading.Thread(target=client, args=(seed,)) for seed in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    outs = {seed: r.json() for seed, r in results.items()}
    assert outs[40]["midi"] == outs[41]["midi"] != outs[42]["midi"]
    for seed in (42, 43):
        assert all(info["batch"] == 1 for info in outs[seed]["stages"].values())
    assert all(info["batch"] <= 2 for out in outs.values() for info in out["stages"].values())
    assert generate(serve_url, {"form": "A2B2", "seed": 99, "temperature": 0})["midi"] == outs[40]["midi"]


def test_stage_sampling_sets_single_stages(serve_url):
    """Greedy in every stage through ``stage_sampling`` is the greedy song; greedy in the chord stage alone keeps
    the chords of another seed and not its melody."""
    from musicray.midi import midi_to_song

    greedy = generate(serve_url, {"form": "A2B2", "seed": 1, "temperature": 0})
    per_stage = generate(serve_url, {"form": "A2B2", "seed": 2,
                                     "stage_sampling": {stage: {"temperature": 0} for stage in SUBTASKS}})
    assert per_stage["midi"] == greedy["midi"]
    songs = [midi_to_song(base64.b64decode(generate(serve_url, {
        "form": "A2B2", "seed": seed, "stage_sampling": {"chord": {"temperature": 0}}})["midi"])) for seed in (3, 4)]
    assert songs[0].chords == songs[1].chords
    assert songs[0].tracks["MELODY"] != songs[1].tracks["MELODY"]


def test_serve_matches_the_in_process_composer(serve_url, run_dir, monkeypatch):
    import torch

    import musicray.compose as compose
    from musicray.compose import Composer, Request
    from musicray.midi import midi_to_song, song_to_midi

    for task, cap in CONFIG["tokens_per_bar"].items():
        monkeypatch.setitem(compose.TOKENS_PER_BAR, task, cap)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local, report = Composer(run_dir).compose(Request("A2B2", key="D:min", tempo=120, seed=9))
    finally:
        torch.set_num_threads(threads)
    answer = generate(serve_url, {"form": "A2B2", "key": "D:min", "tempo": 120, "seed": 9})
    served = midi_to_song(base64.b64decode(answer["midi"]))
    # The answer carries each stage's report as `musicray generate` writes it (and what serving adds).
    for task, info in report["stages"].items():
        assert set(info) <= set(answer["stages"][task]), set(info) - set(answer["stages"][task])
        assert answer["stages"][task]["tokens"] == info["tokens"]
    # The served song is read back from its MIDI file, where a note is cut when the same pitch starts again.
    buffer = io.BytesIO()
    song_to_midi(local).dump(file=buffer)
    local = midi_to_song(buffer.getvalue())
    assert served.chords == local.chords
    assert served.tracks == local.tracks, {name: (sorted(set(served.tracks[name]) - set(local.tracks[name]))[:2],
                                                  sorted(set(local.tracks[name]) - set(served.tracks[name]))[:2])
                                           for name in local.tracks}
    assert [t.bpm for t in served.tempos] == pytest.approx([t.bpm for t in _collapsed(local.tempos)])


def _collapsed(tempos):
    from musicray.midi import collapse_tempos

    return collapse_tempos(tempos)


def test_healthz_and_docs(serve_url):
    health = requests.get(serve_url + "/healthz", timeout=60)
    assert health.status_code == 200
    body = health.json()
    assert body["ok"] is True and body["mode"] == "per-adapter"
    assert body["adapters"] == {task: task for task in SUBTASKS}
    assert set(body["deployments"]) == {f"stage_{task}" for task in SUBTASKS}
    assert all(d["adapters"] == d["subtasks"] for d in body["deployments"].values())
    docs = requests.get(serve_url + "/docs", timeout=60)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = requests.get(serve_url + "/openapi.json", timeout=60).json()
    assert "/v1/generate" in schema["paths"] and "/healthz" in schema["paths"]


# -- bad input: a 4xx naming the field, never a 5xx ---------------------------------------------------------------
def _midi_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _two_bar_song() -> str:
    from musicray.midi import song_to_midi
    from musicray.song import Note, Song, parse_form

    melody = [Note(bar, 0, 64 + bar, 8, 90) for bar in range(2)]
    buffer = io.BytesIO()
    song_to_midi(Song("two", "C:maj", "4/4", parse_form("A2"), tracks={"MELODY": melody, "BRIDGE": [], "PIANO": []})
                 ).dump(file=buffer)
    return _midi_b64(buffer.getvalue())


@pytest.mark.parametrize("url", ["serve_url", "mux_url"])
def test_regenerate_rewrites_one_section_of_an_uploaded_song(request, url):
    """Infilling over HTTP: the uploaded song's bars outside section B come back note for note, chord for chord."""
    from musicray.midi import midi_to_song

    url = request.getfixturevalue(url)
    first = generate(url, {"form": "A2B2A2", "seed": 21})
    given = midi_to_song(base64.b64decode(first["midi"]))
    out = generate(url, {"form": "A2B2A2", "seed": 22, "song_midi": first["midi"], "regenerate": "B"})
    assert list(out["stages"]) == list(SUBTASKS)
    song = midi_to_song(base64.b64decode(out["midi"]))
    kept = {0, 1, 4, 5}

    def onsets(notes):   # a kept note may be cut in the MIDI where a rewritten note of its pitch starts
        return [(n.bar, n.position, n.pitch, n.velocity) for n in notes if n.bar in kept]

    for name in ("MELODY", "BRIDGE"):
        assert onsets(song.tracks[name]) == onsets(given.tracks[name])
    assert [t for t in song.tempos if t.bar in kept] == [t for t in given.tempos if t.bar in kept]
    assert [n for n in song.tracks["MELODY"] if n.bar in (2, 3)] != [n for n in given.tracks["MELODY"]
                                                                      if n.bar in (2, 3)]


def test_continue_bars_extends_an_uploaded_song_and_keeps_every_given_bar(serve_url):
    """Continuation over HTTP: form A2B2 continued by two bars is A2B2C2; the uploaded bars come back note for
    note, chord for chord, and the two new bars have a melody."""
    from musicray.midi import midi_to_song

    first = generate(serve_url, {"form": "A2B2", "seed": 31})
    given = midi_to_song(base64.b64decode(first["midi"]))
    out = generate(serve_url, {"form": "A2B2", "seed": 32, "song_midi": first["midi"], "continue_bars": 2})
    assert out["form"] == "A2B2C2" and out["bars"] == 6 and list(out["stages"]) == list(SUBTASKS)
    song = check_midi(base64.b64decode(out["midi"]), "A2B2C2")["song"]
    kept = range(4)
    for name in ("MELODY", "BRIDGE", "PIANO"):
        assert [(n.bar, n.position, n.pitch, n.velocity) for n in song.tracks[name] if n.bar in kept] == \
            [(n.bar, n.position, n.pitch, n.velocity) for n in given.tracks[name]]
    assert [c for c in song.chords if c.bar in kept] == given.chords
    assert any(n.bar >= 4 for n in song.tracks["MELODY"])


BAD_REQUESTS = [
    # (case, JSON body or raw bytes, status, field the message must name)
    ("malformed form", {"form": "A2B"}, 400, "form"),
    ("unknown section label", {"form": "Q4"}, 400, "form"),
    ("form with junk", {"form": "A4 + B4"}, 400, "form"),
    ("empty form", {"form": ""}, 422, "form"),
    ("zero bars", {"form": "A0"}, 400, "form"),
    ("absurd section", {"form": "A999999"}, 400, "form"),
    ("longer than max_bars", {"form": "A8B8A8"}, 400, "max_bars"),
    ("form missing", {"key": "C:maj"}, 400, "form"),   # required unless song_midi or prompt gives it
    ("empty prompt", {"prompt": ""}, 422, "prompt"),
    ("blank prompt", {"prompt": "   "}, 400, "prompt"),
    ("prompt not a string", {"prompt": ["a", "waltz"]}, 422, "prompt"),
    ("form not a string", {"form": 12}, 422, "form"),
    ("unknown key root", {"form": "A2", "key": "H:maj"}, 400, "key"),
    ("unknown key mode", {"form": "A2", "key": "C:dorian"}, 400, "key"),
    ("unknown metre", {"form": "A2", "metre": "5/4"}, 400, "metre"),
    ("unknown chord quality", {"form": "A2", "chords": "C:maj C:wobble"}, 400, "chords"),
    ("unknown chord root", {"form": "A2", "chords": "X:maj"}, 400, "chords"),
    ("no chords", {"form": "A2", "chords": "  "}, 400, "chords"),
    ("empty chord list", {"form": "A2", "chords": []}, 400, "chords"),
    ("more chords than bars", {"form": "A2", "chords": ["C", "F", "G"]}, 400, "chords"),
    ("chord list entry with spaces", {"form": "A2", "chords": ["C:maj G:maj", "F"]}, 400, "chords"),
    ("chords of the wrong type", {"form": "A2", "chords": 7}, 422, "chords"),
    ("tempo not a number", {"form": "A2", "tempo": "fast"}, 422, "tempo"),
    ("tempo absurd", {"form": "A2", "tempo": 100000}, 422, "tempo"),
    ("tempo as float", {"form": "A2", "tempo": 99.5}, 422, "tempo"),
    ("negative seed", {"form": "A2", "seed": -1}, 422, "seed"),
    ("seed as string", {"form": "A2", "seed": "1"}, 422, "seed"),
    ("negative temperature", {"form": "A2", "temperature": -0.5}, 422, "temperature"),
    ("top_p zero", {"form": "A2", "top_p": 0}, 422, "top_p"),
    ("top_k negative", {"form": "A2", "top_k": -3}, 422, "top_k"),
    ("unknown stage", {"form": "A2", "stages": ["drums"]}, 422, "stages"),
    ("unknown stage to sample", {"form": "A2", "stage_sampling": {"drums": {"temperature": 0.5}}}, 422,
     "stage_sampling"),
    ("stage temperature negative", {"form": "A2", "stage_sampling": {"melody": {"temperature": -1}}}, 422,
     "stage_sampling"),
    ("unknown stage sampling setting", {"form": "A2", "stage_sampling": {"melody": {"heat": 1}}}, 422,
     "stage_sampling"),
    ("stage sampling not a mapping", {"form": "A2", "stage_sampling": ["melody"]}, 422, "stage_sampling"),
    ("no stages", {"form": "A2", "stages": []}, 422, "stages"),
    ("unknown field", {"form": "A2", "tempoo": 90}, 422, "tempoo"),
    ("melody not base64", {"form": "A2", "melody_midi": "not base64!"}, 400, "melody_midi"),
    ("melody not MIDI", {"form": "A2", "melody_midi": _midi_b64(b"RIFF....WAVEfmt ")}, 400, "melody_midi"),
    ("melody truncated MIDI", {"form": "A2", "melody_midi": _midi_b64(b"MThd\x00\x00\x00\x06\x00\x01")}, 400,
     "melody_midi"),
    ("melody corrupt MIDI", {"form": "A2", "melody_midi": _midi_b64(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0"
                                                                    b"MTrk\x00\x00\x00\x04\xff\xff\xff\xff")}, 400,
     "melody_midi"),
    ("melody too large", {"form": "A2", "melody_midi": _midi_b64(b"MThd" + bytes(6000))}, 413, "melody_midi"),
    ("body far too large", {"form": "A2", "melody_midi": "A" * 200_000}, 413, "body"),
    ("regenerate without a song", {"form": "A2", "regenerate": "A"}, 400, "regenerate"),
    ("regenerate an absent label", {"form": "A2", "song_midi": "SONG", "regenerate": "B"}, 400, "regenerate"),
    ("regenerate bars outside the form", {"form": "A2", "song_midi": "SONG", "regenerate_bars": "2-5"}, 400,
     "regenerate_bars"),
    ("tracks without bars", {"form": "A2", "song_midi": "SONG", "regenerate_tracks": ["MELODY"]}, 400,
     "regenerate_tracks"),
    ("an unknown track", {"form": "A2", "song_midi": "SONG", "regenerate_bars": "1", "regenerate_tracks": ["DRUMS"]},
     422, "regenerate_tracks"),
    ("continue without a song", {"form": "A2", "continue_bars": 4}, 400, "continue_bars"),
    ("continue past max_bars", {"form": "A2", "song_midi": "SONG", "continue_bars": 100}, 400, "continue_bars"),
    ("continue with no form", {"form": "A2", "song_midi": "SONG", "continue_bars": "B2?"}, 400, "continue_bars"),
    ("continue by 0 bars", {"form": "A2", "song_midi": "SONG", "continue_bars": 0}, 422, "continue_bars"),
    ("song and melody both", {"form": "A2", "song_midi": "SONG", "melody_midi": "SONG"}, 400, "song_midi"),
    ("song not MIDI", {"form": "A2", "song_midi": _midi_b64(b"RIFF....WAVEfmt ")}, 400, "song_midi"),
    ("invalid JSON", b'{"form": "A2",', 422, "body"),
    ("JSON not an object", b"[1, 2, 3]", 422, "body"),
    ("empty body", b"", 422, "body"),
]


def post_bad_request(url: str, body, path: str = "/v1/generate"):
    """POST one row's body of ``BAD_REQUESTS``: raw bytes as they are, a dict as JSON ("SONG" stands for a valid
    two-bar song upload)."""
    if isinstance(body, bytes):
        return requests.post(url + path, data=body, timeout=60, headers={"Content-Type": "application/json"})
    body = {k: _two_bar_song() if v == "SONG" else v for k, v in body.items()}
    return requests.post(url + path, json=body, timeout=60)


def assert_refused(response, case: str, status: int, field: str) -> None:
    """The answer is ``status`` and names ``field`` (as ``field`` and at the start of the message)."""
    assert response.status_code == status, (case, response.status_code, response.text)
    assert field in response.text, (case, response.text)
    payload = response.json()
    if status == 422 and field != "body":
        assert payload["field"] == field and payload["message"].startswith(field)
    elif status != 422:
        assert payload["field"] == ("form" if field == "max_bars" else field)
        assert payload["detail"].startswith(payload["field"] + ":")


@pytest.mark.parametrize("case,body,status,field", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_is_a_4xx_naming_the_field(serve_url, case, body, status, field):
    assert_refused(post_bad_request(serve_url, body), case, status, field)


def test_midi_upload_without_a_melody_is_refused(serve_url):
    from musicray.midi import song_to_midi
    from musicray.song import Song, parse_form

    empty = Song("empty", "C:maj", "4/4", parse_form("A2"))
    buffer = io.BytesIO()
    song_to_midi(empty).dump(file=buffer)
    response = post(serve_url, {"form": "A2", "melody_midi": _midi_b64(buffer.getvalue())})
    assert response.status_code == 400 and "melody_midi" in response.json()["detail"]


def test_replicas_keep_serving_after_bad_input(serve_url):
    for _ in range(3):
        post(serve_url, {"form": "A2B", "melody_midi": "%%%"})
        requests.post(serve_url + "/v1/generate", data=b"{", timeout=60, headers={"Content-Type": "application/json"})
    out = generate(serve_url, {"form": "A1b1", "seed": 1})
    check_midi(base64.b64decode(out["midi"]), "A1b1")
    assert requests.get(serve_url + "/healthz", timeout=60).json()["ok"] is True


# -- the multiplexed layout --------------------------------------------------------------------------------------
def test_multiplexed_deployment_serves_all_adapters_and_the_same_songs(mux_url, serve_url):
    health = requests.get(mux_url + "/healthz", timeout=60).json()
    assert health["ok"] is True and health["mode"] == "multiplexed"
    assert health["adapters"] == {task: task for task in SUBTASKS}
    assert list(health["deployments"]) == ["composer"]
    assert health["deployments"]["composer"]["adapters"] == list(SUBTASKS)
    body = {"form": "A2B2", "key": "E:min", "seed": 31}
    muxed = generate(mux_url, body)
    assert all(info["adapter"] == task for task, info in muxed["stages"].items())
    check_midi(base64.b64decode(muxed["midi"]), "A2B2", key_signature="Em")
    # One model with set_adapter per batch composes exactly what the per-adapter deployments compose.
    assert muxed["midi"] == generate(serve_url, body)["midi"]


def test_native_stream_sends_stage_starts_and_ends_then_the_midi(serve_url):
    """The native loop decodes a stage in one call: its stream has no bar events, the same stage events otherwise."""
    with requests.post(serve_url + "/v1/generate/stream", json={"form": "A2", "seed": 4}, stream=True,
                       timeout=300) as response:
        assert response.status_code == 200
        events = [line[len("event: "):] for line in response.iter_lines(decode_unicode=True)
                  if line.startswith("event: ")]
    assert events == ["stage", "stage_done"] * len(SUBTASKS) + ["song"]


def test_a_prompt_is_planned_by_the_runs_model_and_stated_fields_win(serve_url, run_dir):
    """The served run's planner (``load_planner`` of the run, the config's planner being null) plans the prompt,
    within the server's max_bars; the body's tempo overrides the plan; the answer names the fields taken from the
    plan, JSON, MIDI headers and stream alike."""
    from musicray.midi import midi_to_song
    from musicray.prompt_plan import load_planner

    body = {"prompt": "a waltz in G major, verse-chorus", "tempo": 90, "seed": 2, "stages": ["chord", "melody"]}
    plan = load_planner(run=run_dir).plan(body["prompt"], CONFIG["max_bars"])
    out = generate(serve_url, body)
    assert out["plan"] == json.loads(json.dumps(plan.to_dict())) and out["from_plan"] == ["form", "key", "metre"]
    assert (out["form"], out["key"], out["metre"]) == (plan.form, plan.key, plan.metre)
    assert out["bars"] <= CONFIG["max_bars"] and list(out["stages"]) == ["chord", "melody"]
    assert midi_to_song(base64.b64decode(out["midi"])).tempos[0].bpm == 90
    midi = requests.post(serve_url + "/v1/generate?format=midi", json=body, timeout=300)
    assert midi.headers["X-Musicray-From-Plan"] == "form,key,metre" and midi.content == base64.b64decode(out["midi"])
    with requests.post(serve_url + "/v1/generate/stream", json=body, stream=True, timeout=300) as response:
        data = [json.loads(line[len("data: "):]) for line in response.iter_lines(decode_unicode=True)
                if line.startswith("data: ")]
    assert data[-1]["from_plan"] == ["form", "key", "metre"] and data[-1]["midi"] == out["midi"]
    # the plan's tempo direction: the tempo stage does not run here, and the answer says so
    assert out["tempo_direction"] == data[-1]["tempo_direction"] == (
        {"direction": "steady", "applied": False, "why": "steady leaves the tempo to the tempo stage"}
        if plan.tempo_direction == "steady" else
        {"direction": plan.tempo_direction, "applied": False, "why": "the tempo stage did not run"})


def test_engine_setting_is_checked_and_auto_resolves():
    from musicray.serve.config import serve_config
    from musicray.engine.available import vllm_available
    from musicray.song import SongError

    with pytest.raises(SongError, match="engine"):
        serve_config({"engine": "tensorrt"})
    auto = serve_config({})
    assert auto["engine"] == ("vllm" if vllm_available() else "native")
    assert serve_config({"engine": "native"})["multiplexed"] is False
    assert serve_config({"engine": "vllm"})["multiplexed"] is True
    assert serve_config({"engine": "vllm", "multiplexed": False})["multiplexed"] is False


@pytest.mark.parametrize("planner, accepted", [(None, True), ("smollm2-135m-instruct", True), ("", False),
                                              (3, False)])
def test_the_planner_setting_is_a_base_name_or_null(planner, accepted):
    from musicray.serve.config import serve_config
    from musicray.song import SongError

    if accepted:
        assert serve_config({"engine": "native", "planner": planner})["planner"] == planner
    else:
        with pytest.raises(SongError, match="^config: planner must be"):
            serve_config({"engine": "native", "planner": planner})


def test_build_app_refuses_a_run_dir_without_a_model(tmp_path):
    from musicray.serve import build_app
    from musicray.song import SongError

    with pytest.raises(FileNotFoundError, match="stage-1 model"):
        build_app(tmp_path)
    with pytest.raises(SongError, match="unknown key"):
        build_app(tmp_path, {"max_barz": 3})
    with pytest.raises(SongError, match="max_bars"):
        build_app(tmp_path, {"max_bars": 0})


def test_config_file_is_a_serve_config_for_the_app_builder():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from musicray.serve.config import IMPORT_PATH, read_config_file, serve_config

    path = Path(__file__).resolve().parents[2] / "configs" / "serve" / "app.yaml"
    text = path.read_text()
    assert text.startswith("# serve run configs/serve/app.yaml")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text)) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(yaml.safe_load(text))
    assert schema.applications[0].import_path == IMPORT_PATH
    settings, http = read_config_file(path)
    assert http["host"] == "127.0.0.1"
    config = serve_config(settings)
    assert config["max_bars"] == 256 and config["engine"] in ("vllm", "native")
    # one engine with every adapter under vLLM, a deployment per sub-task under the native loop
    assert config["multiplexed"] is (config["engine"] == "vllm")
    json.dumps(config)


def test_cli_main_reports_a_missing_run_dir(tmp_path, capsys):
    from musicray.cli import main

    assert main(["serve", "--run", str(tmp_path / "nowhere")]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["serve", "--run", str(tmp_path / "nowhere"), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config" in capsys.readouterr().err


def test_the_schemas_bounds_are_the_ranges_the_library_checks():
    """The OpenAPI bounds come from ``SAMPLING_RANGES`` and ``TEMPO_RANGE``: what the schema allows, the library
    allows, and the other way round."""
    from musicray.request import TEMPO_RANGE
    from musicray.sampling import SAMPLING_RANGES
    from musicray.serve.schema import GenerateBody, StageSamplingBody

    def bounds(prop: dict) -> tuple:
        prop = next((p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"), prop)
        low = prop.get("exclusiveMinimum", prop.get("minimum"))
        return low, "exclusiveMinimum" in prop, prop["maximum"]

    for body in (GenerateBody, StageSamplingBody):
        properties = body.model_json_schema()["properties"]
        for name, setting in SAMPLING_RANGES.items():
            assert bounds(properties[name]) == (setting.low, setting.low_open, setting.high), (body, name)
    assert bounds(GenerateBody.model_json_schema()["properties"]["tempo"]) == (TEMPO_RANGE.low, False,
                                                                               TEMPO_RANGE.high)
    assert GenerateBody(form="A2", allow_missing_adapters=True).allow_missing_adapters


def test_a_stage_without_its_adapter_is_a_400_and_a_failing_stage_a_500():
    """What a stage deployment answers for a song (``_error``) becomes the ingress' status (``_failed``): a stage
    whose adapter the run lacks was refused by the request's own choice (400), any other failure is the
    server's (500)."""
    from musicray.errors import MissingRunPart, SongError
    from musicray.serve.app import _failed
    from musicray.serve.stages import _error

    missing = _failed("tempo", _error(MissingRunPart("adapters: no LoRA adapter for tempo in run/adapters"))["error"])
    assert (missing.stage, missing.status, str(missing)) == ("tempo", 400,
                                                             "adapters: no LoRA adapter for tempo in run/adapters")
    failing = _failed("melody", _error(SongError("melody: the unmasked model produced x"))["error"])
    assert (failing.stage, failing.status) == ("melody", 500) and "the stage failed on this song" in str(failing)

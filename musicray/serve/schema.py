"""The HTTP request body and its conversion into a composer ``Request``.

Types and ranges are checked by pydantic (FastAPI answers 422 naming the field); what needs the music rules
(form, key, metre, chords, the uploaded melody, the configured limits) raises ``InputError`` naming the field,
answered with its ``status`` (400, or 413 for an oversized upload).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from musicray.compose import Request, parse_chords, regenerated_bars
from musicray.harmony import canonical_key
from musicray.midi import midi_to_song
from musicray.sampling import Sampling, stage_sampling
from musicray.song import SongError, metre, parse_form, song_from_dict, song_to_dict
from musicray.tokens import SUBTASKS

Subtask = Literal["chord", "melody", "secondary", "dynamics", "tempo"]
assert set(Subtask.__args__) == set(SUBTASKS)

MAX_FORM_CHARS = 512
MAX_CHORD_TEXT = 16384


class InputError(SongError):
    """Bad input the music rules or the limits refuse; ``field`` and ``status`` go into the answer."""

    def __init__(self, field: str, message: str, status: int = 400):
        text = message if message.startswith(f"{field}:") else f"{field}: {message}"
        super().__init__(text)
        self.field, self.status = field, status


class StageSamplingBody(BaseModel):
    """One stage's sampling settings in ``stage_sampling``; a setting left out is the request's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: Optional[float] = Field(None, ge=0.0, le=10.0, description="0 = greedy")
    top_k: Optional[int] = Field(None, ge=0, le=100000, description="0 = no top-k cut")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="1 = no nucleus cut")


class GenerateBody(BaseModel):
    """``POST /v1/generate``: what to compose."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"form": "i4A8B8A8o4", "key": "G:maj", "tempo": 96, "seed": 7}]})

    form: str = Field(min_length=1, max_length=MAX_FORM_CHARS,
                      description="sections as phrase label + bars, e.g. i4A8B8A8o4 (labels i A B C D E X b x o)")
    key: str = Field("C:maj", min_length=1, max_length=16, description="ROOT:maj or ROOT:min, e.g. Eb:min")
    metre: str = Field("4/4", min_length=1, max_length=8, description="4/4, 3/4, 2/4, 12/8 or 6/8")
    tempo: int = Field(100, ge=20, le=300, description="base tempo, bpm")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling seed; same request + seed = same song")
    chords: Optional[Union[str, list[str]]] = Field(
        None, description="chords instead of the chord stage: a string of per-bar entries cycled over the form "
                          "(C:maj,G:maj splits a bar), or a list with one entry per bar")
    melody_midi: Optional[str] = Field(
        None, description="base64 Standard MIDI File; its MELODY track (or first melodic instrument) replaces the "
                          "melody stage")
    song_midi: Optional[str] = Field(
        None, description="base64 Standard MIDI File of a whole song (MELODY, BRIDGE, PIANO tracks; chords and "
                          "tempo from a musicray file): what it has replaces its stages, like generate --song")
    regenerate: Optional[str] = Field(
        None, max_length=64, description="infilling (needs song_midi): rewrite the sections with these labels, "
                                         "e.g. B or A,B; every other bar stays as uploaded")
    regenerate_bars: Optional[str] = Field(
        None, max_length=256, description="infilling (needs song_midi): rewrite these bars, 1-based, e.g. 9-16")
    stages: Optional[list[Subtask]] = Field(None, min_length=1, max_length=5,
                                            description="sub-tasks to run (default all; with regenerate: the parts "
                                                        "rewritten in the chosen bars)")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, le=100000, description="0 = no top-k cut")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1 = no nucleus cut")
    stage_sampling: Optional[dict[Subtask, StageSamplingBody]] = Field(
        None, description="sampling settings of single stages instead of temperature, top_k and top_p, e.g. "
                          "{\"melody\": {\"temperature\": 0.8}} for a melody closer to what the model finds likeliest")
    harmony_guard: bool = Field(True, description="keep chords among POP909's usual ones in the key's mode and the "
                                                  "melodies in the key's scale or the sounding chord, in their "
                                                  "register; false: the model's own choices")


class RenderBody(BaseModel):
    """``POST /v1/render``: the MIDI file to play."""

    model_config = ConfigDict(extra="forbid", strict=True)

    midi: str = Field(min_length=1, description="base64 Standard MIDI File, e.g. the midi of a /v1/generate answer")


def _field(name: str, fn, *args):
    try:
        return fn(*args)
    except InputError:
        raise
    except SongError as err:
        raise InputError(name, str(err)) from None


def decode_midi_upload(text: str, max_bytes: int, field: str = "melody_midi") -> bytes:
    """The bytes of a base64 upload; 413 above ``max_bytes`` (checked before decoding), 400 if not base64."""
    if len(text) > 4 * ((max_bytes + 2) // 3) + 4:
        raise InputError(field, f"upload of about {len(text) * 3 // 4} bytes exceeds max_midi_bytes "
                                f"({max_bytes} bytes)", 413)
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise InputError(field, f"not valid base64 ({err})") from None
    if len(data) > max_bytes:
        raise InputError(field, f"upload of {len(data)} bytes exceeds max_midi_bytes ({max_bytes} bytes)", 413)
    return data


def _uploaded_song(text: str, field: str, metre_name: str, max_midi_bytes: int):
    uploaded = _field(field, midi_to_song, decode_midi_upload(text, max_midi_bytes, field), "upload")
    if uploaded.metre != metre_name:
        raise InputError(field, f"the upload is in {uploaded.metre} but metre is {metre_name}")
    return uploaded


def to_request(body: GenerateBody, max_bars: int, max_midi_bytes: int) -> Request:
    """The composer request a body describes; ``InputError`` names the field that is wrong."""
    sections = _field("form", parse_form, body.form)
    bars = sum(s.bars for s in sections)
    if bars > max_bars:
        raise InputError("form", f"{body.form!r} has {bars} bars; this server composes at most max_bars={max_bars}")
    key = _field("key", canonical_key, body.key)
    spec = _field("metre", metre, body.metre)
    chords = None
    if body.chords is not None:
        if isinstance(body.chords, list):
            if not body.chords:
                raise InputError("chords", "empty list; give one chord entry per bar")
            if len(body.chords) > bars:
                raise InputError("chords", f"{len(body.chords)} entries for {bars} bars; give one entry per bar")
            for i, entry in enumerate(body.chords):
                if not entry.strip() or len(entry.split()) != 1:
                    raise InputError("chords", f"entry {i} {entry!r} must be one bar's chords without spaces "
                                               "(C:maj,G:maj splits a bar)")
            text = " ".join(body.chords)
        else:
            text = body.chords
        if len(text) > MAX_CHORD_TEXT:
            raise InputError("chords", f"{len(text)} characters; at most {MAX_CHORD_TEXT}")
        chords = _field("chords", parse_chords, text, body.form, spec.name)
    melody = None
    if body.melody_midi is not None:
        uploaded = _uploaded_song(body.melody_midi, "melody_midi", spec.name, max_midi_bytes)
        melody = [n for n in uploaded.tracks["MELODY"] if n.bar < bars]
        if not melody:
            raise InputError("melody_midi", f"no MELODY notes in the first {bars} bars of the upload")
    given = None
    if body.song_midi is not None:
        if body.melody_midi is not None:
            raise InputError("song_midi", "give song_midi or melody_midi, not both")
        given = _uploaded_song(body.song_midi, "song_midi", spec.name, max_midi_bytes)
        given.tracks = {name: [n for n in notes if n.bar < bars] for name, notes in given.tracks.items()}
        if not any(given.tracks.values()):
            raise InputError("song_midi", f"no MELODY, BRIDGE or PIANO notes in the first {bars} bars of the upload")
    regenerate = None
    if body.regenerate is not None or body.regenerate_bars is not None:
        if given is None:
            raise InputError("regenerate", "infilling rewrites part of a given song: upload it as song_midi")
        field = "regenerate" if body.regenerate is not None else "regenerate_bars"
        regenerate = _field(field, regenerated_bars, body.form, body.regenerate, body.regenerate_bars)
    stages = tuple(body.stages) if body.stages is not None else SUBTASKS
    sampling = Sampling(float(body.temperature), int(body.top_k), float(body.top_p))
    per_stage = stage_sampling({stage: given.model_dump(exclude_none=True)
                                for stage, given in (body.stage_sampling or {}).items()}, sampling, "stage_sampling")
    request = Request(form=body.form, key=key, metre=spec.name, tempo=body.tempo, seed=body.seed,
                      chords=chords or (given.chords if given else None),
                      melody=melody or (given.tracks["MELODY"] if given else None), stages=stages,
                      sampling=sampling, stage_sampling=per_stage or None,
                      bridge=given.tracks["BRIDGE"] if given else None, piano=given.tracks["PIANO"] if given else None,
                      regenerate=regenerate, tempos=given.tempos if given and regenerate else None,
                      harmony_guard=body.harmony_guard)
    return request


def request_song(request: Request):
    """The empty song of a request; what ``Request.song`` refuses becomes an ``InputError`` naming the field."""
    try:
        return request.song()
    except SongError as err:
        text = str(err)
        song_id = "generated: "  # Song.check prefixes its messages with the song id
        if text.startswith(song_id):
            text = text[len(song_id):]
        head, sep, _ = text.partition(":")
        field = "melody_midi" if "MELODY" in head else head.strip() if sep and head.strip().isidentifier() \
            else "body"
        raise InputError(field, text) from None


def sampling_settings(request: Request) -> dict:
    """What a stage deployment needs besides the song: the seed, the sampling settings and, when infilling, the
    bars to rewrite and the song as given (the kept bars come from it). JSON-ready."""
    settings = {"seed": request.seed, **dataclasses.asdict(request.sampling), "use_mask": request.use_mask,
                "harmony_guard": request.harmony_guard}
    if request.stage_sampling:
        settings["stage_sampling"] = {stage: dataclasses.asdict(sampling)
                                      for stage, sampling in request.stage_sampling.items()}
    if request.regenerate is not None:
        settings["regenerate"] = list(request.regenerate)
        settings["given"] = song_to_dict(request.song())
    return settings


def stage_request(song, settings: dict) -> Request:
    """The composer request a stage deployment runs for a song and the ingress' ``sampling_settings``."""
    sampling = Sampling(float(settings["temperature"]), int(settings["top_k"]), float(settings["top_p"]))
    per_stage = {stage: Sampling(**values) for stage, values in settings.get("stage_sampling", {}).items()}
    request = Request(form=song.form, seed=int(settings["seed"]), use_mask=settings.get("use_mask", True),
                      sampling=sampling, stage_sampling=per_stage or None,
                      harmony_guard=bool(settings.get("harmony_guard", True)))
    if settings.get("regenerate") is not None:
        given = song_from_dict(settings["given"])
        request = dataclasses.replace(request, key=given.key, metre=given.metre, chords=given.chords,
                                      melody=given.tracks["MELODY"], bridge=given.tracks["BRIDGE"],
                                      piano=given.tracks["PIANO"], tempos=given.tempos,
                                      regenerate=tuple(settings["regenerate"]))
    return request

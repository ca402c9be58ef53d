"""The HTTP request body and its conversion into a composer ``Request``.

Types and ranges are checked by pydantic (FastAPI answers 422 naming the field); what needs the music rules
(form, key, metre, chords, the uploaded melody, the configured limits) raises ``InputError`` naming the field,
answered with its ``status`` (400, or 413 for an oversized upload).
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from musicray.compose import Request, parse_chords
from musicray.decode import Sampling
from musicray.harmony import canonical_key
from musicray.midi import midi_to_song
from musicray.song import SongError, metre, parse_form
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
    stages: Optional[list[Subtask]] = Field(None, min_length=1, max_length=5,
                                            description="sub-tasks to run (default all)")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, le=100000, description="0 = no top-k cut")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1 = no nucleus cut")


def _field(name: str, fn, *args):
    try:
        return fn(*args)
    except InputError:
        raise
    except SongError as err:
        raise InputError(name, str(err)) from None


def decode_midi_upload(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 upload; 413 above ``max_bytes`` (checked before decoding), 400 if not base64."""
    if len(text) > 4 * ((max_bytes + 2) // 3) + 4:
        raise InputError("melody_midi", f"upload of about {len(text) * 3 // 4} bytes exceeds max_midi_bytes "
                                        f"({max_bytes} bytes)", 413)
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise InputError("melody_midi", f"not valid base64 ({err})") from None
    if len(data) > max_bytes:
        raise InputError("melody_midi", f"upload of {len(data)} bytes exceeds max_midi_bytes ({max_bytes} bytes)", 413)
    return data


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
        data = decode_midi_upload(body.melody_midi, max_midi_bytes)
        uploaded = _field("melody_midi", midi_to_song, data, "upload")
        if uploaded.metre != spec.name:
            raise InputError("melody_midi", f"the upload is in {uploaded.metre} but metre is {spec.name}")
        melody = [n for n in uploaded.tracks["MELODY"] if n.bar < bars]
        if not melody:
            raise InputError("melody_midi", f"no MELODY notes in the first {bars} bars of the upload")
    stages = tuple(body.stages) if body.stages is not None else SUBTASKS
    request = Request(form=body.form, key=key, metre=spec.name, tempo=body.tempo, seed=body.seed, chords=chords,
                      melody=melody, stages=stages,
                      sampling=Sampling(float(body.temperature), int(body.top_k), float(body.top_p)))
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
    """What a stage deployment needs besides the song: the seed and the sampling settings (JSON-ready)."""
    return {"seed": request.seed, "temperature": request.sampling.temperature, "top_k": request.sampling.top_k,
            "top_p": request.sampling.top_p, "use_mask": request.use_mask}

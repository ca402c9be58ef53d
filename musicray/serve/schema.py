"""The HTTP request body and its conversion into a composer ``Request``.

Types and ranges are checked by pydantic (FastAPI answers 422 naming the field); what needs the music rules
(form, key, metre, chords, the uploaded melody, the configured limits) raises ``InputError`` naming the field,
answered with its ``status`` (400, or 413 for an oversized upload).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from musicray.midi import midi_to_song
from musicray.request import (MAX_CONTINUATION_BARS, TEMPO_RANGE, VARIATION_RANGE, FieldError, Request,
                              RunDefaults, request_from_fields)
from musicray.sampling import SAMPLING_RANGES
from musicray.song import FORM_PATTERN, TRACKS, SongError, metre, parse_form
from musicray.tempo_direction import TEMPO_DIRECTION_HELP, TEMPO_DIRECTIONS
from musicray.tokens import SUBTASKS

Subtask = Literal[SUBTASKS]   # the sub-tasks' names, in stage order
Track = Literal[TRACKS]

MAX_FORM_CHARS = 512
# A base64 text as ``decode_midi_upload`` accepts it (whitespace around it allowed), for the API's schema.
BASE64_PATTERN = r"^\s*(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\s*$"
# What the schema states of a MIDI upload; the checks themselves stay ours, so that a refusal keeps its message
# (a 400 naming the field), and generated clients and fuzzers draw only texts the API can decode.
MIDI_UPLOAD = {"contentEncoding": "base64", "contentMediaType": "audio/midi", "pattern": BASE64_PATTERN}
MAX_CHORD_TEXT = 16384
MAX_PROMPT_CHARS = 1000


class InputError(FieldError):
    """Bad input the music rules or the limits refuse; ``field`` and ``status`` go into the answer."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(field, message)
        self.status = status


def _sampling_field(name: str, default, unset: str = ""):
    """A sampling setting's pydantic field, its bounds and help from ``musicray.sampling.SAMPLING_RANGES``
    (``unset``: what leaving it out means, added to the help)."""
    setting = SAMPLING_RANGES[name]
    return Field(default, **setting.schema_bounds(), description=setting.help + unset)


# What leaving all sampling settings out of a request means (musicray.request.request_from_fields' defaults).
RUN_SAMPLING = ("; unset: the neutral value, and with no sampling setting at all each stage samples as the served "
                "run's evaluation did (its config's eval.sampling)")


class StageSamplingBody(BaseModel):
    """One stage's sampling settings in ``stage_sampling``; a setting left out is the request's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: Optional[float] = _sampling_field("temperature", None)
    top_k: Optional[int] = _sampling_field("top_k", None)
    top_p: Optional[float] = _sampling_field("top_p", None)


class GenerateBody(BaseModel):
    """``POST /v1/generate``: what to compose."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"form": "i4A8B8A8o4", "key": "G:maj", "tempo": 96, "seed": 7}]})

    form: Optional[str] = Field(None, min_length=1, max_length=MAX_FORM_CHARS, json_schema_extra={"pattern": FORM_PATTERN},
                                description="sections as phrase label + bars, e.g. i4A8B8A8o4 (labels i A B C D E X "
                                            "b x o); required unless song_midi or prompt gives it")
    prompt: Optional[str] = Field(
        None, min_length=1, max_length=MAX_PROMPT_CHARS,
        description="the song in words, e.g. \"a gentle ballad in 3/4, verse-chorus-verse\": an instruct model plans "
                    "form, key, metre and tempo (as musicray plan); the fields this body states override the plan, "
                    "and the answer's from_plan names those taken from it")
    key: str = Field("C:maj", min_length=1, max_length=16, description="ROOT:maj or ROOT:min, e.g. Eb:min")
    metre: str = Field("4/4", min_length=1, max_length=8, description="4/4, 3/4, 2/4, 12/8 or 6/8")
    tempo: int = Field(100, **TEMPO_RANGE.schema_bounds(), description=TEMPO_RANGE.help)
    tempo_direction: Optional[Literal[tuple(TEMPO_DIRECTIONS)]] = Field(
        None, description=TEMPO_DIRECTION_HELP + " (default: the prompt's plan, else steady); the answer's "
                                                 "tempo_direction says where it was applied")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling seed; same request + seed = same song")
    chords: Optional[Union[str, list[str]]] = Field(
        None, description="chords instead of the chord stage: a string of per-bar entries cycled over the form "
                          "(C:maj,G:maj splits a bar), or a list with one entry per bar")
    melody_midi: Optional[str] = Field(
        None, json_schema_extra=MIDI_UPLOAD, description="base64 Standard MIDI File; its MELODY track (or first melodic instrument) replaces the "
                          "melody stage")
    song_midi: Optional[str] = Field(
        None, json_schema_extra=MIDI_UPLOAD, description="base64 Standard MIDI File of a whole song (MELODY, BRIDGE, PIANO tracks; chords and "
                          "tempo from a musicray file): what it has replaces its stages, like generate --song")
    regenerate: Optional[str] = Field(
        None, max_length=64, description="infilling (needs song_midi): rewrite the sections with these labels, "
                                         "e.g. B or A,B; every other bar stays as uploaded")
    regenerate_bars: Optional[str] = Field(
        None, max_length=256, description="infilling (needs song_midi): rewrite these bars, 1-based, e.g. 9-16")
    regenerate_tracks: Optional[list[Track]] = Field(
        None, min_length=1, max_length=len(TRACKS),
        description="infilling by track (with regenerate or regenerate_bars): rewrite only these tracks in the "
                    "chosen bars (their stages and dynamics run; PIANO is voiced anew from the chords); chords, "
                    "tempo and the other tracks stay as uploaded")
    continue_bars: Optional[Union[Annotated[int, Field(ge=1, le=MAX_CONTINUATION_BARS)],
                                  Annotated[str, Field(min_length=1, max_length=MAX_FORM_CHARS)]]] = Field(
        None, description="continuation (needs song_midi): extend form (the uploaded song's) by this many bars or "
                          "by a form string of the new part, e.g. 16 or B8A8, and compose only the new bars; every "
                          "uploaded bar stays as it is")
    stages: Optional[list[Subtask]] = Field(None, min_length=1, max_length=5,
                                            description="sub-tasks to run (default all; with regenerate: the parts "
                                                        "rewritten in the chosen bars)")
    temperature: Optional[float] = _sampling_field("temperature", None, RUN_SAMPLING)
    top_k: Optional[int] = _sampling_field("top_k", None, RUN_SAMPLING)
    top_p: Optional[float] = _sampling_field("top_p", None, RUN_SAMPLING)
    stage_sampling: Optional[dict[Subtask, StageSamplingBody]] = Field(
        None, description="sampling settings of single stages instead of temperature, top_k and top_p, e.g. "
                          "{\"melody\": {\"temperature\": 0.8}} for a melody closer to what the model finds likeliest")
    allow_missing_adapters: bool = Field(
        False, description="run a requested stage whose adapter the served run lacks on the stage-1 model alone "
                           "(refused otherwise); each stage's report names its adapter (null: none)")
    variation: Optional[float] = Field(None, **VARIATION_RANGE.schema_bounds(), description=VARIATION_RANGE.help)
    harmony_guard: bool = Field(True, description="keep chords among POP909's usual ones in the key's mode and the "
                                                  "melodies in the key's scale or the sounding chord, in their "
                                                  "register; false: the model's own choices")


class RenderBody(BaseModel):
    """``POST /v1/render``: the MIDI file to play."""

    model_config = ConfigDict(extra="forbid", strict=True)

    midi: str = Field(min_length=1, json_schema_extra=MIDI_UPLOAD,
                      description="base64 Standard MIDI File, e.g. the midi of a /v1/generate answer")


class ExportBody(BaseModel):
    """``POST /v1/export``: the MIDI file to write as MusicXML."""

    model_config = ConfigDict(extra="forbid", strict=True)

    midi: str = Field(min_length=1, json_schema_extra=MIDI_UPLOAD,
                      description="base64 musicray MIDI file, e.g. the midi of a /v1/generate answer")
    lead_sheet: bool = Field(False, description="the lead sheet (MELODY and chord symbols) instead of the full "
                                                "score (MELODY, BRIDGE, PIANO)")


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


def uploaded_song(text: str, max_midi_bytes: int, field: str = "midi", max_bars: int | None = None):
    """The song of a base64 MIDI upload (400 naming ``field`` if it is not one; above ``max_bars`` bars too,
    where given: a song the server could not compose again)."""
    song = _field(field, midi_to_song, decode_midi_upload(text, max_midi_bytes, field), "upload")
    if max_bars is not None and song.n_bars > max_bars:
        raise InputError(field, f"the song has {song.n_bars} bars; this server composes at most max_bars={max_bars}")
    return song


def _uploaded_song(text: str, field: str, metre_name: str, max_midi_bytes: int):
    uploaded = _field(field, midi_to_song, decode_midi_upload(text, max_midi_bytes, field), "upload")
    if uploaded.metre != metre_name:
        raise InputError(field, f"the upload is in {uploaded.metre} but metre is {metre_name}")
    return uploaded


# The body's names of ``request_from_fields``'s fields, for its messages.
BODY_FIELDS = {"given": "song_midi", "melody": "melody_midi", "stage_settings": "stage_sampling"}


def to_request(body: GenerateBody, max_bars: int, max_midi_bytes: int, planner=None,
               defaults: RunDefaults | None = None) -> Request:
    """The composer request a body describes (``musicray.request.request_from_fields``, as the command line's, with
    the served run's ``defaults``); ``InputError`` names the field that is wrong. ``planner`` reads ``prompt``
    (``request_from_fields``'s).

    key, metre and tempo have defaults in the schema, but with a prompt only those the body states override its
    plan (and the metre of an upload, checked against the body's, stays)."""
    stated = set(body.model_fields_set) | ({"key", "metre", "tempo"} if body.prompt is None else set())
    if body.melody_midi is not None or body.song_midi is not None:
        stated.add("metre")
    metre_name = _field("metre", metre, body.metre).name
    chords = body.chords
    if isinstance(chords, list):
        if not chords:
            raise InputError("chords", "empty list; give one chord entry per bar")
        for i, entry in enumerate(chords):
            if not entry.strip() or len(entry.split()) != 1:
                raise InputError("chords", f"entry {i} {entry!r} must be one bar's chords without spaces "
                                           "(C:maj,G:maj splits a bar)")
        bars = sum(s.bars for s in _field("form", parse_form, body.form)) if body.form is not None else len(chords)
        if len(chords) > bars:
            raise InputError("chords", f"{len(chords)} entries for {bars} bars; give one entry per bar")
        chords = " ".join(chords)
    if chords is not None and len(chords) > MAX_CHORD_TEXT:
        raise InputError("chords", f"{len(chords)} characters; at most {MAX_CHORD_TEXT}")
    if body.song_midi is not None and body.melody_midi is not None:
        raise InputError("song_midi", "give song_midi or melody_midi, not both")
    melody = _uploaded_song(body.melody_midi, "melody_midi", metre_name, max_midi_bytes).tracks["MELODY"] \
        if body.melody_midi is not None else None
    given = _uploaded_song(body.song_midi, "song_midi", metre_name, max_midi_bytes) \
        if body.song_midi is not None else None
    try:
        return request_from_fields(
            body.form, *(value if name in stated else None for name, value in (
                ("key", body.key), ("metre", metre_name), ("tempo", body.tempo))), body.seed, chords, melody, given,
            body.regenerate,
            body.regenerate_bars, body.continue_bars, body.regenerate_tracks, body.stages, body.temperature,
            body.top_k, body.top_p,
            {stage: values.model_dump(exclude_none=True) for stage, values in (body.stage_sampling or {}).items()},
            allow_missing_adapters=body.allow_missing_adapters, variation=body.variation,
            harmony_guard=body.harmony_guard, tempo_direction=body.tempo_direction, max_bars=max_bars,
            defaults=defaults,
            prompt=body.prompt, planner=planner,
            names=BODY_FIELDS)
    except InputError:
        raise
    except FieldError as err:
        raise InputError(err.field, str(err)) from None


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

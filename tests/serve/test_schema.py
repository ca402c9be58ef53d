"""The HTTP body's fields as composer requests (no server: the schema's functions alone)."""

import json

import pytest

from musicray.request import RunDefaults, stage_request, stage_settings
from musicray.serve.schema import GenerateBody, RenderBody, to_request


@pytest.mark.parametrize("body,guard", [
    ({"form": "A2B2"}, True),
    ({"form": "A2B2", "harmony_guard": True}, True),
    ({"form": "A2B2", "harmony_guard": False}, False),
])
def test_the_harmony_guard_travels_from_the_body_to_every_stage(body, guard):
    """On by default; the ingress hands it to the stage deployments through the JSON sampling settings."""
    request = to_request(GenerateBody(**body), max_bars=64, max_midi_bytes=1 << 20)
    assert request.harmony_guard is guard
    settings = json.loads(json.dumps(stage_settings(request)))
    assert stage_request(request.song(), settings).harmony_guard is guard


@pytest.mark.parametrize("body, direction", [
    ({"form": "A2B2"}, "steady"),
    ({"form": "A2B2", "tempo_direction": "slowing"}, "slowing"),
    ({"form": "A2B2", "tempo_direction": "speeding up"}, "speeding up"),
])
def test_a_tempo_direction_travels_from_the_body_to_every_stage(body, direction):
    request = to_request(GenerateBody(**body), max_bars=64, max_midi_bytes=1 << 20)
    settings = json.loads(json.dumps(stage_settings(request)))
    assert request.tempo_direction == direction
    assert stage_request(request.song(), settings).tempo_direction == direction


def test_an_unknown_tempo_direction_is_refused_by_the_schema_naming_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        GenerateBody(form="A2", tempo_direction="ritardando")
    assert [error["loc"] for error in caught.value.errors()] == [("tempo_direction",)]


@pytest.mark.parametrize("variation", [None, 0.0, 0.4, 1.0])
def test_the_variation_travels_from_the_body_to_every_stage(variation):
    request = to_request(GenerateBody(form="A2B2A2", variation=variation), max_bars=64, max_midi_bytes=1 << 20)
    settings = json.loads(json.dumps(stage_settings(request)))
    assert request.variation == variation and stage_request(request.song(), settings).variation == variation


@pytest.mark.parametrize("variation", [-0.1, 1.5, "half"])
def test_a_variation_outside_0_to_1_is_refused(variation):
    with pytest.raises(ValueError, match="variation"):
        GenerateBody(form="A2", variation=variation)


def test_a_harmony_guard_that_is_not_a_boolean_is_refused():
    with pytest.raises(ValueError, match="harmony_guard"):
        GenerateBody(form="A2", harmony_guard="no")


@pytest.mark.parametrize("body, melody, taken", [
    ({"form": "A2B2"}, 0.8, {"stage_sampling": {"melody": {"temperature": 0.8, "top_k": 0, "top_p": 1.0}},
                             "variation": 0.2}),
    ({"form": "A2B2", "temperature": 1.0, "variation": 0.5}, 1.0, {}),
])
def test_a_body_that_leaves_sampling_unsaid_samples_as_the_served_run_was_evaluated(body, melody, taken):
    defaults = RunDefaults({"melody": {"temperature": 0.8}}, 0.2)
    request = to_request(GenerateBody(**body), max_bars=64, max_midi_bytes=1 << 20, defaults=defaults)
    assert request.sampling_for("melody").temperature == melody and request.taken_from_run() == taken


FORMS = ["A4", "i4A8B8A8o4", " A2B2 ", "A08", "A32", "b1x1X3", "0", "A0", "A33", "A320", "Q4", "A4 B4", "a4", "A",
         "4A", "A-1", "A1.5", "", "A4\n"]


@pytest.mark.parametrize("form", FORMS)
def test_the_schemas_form_pattern_accepts_exactly_the_forms_the_api_reads(form):
    """The OpenAPI schema states the form's syntax, so a request the schema allows is one the API composes."""
    import re

    from musicray.song import SongError, parse_form

    try:
        parse_form(form)
        readable = True
    except SongError:
        readable = False
    pattern = GenerateBody.model_json_schema()["properties"]["form"]["pattern"]
    assert bool(re.search(pattern, form)) == readable


@pytest.mark.parametrize("text", ["TVRoZA==", "TVRoZAAA", " TVRo\n", "0", "TVRoZA=", "TVRoZA===", "TV-o", "", "AA=="])
def test_the_schemas_base64_pattern_accepts_exactly_what_uploads_decode(text):
    import base64
    import binascii
    import re

    try:
        base64.b64decode(text.strip(), validate=True)
        decodes = True
    except (binascii.Error, ValueError):
        decodes = False
    for schema in (GenerateBody.model_json_schema()["properties"]["song_midi"],
                   RenderBody.model_json_schema()["properties"]["midi"]):
        assert schema["contentEncoding"] == "base64"
        assert bool(re.search(schema["pattern"], text)) == decodes

"""Per-stage sampling settings: read over a base, checked, every error naming the field."""

import pytest

from musicray.sampling import Sampling, checked_settings, stage_sampling
from musicray.song import SongError

BASE = Sampling(temperature=1.0, top_k=0, top_p=0.95)


@pytest.mark.parametrize("settings,expected", [
    ({}, {}),
    ({"melody": {"temperature": 0.8}}, {"melody": Sampling(0.8, 0, 0.95)}),
    ({"melody": {"temperature": "0"}, "dynamics": {"top_k": 5, "top_p": 1}},
     {"melody": Sampling(0.0, 0, 0.95), "dynamics": Sampling(1.0, 5, 1.0)}),
    ({"chord": {"top_k": 3.0}}, {"chord": Sampling(1.0, 3, 0.95)}),
    ({"tempo": {}}, {"tempo": BASE}),
])
def test_settings_replace_the_base_per_stage(settings, expected):
    assert stage_sampling(settings, BASE, "eval.sampling") == expected


def test_settings_from_text_are_typed():
    checked = checked_settings({"melody": {"temperature": "0.8", "top_k": "3"}}, "--stage-sampling")
    assert checked == {"melody": {"temperature": 0.8, "top_k": 3}}
    assert isinstance(checked["melody"]["top_k"], int)


@pytest.mark.parametrize("settings,message", [
    ({"lyrics": {"temperature": 1}}, "unknown stage 'lyrics'"),
    ({"melody": 0.8}, "melody: give settings"),
    ({"melody": {"heat": 1}}, "unknown setting 'heat'"),
    ({"melody": {"temperature": -0.1}}, "melody.temperature: -0.1 is not 0..10"),
    ({"melody": {"temperature": "warm"}}, "melody.temperature: 'warm' is not a number"),
    ({"melody": {"temperature": float("nan")}}, "melody.temperature"),
    ({"melody": {"top_k": 2.5}}, "melody.top_k: 2.5 is not a whole number"),
    ({"melody": {"top_k": float("inf")}}, "melody.top_k: inf is not a number"),
    ({"melody": {"top_p": 0}}, "melody.top_p: 0 is not above 0"),
    ({"melody": {"top_p": 1.5}}, "melody.top_p"),
])
def test_wrong_settings_name_the_field(settings, message):
    with pytest.raises(SongError, match=r"^--stage-sampling: .*" + message.replace(".", r"\.").replace("(", r"\(")):
        stage_sampling(settings, BASE, "--stage-sampling")


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1}, "temperature: -1 is not 0..10"),
    ({"temperature": 11.0}, "temperature: 11.0 is not 0..10"),
    ({"top_k": -3}, "top_k: -3 is not a whole number"),
    ({"top_k": 2.5}, "top_k: 2.5 is not a whole number"),
    ({"top_p": 0.0}, "top_p: 0.0 is not above 0"),
    ({"top_p": "x"}, "top_p: 'x' is not a number"),
])
def test_sampling_refuses_a_setting_out_of_range_naming_it(kwargs, message):
    with pytest.raises(SongError, match="^" + message.replace(".", r"\.")):
        Sampling(**kwargs)


def test_sampling_types_its_settings():
    sampling = Sampling(temperature=1, top_k=3.0, top_p=1)
    assert (type(sampling.temperature), type(sampling.top_k), type(sampling.top_p)) == (float, int, float)
    assert sampling == Sampling(1.0, 3, 1.0)

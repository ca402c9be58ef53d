"""The Serve app on the vLLM engine (``engine: vllm``): one engine with the random-weight tiny model and five
random adapters, real vLLM (CPU), HTTP on 127.0.0.1. The grammar guarantee, long forms, mixed sub-task batches,
streaming, cancellation and the same bad-input answers as the native engine."""

from __future__ import annotations

import base64
import json
import os
import threading
import time

import pytest

pytest.importorskip("vllm")
requests = pytest.importorskip("requests")

from musicray.song import parse_form  # noqa: E402
from musicray.tokens import SUBTASKS  # noqa: E402

from .conftest import serving  # noqa: E402
from .test_serve import (  # noqa: E402,F401
    BAD_REQUESTS, CONFIG, assert_refused, check_midi, post, post_bad_request, run_dir)
from .test_serve import test_regenerate_rewrites_one_section_of_an_uploaded_song as regenerate_check  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

MAX_BARS = 96
VLLM_CONFIG = {**CONFIG, "engine": "vllm", "max_bars": MAX_BARS,
               "stages": {"default": {"ray_actor_options": {"num_cpus": 0.5}}}}
# POP909-style forms: intro, verses and choruses of 8 bars, pre-choruses, an interlude, an outro; 70-95 bars.
LONG_FORMS = ["i4A8A8B8B8x4A8A8B8B8o4", "i4A8A8B8b4C8x4A8B8b4C8C8X4o3"]


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    return tmp_path_factory.mktemp("grammar") / "stats.json"


@pytest.fixture(scope="module")
def vllm_url(run_dir, stats_file):  # noqa: F811
    # The engine's processes inherit the environment of the Ray instance that ``serving`` starts.
    os.environ["MUSICRAY_GRAMMAR_STATS"] = str(stats_file)
    try:
        with serving(run_dir, VLLM_CONFIG, num_cpus=4) as url:
            yield url
    finally:
        os.environ.pop("MUSICRAY_GRAMMAR_STATS", None)


def generate(url: str, body: dict) -> dict:
    response = post(url, body)
    assert response.status_code == 200, response.text
    return response.json()


def health(url: str) -> dict:
    return requests.get(url + "/healthz", timeout=60).json()


def sse_events(response):
    """(event, data) of a Server-Sent Events response, as they arrive."""
    event = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: "):])


def test_one_engine_serves_every_adapter(vllm_url):
    info = health(vllm_url)
    assert info["ok"] is True and info["engine"] == "vllm" and info["mode"] == "multiplexed"
    assert list(info["deployments"]) == ["composer"]
    composer = info["deployments"]["composer"]
    assert composer["engine"] == "vllm" and composer["adapters"] == list(SUBTASKS)
    assert info["adapters"] == {task: task for task in SUBTASKS}


def test_generate_returns_the_requested_form_from_random_weights(vllm_url):
    out = generate(vllm_url, {"form": "A2B2", "key": "G:maj", "tempo": 96, "seed": 3})
    assert list(out["stages"]) == list(SUBTASKS)
    assert all(info["adapter"] == task for task, info in out["stages"].items())
    check_midi(base64.b64decode(out["midi"]), "A2B2", key_signature="G")


def test_long_pop909_style_forms_come_out_with_exact_bars(vllm_url):
    """Two long songs at once (70-95 bars, up to 14 sections): every stage writes exactly the form's bars."""
    outs: dict[str, dict] = {}

    def one(form: str, seed: int) -> None:
        outs[form] = generate(vllm_url, {"form": form, "seed": seed})

    threads = [threading.Thread(target=one, args=(form, 40 + k)) for k, form in enumerate(LONG_FORMS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for form in LONG_FORMS:
        bars = sum(s.bars for s in parse_form(form))
        assert 70 <= bars <= 95 and outs[form]["bars"] == bars and outs[form]["form"] == form
        check_midi(base64.b64decode(outs[form]["midi"]), form)


def test_concurrent_songs_of_mixed_stages_share_engine_steps(vllm_url, stats_file):
    """Songs arriving together, each at its own stage, decode in the same engine steps: one step's batch mixes
    sub-tasks (their adapters and grammar streams), which the processor's counts show."""
    bodies = [{"form": form, "seed": 60 + k, "stages": stages} for k, (form, stages) in enumerate([
        ("A4B4", list(SUBTASKS)), ("A2B2A2", ["chord", "melody"]), ("i2A4", ["chord", "tempo"]),
        ("A4", list(SUBTASKS)), ("A2B4", ["chord", "melody", "secondary"]), ("B4", ["chord"]),
        ("A3B3", list(SUBTASKS)), ("x2A2", ["chord", "melody", "dynamics"])])]
    answers: list = [None] * len(bodies)

    def one(k: int) -> None:
        answers[k] = post(vllm_url, bodies[k])

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * len(bodies), [a.text for a in answers if a.status_code != 200]
    for body, answer in zip(bodies, answers):
        assert answer.json()["form"] == body["form"]
    deadline = time.time() + 30
    while time.time() < deadline and not stats_file.exists():
        time.sleep(0.5)
    stats = json.loads(stats_file.read_text())
    assert stats["rows_max"] >= 4 and stats["streams_max"] >= 2 and stats["mixed_steps"] > 0, stats


def test_regenerate_keeps_every_bar_outside_the_section(request, vllm_url):
    """Infilling on the engine: the forced bars reach the logits processor with each stage request."""
    regenerate_check(request, "vllm_url")


def test_stream_sends_each_stage_bars_in_order_then_the_midi(vllm_url):
    form = "A2B2A2"
    with requests.post(vllm_url + "/v1/generate/stream", json={"form": form, "seed": 5}, stream=True,
                       timeout=300) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "song", kinds
    expected = []
    for task in SUBTASKS:
        expected += ["stage"] + ["bar"] * 6 + ["stage_done"]
    assert kinds[:-1] == expected
    for task in SUBTASKS:
        bars = [data for kind, data in events if kind == "bar" and data["stage"] == task]
        assert [b["bar"] for b in bars] == [1, 2, 3, 4, 5, 6]
        assert [(b["section"], b["bar_in_section"]) for b in bars] == [("A2", 1), ("A2", 2), ("B2", 1), ("B2", 2),
                                                                       ("A2", 1), ("A2", 2)]
    assert all("chords" in data for kind, data in events if kind == "bar" and data["stage"] == "chord")
    assert all("notes" in data for kind, data in events if kind == "bar" and data["stage"] == "melody")
    song = events[-1][1]
    assert song["form"] == form and list(song["stages"]) == list(SUBTASKS)
    check_midi(base64.b64decode(song["midi"]), form)


def test_a_client_that_leaves_mid_stream_cancels_its_song(vllm_url):
    before = health(vllm_url)["deployments"]["composer"]["requests"]
    with requests.post(vllm_url + "/v1/generate/stream", json={"form": LONG_FORMS[1], "seed": 9}, stream=True,
                       timeout=300) as response:
        for kind, data in sse_events(response):
            if kind == "bar":
                break
    # The connection is closed during the chord stage: the engine aborts it and no later stage starts.
    deadline, composer = time.time() + 30, {}
    while time.time() < deadline:
        composer = health(vllm_url)["deployments"]["composer"]
        if composer["running_requests"] == 0:
            break
        time.sleep(0.5)
    assert composer["running_requests"] == 0
    time.sleep(2)
    after = health(vllm_url)["deployments"]["composer"]["requests"]
    assert after["melody"] == before["melody"] and after["chord"] == before["chord"], (before, after)
    check_midi(base64.b64decode(generate(vllm_url, {"form": "A1b1", "seed": 1})["midi"]), "A1b1")


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate/stream"])
@pytest.mark.parametrize("case,body,status,field", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_is_the_same_4xx_as_the_native_engine(vllm_url, path, case, body, status, field):
    if case == "longer than max_bars":   # the native table's form fits this app's larger limit
        body = {"form": "A32B32A32x4"}   # 100 bars
    assert_refused(post_bad_request(vllm_url, body, path), case, status, field)


def test_the_engine_keeps_serving_after_bad_input(vllm_url):
    for _ in range(3):
        post(vllm_url, {"form": "A2B", "melody_midi": "%%%"})
    check_midi(base64.b64decode(generate(vllm_url, {"form": "A1b1", "seed": 2})["midi"]), "A1b1")
    assert health(vllm_url)["ok"] is True

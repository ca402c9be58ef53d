"""The web page and its endpoints on a live Serve app (the tiny model with random adapters, multiplexed: one model
replica), then the page itself in headless Chromium: compose, piano roll, playable audio, regenerate a section,
errors beside their fields. The browser tests skip, saying why, only where Chromium or its driver is missing."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import sys
import wave
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")

from musicray.tokens import SUBTASKS  # noqa: E402

from .conftest import serving  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "musicray" / "serve" / "static"
# The README's screenshot: the page test writes it there only when asked (MUSICRAY_UPDATE_DOCS=1), so that a test
# run leaves the working tree as it was.
DOCS_SCREENSHOT = ROOT / "docs" / "page.png"
# Small and quick: one multiplexed model replica, short stage caps, a short render limit (the 413 test is cheap).
CONFIG = {
    "engine": "native",   # the page's tests; the vLLM engine has its own (test_serve_vllm.py)
    "multiplexed": True,
    "max_bars": 16,
    "max_midi_bytes": 16384,
    "max_render_seconds": 60,
    "max_batch_size": 2,
    "batch_wait_timeout_s": 0.01,
    "tokens_per_bar": {"chord": 6, "melody": 10, "secondary": 10},
    "torch_threads": 1,
    "ingress": {"ray_actor_options": {"num_cpus": 0.1}},
    "stages": {"multiplexed": {"ray_actor_options": {"num_cpus": 0.5}}},
}


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory, make_random_run):
    root = tmp_path_factory.mktemp("page")
    make_random_run(root / "run", SUBTASKS, root / "cache")
    with serving(root / "run", CONFIG, num_cpus=2) as url:
        yield url


def generate(url: str, body: dict) -> dict:
    response = requests.post(url + "/v1/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def song_midi(bars: int, bpm: float) -> str:
    """A base64 musicray MIDI file of ``bars`` bars of 4/4 at ``bpm``."""
    from musicray.midi import song_to_midi
    from musicray.song import Note, Song, Tempo, parse_form

    song = Song("page-test", "C:maj", "4/4", parse_form(f"A{bars}"), tempos=[Tempo(0, 0, bpm)],
                tracks={"MELODY": [Note(bar, 0, 64, 8, 90) for bar in range(bars)], "BRIDGE": [], "PIANO": []})
    buffer = io.BytesIO()
    song_to_midi(song).dump(file=buffer)
    return base64.b64encode(buffer.getvalue()).decode()


# -- the page and the endpoints over HTTP --------------------------------------------------------------------------
def test_root_serves_the_page_and_its_files_from_the_package(serve_url):
    page = requests.get(serve_url + "/", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == (STATIC / "index.html").read_text()  # this checkout's page, not another install's
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert linked and all(link.startswith("static/") for link in linked)  # relative: works under a route prefix
    for name, kind in (("page.js", "text/javascript"), ("roll.js", "text/javascript"), ("page.css", "text/css")):
        response = requests.get(f"{serve_url}/static/{name}", timeout=60)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), name
        # Nothing is fetched at run time: no URL with a scheme but the SVG namespace.
        assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", response.text), name
    for missing in ("nothing.js", "..%2Fapp.py", "index.html.bak"):
        assert requests.get(f"{serve_url}/static/{missing}", timeout=60).status_code == 404, missing
    assert "/" not in requests.get(serve_url + "/openapi.json", timeout=60).json()["paths"]


def test_generate_answers_the_song_for_the_piano_roll(serve_url):
    from musicray.midi import midi_to_song
    from musicray.song import song_to_dict

    out = generate(serve_url, {"form": "A2B2", "key": "D:min", "metre": "3/4", "seed": 4})
    assert out["grid"] == {"beats_per_bar": 3, "positions_per_beat": 4}
    song, from_midi = out["song"], song_to_dict(midi_to_song(base64.b64decode(out["midi"])))
    assert (song["form"], song["key"], song["metre"]) == ("A2B2", "D:min", "3/4")
    assert song == from_midi  # the song as the MIDI holds it: the roll shows what the WAV plays
    assert any(song["tracks"].values()) and song["tempos"]
    assert all(len(note) == 5 for notes in song["tracks"].values() for note in notes)  # bar, pos, pitch, dur, vel


def test_render_returns_a_wav_as_long_as_the_song(serve_url):
    out = generate(serve_url, {"form": "A2B2", "tempo": 120, "seed": 5})
    response = requests.post(serve_url + "/v1/render", json={"midi": out["midi"]}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    assert response.headers["x-musicray-renderer"] in ("fluidsynth", "midirenderer")
    with wave.open(io.BytesIO(response.content)) as audio:
        assert (audio.getnchannels(), audio.getsampwidth(), audio.getframerate()) == (2, 2, 22050)
        seconds = audio.getnframes() / audio.getframerate()
        frames = audio.readframes(audio.getnframes())
    song_seconds = _song_seconds(out)
    assert song_seconds <= seconds <= song_seconds + 1.0 + 1e-3  # the song plus at most its release
    assert float(response.headers["x-musicray-seconds"]) == pytest.approx(seconds, abs=1e-3)
    assert max(abs(int.from_bytes(frames[i:i + 2], "little", signed=True)) for i in range(0, len(frames), 2)) > 100


def _song_seconds(out: dict) -> float:
    """The length of a composed song, from its tempo changes (as the page computes it)."""
    per_beat, beats = out["grid"]["positions_per_beat"], out["grid"]["beats_per_bar"]
    changes = sorted((bar * beats * per_beat + pos, bpm) for bar, pos, bpm in out["song"]["tempos"])
    end = out["bars"] * beats * per_beat
    seconds = 0.0
    for i, (step, bpm) in enumerate(changes):
        following = changes[i + 1][0] if i + 1 < len(changes) else end
        seconds += (following - step) * 60 / (bpm * per_beat)
    return seconds


RENDER_BAD_INPUT = [
    ("not base64", {"midi": "%%% not base64"}, 400),
    ("not MIDI", {"midi": base64.b64encode(b"RIFF....WAVEfmt ").decode()}, 400),
    ("empty", {"midi": ""}, 422),
    ("missing", {}, 422),
    ("too large", {"midi": base64.b64encode(b"MThd" + bytes(20000)).decode()}, 413),
    ("too long to render", {"midi": "LONG"}, 413),   # 16 bars at 40 bpm: 96 s > max_render_seconds
]


@pytest.mark.parametrize("case,body,status", RENDER_BAD_INPUT, ids=[case[0] for case in RENDER_BAD_INPUT])
def test_render_refuses_bad_input_naming_the_field(serve_url, case, body, status):
    if body.get("midi") == "LONG":
        body = {"midi": song_midi(16, 40.0)}
    response = requests.post(serve_url + "/v1/render", json=body, timeout=120)
    assert response.status_code == status, (case, response.text)
    payload = response.json()
    assert payload["field"] == "midi", payload
    assert (payload["message"] if status == 422 else payload["detail"]).startswith("midi"), payload


def onsets_before(notes: list, bar: int) -> list:
    """(bar, position, pitch, velocity) of the notes starting before ``bar``: what infilling keeps. Not the
    duration: a kept note that sounds into the rewritten bars ends where a new note of its pitch starts."""
    return [(b, position, pitch, velocity) for b, position, pitch, _, velocity in notes if b < bar]


def test_regenerating_a_sections_bars_keeps_the_rest(serve_url):
    """What the page's "regenerate this section" sends: the song as song_midi and the section's bar range."""
    first = generate(serve_url, {"form": "A2B2", "seed": 6})
    again = generate(serve_url, {"form": "A2B2", "seed": 7, "song_midi": first["midi"], "regenerate_bars": "3-4"})
    for track in ("MELODY", "BRIDGE"):
        assert onsets_before(again["song"]["tracks"][track], 2) == onsets_before(first["song"]["tracks"][track], 2)
    response = requests.post(serve_url + "/v1/generate", timeout=60, json={
        "form": "A2B2", "seed": 7, "song_midi": first["midi"], "regenerate_bars": "3-9"})
    assert response.status_code == 400 and response.json()["field"] == "regenerate_bars"


# -- the page in a real browser ----------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "Chromium is not installed (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        print(f"\nskipping the browser tests: {missing}", file=sys.stderr)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,1080", "--hide-scrollbars", "--mute-audio"):
        options.add_argument(argument)
    # The driver named explicitly: selenium would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, timeout: float = 300):
    """Wait until the JavaScript expression ``script`` is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: d.execute_script(f"return {script}"))


def fill(driver, **fields) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        if element.tag_name == "select":
            Select(element).select_by_visible_text(value)
        else:
            element.clear()
            element.send_keys(value)


def notes_before(driver, bar: int) -> list:
    """The MELODY and BRIDGE notes the roll draws before ``bar`` (0-based): [track, bar, position, pitch,
    velocity] (``onsets_before``)."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#roll rect.note.MELODY, #roll rect.note.BRIDGE')]
          .map((r) => [r.classList[1], ...r.dataset.note.split(',').map(Number)])
          .filter((note) => note[1] < arguments[0])
          .map(([track, bar, position, pitch, duration, velocity]) => [track, bar, position, pitch, velocity]);
    """, bar)


def test_page_composes_draws_plays_and_regenerates_a_section(browser, serve_url, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(serve_url + "/")
    wait_for(browser, "document.body.dataset.state === 'ready'", 60)
    fill(browser, form="i1A2B2o1", key="G:maj", metre="4/4", tempo="96", seed="3")
    browser.find_element(By.ID, "compose").click()
    assert wait_for(browser, "document.body.dataset.state", 10) in ("composing", "done")
    wait_for(browser, "document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert browser.execute_script("return document.body.dataset.state") == "done", \
        browser.find_element(By.ID, "general-error").text

    # Each stage's report, the piano roll with the three lanes, sections and chords.
    done = browser.find_elements(By.CSS_SELECTOR, "#stage-list li.done")
    stages = [item.get_attribute("data-stage") for item in done]
    assert stages == list(SUBTASKS)
    counts = browser.execute_script("""
        const roll = document.getElementById('roll');
        const count = (selector) => roll.querySelectorAll(selector).length;
        return {notes: count('rect.note'), melody: count('rect.note.MELODY'), sections: count('g.section'),
                chords: count('text.chord-label'), curves: count('.curve'), width: roll.getBoundingClientRect().width};
    """)
    assert counts["notes"] > 0 and counts["melody"] > 0 and counts["sections"] == 4, counts
    assert counts["chords"] > 0 and counts["curves"] >= 2 and counts["width"] > 600, counts
    colours = browser.execute_script("""
        return ['MELODY', 'BRIDGE', 'PIANO'].map((t) => {
          const probe = document.createElementNS('http://www.w3.org/2000/svg', 'rect');
          probe.setAttribute('class', 'note ' + t);
          document.getElementById('roll').appendChild(probe);
          const fill = getComputedStyle(probe).fill;
          probe.remove();
          return fill;
        });
    """)
    assert len(set(colours)) == 3, colours  # three tracks, three colours

    # A playable audio element: the WAV loads and lasts as long as the song.
    wait_for(browser, "document.body.dataset.audio === 'ready' || document.body.dataset.audio === 'error'")
    assert browser.execute_script("return document.body.dataset.audio") == "ready", \
        browser.find_element(By.ID, "audio-status").text
    duration = wait_for(browser, "(() => { const p = document.getElementById('player');"
                                 " return p.readyState >= 1 && p.duration > 0 ? p.duration : false; })()", 60)
    status = browser.find_element(By.ID, "audio-status").text  # "12.3 s, rendered with midirenderer"
    assert duration == pytest.approx(float(status.split(" s,")[0]), abs=0.06), (duration, status)
    for link, suffix in (("download-midi", ".mid"), ("download-wav", ".wav")):
        element = browser.find_element(By.ID, link)
        assert element.is_displayed() and element.get_attribute("href").startswith("blob:")
        assert element.get_attribute("download").endswith(suffix)

    # "Regenerate this section": section B (bars 4-5) anew, the bars before it unchanged.
    section = browser.find_element(By.CSS_SELECTOR, "#roll g.section[data-section='2']")
    assert section.get_attribute("data-bars") == "4-5"
    before = notes_before(browser, 3)
    assert before, "no melody or bridge notes before section B to keep"
    browser.execute_script("document.body.dataset.state = 'regenerating'")
    section.find_element(By.CSS_SELECTOR, "rect.band").click()
    wait_for(browser, "document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert browser.execute_script("return document.body.dataset.state") == "done", \
        browser.find_element(By.ID, "regenerate-error").text
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "4"
    assert "seed 4" in browser.find_element(By.ID, "summary").text
    assert notes_before(browser, 3) == before
    wait_for(browser, "document.body.dataset.audio === 'ready'")
    wait_for(browser, "document.getElementById('player').duration > 0", 60)

    screenshot = DOCS_SCREENSHOT if os.environ.get("MUSICRAY_UPDATE_DOCS") == "1" else tmp_path / "page.png"
    save_screenshot(browser, screenshot)
    assert screenshot.stat().st_size > 10_000


def save_screenshot(driver, path: Path) -> None:
    """The whole page (the window as tall as the document, the mouse off the roll), in at most 128 colours."""
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1200, height + driver.execute_script("return window.outerHeight - window.innerHeight"))
    path.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(path))
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize("field,value,wrong", [
    ("form", "A2B", "form"),        # the music rules refuse it: 400
    ("tempo", "fast", "tempo"),     # the wrong type: 422
    ("key", "H:maj", "key"),
])
def test_bad_input_shows_the_apis_message_beside_the_field(browser, serve_url, field, value, wrong):
    from selenium.webdriver.common.by import By

    browser.get(serve_url + "/")
    wait_for(browser, "document.body.dataset.state === 'ready'", 60)
    fill(browser, **{field: value})
    browser.find_element(By.ID, "compose").click()
    wait_for(browser, "document.body.dataset.state === 'error'", 60)
    message = browser.find_element(By.CSS_SELECTOR, f"output[data-error-for='{wrong}']")
    assert message.is_displayed() and message.text.startswith(f"{wrong}:"), message.text
    assert "invalid" in browser.find_element(By.ID, wrong).get_attribute("class")
    assert browser.find_element(By.ID, "general-error").text == ""
    assert not browser.find_element(By.ID, "report").is_displayed()  # no stage left "waiting"


def test_an_uploaded_melody_replaces_the_melody_stage(browser, serve_url, tmp_path):
    from selenium.webdriver.common.by import By

    from musicray.midi import write_midi
    from musicray.song import Note, Song, parse_form

    melody = [Note(bar, position, 60 + (bar * 5 + position) % 12, 4, 90) for bar in range(4) for position in (0, 8)]
    path = write_midi(Song("tune", "C:maj", "4/4", parse_form("A4"), tracks={"MELODY": melody, "BRIDGE": [],
                                                                                 "PIANO": []}), tmp_path / "tune.mid")
    browser.get(serve_url + "/")
    wait_for(browser, "document.body.dataset.state === 'ready'", 60)
    fill(browser, form="A2B2", seed="8")
    browser.find_element(By.ID, "melody_midi").send_keys(str(path))
    browser.find_element(By.ID, "compose").click()
    wait_for(browser, "document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert browser.execute_script("return document.body.dataset.state") == "done", \
        browser.find_element(By.ID, "general-error").text
    skipped = browser.find_elements(By.CSS_SELECTOR, "#stage-list li.skipped b")
    assert [item.text for item in skipped] == ["melody"]
    drawn = browser.execute_script(
        "return [...document.querySelectorAll('#roll rect.note.MELODY')].map((r) => r.dataset.note.split(',')"
        ".map(Number))")
    assert sorted((bar, position, pitch) for bar, position, pitch, _, _ in drawn) == \
        sorted((n.bar, n.position, n.pitch) for n in melody)


# -- versions: bars and tracks composed again, a continuation, undo, a dropped song, MusicXML --------------------
def test_export_answers_musicxml_that_music21_reads_back_and_song_reads_a_midi_file(serve_url):
    from music21 import converter, harmony

    from musicray.midi import midi_to_song
    from musicray.song import song_to_dict

    out = generate(serve_url, {"form": "A2B2", "key": "F:maj", "seed": 9})
    for lead_sheet, parts in ((False, 3), (True, 1)):
        response = requests.post(serve_url + "/v1/export", json={"midi": out["midi"], "lead_sheet": lead_sheet},
                                 timeout=120)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/vnd.recordare.musicxml+xml"
        score = converter.parseData(response.content.decode(), format="musicxml")
        assert len(score.parts) == parts and len(score.parts[0].getElementsByClass("Measure")) == 4
        assert [h.figure for h in score.recurse().getElementsByClass(harmony.ChordSymbol)]
    read = requests.post(serve_url + "/v1/song", json={"midi": out["midi"]}, timeout=60)
    assert read.status_code == 200, read.text
    answer = read.json()
    assert (answer["form"], answer["key"], answer["bars"], answer["seed"]) == ("A2B2", "F:maj", 4, None)
    assert answer["song"] == {**song_to_dict(midi_to_song(base64.b64decode(out["midi"]))), "song_id": "upload"}
    for path, body, status in (("/v1/export", {"midi": base64.b64encode(b"RIFF....").decode()}, 400),
                               ("/v1/song", {"midi": "%%%"}, 400), ("/v1/song", {"midi": song_midi(20, 90.0)}, 400),
                               ("/v1/export", {"midi": out["midi"], "lead_sheet": "yes"}, 422)):
        response = requests.post(serve_url + path, json=body, timeout=60)
        assert response.status_code == status and response.json()["field"] in ("midi", "lead_sheet"), response.text


def roll_notes(driver) -> list:
    """Every note the roll draws: [track, bar, position, pitch, duration, velocity]."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#roll rect.note')].map((r) => [r.classList[1],"
        " ...r.dataset.note.split(',').map(Number)])")


def onsets(notes: list, keep) -> list:
    """(track, bar, position, pitch, velocity) of the notes ``keep(track, bar)`` chooses (``onsets_before``)."""
    return sorted((t, b, p, pitch, v) for t, b, p, pitch, _, v in notes if keep(t, b))


def wait_done(driver, error_id: str = "regenerate-error") -> None:
    from selenium.webdriver.common.by import By

    wait_for(driver, "document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert driver.execute_script("return document.body.dataset.state") == "done", \
        driver.find_element(By.ID, error_id).text


def drag_over_bars(driver, first: int, last: int) -> None:
    """Press in bar ``first`` (0-based) of the roll and release in bar ``last``, as a mouse does."""
    from selenium.webdriver.common.action_chains import ActionChains

    x0, x1, y = driver.execute_script("""
        const roll = document.getElementById('roll');
        roll.scrollIntoView({block: 'center'});
        const box = roll.getBoundingClientRect();
        const line = (bar) => box.left + Number(roll.querySelector(`line[data-bar='${bar}']`).getAttribute('x1'));
        const middle = (bar) => bar === 0 ? (box.left + 58 + line(1)) / 2 : (line(bar) + line(bar + 1)) / 2;
        return [middle(arguments[0]), middle(arguments[1]), box.top + box.height / 3];
    """, first, last)
    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(int(x0), int(y)).pointer_down() \
        .move_to_location(int((x0 + x1) / 2), int(y)).move_to_location(int(x1), int(y)).pointer_up()
    actions.perform()


def test_page_recomposes_chosen_bars_and_tracks_continues_undoes_and_takes_a_dropped_song(browser, serve_url):
    from selenium.webdriver.common.by import By

    browser.get(serve_url + "/")
    wait_for(browser, "document.body.dataset.state === 'ready'", 60)
    fill(browser, form="A2B2", key="C:maj", metre="4/4", tempo="100", seed="3")
    browser.find_element(By.ID, "compose").click()
    wait_done(browser, "general-error")
    first = roll_notes(browser)
    assert first

    # Drag over bars 2-3, keep only MELODY ticked, compose again: MELODY there is new, all else as it was.
    drag_over_bars(browser, 1, 2)
    assert browser.find_element(By.ID, "selection-bars").text == "2–3"
    assert browser.find_element(By.CSS_SELECTOR, "#roll rect.selection").get_attribute("data-bars") == "2-3"
    for track in ("BRIDGE", "PIANO"):
        browser.find_element(By.CSS_SELECTOR, f"input[name=regenerate-tracks][value={track}]").click()
    browser.find_element(By.ID, "recompose").click()
    wait_done(browser)
    second = roll_notes(browser)
    chosen = lambda track, bar: track == "MELODY" and bar in (1, 2)  # noqa: E731
    assert onsets(second, lambda t, b: not chosen(t, b)) == onsets(first, lambda t, b: not chosen(t, b))
    assert "seed 4" in browser.find_element(By.ID, "summary").text
    versions = browser.find_elements(By.CSS_SELECTOR, "#versions li")
    assert [v.get_attribute("data-version") for v in versions] == ["1", "2"]
    assert "bars 2-3 of MELODY again" in versions[1].text

    # Undo: the first version is back, note for note.
    browser.find_element(By.ID, "undo").click()
    wait_for(browser, "document.querySelectorAll('#versions li').length === 1", 30)
    assert roll_notes(browser) == first
    assert not browser.find_element(By.ID, "undo").is_enabled()

    # Continue by 2 bars: A2B2C2, the four given bars unchanged, new notes after them.
    fill(browser, **{"continue-bars": "2"})
    browser.find_element(By.ID, "continue").click()
    wait_done(browser)
    assert browser.find_element(By.ID, "summary").text.startswith("A2B2C2 ")
    continued = roll_notes(browser)
    assert onsets(continued, lambda t, b: b < 4) == onsets(first, lambda t, b: True)
    assert any(bar >= 4 for _, bar, *_ in continued)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#roll g.section")) == 3

    # Every version downloadable: its MIDI, and its MusicXML from v1/export.
    for item in browser.find_elements(By.CSS_SELECTOR, "#versions li"):
        assert item.find_element(By.CSS_SELECTOR, "a.midi").get_attribute("href").startswith("blob:")
    link = browser.find_element(By.CSS_SELECTOR, "#versions li[data-version='1'] a.musicxml")
    link.click()
    wait_for(browser, "document.querySelector(\"#versions li[data-version='1'] a.musicxml\").dataset.state"
                      " === 'ready'", 120)
    xml = browser.execute_async_script(
        "fetch(arguments[0]).then((r) => r.text()).then(arguments[1])", link.get_attribute("href"))
    assert "<score-partwise" in xml and xml.count("<part id=") == 3

    # A MIDI file dropped on the page becomes the song on show, as it is.
    dropped = song_midi(4, 90.0)
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], 'mine.mid', {type: 'audio/midi'}));
        document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true}));
    """, dropped)
    wait_for(browser, "document.querySelectorAll('#versions li').length === 3", 60)
    wait_done(browser)
    assert "as uploaded" in browser.find_element(By.ID, "summary").text
    assert browser.find_element(By.ID, "form").get_attribute("value") == "A4"
    assert sorted((t, b, p, pitch) for t, b, p, pitch, _, _ in roll_notes(browser)) == \
        [("MELODY", bar, 0, 64) for bar in range(4)]


def test_words_in_the_prompt_box_are_planned_and_a_field_edited_by_hand_wins(browser, serve_url):
    """The prompt goes to the API with only the planned fields edited by hand (here the tempo); the plan's form, key
    and metre come back into the form, and the API plans the same body the same way."""
    from selenium.webdriver.common.by import By

    browser.get(serve_url + "/")
    wait_for(browser, "document.body.dataset.state === 'ready'", 60)
    fill(browser, prompt="a waltz in G major, verse-chorus", tempo="90", seed="5")
    browser.find_element(By.CSS_SELECTOR, "input[name=stages][value=secondary]").click()   # fewer stages: quicker
    browser.find_element(By.ID, "compose").click()
    wait_for(browser, "document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert browser.execute_script("return document.body.dataset.state") == "done", \
        browser.find_element(By.ID, "general-error").text
    answer = generate(serve_url, {"prompt": "a waltz in G major, verse-chorus", "tempo": 90, "seed": 5,
                                  "stages": ["chord", "melody", "dynamics", "tempo"]})
    assert answer["from_plan"] == ["form", "key", "metre"]
    shown = {name: browser.find_element(By.ID, name).get_attribute("value") for name in ("form", "key", "metre",
                                                                                          "tempo")}
    assert shown == {**{name: answer["plan"][name] for name in ("form", "key", "metre")}, "tempo": "90"}
    assert browser.find_element(By.ID, "summary").text.startswith(f"{answer['form']} · {answer['key']} · ")
    summary = browser.find_element(By.ID, "plan-summary").text
    assert summary.startswith(f"planned from your words: form {answer['form']} · key {answer['key']} · metre "
                              f"{answer['metre']} (sections "), summary
    direction = answer["tempo_direction"]   # the plan's; the tempo stage ran, so a slowing or speeding up is heard
    assert direction["direction"] == answer["plan"]["tempo_direction"]
    assert summary.endswith(f"tempo direction {direction['direction']}, " + (
        f"applied, bars {direction['bars'][0]}-{direction['bars'][1]}: {direction['bpm'][0]} to {direction['bpm'][1]} "
        "bpm)" if direction["applied"] else f"not applied: {direction['why']})")), summary

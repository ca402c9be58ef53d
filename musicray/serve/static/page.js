// The page's behaviour: read the form, call the API (POST v1/generate, then v1/render for the audio), show the
// stages, the piano roll, the player and the downloads; put the API's error message beside the field it names.
// Every song shown is a version: a section, a selection of bars and tracks, or a continuation composed again
// makes the next one, Undo goes back to the one before, each stays downloadable (MIDI; MusicXML through
// v1/export). A MIDI file dropped on the page becomes a version as it is (v1/song).
// URLs are relative, so the page works under any route prefix.
import { drawRoll } from "./roll.js";

const STAGES = ["chord", "melody", "secondary", "dynamics", "tempo"];
const ROOTS = ["C", "C#", "Db", "D", "Eb", "E", "F", "F#", "Gb", "G", "Ab", "A", "Bb", "B"];
// Fields an infilling request adds: their errors belong beside the roll, not beside the form.
const REGENERATE_FIELDS = new Set(["regenerate", "regenerate_bars", "regenerate_tracks", "continue_bars", "song_midi",
                                   "midi", "body"]);
const TRACKS = ["MELODY", "BRIDGE", "PIANO"];

const $ = (id) => document.getElementById(id);
const state = { answer: null, requested: STAGES, roll: null, urls: [], versions: [], selection: null };

// -- reading the form ----------------------------------------------------------------------------------------------
function integerOrText(value) {
  // Whole numbers go as numbers; anything else as typed, so the API's message names the field.
  return /^-?\d+$/.test(value.trim()) ? Number(value.trim()) : value;
}

async function fileAsBase64(input) {
  const file = input.files[0];
  if (!file) return undefined;
  const bytes = new Uint8Array(await file.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function chosenStages() {
  const checked = [...document.querySelectorAll("input[name=stages]:checked")].map((box) => box.value);
  return checked.length === STAGES.length ? undefined : checked;  // all: the API's default
}

async function composeBody() {
  const body = {
    form: $("form").value.trim(), key: $("key").value.trim(), metre: $("metre").value,
    tempo: integerOrText($("tempo").value), seed: integerOrText($("seed").value),
  };
  const chords = $("chords").value.trim();
  if (chords) body.chords = chords;
  const melody = await fileAsBase64($("melody_midi"));
  if (melody !== undefined) body.melody_midi = melody;
  const whole = await fileAsBase64($("song_midi"));
  if (whole !== undefined) body.song_midi = whole;
  const stages = chosenStages();
  if (stages) body.stages = stages;
  return withPrompt(body);
}

// -- errors ----------------------------------------------------------------------------------------------------------
function clearErrors() {
  document.querySelectorAll(".error").forEach((out) => { out.textContent = ""; });
  document.querySelectorAll(".invalid").forEach((input) => input.classList.remove("invalid"));
}

/** The API's answer to bad input: {field, detail} (400, 413) or {field, message, detail: [...]} (422); a failed
 * stage answers {stage, detail}. */
function showError(payload, status, regenerating) {
  const field = payload.field || "body";
  let message = typeof payload.message === "string" ? payload.message
    : typeof payload.detail === "string" ? payload.detail : JSON.stringify(payload.detail || payload);
  if (payload.stage) message = `${message} (HTTP ${status})`;
  const out = regenerating && REGENERATE_FIELDS.has(field) ? $("regenerate-error")
    : document.querySelector(`[data-error-for~="${CSS.escape(field)}"]`) || $("general-error");
  out.textContent = message;
  const input = $(field);
  if (input && !regenerating) input.classList.add("invalid");
  document.body.dataset.state = "error";
}

async function postJSON(url, body) {
  try {
    return await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                              body: JSON.stringify(body) });
  } catch (err) {  // no answer at all: shaped like one, so the callers need no second path
    const payload = { field: "body", detail: `cannot reach the server: ${err.message}` };
    return { ok: false, status: 0, json: async () => payload };
  }
}

async function payloadOf(response) {
  try {
    return await response.json();
  } catch {
    return { field: "body", detail: `HTTP ${response.status} ${response.statusText}` };
  }
}

// -- progress --------------------------------------------------------------------------------------------------------
function startProgress(what, stages) {
  $("compose").disabled = true;
  document.body.dataset.state = "composing";
  const started = performance.now();
  const tick = () => {
    $("progress-text").textContent = `${what} ${((performance.now() - started) / 1000).toFixed(1)} s`;
  };
  tick();
  $("progress").hidden = false;
  const timer = setInterval(tick, 100);
  showStages(Object.fromEntries(stages.map((task) => [task, null])), stages);
  return () => {
    clearInterval(timer);
    $("progress").hidden = true;
    $("compose").disabled = false;
  };
}

/** One box per requested stage: its report once the answer is in, "skipped" if a given part replaced it. */
function showStages(reports, requested) {
  const list = $("stage-list");
  list.replaceChildren();
  for (const task of STAGES.filter((t) => requested.includes(t))) {
    const item = document.createElement("li");
    const report = reports[task];
    const name = document.createElement("b");
    name.textContent = task;
    const detail = document.createElement("span");
    if (report === undefined) {
      item.className = "skipped";
      detail.textContent = "skipped: given in the request";
    } else if (report === null) {
      item.className = "pending";
      detail.textContent = "waiting…";
    } else {
      item.className = "done";
      item.dataset.stage = task;
      detail.textContent = `${report.new_tokens} tokens · ${report.seconds.toFixed(2)} s · batch ${report.batch}`
        + (report.adapter ? ` · adapter ${report.adapter}` : " · no adapter");
    }
    item.append(name, detail);
    list.appendChild(item);
  }
  $("report").hidden = false;
}

// -- results ---------------------------------------------------------------------------------------------------------
function objectURL(blob) {
  const url = URL.createObjectURL(blob);
  state.urls.push(url);
  return url;
}

function base64Blob(text, type) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes], { type });
}

/** A new version: listed with its downloads, then shown. */
function showResult(answer, requested, what = "composed") {
  const version = { answer, requested, what, number: state.versions.length + 1,
                    name: `musicray-v${state.versions.length + 1}-${answer.form}`
                      + (answer.seed === null ? "" : `-seed${answer.seed}`) };
  version.midiURL = URL.createObjectURL(base64Blob(answer.midi, "audio/midi"));  // kept while the version is
  state.versions.push(version);
  listVersions();
  show(version);
}

function show(version) {
  const { answer, requested } = version;
  state.urls.forEach((url) => URL.revokeObjectURL(url));
  state.urls = [];
  state.answer = answer;
  state.requested = requested;
  showStages(answer.stages, requested);
  $("summary").textContent = `${answer.form} · ${answer.key} · ${answer.metre} · ${answer.bars} bars · `
    + (answer.seed === null ? "as uploaded" : `seed ${answer.seed} · composed in ${answer.seconds.toFixed(1)} s`);
  $("result").hidden = false;
  state.roll = drawRoll($("roll"), answer.song, answer.grid, { onSection: regenerate, onSelect: selectBars });
  selectBars(null);
  $("undo").disabled = state.versions.length < 2;
  const name = version.name;
  Object.assign($("download-midi"), { href: version.midiURL, download: `${name}.mid` });
  $("download-wav").hidden = true;
  document.body.dataset.state = "done";
  renderAudio(answer, name);
}

async function renderAudio(answer, name) {
  const player = $("player");
  player.removeAttribute("src");
  player.load();
  document.body.dataset.audio = "rendering";
  $("audio-status").textContent = "rendering audio…";
  const response = await postJSON("v1/render", { midi: answer.midi });
  if (state.answer !== answer) return;  // a newer song arrived meanwhile
  if (!response.ok) {
    const payload = await payloadOf(response);
    $("audio-status").textContent = `no audio: ${payload.detail || payload.message}`;
    document.body.dataset.audio = "error";
    return;
  }
  const url = objectURL(await response.blob());
  player.src = url;
  Object.assign($("download-wav"), { href: url, download: `${name}.wav`, hidden: false });
  const seconds = Number(response.headers.get("X-Musicray-Seconds") || 0);
  const renderer = response.headers.get("X-Musicray-Renderer");
  $("audio-status").textContent = `${seconds.toFixed(1)} s, rendered with ${renderer}`;
  document.body.dataset.audio = "ready";
}

function followPlayback() {
  const player = $("player");
  const step = () => {
    if (state.roll) state.roll.setTime(player.currentTime);
    if (!player.paused) requestAnimationFrame(step);
  };
  player.addEventListener("play", step);
  player.addEventListener("seeked", step);
  player.addEventListener("ended", () => state.roll && state.roll.setTime(0));
}

// -- actions ---------------------------------------------------------------------------------------------------------
async function compose(event) {
  event.preventDefault();
  clearErrors();
  let body;
  try {
    body = await composeBody();
  } catch (err) {
    showError({ field: "body", detail: `cannot read the upload: ${err.message}` }, 0, false);
    return;
  }
  const requested = body.stages || STAGES;
  const done = startProgress("composing…", requested);
  const response = await postJSON("v1/generate", body);
  done();
  const payload = await payloadOf(response);
  if (!response.ok) {
    restoreStages();
    return showError(payload, response.status, false);
  }
  showResult(payload, requested);
  showPlan(payload);
}

// -- versions -------------------------------------------------------------------------------------------------------
function listVersions() {
  const list = $("versions");
  list.replaceChildren();
  for (const version of state.versions) {
    const item = document.createElement("li");
    item.dataset.version = version.number;
    const { answer } = version;
    item.append(`v${version.number} · ${version.what} · ${answer.form} · ${answer.bars} bars `);
    const midi = Object.assign(document.createElement("a"), { className: "midi", href: version.midiURL,
                                                              download: `${version.name}.mid`, textContent: "MIDI" });
    const xml = Object.assign(document.createElement("a"), { className: "musicxml", href: "#",
                                                             textContent: "MusicXML" });
    xml.addEventListener("click", (event) => exportMusicXML(event, xml, version));
    item.append(midi, " ", xml);
    list.appendChild(item);
  }
  $("versions-box").hidden = !state.versions.length;
}

/** The version's MusicXML (full score) from v1/export, then downloaded; later clicks download the same file. */
async function exportMusicXML(event, link, version) {
  if (link.dataset.state === "ready") return;  // the href is the file now: the browser downloads it
  event.preventDefault();
  if (link.dataset.state === "exporting") return;
  link.dataset.state = "exporting";
  const response = await postJSON("v1/export", { midi: version.answer.midi });
  if (!response.ok) {
    const payload = await payloadOf(response);
    link.dataset.state = "error";
    $("regenerate-error").textContent = `MusicXML: ${payload.detail || payload.message}`;
    return;
  }
  Object.assign(link, { href: URL.createObjectURL(await response.blob()), download: `${version.name}.musicxml` });
  link.dataset.state = "ready";
  link.click();
}

function undo() {
  if (state.versions.length < 2 || $("compose").disabled) return;
  clearErrors();
  URL.revokeObjectURL(state.versions.pop().midiURL);
  listVersions();
  show(state.versions[state.versions.length - 1]);
}

/** The bars dragged over on the roll (0-based, end exclusive), or null. */
function selectBars(range) {
  state.selection = range;
  $("selection-bars").textContent = range ? `${range.start + 1}–${range.end}` : "none (drag across the roll)";
  $("recompose").disabled = !range;
}

function chosenTracks() {
  return [...document.querySelectorAll("input[name=regenerate-tracks]:checked")].map((box) => box.value);
}

// -- dropping a song -------------------------------------------------------------------------------------------------
async function dropSong(event) {
  event.preventDefault();
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (!file || $("compose").disabled) return;
  clearErrors();
  let midi;
  try {
    midi = await fileAsBase64({ files: [file] });
  } catch (err) {
    showError({ field: "midi", detail: `cannot read ${file.name}: ${err.message}` }, 0, true);
    return;
  }
  const done = startProgress(`reading ${file.name}…`, []);
  const response = await postJSON("v1/song", { midi });
  done();
  const payload = await payloadOf(response);
  if (!response.ok) {
    restoreStages();
    return showError(payload, response.status, true);
  }
  $("form").value = payload.form;
  $("key").value = payload.key;
  $("metre").value = payload.metre;
  if (payload.song.tempos.length) $("tempo").value = Math.round(payload.song.tempos[0][2]);
  showResult(payload, [], `uploaded ${file.name}`);
}

/** After a refused request: the stages of the song on show again, or none. */
function restoreStages() {
  if (state.answer) showStages(state.answer.stages, state.requested);
  else $("report").hidden = true;
}

/** "Regenerate this section": the song goes back as song_midi with that section's bars to rewrite. */
function regenerate(section, index) {
  const bars = `${section.start + 1}-${section.end}`;
  recompose({ regenerate_bars: bars }, `section ${section.label} (bars ${bars}) again`, index);
}

/** The selected bars of the chosen tracks composed again (all three: every part of those bars). */
function recomposeSelection() {
  if (!state.selection) return;
  const bars = `${state.selection.start + 1}-${state.selection.end}`;
  const tracks = chosenTracks();
  const fields = { regenerate_bars: bars };
  if (tracks.length !== TRACKS.length) fields.regenerate_tracks = tracks;  // none: the API says what is wrong
  const which = tracks.length === TRACKS.length ? "" : ` of ${tracks.join(", ") || "no track"}`;
  recompose(fields, `bars ${bars}${which} again`, null);
}

function continueSong() {
  const bars = $("continue-bars").value.trim();
  recompose({ continue_bars: integerOrText(bars) }, `continued by ${bars}`, null);
}

/** The song on show goes back as song_midi with ``fields`` saying what to compose again, and a new seed (shown in
 * the form) so that comes out different; the answer is the next version. */
async function recompose(fields, what, index) {
  const answer = state.answer;
  if (!answer || $("compose").disabled) return;
  clearErrors();
  const seed = (Number(answer.seed ?? $("seed").value) + 1) % 2 ** 31;
  $("seed").value = seed;
  const body = { form: answer.song.form, key: answer.song.key, metre: answer.song.metre,
                 tempo: integerOrText($("tempo").value), seed, song_midi: answer.midi, ...fields };
  const stages = chosenStages();
  if (stages) body.stages = stages;
  const requested = stages || STAGES;
  state.roll.busy(index);
  const done = startProgress(`composing: ${what}…`, requested);
  const response = await postJSON("v1/generate", body);
  done();
  const payload = await payloadOf(response);
  if (!response.ok) {
    state.roll.busy(null);
    restoreStages();
    return showError(payload, response.status, true);
  }
  showResult(payload, requested, what);
}

// -- songs planned from words --------------------------------------------------------------------------------------
// With words in the prompt box the server plans form, key, metre and tempo; of those fields only the ones edited by
// hand are sent (they override the plan), and the plan's values are shown in the form afterwards.
const PLANNED_FIELDS = ["form", "key", "metre", "tempo"];

function markEdited(event) {
  if (PLANNED_FIELDS.includes(event.target.id)) event.target.dataset.edited = "yes";
}

function withPrompt(body) {
  const prompt = $("prompt").value.trim();
  if (prompt) {
    body.prompt = prompt;
    for (const name of PLANNED_FIELDS) if (!$(name).dataset.edited) delete body[name];
  }
  return body;
}

function showPlan(answer) {
  if (!answer.plan) {
    $("plan-summary").textContent = "";
    return;
  }
  for (const name of answer.from_plan) $(name).value = answer.plan[name];
  const taken = answer.from_plan.map((name) => `${name} ${answer.plan[name]}`).join(" · ") || "nothing";
  const direction = answer.tempo_direction;
  const heard = direction.applied ? `applied, bars ${direction.bars.join("-")}: ${direction.bpm.join(" to ")} bpm`
    : `not applied: ${direction.why}`;
  $("plan-summary").textContent = `planned from your words: ${taken} (sections ${answer.plan.sections.join(", ")}; `
    + `tempo direction ${direction.direction}, ${heard})`;
}

function fillKeys() {
  const list = $("keys");
  for (const mode of ["maj", "min"]) {
    for (const root of ROOTS) {
      const option = document.createElement("option");
      option.value = `${root}:${mode}`;
      list.appendChild(option);
    }
  }
}

fillKeys();
followPlayback();
$("compose-form").addEventListener("submit", compose);
$("recompose").addEventListener("click", recomposeSelection);
$("continue").addEventListener("click", continueSong);
$("undo").addEventListener("click", undo);
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", dropSong);
$("compose-form").addEventListener("input", markEdited);
document.body.dataset.state = "ready";

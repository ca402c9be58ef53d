// The piano roll of a composed song, drawn as SVG: sections (their band clickable), chord symbols, the notes of
// the three tracks, then velocity and tempo curves on the same time axis, so one horizontal scroll moves them
// together. Dragging across the roll selects a range of bars.
// Time is in seconds (through the song's tempo changes), so the playhead follows the audio exactly.

const SVG = "http://www.w3.org/2000/svg";
const TRACKS = ["PIANO", "BRIDGE", "MELODY"];  // drawing order: the melody on top
const GUTTER = 58;          // left margin: pitch names and lane titles
const SECTION_H = 26;
const CHORD_H = 20;
const VELOCITY_H = 64;
const TEMPO_H = 50;
const AXIS_H = 18;
const LANE_GAP = 10;
const MIN_BAR_WIDTH = 30;   // below this a long song scrolls instead of squeezing its bars
const PITCH_NAMES = ["C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B"];  // as musicray spells roots
const NATURALS = { C: 0, D: 2, E: 4, F: 5, G: 7, A: 9, B: 11 };
// Slash-chord basses are Harte degrees above the root (musicray.harmony.BASS_DEGREES).
const BASS_DEGREES = { b2: 1, 2: 2, b3: 3, 3: 4, 4: 5, "#4": 6, b5: 6, 5: 7, "#5": 8, b6: 8, 6: 9, b7: 10, 7: 11 };
const CHAR_WIDTH = 6.6;  // of an 11px label: enough to keep neighbouring chord symbols from overlapping
const BLACK_KEYS = new Set([1, 3, 6, 8, 10]);
const QUALITY_SYMBOLS = {
  maj: "", min: "m", dim: "°", aug: "+", sus2: "sus2", sus4: "sus4", "7": "7", maj7: "maj7", min7: "m7",
  minmaj7: "m(maj7)", hdim7: "ø7", dim7: "°7", maj6: "6", min6: "m6", "sus4(b7)": "7sus4",
};

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (parent) parent.appendChild(node);
  return node;
}

function text(parent, x, y, content, attrs) {
  const node = el("text", { x, y, ...attrs }, parent);
  node.textContent = content;
  return node;
}

/** Harte labels as lead-sheet symbols: A:min7 -> Am7, G:7 -> G7, C:maj/3 -> C/E, N (no chord) -> "". */
export function chordSymbol(label) {
  if (label === "N") return "";
  const [root, rest = "maj"] = label.split(":");
  const [quality, bass] = rest.split("/");
  const symbol = quality in QUALITY_SYMBOLS ? QUALITY_SYMBOLS[quality] : quality;
  return root + symbol + (bass ? "/" + bassName(root, bass) : "");
}

// The bass spelled from the degree (the 3rd of E is G#, of Eb is G): the letter that many steps above the root's,
// then the sharp or flat that reaches the pitch (a double one reads badly on a lead sheet: the plain name instead).
function bassName(root, degree) {
  if (!(degree in BASS_DEGREES) || !(root[0] in NATURALS)) return degree;
  const letters = "CDEFGAB";
  const rootClass = NATURALS[root[0]] + [...root.slice(1)].reduce((sum, sign) => sum + (sign === "#" ? 1 : -1), 0);
  const letter = letters[(letters.indexOf(root[0]) + Number(degree.replace(/[b#]/g, "")) - 1) % 7];
  const shift = ((rootClass + BASS_DEGREES[degree] - NATURALS[letter]) % 12 + 18) % 12 - 6;
  return Math.abs(shift) <= 1 ? letter + ["b", "", "#"][shift + 1]
    : PITCH_NAMES[(rootClass + BASS_DEGREES[degree] + 24) % 12];
}

export function parseForm(form) {
  const sections = [];
  let bar = 0;
  for (const [, label, bars] of form.matchAll(/([A-Za-z])(\d+)/g)) {
    sections.push({ label, start: bar, end: bar + Number(bars) });
    bar += Number(bars);
  }
  return sections;
}

/** Seconds from the song's start to a grid step, through its tempo changes (bpm counts the metre's beats). */
export function timeline(song, grid) {
  const perBeat = grid.positions_per_beat;
  const perBar = grid.beats_per_bar * perBeat;
  const changes = song.tempos.map(([bar, position, bpm]) => ({ step: bar * perBar + position, bpm }))
    .sort((a, b) => a.step - b.step);
  // Before any tempo a MIDI file plays at 120 quarter notes per minute.
  if (!changes.length || changes[0].step > 0) changes.unshift({ step: 0, bpm: 120 });
  let seconds = 0;
  changes.forEach((change, i) => {
    if (i) seconds += (change.step - changes[i - 1].step) * 60 / (changes[i - 1].bpm * perBeat);
    change.seconds = seconds;
  });
  const at = (step) => {
    let i = changes.length - 1;
    while (i > 0 && changes[i].step > step) i--;
    return changes[i].seconds + (step - changes[i].step) * 60 / (changes[i].bpm * perBeat);
  };
  const nBars = parseForm(song.form).reduce((n, s) => Math.max(n, s.end), 0);
  return { perBar, changes, at, ofBar: (bar, position = 0) => at(bar * perBar + position),
           total: at(nBars * perBar), nBars };
}

function pitchRange(song) {
  const pitches = TRACKS.flatMap((t) => (song.tracks[t] || []).map((n) => n[2]));
  if (!pitches.length) return [48, 84];
  return [Math.min(...pitches) - 2, Math.max(...pitches) + 2];
}

/**
 * Draw `song` (song_to_dict JSON) with `grid` ({beats_per_bar, positions_per_beat}) into the <svg> `svg`.
 * `onSection(section)` is called with {label, start, end} (0-based bars, end exclusive) when a section's band is
 * clicked; `onSelect(range)` with {start, end} (the same) when bars are dragged over.
 * Returns {setTime(seconds), busy(section or null), select(range or null)}.
 */
export function drawRoll(svg, song, grid, { onSection, onSelect } = {}) {
  svg.replaceChildren();
  const time = timeline(song, grid);
  const sections = parseForm(song.form);
  const [low, high] = pitchRange(song);
  const rows = high - low + 1;
  const rowH = Math.max(3, Math.min(9, Math.floor(300 / rows)));
  const plotW = Math.max(svg.parentElement.clientWidth - GUTTER - 2, time.nBars * MIN_BAR_WIDTH);
  const x = (seconds) => GUTTER + (seconds / time.total) * plotW;
  const xStep = (bar, position = 0) => x(time.ofBar(bar, position));

  const rollTop = SECTION_H + CHORD_H;
  const rollBottom = rollTop + rows * rowH;
  const velocityTop = rollBottom + LANE_GAP;
  const tempoTop = velocityTop + VELOCITY_H + LANE_GAP;
  const height = tempoTop + TEMPO_H + AXIS_H;
  const width = GUTTER + plotW + 1;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const yPitch = (pitch) => rollTop + (high - pitch) * rowH;

  // Section columns first (behind everything): the whole height of a section is its click target.
  const sectionGroups = sections.map((section, i) => {
    const g = el("g", { class: "section", "data-section": i, "data-bars": `${section.start + 1}-${section.end}` },
                 svg);
    const x0 = xStep(section.start), x1 = xStep(section.end);
    el("rect", { class: "column", x: x0, y: 0, width: x1 - x0, height: height - AXIS_H, fill: "transparent" }, g);
    el("rect", { class: "band", x: x0, y: 0, width: x1 - x0, height: SECTION_H - 2, rx: 3 }, g);
    const bars = section.end - section.start > 1 ? `${section.start + 1}–${section.end}` : `${section.end}`;
    const caption = x1 - x0 > 90 ? `${section.label}  bars ${bars}  ↻` : section.label;
    text(g, x0 + 6, 16, caption);
    el("title", {}, g).textContent = `Regenerate section ${section.label} (bars ${bars})`;
    g.addEventListener("click", (event) => {
      // Below its band a section's column is where bars are dragged over (selectBars), not a button.
      if (!event.target.classList.contains("column") && onSection) onSection(section, i);
    });
    return g;
  });

  // Keyboard rows: black keys shaded, every C named.
  for (let pitch = low; pitch <= high; pitch++) {
    if (BLACK_KEYS.has(pitch % 12)) {
      el("rect", { x: GUTTER, y: yPitch(pitch), width: plotW, height: rowH, fill: "#f1f3f7",
                   "pointer-events": "none" }, svg);
    }
    if (pitch % 12 === 0) {
      text(svg, 6, yPitch(pitch) + rowH, `C${pitch / 12 - 1}`, { class: "lane-title" });
      el("line", { x1: GUTTER, x2: GUTTER + plotW, y1: yPitch(pitch) + rowH, y2: yPitch(pitch) + rowH,
                   stroke: "#e2e5ec", class: "bar-line" }, svg);
    }
  }
  el("rect", { x: GUTTER, y: rollTop, width: plotW, height: rows * rowH, fill: "none", stroke: "#c9cfdb",
               class: "bar-line" }, svg);

  // Bar lines (thin) and section boundaries (dark, through every lane).
  for (let bar = 1; bar < time.nBars; bar++) {
    el("line", { class: "bar-line", x1: xStep(bar), x2: xStep(bar), y1: rollTop, y2: rollBottom,
                 stroke: "#e6e8ee", "data-bar": bar }, svg);
  }
  for (const section of sections.slice(1)) {
    el("line", { class: "bar-line", x1: xStep(section.start), x2: xStep(section.start), y1: SECTION_H - 2,
                 y2: height - AXIS_H, stroke: "#7d879c", "stroke-width": 1.2 }, svg);
  }

  // Chord symbols where each chord starts; one that would run into the symbol before keeps only a tick.
  text(svg, 6, SECTION_H + 14, "chords", { class: "lane-title" });
  let free = 0;
  for (const [bar, position, label] of song.chords) {
    const symbol = chordSymbol(label);
    if (!symbol) continue;
    const cx = xStep(bar, position);
    const shown = cx >= free;  // an unlabelled change gets a short tick that stays below the label before it
    el("line", { class: "bar-line", x1: cx, x2: cx, y1: shown ? SECTION_H + 2 : SECTION_H + CHORD_H - 4,
                 y2: SECTION_H + CHORD_H - 1, stroke: "#9aa3b5" }, svg);
    if (!shown) continue;
    text(svg, cx + 3, SECTION_H + 14, symbol, { class: "chord-label" });
    free = cx + 3 + symbol.length * CHAR_WIDTH + 4;
  }

  // Notes: opacity follows velocity, so the dynamics show in the roll too.
  for (const track of TRACKS) {
    const g = el("g", { class: `track ${track}` }, svg);
    for (const [bar, position, pitch, duration, velocity] of song.tracks[track] || []) {
      const start = bar * time.perBar + position;
      const x0 = x(time.at(start)), x1 = x(time.at(start + duration));
      // data-note keeps the symbolic note (bar, position, pitch, duration, velocity) for scripts and tests.
      el("rect", { class: `note ${track}`, x: x0, y: yPitch(pitch) + 0.5, width: Math.max(1.5, x1 - x0 - 0.6),
                   height: Math.max(2, rowH - 1), rx: 1, "fill-opacity": (0.35 + 0.65 * velocity / 127).toFixed(2),
                   "data-note": `${bar},${position},${pitch},${duration},${velocity}` }, g);
    }
  }

  drawVelocity(svg, song, time, x, velocityTop, plotW);
  drawTempo(svg, time, x, tempoTop, plotW);
  drawAxis(svg, time, x, height - AXIS_H + 12);

  const selection = el("rect", { class: "selection", x: GUTTER, y: SECTION_H, width: 0,
                                  height: height - AXIS_H - SECTION_H, visibility: "hidden" }, svg);
  const select = (range) => {
    if (range) {
      Object.assign(range, { start: Math.max(0, range.start), end: Math.min(time.nBars, range.end) });
      selection.setAttribute("x", xStep(range.start));
      selection.setAttribute("width", xStep(range.end) - xStep(range.start));
      selection.dataset.bars = `${range.start + 1}-${range.end}`;
    } else {
      delete selection.dataset.bars;
    }
    selection.setAttribute("visibility", range ? "visible" : "hidden");
    return range;
  };
  selectBars(svg, time, xStep, select, onSelect);

  const playhead = el("line", { class: "playhead", x1: GUTTER, x2: GUTTER, y1: 0, y2: height - AXIS_H,
                                stroke: "#111", "stroke-width": 1.5, visibility: "hidden" }, svg);
  return {
    setTime(seconds) {
      const at = x(Math.min(seconds, time.total));
      playhead.setAttribute("x1", at);
      playhead.setAttribute("x2", at);
      playhead.setAttribute("visibility", seconds > 0 ? "visible" : "hidden");
    },
    busy(index) {
      sectionGroups.forEach((g, i) => g.classList.toggle("busy", i === index));
    },
    select,
  };
}

// Press on the roll below the section bands and drag: the bars between press and release are selected (a press
// without a drag selects its bar). The handler is the svg's one onmousedown: a redrawn roll replaces it.
function selectBars(svg, time, xStep, select, onSelect) {
  const barAt = (clientX) => {
    const px = clientX - svg.getBoundingClientRect().left;
    let bar = 0;
    while (bar + 1 < time.nBars && xStep(bar + 1) <= px) bar++;
    return bar;
  };
  svg.onmousedown = (event) => {
    if (event.button !== 0 || event.clientY - svg.getBoundingClientRect().top < SECTION_H) return;
    event.preventDefault();
    const first = barAt(event.clientX);
    const range = (clientX) => {
      const bar = barAt(clientX);
      return { start: Math.min(first, bar), end: Math.max(first, bar) + 1 };
    };
    select(range(event.clientX));
    const move = (e) => select(range(e.clientX));
    const up = (e) => {
      window.removeEventListener("mousemove", move);
      window.removeEventListener("mouseup", up);
      const chosen = select(range(e.clientX));
      if (onSelect) onSelect(chosen);
    };
    window.addEventListener("mousemove", move);
    window.addEventListener("mouseup", up);
  };
}

// Velocity: per track, the mean velocity of the notes starting together, joined as a curve (0..127).
function drawVelocity(svg, song, time, x, top, plotW) {
  lane(svg, top, VELOCITY_H, plotW, "velocity", ["127", "0"]);
  const y = (velocity) => top + VELOCITY_H - (velocity / 127) * VELOCITY_H;
  for (const track of TRACKS) {
    const onsets = new Map();
    for (const [bar, position, , , velocity] of song.tracks[track] || []) {
      const step = bar * time.perBar + position;
      if (!onsets.has(step)) onsets.set(step, []);
      onsets.get(step).push(velocity);
    }
    const points = [...onsets.entries()].sort((a, b) => a[0] - b[0])
      .map(([step, vs]) => `${x(time.at(step)).toFixed(1)},${y(vs.reduce((a, b) => a + b) / vs.length).toFixed(1)}`);
    if (points.length) el("polyline", { class: `curve ${track}`, points: points.join(" "), fill: "none" }, svg);
  }
}

// Tempo: a step curve of the song's tempo changes, scaled to their range.
function drawTempo(svg, time, x, top, plotW) {
  const bpms = time.changes.map((c) => c.bpm);
  const lowest = Math.min(...bpms), highest = Math.max(...bpms);
  const pad = Math.max(2, (highest - lowest) * 0.15);
  const [low, high] = [lowest - pad, highest + pad];
  lane(svg, top, TEMPO_H, plotW, "tempo", [`${Math.round(highest)}`, `${Math.round(lowest)}`]);
  const y = (bpm) => top + TEMPO_H - ((bpm - low) / (high - low)) * TEMPO_H;
  let path = "";
  time.changes.forEach((change, i) => {
    path += `${i ? "H" : "M"}${x(change.seconds).toFixed(1)}` + `${i ? " V" : ","}${y(change.bpm).toFixed(1)} `;
  });
  path += `H${x(time.total).toFixed(1)}`;
  el("path", { class: "curve tempo", d: path, fill: "none" }, svg);
}

function lane(svg, top, height, plotW, title, [upper, lower]) {
  el("rect", { x: GUTTER, y: top, width: plotW, height, fill: "#fafbfc", stroke: "#dde1e8",
               "pointer-events": "none" }, svg);
  text(svg, 6, top + height / 2 + 4, title, { class: "lane-title" });
  text(svg, GUTTER - 4, top + 9, upper, { class: "lane-title", "text-anchor": "end" });
  text(svg, GUTTER - 4, top + height, lower, { class: "lane-title", "text-anchor": "end" });
}

// Minutes:seconds under the lanes, at a step that keeps the labels apart.
function drawAxis(svg, time, x, y) {
  const spacing = [1, 2, 5, 10, 15, 30, 60, 120].find((s) => x(s) - x(0) >= 60) || 300;
  for (let s = 0; s <= time.total + 1e-6; s += spacing) {
    const label = `${Math.floor(s / 60)}:${String(Math.round(s % 60)).padStart(2, "0")}`;
    text(svg, x(s), y, label, { class: "lane-title", "text-anchor": s ? "middle" : "start" });
  }
}

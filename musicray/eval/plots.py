"""PNG figures for evaluation reports and notebooks: a song's piano roll, its performance (velocity and tempo per
bar) against a real song, the stage-1 training curves and the stage-2 sweep table.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``: no global
backend is switched (a notebook keeps its inline backend) and no figure lingers in pyplot's registry.
Every function validates its input first and raises ValueError naming what is wrong (TypeError for a song
that is not a Song, FileNotFoundError for a missing CSV).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from musicray.midi import DEFAULT_QPM
from musicray.song import TRACKS, Song

TRACK_COLOURS: dict[str, str] = {"MELODY": "#d62728", "BRIDGE": "#1f77b4", "PIANO": "#2ca02c"}
GENERATED_STYLE, REFERENCE_STYLE = "-", "--"
DPI = 110
# Quiet notes stay visible: opacity runs from MIN_ALPHA at velocity 1 to 1 at velocity 127.
MIN_ALPHA = 0.2
METRIC_COLUMNS_REQUIRED = ("step", "loss")
TRIAL_COLUMNS_REQUIRED = ("trial_id", "subtask", "best_val_loss")
# Columns of musicray.train.tune's trials.csv shown in the sweep table, in this order, where present.
TRIAL_COLUMNS_SHOWN = ("subtask", "trial_id", "rank", "alpha", "dropout", "learning_rate", "target_modules",
                       "best_val_loss", "best_step", "steps", "stopped_early", "status")
BEST_ROW_COLOUR = "#c7e9c0"
GROUP_SHADES = ("#ffffff", "#f2f2f2")
PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def _checked_song(song: Song, role: str) -> Song:
    if not isinstance(song, Song):
        raise TypeError(f"{role}: expected a musicray Song, got {type(song).__name__}")
    song.check()
    if not song.notes():
        raise ValueError(f"{role}: song {song.song_id!r} has no notes in any track ({', '.join(TRACKS)})")
    return song


def _note_name(pitch: int) -> str:
    return f"{PITCH_NAMES[pitch % 12]}{pitch // 12 - 1}"


def _mark_sections(ax, song: Song) -> None:
    """Dashed lines at section starts and each section's name along the top edge."""
    transform = ax.get_xaxis_transform()
    for start, section in zip(song.section_starts(), song.sections):
        ax.axvline(start, color="0.45", linestyle="--", linewidth=0.8, zorder=0)
        ax.text(start + section.bars / 2, 1.01, f"{section.label}{section.bars}", transform=transform,
                ha="center", va="bottom", fontsize=8, color="0.25", clip_on=False)


def piano_roll(song: Song, path: str | Path, title: str | None = None) -> Path:
    """Notes of MELODY, BRIDGE and PIANO as bars in time (bars on x) and pitch (y), opacity by velocity."""
    song = _checked_song(song, "piano_roll")
    steps_per_bar = song.spec.positions_per_bar
    width = min(24.0, max(9.0, 3.0 + 0.14 * song.n_bars))
    figure = Figure(figsize=(width, 5.5), layout="constrained")
    ax = figure.add_subplot()
    handles = []
    for track in TRACKS:
        notes = song.tracks.get(track, [])
        if not notes:
            continue
        starts = np.array([n.bar + n.position / steps_per_bar for n in notes])
        lengths = np.array([n.duration / steps_per_bar for n in notes])
        pitches = np.array([n.pitch for n in notes])
        colours = np.tile(np.array(to_rgb(TRACK_COLOURS[track]) + (1.0,)), (len(notes), 1))
        colours[:, 3] = MIN_ALPHA + (1 - MIN_ALPHA) * np.array([n.velocity for n in notes]) / 127
        ax.barh(pitches, lengths, left=starts, height=0.85, color=colours, linewidth=0)
        handles.append(Patch(color=TRACK_COLOURS[track], label=f"{track} ({len(notes)} notes)"))
    low = min(n.pitch for _, n in song.notes())
    high = max(n.pitch for _, n in song.notes())
    ax.set_ylim(low - 2, high + 2)
    octaves = [p for p in range(0, 128, 12) if low - 2 <= p <= high + 2]
    ax.set_yticks(octaves, [_note_name(p) for p in octaves])
    ax.set_xlim(0, song.n_bars)
    ax.set_xlabel(f"bar ({song.metre})")
    ax.set_ylabel("pitch")
    ax.grid(axis="y", color="0.9", linewidth=0.6)
    _mark_sections(ax, song)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8, title="opacity = velocity",
              title_fontsize=8)
    ax.set_title(title or f"{song.song_id}: {song.key}, {song.metre}, form {song.form}", pad=16)
    return _save(figure, path)


def _bar_velocities(song: Song, track: str) -> np.ndarray:
    """Mean velocity of the track's notes starting in each bar; NaN for bars where it is silent."""
    total = np.zeros(song.n_bars)
    count = np.zeros(song.n_bars)
    for note in song.tracks.get(track, []):
        total[note.bar] += note.velocity
        count[note.bar] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _bar_tempos(song: Song) -> np.ndarray:
    """Mean bpm over each bar's grid steps, the tempo at a step being the last change at or before it; before
    the first change a MIDI player uses 120 quarter notes per minute, and so does this."""
    spec = song.spec
    steps = song.n_bars * spec.positions_per_bar
    bpm = np.full(steps, DEFAULT_QPM / spec.beat_unit)
    for tempo in sorted(song.tempos):
        bpm[tempo.bar * spec.positions_per_bar + tempo.position:] = tempo.bpm
    return bpm.reshape(song.n_bars, spec.positions_per_bar).mean(axis=1)


def performance_curves(generated: Song, reference: Song, path: str | Path) -> Path:
    """Two panels: mean velocity per bar of each track, and tempo per bar, of a generated and a real song."""
    generated = _checked_song(generated, "performance_curves: generated")
    reference = _checked_song(reference, "performance_curves: reference")
    figure = Figure(figsize=(11, 7), layout="constrained")
    velocity_ax, tempo_ax = figure.subplots(2, 1)
    for song, style, role in ((generated, GENERATED_STYLE, "generated"), (reference, REFERENCE_STYLE, "reference")):
        bars = np.arange(1, song.n_bars + 1)
        for track in TRACKS:
            velocities = _bar_velocities(song, track)
            if np.isnan(velocities).all():
                continue
            velocity_ax.plot(bars, velocities, style, color=TRACK_COLOURS[track], linewidth=1.4,
                             marker="." if song.n_bars <= 40 else None, label=f"{role} {track}")
        tempo_ax.plot(bars, _bar_tempos(song), style, color="0.15" if role == "generated" else "#9467bd",
                      linewidth=1.6, drawstyle="steps-mid", label=f"{role}: {song.song_id} ({song.metre})")
    velocity_ax.set_ylabel("mean velocity (notes starting in the bar)")
    velocity_ax.set_ylim(0, 132)
    velocity_ax.set_title(f"velocity per bar: generated ({GENERATED_STYLE}) vs reference ({REFERENCE_STYLE})")
    velocity_ax.legend(fontsize=8, ncols=2, loc="lower right")
    tempo_ax.set_ylabel("tempo (bpm, beat of the metre)")
    tempo_ax.set_title("tempo per bar (mean over the bar)")
    tempo_ax.legend(fontsize=8, loc="best")
    for ax in (velocity_ax, tempo_ax):
        ax.set_xlabel("bar")
        ax.set_xlim(0.5, max(generated.n_bars, reference.n_bars) + 0.5)
        ax.grid(color="0.9", linewidth=0.6)
    return _save(figure, path)


def _read_csv(path: str | Path, required: tuple[str, ...], what: str):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{what}: {path} is empty (no header row)") from None
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ValueError(f"{what}: {path} is missing column(s) {', '.join(missing)}; "
                         f"found: {', '.join(map(str, table.columns)) or 'none'}")
    if table.empty:
        raise ValueError(f"{what}: {path} has a header but no rows")
    return table


def _numeric(table, column: str, path, what: str):
    import pandas as pd

    values = pd.to_numeric(table[column], errors="coerce")
    bad = values.isna() & table[column].notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{what}: {path}: column {column} has a non-number {table[column].iloc[row]!r} "
                         f"in data row {row + 1}")
    return values


def training_curves(metrics_csv: str | Path, path: str | Path) -> Path:
    """Stage-1 training loss (and validation loss where logged) against the optimizer step, from the
    ``metrics.csv`` that musicray.train.stage1_metrics writes."""
    what = "training_curves"
    table = _read_csv(metrics_csv, METRIC_COLUMNS_REQUIRED, what)
    for column in ("step", "loss", "val_loss", "start_step"):
        if column in table:
            table[column] = _numeric(table, column, metrics_csv, what)
    if table["step"].isna().any() or table["loss"].isna().all():
        raise ValueError(f"{what}: {metrics_csv}: every row needs a step, and some row a loss")
    # A resumed run appends again from its checkpoint step: the rows written last describe the model that went on.
    table = table.drop_duplicates("step", keep="last").sort_values("step")
    figure = Figure(figsize=(9, 5), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(table["step"], table["loss"], color="#1f77b4", linewidth=1, alpha=0.55 if len(table) > 50 else 1,
            label="training loss")
    if len(table) > 50:
        window = max(5, len(table) // 25)
        smooth = table["loss"].rolling(window, min_periods=1, center=True).mean()
        ax.plot(table["step"], smooth, color="#1f77b4", linewidth=2, label=f"training loss ({window}-step mean)")
    if "val_loss" in table and table["val_loss"].notna().any():
        validation = table[table["val_loss"].notna()]
        ax.plot(validation["step"], validation["val_loss"], "o-", color="#ff7f0e", linewidth=1.5, markersize=4,
                label="validation loss")
    if "start_step" in table:
        for resumed in sorted(set(table["start_step"].dropna()) - {0}):
            ax.axvline(resumed, color="0.5", linestyle=":", linewidth=1)
            ax.text(resumed, 1.0, f" resumed at {int(resumed)}", transform=ax.get_xaxis_transform(),
                    fontsize=8, color="0.35", va="top")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, target tokens)")
    ax.set_title(f"stage-1 fine-tune: loss per step ({int(table['step'].max())} steps)")
    ax.grid(color="0.9", linewidth=0.6)
    ax.legend(fontsize=9)
    return _save(figure, path)


def compared_loss_curves(curves: dict[str, list[tuple[float, float, float]]], path: str | Path) -> Path:
    """Several trainings' loss in one figure, against the labelled tokens seen (left, log scale) and the seconds
    trained (right): ``curves`` maps a name to its (labelled tokens, seconds, loss) per step, in step order."""
    what = "compared_loss_curves"
    if not curves:
        raise ValueError(f"{what}: no curve given")
    for name, points in curves.items():
        if not points or any(len(point) != 3 for point in points):
            raise ValueError(f"{what}: curve {name!r}: expected (tokens, seconds, loss) per step, got {points[:2]!r}")
    figure = Figure(figsize=(12, 5), layout="constrained")
    by_tokens, by_seconds = figure.subplots(1, 2, sharey=True)
    for name, points in curves.items():
        tokens, seconds, losses = (np.array(column, dtype=float) for column in zip(*points))
        line, = by_tokens.plot(tokens, losses, linewidth=1.2, label=name)
        by_seconds.plot(seconds, losses, linewidth=1.2, color=line.get_color())
    # Trainings of a few hundred steps and of thousands share the axis: a log scale shows both.
    by_tokens.set_xscale("log")
    by_tokens.set_xlabel("labelled tokens seen (log scale)")
    by_seconds.set_xlabel("seconds of training")
    by_tokens.set_ylabel("training loss (cross-entropy, labelled tokens)")
    for ax in (by_tokens, by_seconds):
        ax.grid(color="0.9", linewidth=0.6)
    by_tokens.legend(fontsize=9)
    figure.suptitle("training loss: the same tokens (left), the same wall-clock (right)")
    return _save(figure, path)


def _cell(value, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if column == "learning_rate":
            return f"{value:.1e}"
        # Five digits: sweep trials of one sub-task often differ only in the fourth.
        return f"{value:g}" if float(value).is_integer() else f"{value:.5g}"
    return str(value)


def sweep_table(trials_csv: str | Path, path: str | Path) -> Path:
    """The Ray Tune trials of every sub-task as a table figure; the best trial (lowest validation loss) of each
    sub-task is highlighted."""
    what = "sweep_table"
    table = _read_csv(trials_csv, TRIAL_COLUMNS_REQUIRED, what)
    table["best_val_loss"] = _numeric(table, "best_val_loss", trials_csv, what)
    if table["subtask"].isna().any():
        row = int(np.flatnonzero(table["subtask"].isna().to_numpy())[0])
        raise ValueError(f"{what}: {trials_csv}: data row {row + 1} has no subtask")
    order = list(dict.fromkeys(table["subtask"]))  # tune.py writes trials grouped in pipeline order
    table = table.assign(_group=table["subtask"].map(order.index)).sort_values(["_group", "best_val_loss"],
                                                                                 kind="stable")
    reported = table.dropna(subset=["best_val_loss"])
    best_index = set(reported.groupby("subtask")["best_val_loss"].idxmin())
    columns = [c for c in TRIAL_COLUMNS_SHOWN if c in table.columns]
    cells = [[_cell(row[c], c) for c in columns] for _, row in table.iterrows()]
    colours = []
    for index, row in table.iterrows():
        shade = BEST_ROW_COLOUR if index in best_index else GROUP_SHADES[row["_group"] % 2]
        colours.append([shade] * len(columns))
    figure = Figure(figsize=(max(8.0, 1.1 * len(columns)), 0.7 + 0.24 * (len(cells) + 1)), layout="constrained")
    ax = figure.add_subplot()
    ax.axis("off")
    drawn = ax.table(cellText=cells, colLabels=columns, cellColours=colours, bbox=(0, 0, 1, 1), cellLoc="center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(8)
    drawn.auto_set_column_width(list(range(len(columns))))
    for (row, _), cell in drawn.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#dddddd")
        elif table.index[row - 1] in best_index:
            cell.set_text_props(weight="bold")
    subtasks = len(order)
    ax.set_title(f"stage-2 LoRA sweeps: {len(table)} trials over {subtasks} sub-task{'s' * (subtasks != 1)}; "
                 f"best (lowest validation loss) per sub-task highlighted", fontsize=10)
    return _save(figure, path)

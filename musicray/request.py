"""A composer request and the one builder of it: ``request_from_fields`` turns what the command line
(``musicray generate``) or the HTTP body (``POST /v1/generate``) gives into a checked ``Request``; both front ends
only read their files or uploads and name their fields. ``stage_settings``/``stage_request`` are the wire form a
stage deployment gets (JSON-ready, built back through the same ``Request``).

Light (no torch): the command line and the HTTP schema import it before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Callable

from musicray.errors import SongError
from musicray.harmony import canonical_chord, canonical_key
from musicray.sampling import SAMPLING_RANGES, SettingRange, Sampling, stage_sampling
from musicray.song import (MAX_SECTION_BARS, TRACKS, Chord, Note, Section, Song, Tempo, form_returns, form_string,
                           metre, parse_form, song_from_dict, song_to_dict)
from musicray.tempo_direction import TEMPO_DIRECTIONS, directed_tempi
from musicray.tokens import SUBTASKS

# The base tempo a request may ask for (also the HTTP schema's bounds).
TEMPO_RANGE = SettingRange(float, 20, 300, text="20..300 bpm", help="base tempo, bpm")
# How much a returning section varies its first occurrence (``Request.variation``).
VARIATION_RANGE = SettingRange(float, 0, 1, text="0..1", help=(
    "how much a returning section varies its first occurrence: each returning bar repeats the first occurrence's "
    "(chords, melodies, velocities) with probability 1 - variation; 0 = every return repeats, 1 = written anew; "
    "unset: as the model writes it"))

@dataclass(frozen=True)
class RunDefaults:
    """What a request takes from the run it is composed with where it leaves these unsaid (no sampling setting, no
    variation given): the settings the run's evaluation composed with (``musicray.train.config.run_defaults``),
    so that the product sounds as the run's report measured."""

    stage_settings: dict = field(default_factory=dict)   # {stage: {temperature | top_k | top_p: value}}
    variation: float | None = None


class FieldError(SongError):
    """A request field that cannot be used; ``field`` is its name as the front end calls it."""

    def __init__(self, field: str, message: str):
        super().__init__(message if message.startswith(f"{field}:") else f"{field}: {message}")
        self.field = field


@dataclass
class Request:
    form: str
    key: str = "C:maj"
    metre: str = "4/4"
    tempo: int = 100
    seed: int = 0
    chords: list[Chord] | None = None
    melody: list[Note] | None = None
    stages: tuple[str, ...] = SUBTASKS
    sampling: Sampling = field(default_factory=Sampling)
    use_mask: bool = True
    bridge: list[Note] | None = None  # a given secondary melody (BRIDGE) replaces the secondary stage
    piano: list[Note] | None = None   # a given accompaniment is performed as it is instead of the voiced chords
    # Infilling: the bars (0-based) that ``stages`` write anew; every other bar of those stages keeps what the
    # request gives (chords, melody, bridge, piano, tempo), token for token. None: compose as usual.
    regenerate: tuple[int, ...] | None = None
    # Infilling by track: the tracks rewritten in the ``regenerate`` bars (their stages and dynamics run there;
    # PIANO, which no stage writes, is voiced anew from the chords); the chords, the tempo and the other tracks
    # stay as given. None: every part of those bars.
    regenerate_tracks: tuple[str, ...] | None = None
    tempos: list[Tempo] | None = None  # a given tempo map (kept outside the regenerated bars)
    # Sampling settings of single stages instead of ``sampling`` (e.g. a cooler melody over livelier dynamics).
    stage_sampling: dict[str, Sampling] | None = None
    # A requested stage whose adapter the run lacks is refused unless this allows it (it then runs on the
    # stage-1 model alone, and its report says ``"adapter": null``).
    allow_missing_adapters: bool = False
    # VARIATION_RANGE; None: the model alone decides how returns sound
    variation: float | None = None
    # The harmony guard (musicray.harmony_guard): chords among POP909's 99 % in the key's mode, MELODY and BRIDGE
    # pitches in the key's scale or the sounding chord and in their POP909 register. Applied by the mask only.
    harmony_guard: bool = True
    # The settings taken from the run's evaluated defaults (RunDefaults), by name: "stage_sampling", "variation".
    from_run: tuple[str, ...] = ()
    # TEMPO_DIRECTIONS: the tempo stage writes the last section's bars as ``directed_tempi`` says (outside infilling)
    tempo_direction: str = "steady"

    def taken_from_run(self) -> dict:
        """The settings this request took from the run's defaults (``from_run``), JSON-ready, for the printed line
        and the HTTP answer."""
        taken = {}
        if "stage_sampling" in self.from_run:
            taken["stage_sampling"] = {stage: dataclasses.asdict(sampling)
                                       for stage, sampling in sorted((self.stage_sampling or {}).items())}
        if "variation" in self.from_run:
            taken["variation"] = self.variation
        return taken

    def tempo_direction_applied(self, stages_run) -> dict:
        """How the song's tempo follows ``tempo_direction`` after ``stages_run``, JSON-ready for the front ends: the
        last section's bars (from 1) and its first and last tempo, or why it is not applied."""
        tempi = directed_tempi(parse_form(self.form), self.tempo, self.tempo_direction)
        why = ("steady leaves the tempo to the tempo stage" if not tempi else
               "infilling keeps the given tempo" if self.regenerate is not None else
               "the tempo stage did not run" if "tempo" not in stages_run else None)
        if why is not None:
            return {"direction": self.tempo_direction, "applied": False, "why": why}
        return {"direction": self.tempo_direction, "applied": True, "bars": [tempi[0][0] + 1, tempi[-1][0] + 1],
                "bpm": [round(tempi[0][1]), round(tempi[-1][1])]}

    def tempo_direction_line(self, stages_run) -> str:
        """``tempo_direction_applied`` in words, as the command line prints it."""
        applied = self.tempo_direction_applied(stages_run)
        if not applied["applied"]:
            return f"tempo direction {applied['direction']}: not applied ({applied['why']})"
        (first, last), (start, end) = applied["bars"], applied["bpm"]
        return f"tempo direction {applied['direction']}: applied, bars {first}-{last} from {start} to {end} bpm"

    # Songs planned from words: the plan a prompt was given (``musicray.prompt_plan.PromptPlan.to_dict``) and the
    # fields of this request taken from it (those the request did not state itself); for the front ends' answers.
    plan: dict | None = None
    from_plan: tuple[str, ...] = ()

    def sampling_for(self, stage: str) -> Sampling:
        """How ``stage``'s tokens are drawn: its own settings where ``stage_sampling`` has them, else ``sampling``."""
        return (self.stage_sampling or {}).get(stage, self.sampling)

    def song(self) -> Song:
        """The song the request describes, empty but for what it gives (validated: form, key, metre, tempo)."""
        sections = parse_form(self.form)
        spec = metre(self.metre)
        TEMPO_RANGE.checked(self.tempo, "tempo")
        try:
            key = canonical_key(self.key)
        except SongError as err:
            raise SongError(f"key: {err}") from None
        song = Song("generated", key, spec.name, sections, chords=list(self.chords or []),
                    tracks={name: [] for name in TRACKS},
                    tempos=[t for t in self.tempos if t.bar < sum(s.bars for s in sections)] if self.tempos
                    else [Tempo(0, 0, float(self.tempo))])
        for name, notes in (("MELODY", self.melody), ("BRIDGE", self.bridge), ("PIANO", self.piano)):
            if notes:
                song.tracks[name] = [song.inside_form(n) for n in sorted(notes) if n.bar < song.n_bars]
        for field_name, names in (("stages", self.stages), ("stage_sampling", self.stage_sampling or {})):
            unknown = set(names) - set(SUBTASKS)
            if unknown:
                raise SongError(f"{field_name}: unknown {sorted(unknown)}; known: {', '.join(SUBTASKS)}")
        if self.variation is not None:
            VARIATION_RANGE.checked(self.variation, "variation")
        directed_tempi(sections, self.tempo, self.tempo_direction)   # raises on an unknown direction
        if self.regenerate_tracks is not None:
            unknown = sorted(set(self.regenerate_tracks) - set(TRACKS))
            if unknown or not self.regenerate_tracks or self.regenerate is None:
                raise SongError(f"regenerate_tracks: {unknown or list(self.regenerate_tracks)} is not a choice of "
                                f"{', '.join(TRACKS)} in infilled bars")
        if self.regenerate is not None:
            outside = sorted(b for b in self.regenerate if not 0 <= b < song.n_bars)
            if outside or not self.regenerate:
                raise SongError(f"regenerate: bars {[b + 1 for b in outside] or '(none)'} are not bars of the form "
                                f"{song.form} (1..{song.n_bars})")
        song.check()
        return song

    def returns(self) -> list[tuple[int, int]]:
        """(bar, first occurrence's bar), 0-based: the returning bars that repeat their first occurrence under
        ``variation``, the same draw for every stage (a repeated melody bar sits on its repeated chords)."""
        if self.variation is None:
            return []
        draw = random.Random(f"returns-{self.seed}")
        return [(bar, source) for bar, source in form_returns(parse_form(self.form))
                if draw.random() >= self.variation]


def parse_chords(text: str, form: str, metre_name: str) -> list[Chord]:
    """Chords from text: one entry per bar, cycled over the form's bars; ``C:maj,G:maj`` splits a bar evenly."""
    bars = sum(s.bars for s in parse_form(form))
    spec = metre(metre_name)
    entries = text.split()
    if not entries:
        raise SongError("chords: no chord given")
    chords = []
    for bar in range(bars):
        labels = entries[bar % len(entries)].split(",")
        for k, label in enumerate(labels):
            position = (k * spec.beats_per_bar // len(labels)) * spec.positions_per_beat
            try:
                chords.append(Chord(bar, position, canonical_chord(label)))
            except SongError as err:
                raise SongError(f"chords: bar {bar + 1}: {err}") from None
    return chords


def regenerated_bars(form: str, labels: str | None = None, bars: str | None = None) -> tuple[int, ...]:
    """The bars (0-based) to write anew: every bar of the sections whose label is in ``labels`` (e.g. ``B`` or
    ``A,B``) and the 1-based inclusive ranges of ``bars`` (e.g. ``9-16`` or ``1-4,9``)."""
    sections = parse_form(form)
    chosen: set[int] = set()
    if labels:
        wanted = {label.strip() for label in labels.split(",") if label.strip()}
        missing = wanted - {s.label for s in sections}
        if missing:
            raise SongError(f"regenerate: the form {form} has no section labelled {', '.join(sorted(missing))}")
        start = 0
        for section in sections:
            if section.label in wanted:
                chosen.update(range(start, start + section.bars))
            start += section.bars
    if bars:
        n_bars = sum(s.bars for s in sections)
        for part in bars.split(","):
            first, _, last = part.strip().partition("-")
            try:
                low, high = int(first), int(last or first)
            except ValueError:
                raise SongError(f"regenerate-bars: cannot read {part!r}; expected e.g. 9-16 or 1-4,9") from None
            if not 1 <= low <= high <= n_bars:
                raise SongError(f"regenerate-bars: {part.strip()} is not a range of bars in 1..{n_bars}")
            chosen.update(range(low - 1, high))
    if not chosen:
        raise SongError("regenerate: no bar chosen (give section labels or bar ranges)")
    return tuple(sorted(chosen))




# The labels a continuation of N bars takes, in order of preference: the first melodic phrase label the song's
# form does not use yet (the new bars are new material, not a return of a section the song has).
CONTINUATION_LABELS: tuple[str, ...] = ("A", "B", "C", "D", "E", "X")
# The most bars one continuation adds: far more than a model's context holds, it only stops a mistyped number
# from building millions of sections before the server's max_bars refuses the form.
MAX_CONTINUATION_BARS = 1024


def continued_form(form: str, extension: str) -> str:
    """``form`` extended by ``extension``: a number of bars (new sections of at most ``MAX_SECTION_BARS`` bars,
    labelled with the first of ``CONTINUATION_LABELS`` the form does not use; ``X`` if it uses them all) or a form
    string of the new part (e.g. ``B8A8``: returns of the song's sections)."""
    sections = parse_form(form)
    text = str(extension).strip()
    if text.isdigit():
        bars = int(text)
        if not 1 <= bars <= MAX_CONTINUATION_BARS:
            raise SongError(f"continue: {text} bars; give 1..{MAX_CONTINUATION_BARS} bars "
                            "(or a form string such as B8A8)")
        used = {s.label for s in sections}
        label = next((label for label in CONTINUATION_LABELS if label not in used), "X")
        full, rest = divmod(bars, MAX_SECTION_BARS)
        added = [Section(label, MAX_SECTION_BARS)] * full + ([Section(label, rest)] if rest else [])
    else:
        try:
            added = parse_form(text)
        except SongError as err:
            raise SongError(f"continue: {text!r} is neither a number of bars nor a form string "
                            f"({str(err).removeprefix('form: ')})") from None
    return form_string(sections + added)


def infilled_tracks(names: tuple[str, ...] | list[str] | str,
                    stages: tuple[str, ...] | list[str] = SUBTASKS) -> tuple[str, ...]:
    """The tracks of ``names`` (any case, a list or a comma-separated string) in track order, checked: known,
    at least one, and written by one of ``stages`` (``musicray.tasks.stages_rewriting``)."""
    from musicray.tasks import stages_rewriting

    listed = names.split(",") if isinstance(names, str) else list(names)
    wanted = {str(name).strip().upper() for name in listed if str(name).strip()}
    unknown = sorted(wanted - set(TRACKS))
    if unknown or not wanted:
        raise SongError(f"{', '.join(unknown) or 'no track'}: choose among {', '.join(TRACKS)}")
    tracks = tuple(name for name in TRACKS if name in wanted)
    if not stages_rewriting(tracks, tuple(stages)):
        raise SongError(f"none of the stages {', '.join(stages)} writes {', '.join(tracks)}")
    return tracks


def revoiced_piano(song: Song, bars: tuple[int, ...]) -> list[Note]:
    """The song's PIANO with ``bars`` voiced anew from its chords (no stage writes PIANO: its own accompaniment is
    what rewriting it means). Each of those bars restates the chord sounding at its downbeat, so that a bar
    without a chord change of its own is played too (the old notes there are gone)."""
    from musicray.accompaniment import voice_piano
    from musicray.encoding import SoundingChords

    span = set(bars)
    sounding = SoundingChords(song.chords)
    restated = [Chord(bar, 0, sounding.at(bar, 0)) for bar in sorted(span) if sounding.at(bar, 0) is not None]
    voiced = voice_piano(dataclasses.replace(song, chords=sorted(set(song.chords) | set(restated))))
    return sorted([n for n in song.tracks["PIANO"] if n.bar not in span] + [n for n in voiced if n.bar in span])


def request_from_fields(form: str | None = None, key: str | None = None, metre_name: str | None = None,
                        tempo: float | None = None, seed: int = 0, chords: str | None = None,
                        melody: list[Note] | None = None, given: Song | None = None, regenerate: str | None = None,
                        regenerate_bars: str | None = None, continue_bars: str | int | None = None,
                        regenerate_tracks: tuple[str, ...] | list[str] | str | None = None,
                        stages: tuple[str, ...] | list[str] | None = None,
                        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        stage_settings: dict | None = None, use_mask: bool = True,
                        allow_missing_adapters: bool = False, variation: float | None = None,
                        harmony_guard: bool = True, tempo_direction: str | None = None,
                        max_bars: int | None = None, defaults: RunDefaults | None = None,
                        prompt: str | None = None, planner: Callable[[str, int | None], object] | None = None,
                        names: dict[str, str] | None = None) -> Request:
    """The request the command line or an HTTP body describes, checked; ``FieldError`` names the field at fault
    as the front end calls it (``names`` maps this function's argument names to those, e.g. ``given`` to
    ``--song`` or ``song_midi``).

    ``given`` is a whole song whose parts replace their stages (and whose form, key, metre and first tempo are
    used where those are not given); ``melody`` a given main melody; ``chords`` the chord text of
    ``parse_chords``; ``regenerate``/``regenerate_bars`` choose the bars infilling rewrites (needs ``given``);
    ``continue_bars`` extends the form after the given song's (``form``, or ``given``'s) by a number of bars or a
    form string (``continued_form``) and composes only the new bars, every given bar kept (infilling);
    ``regenerate_tracks`` narrows infilling to some tracks (any case; ``Request.regenerate_tracks``);
    ``stage_settings`` is ``{stage: {setting: value}}`` over ``temperature``/``top_k``/``top_p``; ``max_bars``
    caps the form's length (a server's limit). ``temperature``/``top_k``/``top_p`` left None sample at 1, no cut.

    ``defaults`` (the run's evaluated settings) fill what the request leaves unsaid: its per-stage sampling where
    no sampling setting is given (stage settings given are laid over it), its variation where none is given; and
    a request that regenerates sections by label without a variation gets 0, so that every rewritten occurrence of
    a label repeats the first (``regenerate_bars`` stays literal). ``Request.from_run`` names what was taken.

    ``prompt`` is the song in words: ``planner(prompt, max_bars)`` (e.g. ``musicray.prompt_plan.PromptPlanner.plan``)
    turns it into a plan whose form, key, metre, tempo and tempo direction fill what neither the fields nor ``given``
    state (stated fields win); the request's ``from_plan`` names the fields of the form taken from the plan.
    ``tempo_direction`` (``TEMPO_DIRECTIONS``) left None is the plan's, else steady."""
    names = names or {}

    def named(argument: str) -> str:
        return names.get(argument, argument)

    def checked(argument: str, fn, *args):
        try:
            return fn(*args)
        except FieldError:
            raise
        except SongError as err:
            raise FieldError(named(argument), str(err)) from None

    plan = None
    if prompt is not None:
        if planner is None:
            raise FieldError(named("prompt"), "this front end has no planner to read a prompt with")
        if not prompt.strip():   # before a planner (a model) is loaded for it
            raise FieldError(named("prompt"), "empty; describe the song in words, e.g. 'a gentle ballad in 3/4'")
        plan = checked("prompt", planner, prompt, max_bars)
    # What the plan fills: a field neither stated nor brought by a given song.
    from_plan = tuple(name for name, value in (("form", form), ("key", key), ("metre", metre_name), ("tempo", tempo))
                      if plan is not None and value is None and given is None)
    planned = {name: getattr(plan, name) for name in from_plan}
    if tempo_direction is None:
        tempo_direction = plan.tempo_direction if plan is not None else "steady"
    if tempo_direction not in TEMPO_DIRECTIONS:
        raise FieldError(named("tempo_direction"),
                         f"unknown {tempo_direction!r}; known: {', '.join(TEMPO_DIRECTIONS)}")
    form = form or (given.form if given else None) or planned.get("form")
    if not form:
        raise FieldError(named("form"), f"required (or give {named('given')}, whose form is used, or "
                                        f"{named('prompt')}, whose plan is)")
    bars = sum(s.bars for s in checked("form", parse_form, form))
    given_bars = bars   # the bars the given parts fill (all of the form but a continuation)
    if continue_bars is not None:
        if given is None:
            raise FieldError(named("continue_bars"),
                             f"a continuation extends a given song: give it with {named('given')}")
        form = checked("continue_bars", continued_form, form, continue_bars)
        bars = sum(s.bars for s in parse_form(form))
    if max_bars is not None and bars > max_bars:
        field_name = "form" if continue_bars is None else "continue_bars"
        raise FieldError(named(field_name),
                         f"{form!r} has {bars} bars; this server composes at most max_bars={max_bars}")
    key = checked("key", canonical_key, key or (given.key if given else planned.get("key", "C:maj")))
    metre_name = checked("metre", metre, metre_name or (given.metre if given else planned.get("metre", "4/4"))).name
    if tempo is None:
        tempo = round(given.tempos[0].bpm) if given and given.tempos else planned.get("tempo", 100)
    checked("tempo", TEMPO_RANGE.checked, tempo, named("tempo"))
    if given is not None:
        given = dataclasses.replace(
            given, chords=[c for c in given.chords if c.bar < given_bars],
            tempos=[t for t in given.tempos if t.bar < given_bars],
            tracks={name: [n for n in given.tracks.get(name, []) if n.bar < given_bars] for name in TRACKS})
        if not any(given.tracks.values()):
            raise FieldError(named("given"), f"no MELODY, BRIDGE or PIANO notes in the first {given_bars} bars")
    if melody is not None:
        melody = [n for n in melody if n.bar < bars]
        if not melody:
            raise FieldError(named("melody"), f"no MELODY notes in the first {bars} bars")
    parsed_chords = checked("chords", parse_chords, chords, form, metre_name) if chords is not None else None
    infilling = None
    if regenerate is not None or regenerate_bars is not None:
        if given is None:
            raise FieldError(named("regenerate"),
                             f"infilling rewrites part of a given song: give it with {named('given')}")
        infilling = checked("regenerate" if regenerate is not None else "regenerate_bars", regenerated_bars, form,
                            regenerate, regenerate_bars)
    if continue_bars is not None:   # the new bars are written, with whatever else infilling rewrites
        infilling = tuple(sorted({*(infilling or ()), *range(given_bars, bars)}))
    tracks = None
    if regenerate_tracks is not None:
        if infilling is None or continue_bars is not None:
            raise FieldError(named("regenerate_tracks"), f"rewrites tracks in chosen bars of a given song: give "
                             f"them with {named('regenerate_bars')} or {named('regenerate')} (a continuation "
                             "composes every part of its new bars)")
        tracks = checked("regenerate_tracks", infilled_tracks, regenerate_tracks, stages or SUBTASKS)
        if "PIANO" in tracks:
            given = dataclasses.replace(given, tracks={**given.tracks, "PIANO": revoiced_piano(given, infilling)})
    globals_given = {name: value for name, value in (("temperature", temperature), ("top_k", top_k),
                                                      ("top_p", top_p)) if value is not None}
    sampling = Sampling(**{name: checked(name, SAMPLING_RANGES[name].checked, value, named(name))
                           for name, value in globals_given.items()})
    from_run = []
    if defaults and defaults.stage_settings and not globals_given:
        stage_settings = {**defaults.stage_settings, **(stage_settings or {})}
        from_run.append("stage_sampling")
    per_stage = checked("stage_settings", stage_sampling, stage_settings or {}, sampling, named("stage_settings"))
    if variation is not None:
        variation = checked("variation", VARIATION_RANGE.checked, variation, named("variation"))
    elif regenerate is not None:
        variation = 0.0   # every rewritten occurrence of a label returns as its (rewritten) first one
    elif defaults and defaults.variation is not None:
        variation = defaults.variation
        from_run.append("variation")
    return Request(form=form, key=key, metre=metre_name, tempo=tempo, seed=seed,
                   chords=parsed_chords or (given.chords if given else None),
                   melody=melody or (given.tracks["MELODY"] if given else None),
                   stages=tuple(stages) if stages else SUBTASKS, sampling=sampling, use_mask=use_mask,
                   bridge=given.tracks["BRIDGE"] if given else None, piano=given.tracks["PIANO"] if given else None,
                   regenerate=infilling, regenerate_tracks=tracks,
                   tempos=given.tempos if given and infilling else None,
                   stage_sampling=per_stage or None, allow_missing_adapters=allow_missing_adapters,
                   variation=variation, harmony_guard=harmony_guard, from_run=tuple(from_run),
                   plan=plan.to_dict() if plan is not None else None, from_plan=from_plan,
                   tempo_direction=tempo_direction)


def stage_settings(request: Request) -> dict:
    """What a stage deployment needs besides the song: the seed, the sampling settings, the adapter switch and,
    when infilling, the bars to rewrite and the song as given (the kept bars come from it). JSON-ready; read
    back by ``stage_request``."""
    settings = {"seed": request.seed, **dataclasses.asdict(request.sampling), "use_mask": request.use_mask,
                "allow_missing_adapters": request.allow_missing_adapters, "variation": request.variation,
                "harmony_guard": request.harmony_guard, "tempo_direction": request.tempo_direction}
    if request.stage_sampling:
        settings["stage_sampling"] = {stage: dataclasses.asdict(sampling)
                                      for stage, sampling in request.stage_sampling.items()}
    if request.regenerate is not None:
        settings["regenerate"] = list(request.regenerate)
        settings["regenerate_tracks"] = list(request.regenerate_tracks) if request.regenerate_tracks else None
        settings["given"] = song_to_dict(request.song())
    return settings


def stage_request(song: Song, settings: dict) -> Request:
    """The request a stage deployment runs for ``song`` (the song so far) and the ingress' ``stage_settings``."""
    sampling = Sampling(float(settings["temperature"]), int(settings["top_k"]), float(settings["top_p"]))
    per_stage = {stage: Sampling(**values) for stage, values in settings.get("stage_sampling", {}).items()}
    request = Request(form=song.form, seed=int(settings["seed"]), use_mask=settings.get("use_mask", True),
                      sampling=sampling, stage_sampling=per_stage or None,
                      allow_missing_adapters=settings.get("allow_missing_adapters", False),
                      variation=settings.get("variation"), harmony_guard=settings.get("harmony_guard", True),
                      tempo_direction=settings.get("tempo_direction", "steady"))
    if settings.get("regenerate") is not None:
        given = song_from_dict(settings["given"])
        request = dataclasses.replace(request, key=given.key, metre=given.metre, chords=given.chords,
                                      melody=given.tracks["MELODY"], bridge=given.tracks["BRIDGE"],
                                      piano=given.tracks["PIANO"], tempos=given.tempos,
                                      regenerate=tuple(settings["regenerate"]),
                                      regenerate_tracks=tuple(settings["regenerate_tracks"])
                                      if settings.get("regenerate_tracks") else None)
    return request

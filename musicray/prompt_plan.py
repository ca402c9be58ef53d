"""Songs planned from words: an instruct LLM writes a song's plan (form, key, metre, tempo, tempo direction) as
JSON for a prompt such as "a gentle ballad in 3/4, verse-chorus-verse, slowing at the end".

The plan's grammar is data (``PLAN_GRAMMAR``, ``SECTION_WORDS``): the JSON's fixed text, and for each field the
finite set of values it may take, written in words the model knows ("A minor", "chorus"). Decoding follows the
grammar: at each field the model's log-likelihood of every allowed value, given the prompt and the plan so far, is
summed over the value's tokens and the likeliest is written (a grammar mask over whole values rather than single
tokens, so a value split into several BPE tokens is never left half-written). Every plan is therefore valid by
construction and maps onto a ``musicray.compose.Request``'s fields.

The sections a prompt lists ("verse-chorus-verse", "intro, verse, chorus, outro") are read first
(``stated_sections``, one table of spellings ``SECTION_SPELLINGS``) and narrow the form's grammar to that list in
that order (``FormGrammar``); the model then chooses only each section's length. A prompt that lists none leaves
the model free to choose the sections too: SmolLM2-135M, left free, wrote "verse" eight times whatever the prompt
listed (docs/results.md).

A section's length is chosen by what the prompt says of it plus a prior. Alone, SmolLM2-135M gave every section
the shortest length offered whatever the prompt (a "verse-chorus-verse" of 12 bars), a bias of the model rather than
a reading of the prompt: POP909 writes most verses and choruses in 8 bars. So each length's score is the model's
log-likelihood given the prompt, less the same given a content-free prompt ("N/A" in the prompt's place: contextual
calibration, Zhao et al. 2021, "Calibrate Before Use", ICML), plus the log of how often POP909's songs give that
section that length (``SectionWord.length_counts``, counted by ``count_section_lengths``).
"""

from __future__ import annotations

import collections
import copy
import json
import math
import re
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from musicray.errors import SongError
from musicray.harmony import canonical_key
from musicray.song import METRES, Section, Song, form_string
from musicray.tempo_direction import TEMPO_DIRECTIONS


@dataclass(frozen=True)
class SectionWord:
    """A section as a plan names it: its POP909 phrase label (upper case melodic, lower case not), the lengths
    in bars a plan may give it (every occurrence of a word in one form has the same length: a return repeats), and
    how many sections of that label POP909's songs give each of those lengths (the length prior)."""

    label: str
    lengths: tuple[int, ...]
    length_counts: tuple[int, ...]

    def __post_init__(self):
        if len(self.length_counts) != len(self.lengths):
            raise ValueError(f"SectionWord {self.label}: one count per length, got {self.length_counts} for "
                             f"{self.lengths}")

    def section(self, bars: int) -> Section:
        return Section(self.label, bars)

    def length_log_prior(self, allowed: tuple[int, ...]) -> tuple[float, ...]:
        """log P(length) over the ``allowed`` lengths from POP909's counts (add-one smoothed: a length POP909
        never gives this section stays possible)."""
        counts = [self.length_counts[self.lengths.index(bars)] + 1 for bars in allowed]
        return tuple(math.log(count / sum(counts)) for count in counts)


# Section words -> label, lengths and POP909's count of each length (its 909 songs as prepared, every split:
# tests/test_prompt_plan.py counts them again). Pre-chorus is a melodic phrase of its own (D: verse A, chorus B,
# bridge C).
SECTION_WORDS: dict[str, SectionWord] = {
    "intro": SectionWord("i", (2, 4), (24, 229)), "verse": SectionWord("A", (4, 8), (722, 1579)),
    "pre-chorus": SectionWord("D", (2, 4), (0, 82)), "chorus": SectionWord("B", (4, 8), (917, 1434)),
    "bridge": SectionWord("C", (4, 8), (407, 369)), "interlude": SectionWord("x", (2, 4), (58, 134)),
    "outro": SectionWord("o", (2, 4), (108, 100)),
}

MAX_SECTIONS = 8
# How a prompt may spell each section word (lower case; plurals included): ``stated_sections`` reads them.
SECTION_SPELLINGS: dict[str, tuple[str, ...]] = {
    "intro": ("intro", "intros", "introduction"), "verse": ("verse", "verses"),
    "pre-chorus": ("pre-chorus", "pre-choruses", "prechorus", "pre chorus"),
    "chorus": ("chorus", "choruses", "refrain"), "bridge": ("bridge", "middle eight"),
    "interlude": ("interlude", "instrumental break"), "outro": ("outro", "outros", "coda"),
}
# One pattern for every spelling, longest first so that "pre-chorus" is not read as "chorus".
_SECTION_MENTION = re.compile(r"\b(" + "|".join(re.escape(spelling) for spelling in sorted(
    (s for spellings in SECTION_SPELLINGS.values() for s in spellings), key=len, reverse=True)) + r")\b")
_SECTION_OF_SPELLING = {spelling: word for word, spellings in SECTION_SPELLINGS.items() for spelling in spellings}
# A form the prompt states lists at least two sections; one section word alone ("with a long intro") is no form.
MIN_STATED_SECTIONS = 2
# Key names as a prompt may spell them (sharps and flats), each read by canonical_key.
KEY_NAMES: tuple[str, ...] = ("C", "C#", "Db", "D", "D#", "Eb", "E", "F", "F#", "Gb", "G", "G#", "Ab", "A", "A#",
                              "Bb", "B")
KEY_MODES_IN_WORDS: dict[str, str] = {"major": "maj", "minor": "min"}
TEMPI: tuple[int, ...] = tuple(range(40, 222, 2))   # bpm; even values cover any stated tempo within 1 bpm

DEFAULT_BASE = "smollm2-135m-instruct"   # the instruct model `musicray plan` uses when given none
CONTENT_FREE_PROMPT = "N/A"   # the calibration's prompt: says nothing of the song (Zhao et al. 2021)
SYSTEM = ("You plan pop songs. Answer with the plan as JSON: form (the list of sections), key, metre, tempo in bpm "
          "and tempo direction, as the request says.")


@dataclass(frozen=True)
class PlanField:
    """One field of the plan JSON: the text written before its value, and the values it may take (as written)."""

    name: str
    before: str
    values: tuple[str, ...]


# The plan JSON, field by field (the form's sections are a list of SECTION_WORDS, decoded one at a time).
PLAN_GRAMMAR: tuple[PlanField, ...] = (
    PlanField("key", ', "key": "', tuple(f"{name} {mode}" for name in KEY_NAMES for mode in KEY_MODES_IN_WORDS)),
    PlanField("metre", '", "metre": "', tuple(METRES)),
    PlanField("tempo", '", "tempo": ', tuple(str(bpm) for bpm in TEMPI)),
    PlanField("tempo_direction", ', "tempo_direction": "', tuple(TEMPO_DIRECTIONS)),
)
# After each section the form goes on ('", "') or closes ('"]'): both written up to the character that differs,
# so that neither choice is favoured for being shorter. Then each section word's length, one entry per word.
FORM_OPEN, SECTION_NEXT, FORM_CLOSE = '{"form": ["', '", "', '"]'
LENGTHS_OPEN, LENGTH_NEXT, LENGTHS_CLOSE = ', "section_bars": {', ', ', '}'


def count_section_lengths(songs: list[Song]) -> dict[str, tuple[int, ...]]:
    """Each section word's ``length_counts`` as ``songs`` give them (``SECTION_WORDS``' counts, from POP909)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for song in songs:
        for section in song.sections:
            counts[section.label][section.bars] += 1
    return {word: tuple(counts[entry.label][bars] for bars in entry.lengths) for word, entry in SECTION_WORDS.items()}


def stated_sections(prompt: str) -> tuple[str, ...]:
    """The section words ``prompt`` lists, in its order (read through ``SECTION_SPELLINGS``); () where it names
    fewer than ``MIN_STATED_SECTIONS`` (no form stated)."""
    words = tuple(_SECTION_OF_SPELLING[match.group(1)] for match in _SECTION_MENTION.finditer(prompt.lower()))
    return words if len(words) >= MIN_STATED_SECTIONS else ()


@dataclass(frozen=True)
class FormGrammar:
    """What the plan's form may hold next. With ``stated`` sections (the prompt's list) each step allows only the
    next stated word, and the form closes after the last; without, every word that still fits, up to
    ``MAX_SECTIONS``. The words are chosen first, each counted at its shortest length against ``max_bars``; then
    each word's length (``lengths``) among those that leave room for the words still without one."""

    stated: tuple[str, ...] = ()
    max_bars: int = MAX_SECTIONS * max(max(word.lengths) for word in SECTION_WORDS.values())

    def __post_init__(self):
        if len(self.stated) > MAX_SECTIONS:
            raise SongError(f"prompt: lists {len(self.stated)} sections ({', '.join(self.stated)}); a plan holds at "
                            f"most {MAX_SECTIONS}")
        shortest = _bars(self.stated or (min(SECTION_WORDS, key=lambda w: min(SECTION_WORDS[w].lengths)),), {})
        if shortest > self.max_bars:
            listed = f"the sections it lists ({', '.join(self.stated)}) need" if self.stated else "a form needs"
            raise SongError(f"prompt: {listed} at least {shortest} bars; this server composes at most "
                            f"max_bars={self.max_bars}")

    def words(self, chosen: tuple[str, ...]) -> tuple[str, ...]:
        if self.stated:
            return (self.stated[len(chosen)],)
        left = self.max_bars - _bars(chosen, {})
        return tuple(word for word, section in SECTION_WORDS.items() if min(section.lengths) <= left)

    def endings(self, chosen: tuple[str, ...]) -> tuple[str, ...]:
        if self.stated:
            return (FORM_CLOSE,) if len(chosen) == len(self.stated) else (SECTION_NEXT,)
        if len(chosen) == MAX_SECTIONS or not self.words(chosen):
            return (FORM_CLOSE,)
        return (SECTION_NEXT, FORM_CLOSE)

    def lengths(self, chosen: tuple[str, ...], given: dict[str, int], word: str) -> tuple[int, ...]:
        """The lengths ``word`` may take in the form ``chosen`` once the words of ``given`` have theirs."""
        left = self.max_bars - _bars(tuple(w for w in chosen if w != word), given)
        return tuple(bars for bars in SECTION_WORDS[word].lengths if chosen.count(word) * bars <= left)


def _bars(words: tuple[str, ...], lengths: dict[str, int]) -> int:
    """The bars of a form of ``words``: each at its given length, else its shortest."""
    return sum(lengths.get(word, min(SECTION_WORDS[word].lengths)) for word in words)


@dataclass(frozen=True)
class PromptPlan:
    """A song's plan in ``musicray.compose.Request`` terms, and the sections in words as the model wrote them with
    each word's length in bars."""

    form: str
    key: str
    metre: str
    tempo: int
    tempo_direction: str
    sections: tuple[str, ...]
    section_bars: dict[str, int]

    @property
    def mode(self) -> str:
        """The key's mode ("maj", "min"): what a prompt naming only the mode ("in a minor key") states."""
        return self.key.split(":")[1]

    def to_dict(self) -> dict:
        return asdict(self)


class PromptPlanner:
    """Writes plans with a causal LM and its chat-template tokenizer (a base model or a stage-1 model)."""

    def __init__(self, model, tokenizer, length_prior: bool = True):
        """``length_prior``: choose a section's length by the model's calibrated score plus POP909's length prior
        (off: by the model's score alone, as measured before the prior)."""
        self.model, self.tokenizer, self.length_prior = model.eval(), tokenizer, length_prior
        self._seen: tuple[list[int], object] | None = None   # the last context's ids and KV cache (``_context``)

    def plan(self, prompt: str, max_bars: int | None = None) -> PromptPlan:
        """The plan of ``prompt``; with ``max_bars`` (a server's limit) the form only takes sections that fit."""
        if not prompt or not prompt.strip():
            raise SongError("prompt: empty; describe the song in words, e.g. 'a gentle ballad in 3/4'")
        form = FormGrammar(stated_sections(prompt), **({"max_bars": max_bars} if max_bars is not None else {}))
        # No worked examples before the prompt: two of them (earlier chat turns) made SmolLM2-135M copy their values
        # instead of the prompt's, 15 of 28 stated attributes honoured against 21 without (docs/results.md).
        head = self._chat(prompt.strip())
        text = head
        sections: tuple[str, ...] = ()
        while True:
            word = self._choose(text, form.words(sections))
            sections += (word,)
            ending = self._choose(text + word, form.endings(sections))   # another section, or the end of the form
            text += word + ending
            if ending == FORM_CLOSE:
                break
        text += LENGTHS_OPEN
        lengths: dict[str, int] = {}
        for word in dict.fromkeys(sections):   # each word once, in the order of its first occurrence
            text += (LENGTH_NEXT if lengths else "") + f'"{word}": '
            allowed = form.lengths(sections, lengths, word)
            choices = tuple(map(str, allowed))
            if self.length_prior:   # the prompt's word on the length, calibrated, plus POP909's prior
                content_free = self._chat(CONTENT_FREE_PROMPT) + text[len(head):]
                chosen = self._choose(text, choices, SECTION_WORDS[word].length_log_prior(allowed), content_free)
            else:
                chosen = self._choose(text, choices)
            lengths[word] = int(chosen)
            text += str(lengths[word])
        text += LENGTHS_CLOSE
        values = {}
        for field in PLAN_GRAMMAR:
            text += field.before
            values[field.name] = self._choose(text, field.values)
            text += values[field.name]
        name, mode = values["key"].split(" ")
        return PromptPlan(form_string([SECTION_WORDS[word].section(lengths[word]) for word in sections]),
                          canonical_key(f"{name}:{KEY_MODES_IN_WORDS[mode]}"), values["metre"], int(values["tempo"]),
                          values["tempo_direction"], sections, lengths)

    def _chat(self, prompt: str) -> str:
        """The chat-rendered request, up to the plan's first value."""
        return self.tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            add_generation_prompt=True, tokenize=False) + FORM_OPEN

    def _choose(self, text: str, values: tuple[str, ...], log_prior: tuple[float, ...] | None = None,
                calibration_text: str | None = None) -> str:
        """The value of ``values`` the model finds likeliest after ``text`` (``_scores``), less its score after
        ``calibration_text`` and plus ``log_prior`` where given; the only one where the grammar allows one."""
        if len(values) == 1:
            return values[0]
        scores = self._scores(text, values)
        if calibration_text is not None:
            scores = scores - self._scores(calibration_text, values)
        if log_prior is not None:
            scores = scores + torch.tensor(log_prior, dtype=scores.dtype)
        return values[int(scores.argmax())]

    @torch.no_grad()
    def _scores(self, text: str, values: tuple[str, ...]) -> torch.Tensor:
        """[values]: each value's summed log-probability of its tokens after ``text``.

        The text and each continuation are tokenized together (BPE may merge across the boundary); the ids all
        continuations share are run once (only those the previous choice did not run: ``_context``), and their KV
        cache, repeated per value, scores every value's remaining ids in one batched forward pass (right-padded: a
        causal model's scores before the padding are unaffected)."""
        full = [self.tokenizer(text + value, add_special_tokens=False)["input_ids"] for value in values]
        shared = min(_common_prefix(full[0], ids) for ids in full)
        shared = min(shared, min(len(ids) for ids in full) - 1)   # every value keeps at least one token to score
        last_logits, cache = self._context(full[0][:shared])
        cache.batch_repeat_interleave(len(values))
        rests = [ids[shared:] for ids in full]
        width = max(map(len, rests))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([rest + [pad] * (width - len(rest)) for rest in rests])
        mask = torch.tensor([[1] * shared + [1] * len(rest) + [0] * (width - len(rest)) for rest in rests])
        positions = torch.arange(shared, shared + width).expand(len(values), -1)
        step = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        first = last_logits.expand(len(values), -1, -1)
        logits = torch.cat([first, step.logits[:, :-1]], dim=1).float().log_softmax(-1)
        taken = logits.gather(-1, ids[..., None])[..., 0] * mask[:, shared:]
        return taken.sum(-1)

    @torch.no_grad()
    def _context(self, ids: list[int]):
        """(logits after the last id, a KV cache of ``ids``): a plan's choices share ever longer contexts, so the
        ids the previous context shares with this one are not run again (its cache, cropped to them, is reused)."""
        reuse = min(_common_prefix(self._seen[0], ids), len(ids) - 1) if self._seen is not None else 0
        cache = copy.deepcopy(self._seen[1]) if reuse else DynamicCache()
        if reuse and reuse < len(self._seen[0]):
            cache.crop(reuse - len(self._seen[0]))   # a negative count: the ids after the shared ones go
        out = self.model(input_ids=torch.tensor([ids[reuse:]]), past_key_values=cache, use_cache=True,
                         position_ids=torch.arange(reuse, len(ids))[None])
        self._seen = (ids, out.past_key_values)
        return out.logits[:, -1:], copy.deepcopy(out.past_key_values)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# Prompts with checkable attributes and what they state (a plan honours one when its field equals the value given
# here): the measure of tests/test_prompt_plan.py and benchmarks/plan_experiment.py (docs/results.md). The last
# five were added, before any measure of them, to check the first five's figure on prompts the plan grammar was not
# looked at with; the last two, with the form grammar (issue 18), for the kinds no other prompt states: the mode
# alone, and a tempo range (a ``range`` of bpm: honoured when the planned tempo is in it).
CHECKED_PROMPTS: tuple[tuple[str, dict], ...] = (
    ("a gentle ballad in 3/4, verse-chorus-verse, slowing at the end",
     {"metre": "3/4", "sections": ("verse", "chorus", "verse"), "tempo_direction": "slowing"}),
    ("an upbeat dance song in A minor at 128 bpm", {"key": "A:min", "tempo": 128}),
    ("a song in D major in 6/8 at 90 bpm", {"key": "D:maj", "metre": "6/8", "tempo": 90}),
    ("intro, verse, chorus, outro in 4/4 with a steady tempo",
     {"sections": ("intro", "verse", "chorus", "outro"), "metre": "4/4", "tempo_direction": "steady"}),
    ("a sad song in E minor at 70 bpm, speeding up at the end",
     {"key": "E:min", "tempo": 70, "tempo_direction": "speeding up"}),
    ("a love song in F major: verse, chorus, verse, chorus, bridge, chorus",
     {"key": "F:maj", "sections": ("verse", "chorus", "verse", "chorus", "bridge", "chorus")}),
    ("a march in 2/4 at 110 bpm", {"metre": "2/4", "tempo": 110}),
    ("a lullaby in 6/8 in Bb major, getting slower", {"metre": "6/8", "key": "Bb:maj", "tempo_direction": "slowing"}),
    ("chorus, verse, chorus in C minor at 100 bpm", {"sections": ("chorus", "verse", "chorus"), "key": "C:min",
                                                     "tempo": 100}),
    ("a fast song at 160 bpm in 12/8, intro-verse-chorus-bridge-chorus-outro, speeding up",
     {"tempo": 160, "metre": "12/8", "sections": ("intro", "verse", "chorus", "bridge", "chorus", "outro"),
      "tempo_direction": "speeding up"}),
    ("a slow ballad in a minor key: verse, chorus, verse, chorus", {"tempo": range(40, 81), "mode": "min",
                                                                    "sections": ("verse", "chorus") * 2}),
    ("a fast dance track in a major key", {"tempo": range(120, 222), "mode": "maj"}),
)


def missed_attributes(plan: PromptPlan, stated: dict) -> list[tuple[str, object, object]]:
    """(attribute, planned, stated) for each stated attribute the plan does not honour (a ``range``: holds)."""
    return [(name, getattr(plan, name), value) for name, value in stated.items()
            if not (getattr(plan, name) in value if isinstance(value, range) else getattr(plan, name) == value)]


def plan_json(plan: PromptPlan) -> str:
    return json.dumps(plan.to_dict(), indent=1)


def load_planner(base: str | None = None, run=None, cache_dir: str = "~/.cache/musicray",
                 music_tuned: bool = False, length_prior: bool = True) -> PromptPlanner:
    """A planner on base model ``base`` (a name or directory, as ``base_model``, converted or built under
    ``cache_dir``), or for run directory ``run``: on the base model the run was fine-tuned from (its stage-1 config's
    ``base_model``, from the config's ``cache_dir``), because a full fine-tune on music tokens loses the text skill
    (SmolLM2 after 100 steps honoured 10 of 33 stated attributes, its base 29: docs/results.md). ``music_tuned``, or
    a run whose stage-1 config is missing (a copied model), plans with the run's stage-1 model itself (the adapters
    are not loaded: the plan is text). ``length_prior``: as ``PromptPlanner``'s."""
    from musicray.model import load_base, load_music_model
    from musicray.run import RunDir
    from musicray.train.config import run_config

    if (base is None) == (run is None):
        raise SongError("--base/--run: give exactly one (a base model name or directory, or a run directory)")
    if run is not None:
        if music_tuned or not RunDir(run).stage1_config.exists():
            model, music = load_music_model(RunDir(run).require("stage-1 model"))
            return PromptPlanner(model, music.tokenizer, length_prior)
        trained = run_config(run)
        base, cache_dir = trained.base_model, trained.cache_dir
    model, tokenizer = load_base(base, cache_dir)
    if not tokenizer.chat_template:
        raise SongError(f"--base: {base} has no chat template; planning needs an instruct model")
    return PromptPlanner(model, tokenizer, length_prior)

"""Songs planned from words: every value the plan grammar allows is a valid request field, and SmolLM2-135M-Instruct
plans prompts with stated attributes (metre, key, tempo, tempo direction, number and kind of sections) into valid
plans, honouring most of what they state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from musicray.errors import SongError
from musicray.prompt_plan import (CHECKED_PROMPTS, FORM_CLOSE, KEY_MODES_IN_WORDS, MAX_SECTIONS, PLAN_GRAMMAR,
                                  SECTION_NEXT, SECTION_WORDS, FormGrammar, PromptPlan, PromptPlanner,
                                  count_section_lengths, load_planner, missed_attributes, stated_sections)
from musicray.request import Request
from musicray.song import form_string, parse_form

HONOURED_AT_LEAST = 0.80   # the goal; measured 29 of 33 (0.88; docs/results.md, "Songs planned from words")


@pytest.mark.parametrize("field", PLAN_GRAMMAR, ids=lambda field: field.name)
def test_every_value_the_plan_grammar_allows_makes_a_valid_request(field):
    for value in field.values:
        plan = {"key": "C:maj", "metre": "4/4", "tempo": 100}
        if field.name == "key":
            name, mode = value.split(" ")
            plan["key"] = f"{name}:{KEY_MODES_IN_WORDS[mode]}"
        elif field.name in ("metre", "tempo"):
            plan[field.name] = int(value) if field.name == "tempo" else value
        every_section = [word.section(bars) for word in SECTION_WORDS.values() for bars in word.lengths]
        Request(form_string(every_section), **plan).song()   # raises on an invalid field


@pytest.mark.parametrize("prompt, sections", [
    ("a gentle ballad in 3/4, verse-chorus-verse, slowing at the end", ("verse", "chorus", "verse")),
    ("Intro, Verse, Chorus, Outro in 4/4", ("intro", "verse", "chorus", "outro")),
    ("two verses then a pre-chorus and a refrain", ("verse", "pre-chorus", "chorus")),
    ("verse, prechorus, chorus, middle eight, coda", ("verse", "pre-chorus", "chorus", "bridge", "outro")),
    ("an introduction and an instrumental break", ("intro", "interlude")),
    ("a ballad with a long intro", ()),                      # one section word names no form
    ("a song in D major in 6/8 at 90 bpm", ()),
    ("a universe of choruses", ()),                          # words, not parts of words ("universe")
    ("chorusline and verses", ()),                           # "chorusline" is not "chorus": only "verse" is read
])
def test_the_sections_a_prompt_lists_are_read_in_its_order(prompt, sections):
    assert stated_sections(prompt) == sections


@pytest.mark.parametrize("grammar, chosen, words, endings", [
    # stated: one word at each step, in order, and the form closes after the last
    (FormGrammar(("verse", "chorus", "verse")), (), ("verse",), None),
    (FormGrammar(("verse", "chorus", "verse")), ("verse",), ("chorus",), (SECTION_NEXT,)),
    (FormGrammar(("verse", "chorus", "verse")), ("verse", "chorus", "verse"), None, (FORM_CLOSE,)),
    # free: every word; past the limit of sections, or of bars, only the close
    (FormGrammar(), (), tuple(SECTION_WORDS), None),
    (FormGrammar(), ("verse",), tuple(SECTION_WORDS), (SECTION_NEXT, FORM_CLOSE)),
    (FormGrammar(), ("verse",) * MAX_SECTIONS, None, (FORM_CLOSE,)),
    (FormGrammar(max_bars=7), ("verse",), ("intro", "pre-chorus", "interlude", "outro"), (SECTION_NEXT, FORM_CLOSE)),
    (FormGrammar(max_bars=7), ("verse", "intro"), None, (FORM_CLOSE,)),
])
def test_the_form_grammar_allows_the_stated_sections_in_order_else_any_that_fit(grammar, chosen, words, endings):
    if words is not None:
        assert grammar.words(chosen) == words
    if endings is not None:
        assert grammar.endings(chosen) == endings


@pytest.mark.parametrize("max_bars, chosen, given, word, lengths", [
    (None, ("verse", "chorus", "verse"), {}, "verse", (4, 8)),
    (20, ("verse", "chorus", "verse"), {}, "verse", (4, 8)),        # 2 x 8 + chorus 4 = 20
    (19, ("verse", "chorus", "verse"), {}, "verse", (4,)),
    (19, ("verse", "chorus", "verse"), {"verse": 4}, "chorus", (4, 8)),
    (12, ("verse", "chorus", "verse"), {}, "verse", (4,)),
])
def test_a_length_leaves_room_for_the_sections_still_without_one(max_bars, chosen, given, word, lengths):
    grammar = FormGrammar(chosen, **({"max_bars": max_bars} if max_bars else {}))
    assert grammar.lengths(chosen, given, word) == lengths


@pytest.mark.parametrize("stated, max_bars, message", [
    (("verse", "chorus", "verse"), 11, "the sections it lists (verse, chorus, verse) need at least 12 bars"),
    ((), 1, "a form needs at least 2 bars"),
    (("verse", "chorus") * 5, 100, "lists 10 sections"),
])
def test_a_form_that_cannot_fit_is_refused_naming_the_prompt(stated, max_bars, message):
    with pytest.raises(SongError, match="^prompt: ") as caught:
        FormGrammar(stated, max_bars)
    assert message in str(caught.value)


PLAN = PromptPlan("A8B8A8", "A:min", "3/4", 76, "slowing", ("verse", "chorus", "verse"), {"verse": 8, "chorus": 8})


@pytest.mark.parametrize("stated, missed", [
    ({"metre": "3/4", "key": "A:min", "tempo_direction": "slowing"}, []),
    ({"sections": ("verse", "chorus", "verse")}, []),
    ({"sections": ("verse", "chorus")}, [("sections", PLAN.sections, ("verse", "chorus"))]),
    ({"mode": "min", "tempo": range(40, 81)}, []),
    ({"mode": "maj", "tempo": range(120, 222)}, [("mode", "min", "maj"), ("tempo", 76, range(120, 222))]),
    ({"tempo": 76, "key": "C:min"}, [("key", "A:min", "C:min")]),
])
def test_an_attribute_is_honoured_when_the_plan_has_it_or_a_stated_range_holds_it(stated, missed):
    assert missed_attributes(PLAN, stated) == missed


@pytest.mark.parametrize("base, run, message", [(None, None, "--base/--run"), ("x", "y", "--base/--run")])
def test_a_planner_needs_one_model(base, run, message):
    with pytest.raises(SongError, match=message):
        load_planner(base, run)


def test_the_length_prior_is_what_pop909_counts(pop909_prepared):
    """The shipped counts are POP909's, counted again from its prepared songs (every split)."""
    from musicray.data.prepare import load_table
    from musicray.song import song_from_dict

    data, _ = pop909_prepared
    songs = [song_from_dict(json.loads(text)) for text in load_table(data, "songs")["song_json"]]
    assert count_section_lengths(songs) == {word: entry.length_counts for word, entry in SECTION_WORDS.items()}


@pytest.mark.parametrize("word, allowed, favoured", [
    ("verse", (4, 8), 8), ("chorus", (4, 8), 8), ("intro", (2, 4), 4), ("bridge", (4, 8), 4), ("verse", (4,), 4),
])
def test_the_length_prior_is_a_distribution_over_the_allowed_lengths(word, allowed, favoured):
    prior = SECTION_WORDS[word].length_log_prior(allowed)
    assert sum(math.exp(p) for p in prior) == pytest.approx(1.0)
    assert allowed[max(range(len(allowed)), key=prior.__getitem__)] == favoured


@pytest.fixture(scope="module")
def tiny_planner(tmp_path_factory):
    from musicray.model import load_base

    return PromptPlanner(*load_base("tiny", tmp_path_factory.mktemp("cache")))


@pytest.mark.parametrize("field", PLAN_GRAMMAR, ids=lambda field: field.name)
def test_a_choice_scores_every_value_in_one_batch_as_one_by_one_would(tiny_planner, field):
    """The batched, cache-sharing choice picks the value whose tokens a plain forward pass over the whole text
    finds likeliest (here with the tiny random model, whose preferences are arbitrary but fixed)."""
    model, tokenizer = tiny_planner.model, tiny_planner.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a song in 3/4"}], add_generation_prompt=True,
                                         tokenize=False) + '{"form": ["verse"]' + field.before

    def one_by_one(value: str) -> float:
        context = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(text + value, add_special_tokens=False)["input_ids"]
        start = min(next((k for k, (a, b) in enumerate(zip(context, ids)) if a != b), len(context)), len(ids) - 1)
        with torch.no_grad():
            scores = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return sum(scores[j - 1, ids[j]].item() for j in range(start, len(ids)))

    assert tiny_planner._choose(text, field.values) == max(field.values, key=one_by_one)
    # A prior is added to the model's scores: an overwhelming one decides, a flat one changes nothing.
    least = min(field.values, key=one_by_one)
    assert tiny_planner._choose(text, field.values, tuple(0.0 if v == least else -1e4 for v in field.values)) == least
    assert tiny_planner._choose(text, field.values, (-3.0,) * len(field.values)) == max(field.values, key=one_by_one)
    # Calibrated by the same text, every score is 0: the prior alone decides.
    for favoured in (field.values[0], field.values[-1]):
        prior = tuple(0.0 if v == favoured else -0.01 for v in field.values)
        assert tiny_planner._choose(text, field.values, prior, calibration_text=text) == favoured


@pytest.mark.parametrize("prompt, max_bars", [(prompt, max_bars) for prompt, stated in CHECKED_PROMPTS
                                              if "sections" in stated for max_bars in (None, 24)])
def test_a_plan_follows_the_sections_its_prompt_lists_whatever_the_model_prefers(tiny_planner, prompt, max_bars):
    """The tiny random model's preferences are arbitrary: the listed sections are the grammar's, not the model's;
    the model chooses each word's length, within the server's ``max_bars``."""
    plan = tiny_planner.plan(prompt, max_bars)
    assert plan.sections == stated_sections(prompt) == dict(CHECKED_PROMPTS)[prompt]["sections"]
    sections = parse_form(plan.form)
    assert [s.label for s in sections] == [SECTION_WORDS[word].label for word in plan.sections]
    assert [s.bars for s in sections] == [plan.section_bars[word] for word in plan.sections]
    assert sum(s.bars for s in sections) <= (max_bars or MAX_SECTIONS * 8)


@pytest.fixture(scope="module")
def planner(smol_base):
    cache, _ = smol_base
    return load_planner("smollm2-135m-instruct", cache_dir=str(cache))


def test_an_empty_prompt_is_refused(planner):
    with pytest.raises(SongError, match="prompt"):
        planner.plan("  ")


def test_prompts_become_valid_plans_that_honour_what_they_state(planner: PromptPlanner):
    stated, missed = 0, []
    for prompt, attributes in CHECKED_PROMPTS:
        plan = planner.plan(prompt)
        Request(plan.form, plan.key, plan.metre, plan.tempo).song()   # every plan is valid
        assert json.loads(json.dumps(plan.to_dict()))["form"] == plan.form
        assert plan.form == form_string([SECTION_WORDS[word].section(plan.section_bars[word])
                                         for word in plan.sections])
        stated += len(attributes)
        missed += [(prompt, *miss) for miss in missed_attributes(plan, attributes)]
    assert 1 - len(missed) / stated >= HONOURED_AT_LEAST, missed


def test_the_plan_command_prints_the_plan_as_json(tmp_path, capsys):
    from musicray.cli import main

    assert main(["plan", "--prompt", "a waltz in G major", "--base", "tiny", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out   # under pytest, a library's logging may come first (the command alone prints none)
    plan = json.loads(out[out.index("{\n"):])
    assert set(plan) == {"form", "key", "metre", "tempo", "tempo_direction", "sections", "section_bars"}
    Request(plan["form"], plan["key"], plan["metre"], plan["tempo"]).song()


def test_a_run_plans_with_the_base_it_was_fine_tuned_from(tmp_path, make_random_run):
    """A full fine-tune on music tokens loses the text skill (docs/results.md), so a run plans with its base; its own
    stage-1 model only when asked (``music_tuned``) or when the run records no base (a copied stage-1 model)."""
    from musicray.run import RunDir

    run, cache = tmp_path / "run", str(tmp_path / "cache")
    _, music = make_random_run(run, (), tmp_path / "cache")
    assert len(load_planner(run=run, cache_dir=cache).tokenizer) == len(music.tokenizer)   # no config: its model
    # The base is read from where the run's config kept it (its cache_dir), not from the planner's default.
    RunDir(run).stage1_config.write_text(f"base_model: tiny\ncache_dir: {tmp_path / 'run-cache'}\n")
    assert len(load_planner(run=run, cache_dir=cache).tokenizer) < len(music.tokenizer)    # the base: no music tokens
    assert (tmp_path / "run-cache").is_dir()
    assert len(load_planner(run=run, cache_dir=cache, music_tuned=True).tokenizer) == len(music.tokenizer)


def test_the_plan_command_refuses_music_tuned_without_a_run(tmp_path, capsys):
    from musicray.cli import main

    assert main(["plan", "--prompt", "a waltz", "--music-tuned", "--cache-dir", str(tmp_path)]) == 2
    assert "--music-tuned" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, make_random_run):
    """The tiny random run (its stage-1 model has the tiny base's chat template): plans arbitrary but valid."""
    run = tmp_path_factory.mktemp("prompt-run") / "run"
    make_random_run(run, ("chord",), tmp_path_factory.mktemp("cache"))
    return run


@pytest.mark.parametrize("planner_options", [[], ["--base", "tiny"]], ids=["the run's stage-1 model", "--base"])
def test_generate_with_a_prompt_composes_the_plan_and_says_which_fields_it_took(tiny_run, tmp_path, capsys,
                                                                                 planner_options):
    from musicray.cli import main
    from musicray.midi import read_midi

    prompt, out = "a waltz in G major", tmp_path / "song.mid"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["generate", "--run", str(tiny_run), "--prompt", prompt, "--tempo", "90", "--stages", "chord",
                 *planner_options, *cache, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = (load_planner(planner_options[1] if planner_options else None, None if planner_options else tiny_run,
                         tmp_path / "cache").plan(prompt))
    song = read_midi(out)
    assert (song.form, song.key, song.metre) == (plan.form, plan.key, plan.metre)
    assert f"from the --prompt's plan: form {plan.form}, key {plan.key}, metre {plan.metre}; stated instead: " \
           f"tempo; tempo direction {plan.tempo_direction}" in printed
    why = "steady leaves the tempo to the tempo stage" if plan.tempo_direction == "steady" else \
        "the tempo stage did not run"
    assert f"tempo direction {plan.tempo_direction}: not applied ({why})" in printed
    assert json.loads(out.with_suffix(".json").read_text())["stages"]["chord"]["grammar_errors"] == 0


def test_generate_refuses_an_empty_prompt_naming_it(tiny_run, tmp_path, capsys):
    from musicray.cli import main

    assert main(["generate", "--run", str(tiny_run), "--prompt", " ", "--out", str(tmp_path / "song.mid")]) != 0
    assert capsys.readouterr().err.strip().endswith("--prompt: empty; describe the song in words, e.g. 'a gentle "
                                                    "ballad in 3/4'")

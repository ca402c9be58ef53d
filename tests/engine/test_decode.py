"""Grammar-masked decoding on a random-weight model: every output is grammatical and the form exact."""

import random

import pytest
import torch

from musicray.encoding import encode
from musicray.engine.decode import GrammarLogitsProcessor, generate
from musicray.grammar import Grammar, Plan, small_tensor_threads
from musicray.model import add_music_tokens, load_base
from musicray.sampling import Sampling
from musicray.song import METRES, SECTION_LABELS, Section, Song, TRACKS, Tempo
from musicray.streams import TASK_TARGET
from musicray.tokens import SUBTASKS, Vocabulary

VOCAB = Vocabulary()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model, tokenizer = load_base("tiny", tmp_path_factory.mktemp("cache"))
    music = add_music_tokens(model, tokenizer, VOCAB)
    return model.eval(), music, Grammar(VOCAB)


def random_request(rng: random.Random, song) -> tuple:
    """An example prompt of a random sub-task for a random small form, over a synthetic song's material."""
    sections = [Section(rng.choice(SECTION_LABELS), rng.randint(1, 2)) for _ in range(rng.randint(1, 2))]
    spec = METRES[rng.choice(sorted(METRES))]
    n_bars = sum(s.bars for s in sections)
    small = Song("r", song.key, spec.name, sections, tracks={name: [] for name in TRACKS}, tempos=[Tempo(0, 0, 90.0)])
    small.tracks["MELODY"] = [n for n in song.tracks["MELODY"] if n.bar < n_bars and n.position < spec.positions_per_bar]
    task = rng.choice(SUBTASKS)
    example = encode(small, task, VOCAB)
    return task, example


def test_masked_outputs_are_grammatical_for_many_seeds_and_forms(model, synthetic_songs):
    model, music, grammar = model
    rng = random.Random(0)
    requests = [random_request(rng, synthetic_songs[i % len(synthetic_songs)]) for i in range(24)]
    streams = [TASK_TARGET[task] for task, _ in requests]
    plans = [Plan.from_prompt(example.prompt, VOCAB) for _, example in requests]
    minimum = grammar.tokens_to_finish(grammar.start(streams, plans)).tolist()
    budgets = [m + rng.choice([0, 3, 40]) for m in minimum]
    prompts = [music.prompt_ids(example) for _, example in requests]
    with small_tensor_threads("cpu"):
        out = generate(model, music, grammar, prompts, streams, plans, budgets, list(range(24)), Sampling(1.2))
    assert all(out.finished)
    assert all(len(tokens) <= budget for tokens, budget in zip(out.tokens, budgets))
    assert sum(map(len, grammar.validate_batch(out.tokens, streams, plans))) == 0
    for tokens, plan in zip(out.tokens, plans):
        sections = [VOCAB.tokens[t] for t in tokens if VOCAB.family[t] == "Sec"]
        assert sections == [f"<Sec_{s.label}{s.bars}>" for s in plan.sections]
        assert sum(VOCAB.family[t] == "Bar" for t in tokens) == plan.n_bars


def test_a_rows_output_does_not_depend_on_its_batch(model, synthetic_songs):
    model, music, grammar = model
    rng = random.Random(1)
    requests = [random_request(rng, synthetic_songs[i]) for i in range(3)]
    args = dict(prompts=[music.prompt_ids(e) for _, e in requests], streams=[TASK_TARGET[t] for t, _ in requests],
                plans=[Plan.from_prompt(e.prompt, VOCAB) for _, e in requests])
    budgets = [200, 200, 200]
    together = generate(model, music, grammar, **args, max_new_tokens=budgets, seeds=[7, 8, 9])
    alone = generate(model, music, grammar, [args["prompts"][1]], [args["streams"][1]], [args["plans"][1]], [200], [8])
    assert alone.tokens[0] == together.tokens[1]
    again = generate(model, music, grammar, **args, max_new_tokens=budgets, seeds=[7, 8, 9])
    assert again.tokens == together.tokens


def test_greedy_and_top_k_top_p_stay_grammatical(model, synthetic_songs):
    model, music, grammar = model
    task, example = random_request(random.Random(2), synthetic_songs[0])
    plan = Plan.from_prompt(example.prompt, VOCAB)
    for sampling in (Sampling(0.0), Sampling(0.8, top_k=5), Sampling(1.0, top_p=0.5)):
        out = generate(model, music, grammar, [music.prompt_ids(example)], [TASK_TARGET[task]], [plan], [150], [3],
                       sampling)
        assert grammar.validate(out.tokens[0], TASK_TARGET[task], plan) == []


def test_logits_processor_with_hf_generate(model, synthetic_songs):
    model, music, grammar = model
    task, example = random_request(random.Random(3), synthetic_songs[1])
    plan, stream = Plan.from_prompt(example.prompt, VOCAB), TASK_TARGET[task]
    budget = int(grammar.tokens_to_finish(grammar.start([stream], [plan]))[0]) + 30
    ids = torch.tensor([music.prompt_ids(example)])
    torch.manual_seed(0)
    output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=budget + 1,
                            logits_processor=[GrammarLogitsProcessor(grammar, music, [stream], [plan], [budget])],
                            eos_token_id=music.eot_id, pad_token_id=music.tokenizer.pad_token_id,
                            top_k=None, top_p=None, temperature=None)
    answer = output[0, ids.shape[1]:].tolist()
    assert answer[-1] == music.eot_id
    assert grammar.validate(music.from_llm(answer), stream, plan) == []


def test_unmasked_ablation_runs_and_is_not_held_to_the_grammar(model, synthetic_songs):
    model, music, grammar = model
    task, example = random_request(random.Random(4), synthetic_songs[2])
    plan = Plan.from_prompt(example.prompt, VOCAB)
    out = generate(model, music, grammar, [music.prompt_ids(example)], [TASK_TARGET[task]], [plan], [40], [1],
                   use_mask=False)
    assert out.mask_seconds == 0 and out.new_tokens <= 40
    # a random model without the mask does not write a grammatical stream
    assert grammar.validate(music.from_llm(out.tokens[0]), TASK_TARGET[task], plan)


def test_jump_forward_feeds_forced_runs_at_once_and_keeps_the_output(model, synthetic_songs):
    """Half the bars given (infilling): jump-forward decodes the same tokens as the step-by-step loop, for
    sampled and greedy decoding, with fewer model calls than tokens."""
    from musicray.encoding import bar_contents
    from musicray.quantize import quantized

    model, music, grammar = model
    song = quantized(synthetic_songs[4], VOCAB)
    window = Song("w", song.key, song.metre, [Section("A", 4)], chords=[c for c in song.chords if c.bar < 4],
                  tracks={name: [n for n in song.tracks[name] if n.bar < 4] for name in TRACKS},
                  tempos=[t for t in song.tempos if t.bar < 4])
    window.tracks = {name: [window.inside_form(n) for n in notes] for name, notes in window.tracks.items()}
    example = encode(window, "melody", VOCAB)
    bars = bar_contents(example.target, VOCAB)
    plan = Plan.from_prompt(example.prompt, VOCAB)
    forced = Plan(plan.sections, plan.metre, forced=((1, tuple(bars[0])), (3, tuple(bars[2]))))
    budget = int(grammar.tokens_to_finish(grammar.start(["melody"], [forced]))[0]) + 60
    for sampling in (Sampling(1.0), Sampling(0.0)):
        step_by_step, jumping = (generate(model, music, grammar, [music.prompt_ids(example)] * 2, ["melody"] * 2,
                                          [forced, plan], [budget] * 2, [5, 6], sampling, jump_forward=jump)
                                 for jump in (False, True))
        assert jumping.tokens == step_by_step.tokens
        assert bar_contents(jumping.tokens[0], VOCAB)[0] == bars[0] and \
            bar_contents(jumping.tokens[0], VOCAB)[2] == bars[2]
        assert grammar.validate(jumping.tokens[0], "melody", forced) == []
        assert jumping.forward_calls < step_by_step.forward_calls

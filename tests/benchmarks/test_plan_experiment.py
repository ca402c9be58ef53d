"""benchmarks/plan_experiment.py on the built-in tiny base (random weights, a chat template): every checked prompt
planned, with and without the length prior, and the lengths counted."""

import json

import plan_experiment
import pytest

from musicray.prompt_plan import CHECKED_PROMPTS, SECTION_WORDS


@pytest.mark.parametrize("length_prior", ["on", "off"])
def test_every_checked_prompt_is_planned_and_its_lengths_counted(tmp_path, length_prior):
    out = tmp_path / "plans.json"
    assert plan_experiment.main(["--planner", "base:tiny", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
                                 "--out", str(out), "--length-prior", length_prior]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["valid"] == len(CHECKED_PROMPTS) and result["length_prior"] == length_prior
    assert 0 <= result["honoured"] <= result["stated"]
    planned = sum(counts for word in result["lengths"].values() for counts in word.values())
    assert planned == sum(len(row["plan"]["section_bars"]) for row in result["prompts"])
    for word, counts in result["lengths"].items():
        assert {int(bars) for bars in counts} <= set(SECTION_WORDS[word].lengths)

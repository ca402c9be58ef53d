"""The benchmark scripts importable by name, and a small prepared data dir their tests share."""

import sys
from pathlib import Path

import pytest

from musicray.data.prepare import SynthSource, prepare_one, write_tables
from musicray.tokens import Vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

# Synthetic songs whose ids hash into the test split (as tests/eval/conftest.py), one into train.
SPLIT_SONGS = ("synth-0000", "synth-0034", "synth-0050", "synth-0001")


@pytest.fixture(scope="session")
def split_data(tmp_path_factory):
    """Prepared tables of SPLIT_SONGS (read only: the benchmarks read their songs and examples from it)."""
    data = tmp_path_factory.mktemp("benchmark-data")
    vocab = Vocabulary()
    write_tables([prepare_one(SynthSource(len(SPLIT_SONGS)), song_id, vocab) for song_id in SPLIT_SONGS], data,
                 vocab)
    return data

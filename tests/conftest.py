import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pop909_dir() -> Path:
    return Path(os.environ.get("POP909_DIR", ROOT.parent / "shared" / "datasets" / "pop909"))


@pytest.fixture(scope="session")
def synthetic_songs():
    from musicray.data.synth import synth_songs

    return synth_songs(40, seed=7)

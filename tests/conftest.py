import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# The tests' models and grammar tensors are tiny, and Ray workers share the same cores: intra-op threads in this
# process only contend with them.
torch.set_num_threads(1)


def pop909_dir() -> Path:
    return Path(os.environ.get("POP909_DIR", ROOT.parent / "shared" / "datasets" / "pop909"))


@pytest.fixture(scope="session")
def synthetic_songs():
    from musicray.data.synth import synth_songs

    return synth_songs(40, seed=7)


@pytest.fixture(scope="session")
def pop909_root() -> Path:
    root = pop909_dir()
    if not (root / "POP909").is_dir():
        pytest.skip(f"POP909 not found at {root} (set POP909_DIR)")
    return root


@pytest.fixture(scope="session")
def pop909_prepared(tmp_path_factory, pop909_root):
    """All of POP909 through the real preparation job (Ray tasks), once per test session."""
    root = pop909_root
    from musicray.data.prepare import Pop909Source, load_table, prepare
    from musicray.tokens import TASKS

    out = tmp_path_factory.mktemp("pop909")
    report = prepare(Pop909Source(str(root)), out, progress=False)
    tables = {name: load_table(out, name) for name in ("songs", *TASKS)}
    tables["report"] = report
    return out, tables

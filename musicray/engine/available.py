"""Which serving engine this machine has: vLLM where it is installed (``engine: auto``), else musicray's own loop.

A module of its own, light to import: the config reads it without loading vLLM, Ray or torch.
"""

from __future__ import annotations

import importlib.util


def vllm_available() -> bool:
    """Whether vLLM can be imported here (its package is installed: ``pip install -e ".[vllm]"`` on CPU)."""
    return importlib.util.find_spec("vllm") is not None

"""How a stage's next token is drawn: ``Sampling`` (temperature, top-k, top-p) and per-stage settings.

Light on purpose (no torch at import): the HTTP schema, the command line and the config read it before any model
is loaded; ``Sampling.warp`` imports the transformers warpers when it first runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from musicray.errors import SongError
from musicray.tokens import SUBTASKS


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the (masked) distribution."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0            # 0 means no top-k cut
    top_p: float = 1.0        # 1 means no nucleus cut

    def warp(self, scores):
        """``scores`` ([batch, vocab] logits) with the temperature, top-k and top-p applied, in that order."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        if self.temperature > 0 and self.temperature != 1.0:
            scores = TemperatureLogitsWarper(self.temperature)(None, scores)
        if self.top_k > 0:
            scores = TopKLogitsWarper(self.top_k)(None, scores)
        if self.top_p < 1.0:
            scores = TopPLogitsWarper(self.top_p)(None, scores)
        return scores


# Each sampling setting: its type, whether a value is in range, and the range in words (as the HTTP schema's).
SAMPLING_RANGES: dict[str, tuple[type, object, str]] = {
    "temperature": (float, lambda v: 0.0 <= v <= 10.0, "0..10 (0 = greedy)"),
    "top_k": (int, lambda v: 0 <= v <= 100000, "a whole number 0..100000 (0 = no cut)"),
    "top_p": (float, lambda v: 0.0 < v <= 1.0, "above 0, at most 1 (1 = no cut)")}


def checked_settings(settings: dict, field: str) -> dict[str, dict[str, float | int]]:
    """``{stage: {temperature | top_k | top_p: value}}`` checked and typed (values may be text, as from a command
    line); a wrong stage, setting or value raises ``SongError`` naming ``field``."""
    checked: dict[str, dict[str, float | int]] = {}
    for stage, values in settings.items():
        if stage not in SUBTASKS:
            raise SongError(f"{field}: unknown stage {stage!r}; known: {', '.join(SUBTASKS)}")
        if not isinstance(values, dict):
            raise SongError(f"{field}: {stage}: give settings as temperature, top_k or top_p = value")
        checked[stage] = {}
        for name, value in values.items():
            if name not in SAMPLING_RANGES:
                raise SongError(f"{field}: {stage}: unknown setting {name!r}; known: {', '.join(SAMPLING_RANGES)}")
            kind, in_range, text = SAMPLING_RANGES[name]
            try:
                number = kind(float(value))
            except (TypeError, ValueError, OverflowError):
                raise SongError(f"{field}: {stage}.{name}: {value!r} is not a number") from None
            if number != float(value) or not in_range(number):
                raise SongError(f"{field}: {stage}.{name}: {value!r} is not {text}")
            checked[stage][name] = number
    return checked


def stage_sampling(settings: dict, base: Sampling, field: str) -> dict[str, Sampling]:
    """Per-stage sampling from ``{stage: {temperature | top_k | top_p: value}}`` over ``base`` (what a stage leaves
    out is ``base``'s), checked by ``checked_settings``."""
    return {stage: dataclasses.replace(base, **values) for stage, values in checked_settings(settings, field).items()}

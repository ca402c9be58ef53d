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
class SettingRange:
    """The values a number setting accepts: its type and bounds, written once for every reader (the command
    line's and HTTP's checks, the pydantic schema's bounds, the messages)."""

    kind: type            # int: a whole number
    low: float
    high: float
    low_open: bool = False   # True: ``low`` itself is refused
    text: str = ""           # the range in words, for messages
    help: str = ""           # what the setting's special values mean, for help texts and the API schema

    def contains(self, value) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def schema_bounds(self) -> dict:
        """The bounds as pydantic ``Field`` arguments (``gt``/``ge``, ``le``)."""
        return {"gt" if self.low_open else "ge": self.kind(self.low), "le": self.kind(self.high)}

    def checked(self, value, field: str):
        """``value`` (a number, or text as from a command line) typed and in range; ``SongError`` naming ``field``
        otherwise."""
        try:
            number = self.kind(float(value))
        except (TypeError, ValueError, OverflowError):
            raise SongError(f"{field}: {value!r} is not a number") from None
        if number != float(value) or not self.contains(number):
            raise SongError(f"{field}: {value!r} is not {self.text}")
        return number


# Each sampling setting's range (also the HTTP schema's bounds, generated from it).
SAMPLING_RANGES: dict[str, SettingRange] = {
    "temperature": SettingRange(float, 0.0, 10.0, text="0..10 (0 = greedy)", help="0 = greedy"),
    "top_k": SettingRange(int, 0, 100000, text="a whole number 0..100000 (0 = no cut)", help="0 = no top-k cut"),
    "top_p": SettingRange(float, 0.0, 1.0, low_open=True, text="above 0, at most 1 (1 = no cut)",
                          help="1 = no nucleus cut")}


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the (masked) distribution. Checked when made: a value out of
    ``SAMPLING_RANGES`` raises ``SongError`` naming the setting."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0            # 0 means no top-k cut
    top_p: float = 1.0        # 1 means no nucleus cut

    def __post_init__(self):
        for name, setting in SAMPLING_RANGES.items():
            object.__setattr__(self, name, setting.checked(getattr(self, name), name))

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
            checked[stage][name] = SAMPLING_RANGES[name].checked(value, f"{field}: {stage}.{name}")
    return checked


def stage_sampling(settings: dict, base: Sampling, field: str) -> dict[str, Sampling]:
    """Per-stage sampling from ``{stage: {temperature | top_k | top_p: value}}`` over ``base`` (what a stage leaves
    out is ``base``'s), checked by ``checked_settings``."""
    return {stage: dataclasses.replace(base, **values) for stage, values in checked_settings(settings, field).items()}

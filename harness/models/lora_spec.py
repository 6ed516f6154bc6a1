"""``BASE::LORA@SCALE``: a base model with LoRA weights fused at a scale, as one checkpoint name.

Every command that takes a checkpoint takes this (``harness generate --model``, grid checkpoint axes and
``--model``, ``harness eval --base/--candidate``, ``harness info``), so a LoRA is evaluated, swept and
compared like any fine-tune. ``@SCALE`` is optional (1). An ``@`` inside the LoRA path is kept: only a
trailing ``@NUMBER`` is a scale.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from harness.errors import ConfigError

SEP = "::"
_SCALE = re.compile(r"^(?P<lora>.+)@(?P<scale>[^/\\]*)$")


@dataclass(frozen=True)
class ModelSpec:
    base: str
    lora: str | None = None
    scale: float = 1.0

    def __str__(self) -> str:
        return self.base if self.lora is None else f"{self.base}{SEP}{self.lora}@{self.scale:g}"


def is_spec(text) -> bool:
    return isinstance(text, str) and SEP in text


def parse_spec(text) -> ModelSpec:
    """``"BASE"`` or ``"BASE::LORA[@SCALE]"`` -> :class:`ModelSpec` (a one-line error naming the bad part)."""
    text = str(text)
    if SEP not in text:
        return ModelSpec(text)
    base, _, rest = text.partition(SEP)
    scale = 1.0
    m = _SCALE.match(rest)
    if m:
        rest, raw = m["lora"], m["scale"].strip()
        try:
            scale = float(raw)
        except ValueError:
            raise ConfigError(f"{text}: LoRA scale {raw!r} is not a number; expected BASE{SEP}LORA@SCALE, "
                              "e.g. runwayml/stable-diffusion-v1-5::runs/lora/lora@0.8") from None
        if not math.isfinite(scale):
            raise ConfigError(f"{text}: LoRA scale {raw!r} is not finite")
    if not base.strip() or not rest.strip() or SEP in rest:
        raise ConfigError(f"{text}: expected BASE{SEP}LORA@SCALE with one '{SEP}' between a base model and a "
                          "LoRA file or folder, e.g. runwayml/stable-diffusion-v1-5::runs/lora/lora@0.8")
    return ModelSpec(base.strip(), rest.strip(), scale)

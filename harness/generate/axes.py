"""x/y/z axis specs: ``"cfg=1,4,7"``, ``"steps=10-30 (+10)"``, ``"seed=1-10 [4]"``, ``"prompt=[a cat, 'a dog, red']"``.

Value syntax (A1111's, plus YAML lists):
- ``4,7.5,12``: a comma list; every item may itself be a range;
- ``1-10 (+2)``: start-end inclusive with a step (``(-2)`` counts down); ``1-10``: step 1 (or -1);
- ``1-2 [5]``: start-end inclusive with a count of evenly spaced values;
- ``[a, "b, c"]``: a YAML flow list (for values containing commas);
- ``prompt_sr=cat,dog,bird``: search/replace: the first value is the text searched for in the prompt,
  each value replaces it (the first one leaves the prompt as it is).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

import yaml

from harness.errors import ConfigError
from harness.models.schedulers import canonical_scheduler

# axis -> (value kind, parameter it sets). Cheap-to-batch axes vs expensive switches: see grid.py.
AXES: dict[str, tuple[str, str]] = {
    "cfg": ("float", "guidance_scale"),
    "steps": ("int", "steps"),
    "scheduler": ("scheduler", "scheduler"),
    "checkpoint": ("str", "checkpoint"),
    "seed": ("int", "seed"),
    "prompt": ("str", "prompt"),
    "prompt_sr": ("str", "prompt"),
    "negative": ("str", "negative_prompt"),
    "lora_scale": ("float", "lora_scale"),
    "width": ("int", "width"),
    "height": ("int", "height"),
    "size": ("size", "size"),
}
AXIS_ALIASES = {
    "guidance": "cfg", "guidance_scale": "cfg", "cfg_scale": "cfg", "sampler": "scheduler", "model": "checkpoint",
    "ckpt": "checkpoint", "seeds": "seed", "sr": "prompt_sr", "negative_prompt": "negative", "lora": "lora_scale",
    "num_inference_steps": "steps",
}

_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_RANGE = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*({_NUM})\s*\)|\[\s*(\d+)\s*\])?\s*$")
_LIMIT = 10_000  # no axis needs more values; a typo like 1-100000 should fail fast, not allocate


@dataclass(frozen=True)
class Axis:
    name: str  # canonical axis name
    values: tuple  # typed values
    labels: tuple[str, ...]  # what the grid prints for each value
    search: str | None = None  # prompt_sr: the searched text

    def __len__(self) -> int:
        return len(self.values)

    def apply(self, params: dict, index: int) -> dict:
        """``params`` with this axis set to its ``index``-th value."""
        kind, key = AXES[self.name]
        value = self.values[index]
        out = dict(params)
        if self.name == "prompt_sr":
            if self.search not in out["prompt"]:
                raise ConfigError(f"prompt_sr: {self.search!r} does not occur in the prompt {out['prompt']!r}")
            out["prompt"] = out["prompt"].replace(self.search, value)
        elif self.name == "size":
            out["width"], out["height"] = value
        else:
            out[key] = value
        return out


def axis_names() -> list[str]:
    return list(AXES)


def canonical_axis(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = AXIS_ALIASES.get(key, key)
    if key not in AXES:
        close = difflib.get_close_matches(key, [*AXES, *AXIS_ALIASES], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"axis {name!r} does not exist{hint}; valid axes: {', '.join(AXES)}")
    return key


def _number(text: str, kind: str, where: str):
    try:
        value = int(text) if kind == "int" else float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    if kind == "float" and not math.isfinite(value):
        raise ConfigError(f"{where}: {text!r} is not a finite number")
    return value


def expand_range(item: str, kind: str, where: str) -> list:
    """One comma item: a number or a range, as typed values."""
    m = _RANGE.match(item)
    if not m:
        return [_number(item.strip(), kind, where)]
    a, b = _number(m[1], kind, where), _number(m[2], kind, where)
    if m[4] is not None:  # [count]
        count = int(m[4])
        if count == 0 or count > _LIMIT:
            raise ConfigError(f"{where}: range {item.strip()!r} yields {count} values")
        if count == 1:
            return [a]
        if kind == "int" and max(abs(a), abs(b)) > 2**53:  # beyond exact float integers
            raise ConfigError(f"{where}: range {item.strip()!r}: values too large")
        vals = [a + (b - a) * i / (count - 1) for i in range(count)]
        return [round(v) for v in vals] if kind == "int" else [round(v, 6) for v in vals]
    step = _number(m[3], kind, where) if m[3] is not None else (1 if b >= a else -1)
    if step == 0:
        raise ConfigError(f"{where}: range {item.strip()!r} has step 0")
    try:  # exact for ints; huge ints would overflow a float division
        n = (b - a) // step + 1 if kind == "int" else int((b - a) / step + 1e-9) + 1
    except OverflowError:
        n = _LIMIT + 1
    if n <= 0:
        raise ConfigError(f"{where}: range {item.strip()!r} yields no values (step {step} does not lead from {a} to {b})")
    if n > _LIMIT:
        raise ConfigError(f"{where}: range {item.strip()!r} yields {n} values; at most {_LIMIT} per axis")
    vals = [a + i * step for i in range(n)]
    return vals if kind == "int" else [round(v, 6) for v in vals]


def _split_values(text: str, where: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: {text!r} is not a valid [a, b, ...] list ({e.problem})") from None
        if not isinstance(items, list):
            raise ConfigError(f"{where}: {text!r} is not a list")
        return ["" if v is None else str(v) for v in items]
    return [v.strip() for v in text.split(",")]


def _check(name: str, kind: str, value, where: str):
    if kind == "scheduler":
        return canonical_scheduler(value)
    if kind == "size":
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
        if not m:
            raise ConfigError(f"{where}: {value!r} is not a size like 512x768")
        w, h = int(m[1]), int(m[2])
        for v in (w, h):
            if v <= 0 or v % 8:
                raise ConfigError(f"{where}: {value!r}: width and height must be positive multiples of 8")
        return (w, h)
    if name in ("width", "height") and (value <= 0 or value % 8):
        raise ConfigError(f"{where}: {value} must be a positive multiple of 8")
    if name == "steps" and not 1 <= value <= 1000:
        raise ConfigError(f"{where}: {value} must be between 1 and 1000")
    if name == "cfg" and value < 0:
        raise ConfigError(f"{where}: {value} must be >= 0")
    if name == "seed" and not 0 <= value < 2**63:
        raise ConfigError(f"{where}: {value} must be in [0, 2^63)")
    if kind == "str" and name not in ("negative", "prompt_sr", "prompt") and not value:
        raise ConfigError(f"{where}: empty value")
    return value


def _label(name: str, value) -> str:
    if name == "size":
        return f"{value[0]}x{value[1]}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_axis(spec: str) -> Axis:
    """Parse ``"name=values"``."""
    if "=" not in str(spec):
        raise ConfigError(f"axis {spec!r}: expected NAME=VALUES, e.g. 'cfg=1,4,7'; valid axes: {', '.join(AXES)}")
    raw_name, text = str(spec).split("=", 1)
    name = canonical_axis(raw_name)
    kind, _ = AXES[name]
    where = f"axis {name}"
    items = _split_values(text, where)
    if not text.strip() or not items or items == [""]:
        raise ConfigError(f"{where}: no values given after '='")
    values: list = []
    for item in items:
        if kind in ("int", "float"):
            if not item:
                raise ConfigError(f"{where}: empty item in {text.strip()!r}")
            values.extend(expand_range(item, kind, where))
        else:
            values.append(item)
    values = [_check(name, kind, v, where) for v in values]
    if len(values) > _LIMIT:
        raise ConfigError(f"{where}: {len(values)} values; at most {_LIMIT} per axis")
    search = None
    if name == "prompt_sr":
        search = values[0]
        if not search:
            raise ConfigError(f"{where}: the first value (the text to search for) is empty")
    return Axis(name=name, values=tuple(values), labels=tuple(_label(name, v) for v in values), search=search)


def check_axes(axes: list[Axis]) -> None:
    """Two axes must not set the same parameter (the later would silently win)."""
    seen: dict[str, str] = {}
    for a in axes:
        keys = ("width", "height") if a.name == "size" else (AXES[a.name][1],)
        if a.name == "prompt_sr":
            keys = ("prompt_sr",)
        for key in keys:
            if key in seen:
                raise ConfigError(f"axes {seen[key]} and {a.name} both set {key}; use one of them")
            seen[key] = a.name

"""Ultralytics model YAMLs, checked before ultralytics reads them.

Building a model from a YAML is not just parsing: ultralytics ``eval()``s the ``activation:`` value
and looks each layer's module name up in its own module globals, which also hold functions such as
its checkpoint loader. A detector YAML a user received (a ``.yaml`` detector, or a detector folder's
``model-t.yaml``) could therefore run code. This module reads the YAML with ``yaml.safe_load`` and
allows only what a model description needs: an activation of the form ``nn.<Class>(<literals>)``
from a short list, and layers whose module resolves to a ``torch.nn.Module`` class. The harness also
turns on ultralytics' own restricted loading (``ULTRALYTICS_SAFE_LOAD=1``: no ``eval``, known layers
only, ``weights_only`` checkpoints) before it first imports ultralytics.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from harness.errors import UnsafeCheckpointError

# Activations a YOLO YAML uses in practice (ultralytics ships SiLU, ReLU, LeakyReLU, Hardswish, ...).
SAFE_ACTIVATIONS = frozenset({"SiLU", "ReLU", "ReLU6", "LeakyReLU", "GELU", "Hardswish", "Hardsigmoid", "Mish",
                              "Identity", "Sigmoid", "Tanh", "ELU", "PReLU"})
_ACTIVATION = re.compile(r"^\s*(?:torch\.)?nn\.([A-Za-z0-9_]+)\((.*)\)\s*$")
MAX_YAML_BYTES = 1 << 20  # a model description is a few KB


def ultralytics_env() -> None:
    """Offline and restricted ultralytics, set before its first import (it reads both at import)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("ULTRALYTICS_SAFE_LOAD", "1")


def _refuse(path: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{path}: {what}; the harness builds detectors only from plain model "
                                 "descriptions (see harness/models/yolo_config.py)")


def check_activation(path: Path, act) -> None:
    if act is None:
        return
    m = _ACTIVATION.match(act) if isinstance(act, str) else None
    if not m or m.group(1) not in SAFE_ACTIVATIONS:
        raise _refuse(path, f"activation {str(act)[:80]!r} is not one of nn.{{{', '.join(sorted(SAFE_ACTIVATIONS))}}}(...)")
    try:
        call = ast.parse(f"f({m.group(2)})", mode="eval").body
        for a in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(a)
    except (SyntaxError, ValueError) as e:
        raise _refuse(path, f"activation {act[:80]!r} has arguments that are not plain numbers") from e


def resolve_module(name: str):
    """The class ultralytics would build for a layer named ``name`` (its own resolution rule)."""
    import torch
    import torchvision

    ultralytics_env()
    from ultralytics.nn import tasks

    if name.startswith("nn."):
        return getattr(torch.nn, name[3:], None)
    if name.startswith("torchvision.ops."):
        return getattr(torchvision.ops, name[16:], None)
    return vars(tasks).get(name)


def check_layers(path: Path, cfg: dict) -> None:
    import torch

    for part in ("backbone", "head"):
        layers = cfg.get(part)
        if not isinstance(layers, list):
            raise _refuse(path, f"'{part}' must be a list of [from, repeats, module, args] layers")
        for i, layer in enumerate(layers):
            if not (isinstance(layer, list) and len(layer) == 4 and isinstance(layer[2], str)
                    and isinstance(layer[3], list)):
                raise _refuse(path, f"{part}[{i}] = {str(layer)[:80]}: expected [from, repeats, module, args]")
            cls = resolve_module(layer[2])
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
                raise _refuse(path, f"{part}[{i}] module {layer[2][:80]!r} is not a torch.nn.Module layer")


def check_yolo_yaml(path: str | Path) -> dict:
    """The parsed YAML if it is a plain model description; a one-line error naming the file otherwise."""
    import yaml

    path = Path(path)
    if path.stat().st_size > MAX_YAML_BYTES:
        raise _refuse(path, f"{path.stat().st_size} bytes is not a model description (at most {MAX_YAML_BYTES})")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _refuse(path, f"not a YAML model description ({type(e).__name__})") from e
    if not isinstance(cfg, dict):
        raise _refuse(path, "not a YAML mapping")
    check_activation(path, cfg.get("activation"))
    check_layers(path, cfg)
    return cfg

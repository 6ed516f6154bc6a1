"""Reading checkpoint files without trusting them.

A ``.safetensors`` header is parsed and checked against the file's real size *before* any tensor is
allocated, so a header that claims a terabyte tensor (or a terabyte header) is refused instead of
exhausting memory. Pickled ``.ckpt``/``.pt`` files can run arbitrary code when unpickled: they are
refused unless the caller opts in, and even then only ``torch.load(weights_only=True)`` is used,
which refuses any pickled object that is not a tensor or a plain container.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import CheckpointError, UnsafeCheckpointError

log = logging.getLogger(__name__)

# The safetensors library refuses headers above 100 MB; an SD checkpoint's header is ~100 KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
}
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

PICKLE_RISK = ("a pickled checkpoint can run arbitrary code when it is loaded; prefer a .safetensors file, "
               "or pass allow_pickle=True (--allow-pickle) only for a file you trust")


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a validated header promises: tensor name -> (dtype, shape), plus ``__metadata__``."""

    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str] = field(default_factory=dict)
    data_bytes: int = 0

    def dtypes(self) -> dict[str, int]:
        """Number of tensors per dtype."""
        counts: dict[str, int] = {}
        for dtype, _shape in self.tensors.values():
            counts[dtype] = counts.get(dtype, 0) + 1
        return counts


def sniff(path: str | Path) -> str:
    """``"safetensors"``, ``"pickle"`` (torch zip or raw pickle) or ``"unknown"``, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":  # torch.save's zip container holds a pickle
        return "pickle"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5 opcode
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate a ``.safetensors`` header without reading any tensor data.

    Every tensor's byte range must match its dtype and shape and lie inside the file, so the
    allocations a later load makes are bounded by the file's real size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated or empty ({size} bytes); expected a .safetensors file "
                                      "starting with an 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header claims {n:,} bytes (limit {MAX_HEADER_BYTES:,}); "
                                      "not a valid .safetensors file, refusing to read it")
            if 8 + n > size:
                raise CheckpointError(f"{path}: truncated: header claims {n:,} bytes but the file has {size:,}; "
                                      "expected a complete .safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); expected a .safetensors file") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a {type(header).__name__}; expected a JSON object")
    data_bytes = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    tensors = {name: _check_entry(path, name, entry, data_bytes) for name, entry in header.items()}
    return SafetensorsHeader(path, tensors, dict(metadata), data_bytes)


def _check_entry(path: Path, name: str, entry, data_bytes: int) -> tuple[str, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    want = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8  # Python ints: a huge claim cannot overflow
    if offsets[1] - offsets[0] != want:
        raise CheckpointError(f"{path}: tensor {name!r} {dtype}{shape} needs {want:,} bytes but its offsets "
                              f"span {offsets[1] - offsets[0]:,}")
    if offsets[1] > data_bytes:
        raise CheckpointError(f"{path}: truncated or corrupt: tensor {name!r} claims bytes up to {offsets[1]:,} "
                              f"but the file holds {data_bytes:,} bytes of tensor data")
    return dtype, tuple(shape)


def load_safetensors(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Validated load: (state dict on the CPU, ``__metadata__``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu"), header.metadata
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read the tensors ({_first_line(e)})") from e


def load_pickled(path: str | Path, *, allow_pickle: bool = False) -> dict:
    """Load a ``.ckpt``/``.pt`` state dict, only when opted in and only through ``weights_only=True``."""
    import pickle

    import torch

    path = Path(path)
    if not allow_pickle:
        raise UnsafeCheckpointError(f"{path}: refused: {PICKLE_RISK}")
    log.warning("%s: loading a pickled checkpoint (allow_pickle=True) with torch.load(weights_only=True)", path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "WeightsUnpickler" in ln]
        why = (lines[0] if lines else _first_line(e)).split(" was not an allowed")[0][:160]
        raise UnsafeCheckpointError(
            f"{path}: torch.load(weights_only=True) refused it: it holds pickled objects other than tensors "
            f"({why}); the harness never unpickles arbitrary objects. Convert it to .safetensors "
            "in an environment you trust") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the pickled checkpoint, truncated or corrupt? "
                              f"({_first_line(e)[:160]})") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}; expected a dict of tensors (a state dict)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def check_weight_files(folder: str | Path, *, allow_pickle: bool = False) -> list[Path]:
    """Validate every ``.safetensors`` header under ``folder``; refuse pickled weights unless opted in.

    Returns the weight files found. A folder whose only weights are pickled is refused up front, so
    no library gets the chance to unpickle them."""
    folder = Path(folder)
    st = sorted(folder.rglob("*.safetensors"))
    for p in st:
        read_safetensors_header(p)
    pickled = sorted(p for s in PICKLE_SUFFIXES for p in folder.rglob(f"*{s}")
                     if p.name not in ("training_args.bin", "optimizer.bin", "scheduler.bin"))
    by_dir = {p.parent for p in st}
    unsafe = [p for p in pickled if p.parent not in by_dir]
    if unsafe and not allow_pickle:
        raise UnsafeCheckpointError(f"{unsafe[0]}: refused: {PICKLE_RISK}")
    return st + pickled


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]

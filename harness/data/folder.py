"""The dataset folder format (see data/README.md): scanning it into a list of items, and editing its
``metadata.jsonl`` without losing anything.

A dataset is a folder of images with captions either in ``.txt`` sidecars (``cat.jpg`` + ``cat.txt``)
or in ``metadata.jsonl`` rows (``{"file_name": "cat.jpg", "text": "...", ...}``), the layout Hugging
Face ``datasets``' imagefolder reads. A split comes from a ``split`` column, a top-level ``train/`` /
``val/`` folder, or (optionally) a hash of the file's path.

Scanning never stops at a bad file: each one lands in ``DatasetIndex.skipped`` with its path and a
reason, and nothing outside the dataset folder is ever opened (``../`` and absolute ``file_name``
values and symlinks that leave the folder are refused; folder symlinks are not followed, so loops
cannot hang the scan).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.images import DEFAULT_MAX_PIXELS, image_size, is_image_path, verify_image
from harness.data.split_rule import assign_split
from harness.errors import HarnessError
from harness.io import atomic_write_bytes

log = logging.getLogger(__name__)

METADATA_NAME = "metadata.jsonl"
# CLIP reads 77 tokens; a caption file of more than 64 KiB is a mistake or an attack, not a caption.
MAX_CAPTION_BYTES = 65_536
MAX_METADATA_LINE_BYTES = 1_048_576
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
_RESERVED = ("file_name", "split")


@dataclass
class Item:
    """One image of a dataset. ``size`` is (width, height) as displayed, after EXIF rotation."""

    path: Path
    caption: str | None
    split: str | None = None
    extra: dict = field(default_factory=dict)
    rel: str = ""
    size: tuple[int, int] | None = None
    caption_source: str | None = None  # "txt" | "metadata" | None
    metadata_file: Path | None = None


@dataclass
class DatasetIndex:
    root: Path
    items: list[Item]
    skipped: list[tuple[Path, str]]

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        return f"{self.root}: {len(self.items)} images, {len(self.skipped)} skipped"


@dataclass
class _Row:
    meta: Path
    lineno: int
    raw: bytes
    data: dict | None = None
    path: Path | None = None  # the image it names, when that is valid


def split_name(value) -> str | None:
    """Normalise a split label ('validation' -> 'val'); anything else is returned as given."""
    if value is None:
        return None
    return SPLIT_FOLDERS.get(str(value).lower(), str(value))


def _inside(path: Path, root_real: Path) -> str | None:
    """None when ``path`` (following symlinks) stays inside ``root_real``; else the reason it does not."""
    try:
        real = path.resolve(strict=True)
    except RuntimeError:
        return "symlink loop"
    except FileNotFoundError:
        return "broken symlink" if path.is_symlink() else "missing file"
    except OSError as e:
        return "symlink loop" if e.errno == 40 else f"cannot resolve ({e.strerror or e})"
    if not real.is_relative_to(root_real):
        return "refused: points outside the dataset folder"
    try:
        if not stat.S_ISREG(real.stat().st_mode):
            return "not a regular file"
    except OSError as e:
        return f"cannot stat ({e.strerror or e})"
    return None


def safe_join(base: Path, name, root: Path, root_real: Path) -> tuple[Path | None, str | None]:
    """Join a ``file_name`` from metadata onto its folder, refusing anything that escapes ``root``."""
    if not isinstance(name, str) or not name.strip():
        return None, "file_name missing or not a string"
    if "\x00" in name:
        return None, "refused: file_name contains a NUL byte"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return None, f"refused: absolute file_name {name!r} (must be relative to the dataset folder)"
    joined = Path(os.path.normpath(base / norm))
    if not joined.is_relative_to(root):
        return None, f"refused: file_name {name!r} points outside the dataset folder"
    reason = _inside(joined, root_real)
    if reason == "missing file":
        reason = f"file_name {name!r}: no such file"
    return (None, reason) if reason else (joined, None)


def read_caption_file(path: Path, *, max_bytes: int = MAX_CAPTION_BYTES) -> str:
    """A sidecar caption as one line of text; HarnessError if it is huge or not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise HarnessError(f"{path}: cannot read caption ({e.strerror or e})") from e
    if len(data) > max_bytes:
        raise HarnessError(f"{path}: caption file is larger than {max_bytes:,} bytes; refusing to read it")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise HarnessError(f"{path}: caption is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from e
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _utf8(name: str) -> bool:
    # os.walk gives undecodable bytes as lone surrogates, which cannot be written to JSON or a terminal.
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _walk(root: Path, skipped: list) -> tuple[list[Path], list[Path]]:
    """Image files and metadata files under ``root``; hidden entries ignored, folder symlinks not followed."""
    images, metas = [], []

    def onerror(e: OSError) -> None:
        skipped.append((Path(e.filename or root), f"cannot list folder ({e.strerror or e})"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=onerror):
        here = Path(dirpath)
        for d in list(dirnames):
            if d.startswith(".") or (here / d).is_symlink() or not _utf8(d):
                dirnames.remove(d)
                if not _utf8(d):
                    skipped.append((here / _printable(d), "folder name is not valid UTF-8"))
                elif not d.startswith("."):
                    skipped.append((here / d, "symlinked folder not followed"))
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if not _utf8(name):
                if is_image_path(name) or name.endswith(".txt"):
                    skipped.append((here / _printable(name), "file name is not valid UTF-8"))
                continue
            if name == METADATA_NAME:
                metas.append(here / name)
            elif is_image_path(name):
                images.append(here / name)
    return images, metas


def _read_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, raw bytes without newline, too_long) without ever holding a huge line in memory."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            line = f.readline(MAX_METADATA_LINE_BYTES + 1)
            if not line:
                return
            lineno += 1
            too_long = len(line) > MAX_METADATA_LINE_BYTES and not line.endswith(b"\n")
            while too_long:  # drain the rest of the monster line
                more = f.readline(MAX_METADATA_LINE_BYTES)
                if not more or more.endswith(b"\n"):
                    break
            yield lineno, line.rstrip(b"\r\n"), too_long


def parse_metadata(meta: Path, root: Path, root_real: Path, skipped: list, *, strict: bool = False) -> list[_Row]:
    """Every line of one metadata file (bad ones kept raw so a rewrite loses nothing). ``strict``:
    raise instead of returning a partial list when the file cannot be read to the end."""
    rows: list[_Row] = []
    reason = _inside(meta, root_real)
    if reason or meta.is_symlink():
        skipped.append((meta, reason or "refused: metadata.jsonl is a symlink"))
        return rows
    try:
        for lineno, raw, too_long in _read_lines(meta):
            row = _Row(meta, lineno, raw)
            rows.append(row)
            where = Path(f"{meta}:{lineno}")
            if too_long:
                skipped.append((where, f"line longer than {MAX_METADATA_LINE_BYTES:,} bytes"))
                continue
            if not raw.strip():
                continue
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.append((where, "line is not UTF-8"))
                continue
            except json.JSONDecodeError as e:
                skipped.append((where, f"not valid JSON ({e.msg})"))
                continue
            if not isinstance(data, dict):
                skipped.append((where, "line is not a JSON object"))
                continue
            row.data = data
            path, why = safe_join(meta.parent, data.get("file_name"), root, root_real)
            if path is None:
                skipped.append((where, why))
            elif not is_image_path(path):
                skipped.append((where, f"file_name {data['file_name']!r} is not an image file"))
            else:
                row.path = path
    except OSError as e:
        if strict:
            raise HarnessError(f"{meta}: cannot read ({e.strerror or e}); not rewriting it") from e
        skipped.append((meta, f"cannot read ({e.strerror or e})"))
    return rows


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _resolve_root(root) -> tuple[Path, Path]:
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise HarnessError(f"{root}: dataset folder not found (expected a folder of images)")
    return root, root.resolve()


def _caption_for(path: Path, row: dict | None, column: str, root_real: Path, max_caption_bytes: int):
    """(caption, source); raises HarnessError with the reason the image must be skipped."""
    if row is not None and row.get(column) is not None:
        text = row[column]
        if not isinstance(text, str):
            raise HarnessError(f"metadata '{column}' is {type(text).__name__}, expected a string")
        return " ".join(text.split()), "metadata"
    sidecar = path.with_suffix(".txt")
    if not os.path.lexists(sidecar):
        return None, None
    reason = _inside(sidecar, root_real)
    if not reason and sidecar.stat().st_nlink > 1:
        # a hard link looks like a file of the dataset but may be any file of the user's (a key, a history)
        reason = "refused: hard-linked (its text may belong to a file outside the dataset)"
    if reason:
        raise HarnessError(f"caption {sidecar.name}: {reason}")
    return read_caption_file(sidecar, max_bytes=max_caption_bytes), "txt"


def _split_for(rel: str, row: dict | None, val_fraction: float, seed: int) -> str | None:
    if row is not None and row.get("split") is not None:
        return split_name(row["split"])
    top = rel.split("/", 1)
    if len(top) == 2 and top[0].lower() in SPLIT_FOLDERS:
        return SPLIT_FOLDERS[top[0].lower()]
    if val_fraction > 0:
        return assign_split(rel, val_fraction, seed)
    return None


def scan_dataset(root, *, split: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 require_captions: bool = False, verify: bool = True, val_fraction: float = 0.0,
                 split_seed: int = 0, caption_column: str = "text",
                 max_caption_bytes: int = MAX_CAPTION_BYTES) -> DatasetIndex:
    """Index a dataset folder. ``split='train'`` also keeps images with no split (unassigned images
    train); ``verify`` decodes every image (catching truncation) instead of reading headers only;
    ``val_fraction`` assigns images with no explicit split by a hash of their path."""
    if split is not None and split not in ("train", "val", "test"):
        raise HarnessError(f"split: expected 'train', 'val', 'test' or None, got {split!r}")
    root, root_real = _resolve_root(root)
    skipped: list[tuple[Path, str]] = []
    images, metas = _walk(root, skipped)
    by_path: dict[Path, _Row] = {}
    for meta in metas:
        for row in parse_metadata(meta, root, root_real, skipped):
            if row.path is None:
                continue
            if row.path in by_path:
                log.warning("%s:%d: %s is listed again (first at %s:%d); using the later row", meta,
                            row.lineno, row.data["file_name"], by_path[row.path].meta, by_path[row.path].lineno)
            by_path[row.path] = row
    candidates = sorted(set(images) | set(by_path))
    items: list[Item] = []
    probe = verify_image if verify else image_size
    for path in candidates:
        row = by_path.get(path)
        reason = _inside(path, root_real)
        if reason:
            skipped.append((path, reason))
            continue
        rel = path.relative_to(root).as_posix()
        try:
            size = probe(path, max_pixels=max_pixels)
            caption, source = _caption_for(path, row.data if row else None, caption_column, root_real,
                                           max_caption_bytes)
        except HarnessError as e:
            skipped.append((path, _strip_path(str(e), path)))
            continue
        if require_captions and not caption:
            skipped.append((path, "no caption"))
            continue
        data = row.data if row else None
        item_split = _split_for(rel, data, val_fraction, split_seed)
        if split is not None and (item_split or "train") != split:
            continue
        extra = {k: v for k, v in (data or {}).items() if k not in _RESERVED and k != caption_column}
        items.append(Item(path=path, caption=caption, split=item_split, extra=extra, rel=rel, size=size,
                          caption_source=source, metadata_file=row.meta if row else None))
    for path, why in skipped:
        log.debug("skipped %s: %s", path, why)
    if skipped:
        log.warning("%s: skipped %d file(s) (run 'harness data stats' for the list)", root, len(skipped))
    return DatasetIndex(root=root, items=items, skipped=skipped)


def update_metadata(root, updates: dict[Path, dict], *, replace: bool = False,
                    dry_run: bool = False) -> dict[Path, int]:
    """Set fields of images' metadata rows; returns {metadata file: rows changed or added}.

    Each image's row is edited in the metadata.jsonl that lists it; images listed nowhere get a new
    row in ROOT/metadata.jsonl. Existing values are kept unless ``replace``; lines that are not valid
    JSON and all other columns are written back byte for byte; each file is replaced atomically.
    """
    root, root_real = _resolve_root(root)
    ignored: list = []
    _images, metas = _walk(root, ignored)
    root_meta = root / METADATA_NAME
    if root_meta not in metas and os.path.lexists(root_meta):
        metas.append(root_meta)
    pending = {Path(os.path.abspath(p)): dict(v) for p, v in updates.items()}
    changed: dict[Path, int] = {}
    contents: dict[Path, list[bytes]] = {}
    for meta in metas:
        if meta.is_symlink() or _inside(meta, root_real):
            if meta == root_meta and pending:
                raise HarnessError(f"{meta}: is a symlink or not a regular file; refusing to rewrite it")
            log.warning("%s: is a symlink or not a regular file; leaving it alone", meta)
            continue
        rows = parse_metadata(meta, root, root_real, ignored, strict=True)
        lines, n = [], 0
        for row in rows:
            fields = pending.pop(row.path, None) if row.path is not None else None
            if fields is None:
                lines.append(row.raw)
                continue
            new = dict(row.data)
            for k, v in fields.items():
                if replace or new.get(k) is None:
                    new[k] = v
            n += new != row.data
            lines.append(json.dumps(new, ensure_ascii=False).encode("utf-8") if new != row.data else row.raw)
        contents[meta], changed[meta] = lines, n
    if pending:
        lines = contents.setdefault(root_meta, [])
        for path, fields in sorted(pending.items()):
            rel = path.relative_to(root).as_posix()
            lines.append(json.dumps({"file_name": rel, **fields}, ensure_ascii=False).encode("utf-8"))
        changed[root_meta] = changed.get(root_meta, 0) + len(pending)
    changed = {m: n for m, n in changed.items() if n}
    if not dry_run:
        for meta in changed:
            atomic_write_bytes(meta, b"".join(line + b"\n" for line in contents[meta]))
    return changed

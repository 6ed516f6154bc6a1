"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Everything the harness writes that a later step relies on goes through here: write to a temporary
name in the same directory, flush and fsync, then ``os.replace`` (atomic on POSIX). An ``OSError``
(disk full, read-only folder) becomes a one-line :class:`HarnessError` naming the path, and the
previous file, if any, is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from harness.errors import HarnessError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, overwrite: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then rename it into place."""
    path = Path(path)
    if not overwrite and path.exists():
        raise HarnessError(f"{path}: already exists; refusing to overwrite it (pass overwrite to replace it)")
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; final files get the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise HarnessError(f"{path}: cannot write ({e.strerror or e}); the previous file, if any, is intact") from e
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), overwrite=overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n", overwrite=overwrite)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync it. A kill can at worst leave a partial last line,
    which :func:`read_jsonl` skips."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # never through a symlink (it could point anywhere) and never into a FIFO or device
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as e:
        why = "a symlink; refusing to write through it" if e.errno == 40 else (e.strerror or str(e))
        raise HarnessError(f"{path}: cannot append ({why})") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HarnessError(f"{path}: not a regular file; refusing to append to it")
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            fd = -1
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise HarnessError(f"{path}: cannot append ({e.strerror or e})") from e
    finally:
        if fd >= 0:
            os.close(fd)


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """A regular file's bytes, at most ``max_bytes``: a FIFO would block forever and ``/dev/zero``
    would fill memory, so anything else is a one-line error naming the file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise HarnessError(f"{path}: cannot read ({e.strerror or e})") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise HarnessError(f"{path}: not a regular file; refusing to read it")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HarnessError(f"{path}: larger than {max_bytes:,} bytes; refusing to read it")
    return data


MAX_JSONL_BYTES = 1 << 30


def read_jsonl(path: str | os.PathLike, max_bytes: int = MAX_JSONL_BYTES) -> list[dict]:
    """Read a JSON-lines file written by :func:`append_jsonl`, skipping a torn last line."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    lines = read_regular(path, max_bytes).decode("utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # torn write from a kill: lose only the item in flight
                break
            raise HarnessError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from e
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to ``path`` only when complete.

    A kill mid-write leaves a ``.tmp-*`` folder that no reader picks up; ``path`` itself is either
    absent, the previous complete version, or the new complete version.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise HarnessError(f"{path}: already exists; refusing to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    except OSError as e:
        raise HarnessError(f"{path.parent}: cannot create a folder there ({e.strerror or e})") from e
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with contextlib.suppress(OSError):
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
        if path.exists():
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)  # put the previous version back under its name
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"{path}: cannot write ({e.strerror or e}); the previous version, if any, is intact") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""One writer per run folder: a lock file naming the process that holds it.

Two ``harness eval`` or two training runs writing one folder would interleave images, checkpoints
and tables. The first takes ``FOLDER/.harness.lock`` (created with ``O_EXCL``, so exactly one
process wins) holding its pid, host and command; a second refuses with a one-line error naming the
folder and the holder. A lock left by a process that died (same host, pid gone) is taken over with a
warning: a SIGKILLed run must stay resumable. A lock from another host is never taken over, since
its process cannot be checked from here; the message says to remove the file if that run is over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from harness.errors import HarnessError

log = logging.getLogger(__name__)

LOCK_NAME = ".harness.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as f:  # a lock is a few hundred bytes; never read more
            info = json.loads(f.read(4096).decode("utf-8", "replace"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _create(path: Path, info: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        raise HarnessError(f"{path}: cannot create the run folder's lock ({e.strerror})") from None
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return True


def acquire(folder: str | os.PathLike, what: str) -> Path:
    """Take ``folder``'s lock for this process (``what``: e.g. "harness eval"), or raise naming the holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time(),
          "argv": [a[:200] for a in sys.argv[:20]]}
    for _ in range(3):  # a stale lock removed by two processes at once: one of them wins the retry
        if _create(path, me):
            return path
        other = _read(path)
        pid, host = other.get("pid"), other.get("host")
        if other and host == me["host"] and isinstance(pid, int) and pid == me["pid"]:
            return path  # this process already holds it (a resumed run in the same process)
        if other and host == me["host"] and isinstance(pid, int) and not _alive(pid):
            log.warning("%s: taking over the lock of %s (pid %d on %s), which is no longer running",
                        folder, other.get("what", "a run"), pid, host)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        holder = f"{other.get('what', 'another run')} (pid {pid} on {host})" if other else "another process"
        raise HarnessError(f"{folder}: in use by {holder}; wait for it to finish, use another folder, or remove "
                           f"{path} if that run is over")
    raise HarnessError(f"{folder}: could not take the lock {path}; another process keeps replacing it")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    info = _read(path)
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    path = acquire(folder, what)
    try:
        yield path
    finally:
        release(path)

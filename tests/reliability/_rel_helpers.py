"""Shared fault-injection tools for the reliability tests: a file-open recorder, folder snapshots, the
hostile corpus generator and a launcher that SIGKILLs a harness command at a chosen point."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
PASSWD_MARK = "root:x:0:0"  # a line of /etc/passwd; must never appear in anything the harness writes


def bad_corpus():
    """tests/data/make_bad_corpus.py as a module (tests/data is not a package)."""
    spec = importlib.util.spec_from_file_location("make_bad_corpus", TESTS / "data" / "make_bad_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- which files a piece of code opens ---------------------------------------------------------

_opened: list[str] | None = None


def _hook(event: str, args) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            _opened.append(os.path.realpath(os.fsdecode(args[0])))
        except (OSError, ValueError):
            pass


sys.addaudithook(_hook)  # audit hooks cannot be removed; it records only inside watch_opens()


@contextlib.contextmanager
def watch_opens():
    """Record the real path of every file Python opens inside the block (audit event 'open')."""
    global _opened
    seen: list[str] = []
    _opened = seen
    try:
        yield seen
    finally:
        _opened = None


def outside(opened: list[str], allowed: list[Path], watched: Path) -> list[str]:
    """Files under ``watched`` (or under /etc) that were opened although they lie in none of ``allowed``."""
    roots = [os.path.realpath(a) for a in allowed]
    bad = []
    for p in opened:
        if not (p.startswith(os.path.realpath(watched) + os.sep) or p.startswith("/etc/")):
            continue
        if not any(p == r or p.startswith(r + os.sep) for r in roots):
            bad.append(p)
    return bad


def snapshot(folder: Path, exclude: Path | None = None) -> dict[str, bytes]:
    """{relative path: content} of every regular file under ``folder`` (symlinks not followed)."""
    out = {}
    for root, _dirs, files in os.walk(folder, followlinks=False):
        if exclude is not None and Path(root).resolve().is_relative_to(exclude.resolve()):
            continue
        for name in files:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(folder))] = p.read_bytes()
    return out


# --- SIGKILL at a chosen point ------------------------------------------------------------------

def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", YOLO_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).parent)]))
    e.pop("WORLD_SIZE", None)
    return e


def run_killed(argv: list[str], point: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """``harness ARGV`` in a subprocess that SIGKILLs itself at ``point`` (see _killpoints.py)."""
    code = ("import sys, _killpoints; _killpoints.install(sys.argv[1]); from harness.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, point, *map(str, argv)], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def run_cli(argv: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *map(str, argv)], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)

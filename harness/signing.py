"""Signing what the harness writes, so it can tell its own files from files someone handed it.

Some resume state can only be read by unpickling (FSDP2's distributed-checkpoint ``.metadata``,
DeepSpeed's ``*_states.pt``): reading such a file runs any code it carries. A checkpoint's manifest
already lists the sha256 of every file; the harness also signs that list with an HMAC under a key
only this user holds (``~/.config/harness/signing.key``, created on first use with mode 0600, or
``$HARNESS_SIGNING_KEY_FILE``; nodes of one multi-node run must share it). A checkpoint the harness
wrote here verifies and resumes; a copied or edited one does not, and is unpickled only when the user
says they trust it (``checkpoint.allow_pickle=true``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from harness.errors import HarnessError

KEY_BYTES = 32


def key_path() -> Path:
    env = os.environ.get("HARNESS_SIGNING_KEY_FILE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "harness" / "signing.key"


def signing_key() -> bytes:
    """This user's key; created (0600, exclusively: two processes agree on one key) when missing."""
    path = key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            pass  # another process created it first: read theirs
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
    try:
        key = path.read_bytes()
    except OSError as e:
        raise HarnessError(f"{path}: cannot read the harness signing key ({e.strerror})") from None
    if len(key) < KEY_BYTES:
        raise HarnessError(f"{path}: the harness signing key is {len(key)} bytes; expected {KEY_BYTES} "
                           "(remove it to make a new one; checkpoints signed with the old key will then need "
                           "checkpoint.allow_pickle=true to resume under FSDP2/DeepSpeed)")
    return key


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sign(obj) -> str:
    """HMAC-SHA256 of a JSON-able object under this user's key."""
    return hmac.new(signing_key(), _canonical(obj), hashlib.sha256).hexdigest()


def verify(obj, signature) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(obj), signature)

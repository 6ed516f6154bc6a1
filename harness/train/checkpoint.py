"""Training checkpoints: atomic, verified, rotated, and resumable exactly.

A checkpoint is ``RUN/checkpoints/step-NNNNNNNN/`` holding accelerate's state (model, optimizer, RNG of
every rank; under DeepSpeed its engine's files), ``lr_scheduler.pt``, ``ema.safetensors`` (when EMA
is on; ``ema.rank-NNN.safetensors`` per process when parameters are sharded), ``trainer_state.json`` (step,
epoch, stage, data position, model fingerprint) and, written last, ``manifest.json`` with the sha256
of every file. The folder is built under a ``.tmp-*`` name and renamed only when complete, so a kill
never leaves a half-written folder under a name ``--resume latest`` would pick; a folder whose files
do not match its manifest is skipped with a warning in favour of the previous one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch

from harness import signing
from harness.errors import CheckpointError, HarnessError
from harness.io import atomic_dir, atomic_write_json
from harness.provenance import file_sha256
from harness.train.ema import local_shard

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


def shard_file(name: str, rank: int | None) -> str:
    """``ema.safetensors`` / ``best.safetensors`` of an unsharded run; ``ema.rank-001.safetensors`` for
    each process's shard when parameters are sharded (``rank`` given)."""
    stem, ext = name.split(".", 1)
    return name if rank is None else f"{stem}.rank-{rank:03d}.{ext}"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Published checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    d = Path(run_dir) / CHECKPOINTS
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def clean_stale(run_dir: str | Path) -> None:
    """Remove leftovers of writes a kill interrupted (``.tmp-*`` / ``.old-*`` folders)."""
    d = Path(run_dir) / CHECKPOINTS
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                log.warning("removing an unfinished checkpoint write %s", p)
                shutil.rmtree(p, ignore_errors=True)


def write_manifest(path: Path) -> None:
    files = {str(f.relative_to(path)): file_sha256(f) for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != MANIFEST}
    # signed with this user's key: a folder the harness wrote here can be unpickled on resume
    atomic_write_json(path / MANIFEST, {"files": files, "signature": signing.sign(files)})


# accelerate and torch read these with weights_only=True; anything else pickled is the engine's
_SAFE_PICKLES = {"lr_scheduler.pt", "scaler.pt", "optimizer.bin", "scheduler.bin", "sampler.bin"}


def unpickled_on_resume(path: Path, engine: str) -> list[str]:
    """Files an FSDP2 or DeepSpeed resume unpickles (distributed-checkpoint metadata, engine states)."""
    if engine not in ("FSDP", "DEEPSPEED"):
        return []
    return sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name not in _SAFE_PICKLES
                  and (f.name == ".metadata" or f.suffix in (".pt", ".pkl", ".bin")) and "random_states" not in f.name)


def check_unpickling(path: str | Path, engine: str, allow_pickle: bool) -> None:
    """Refuse to let the engine unpickle files of a checkpoint this user's harness did not sign."""
    path = Path(path)
    risky = unpickled_on_resume(path, engine)
    if not risky or allow_pickle:
        return
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    if signing.verify(manifest.get("files"), manifest.get("signature")):
        return
    shown = ", ".join(risky[:3]) + (f" and {len(risky) - 3} more" if len(risky) > 3 else "")
    raise CheckpointError(f"{path}: resuming under {engine} unpickles {shown} (a pickle can run code), and this "
                          "checkpoint was not signed by your harness (copied or edited); resume it only if you trust "
                          "it, with checkpoint.allow_pickle=true")


def verify_checkpoint(path: str | Path) -> str | None:
    """None when every file matches the manifest, else what is wrong (one line)."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable {MANIFEST} ({type(e).__name__})"
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if file_sha256(f) != digest:
            return f"{rel} does not match its checksum"
    if STATE not in files:
        return f"{STATE} is missing"
    return None


RUN_MARKER = ".harness-run"  # written into every run folder: what marks a folder as the harness's to write


def is_run_folder(path: Path) -> bool:
    """A folder a harness training run made (its marker, or the files an older run left)."""
    if (path / RUN_MARKER).is_file() or list_checkpoints(path):  # a run, or checkpoints copied in to resume
        return True
    return (path / "recipe.yaml").is_file() and (path / "provenance.json").is_file() and \
        any((path / x).exists() for x in (CHECKPOINTS, "final", "metrics.jsonl"))


def check_output_dir(run_dir: Path, resume: str | None, data_root: str | Path | None = None) -> None:
    """``output_dir`` is a new or empty folder, or an earlier harness run (continued with --resume):
    never the current folder of the user's files, their home, ``/``, or the dataset."""
    where = Path(run_dir).expanduser().resolve()
    shown = f"output_dir = {str(run_dir) or repr('')}"
    if str(run_dir) in ("", ".") or where in (Path("/").resolve(), Path.home().resolve()):
        raise HarnessError(f"{shown} is {where}: give the run its own new folder (e.g. runs/my-run)")
    if data_root is not None:
        data = Path(data_root).expanduser().resolve()
        if where == data or where.is_relative_to(data) or data.is_relative_to(where):
            raise HarnessError(f"{shown} ({where}) overlaps the dataset {data}: samples and checkpoints would "
                               "land among the images, or the dataset inside the run; use a folder outside it")
    # the run's own lock file (a killed start may leave it) does not make the folder someone else's
    if where.is_dir() and any(not p.name.startswith(".harness") for p in where.iterdir()) and not is_run_folder(where):
        raise HarnessError(f"{shown}: {where} is not empty and not a harness run folder; refusing to write "
                           "recipe.yaml, checkpoints and samples among its files (use a new folder)")
    if resume is None and (list_checkpoints(run_dir) or (run_dir / "final").exists()):
        raise HarnessError(f"{shown}: holds an earlier run's checkpoints or final/; pass "
                           f"--resume latest to continue it, or choose another output_dir")


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """``resume`` is ``latest`` (newest intact checkpoint, or None when there is none yet) or a path."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: not a checkpoint folder")
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"--resume {resume}: checkpoint is incomplete or corrupt: {problem}")
        return path
    candidates = list_checkpoints(run_dir)
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is incomplete or corrupt (%s); falling back to the previous one", path, problem)
    if candidates:
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINTS}: no intact checkpoint to resume from "
                              f"({len(candidates)} found, all corrupt)")
    log.info("--resume latest: no checkpoint in %s yet; starting from the beginning", run_dir)
    return None


def save_checkpoint(accelerator, run_dir: str | Path, state: dict, lr_scheduler, ema=None,
                    keep_last: int = 3, shard_rank: int | None = None) -> Path:
    """Called on every rank (each saves its RNG state, and with sharded parameters its EMA shard: ``shard_rank``);
    the main rank publishes the folder."""
    from accelerate.utils import broadcast_object_list

    path = Path(run_dir) / CHECKPOINTS / checkpoint_name(state["step"])
    with contextlib.ExitStack() as stack:
        tmp = [None]
        if accelerator.is_main_process:
            tmp[0] = str(stack.enter_context(atomic_dir(path, overwrite=True)))
        tmp = broadcast_object_list(tmp)[0]
        accelerator.save_state(tmp, safe_serialization=True)
        if ema is not None and (shard_rank is not None or accelerator.is_main_process):
            ema.save(Path(tmp) / shard_file(EMA_FILE, shard_rank))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            torch.save(lr_scheduler.state_dict(), Path(tmp) / "lr_scheduler.pt")
            atomic_write_json(Path(tmp) / STATE, state)
            write_manifest(Path(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", path)
    return path


def read_state(path: str | Path) -> dict:
    return json.loads((Path(path) / STATE).read_text())


def load_checkpoint(accelerator, path: str | Path, fingerprint: dict, ema=None, shard_rank: int | None = None,
                    allow_pickle: bool = False) -> dict:
    """Restore models, optimizer, RNG and EMA; refuse a checkpoint of another model, and one whose
    FSDP2/DeepSpeed state would be unpickled without this user's signature (:func:`check_unpickling`).
    The LR scheduler is restored by :func:`load_lr_scheduler` once the loop has built the checkpoint's stage."""
    path = Path(path)
    check_unpickling(path, str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)),
                     allow_pickle)
    state = read_state(path)
    theirs = state.get("fingerprint")
    if theirs != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(theirs or {}) if (theirs or {}).get(k) != fingerprint.get(k))
        raise CheckpointError(f"{path}: checkpoint was made for another model or training setup (differs in: "
                              f"{', '.join(diff)}); resume with the recipe that wrote it")
    accelerator.load_state(str(path))
    if ema is not None:
        ema.load(path / shard_file(EMA_FILE, shard_rank))
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


def load_lr_scheduler(path: str | Path, lr_scheduler) -> None:
    lr_scheduler.load_state_dict(torch.load(Path(path) / "lr_scheduler.pt", weights_only=True))
    # Loading a scheduler's state does not touch the optimizer, whose lr the fresh scheduler just reset.
    for group, lr in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.get_last_lr()):
        group["lr"] = lr


# ---------------------------------------------------------------- the best validation's weights

BEST = "best.safetensors"


def save_best(run_dir: str | Path, step: int, named_params, ema=None, shard_rank: int | None = None) -> Path:
    """The trainable weights (and EMA shadow) of the best validation so far, written atomically as
    ``RUN/best.safetensors`` (one file per process's shards when parameters are sharded) so early stopping can export
    them instead of the weights at the stop."""
    from safetensors.torch import save

    from harness.io import atomic_write_bytes

    tensors = {f"w.{n}": local_shard(p).float().cpu().contiguous() for n, p in named_params if p.requires_grad}
    if ema is not None:
        tensors.update({f"ema.{n}": t.cpu().contiguous() for n, t in ema.shadow.items()})
    return atomic_write_bytes(Path(run_dir) / shard_file(BEST, shard_rank), save(tensors, metadata={"step": str(step)}))


def best_step(run_dir: str | Path, shard_rank: int | None = None) -> int | None:
    from safetensors import safe_open

    path = Path(run_dir) / shard_file(BEST, shard_rank)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return int((f.metadata() or {}).get("step", -1))


@torch.no_grad()
def load_best(run_dir: str | Path, named_params, ema=None, shard_rank: int | None = None) -> int:
    """Copy ``RUN/best.safetensors`` back into the model (and EMA); returns its step."""
    from safetensors import safe_open

    path = Path(run_dir) / shard_file(BEST, shard_rank)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for n, p in named_params:
            if f"w.{n}" in keys:
                local_shard(p).copy_(f.get_tensor(f"w.{n}").to(p.dtype))
        if ema is not None:
            for n in ema.shadow:
                ema.shadow[n] = f.get_tensor(f"ema.{n}").float()
        return int((f.metadata() or {}).get("step", -1))

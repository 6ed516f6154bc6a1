"""Load paths a user may point at a file someone else wrote: nothing in the file runs as code.

Each test builds its hostile input here (a pickle or YAML whose loading would write a marker file),
hands it to the path the harness uses, and checks that the marker never appears and that the error
is one line naming the file. See SECURITY.md for the inventory of load paths."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from harness.errors import UnsafeCheckpointError
from harness.metrics.detector import YoloDetector
from harness.models.tiny import load_yolo_dir


class _WritesMarker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_activation(marker) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch() or nn.SiLU()"


@pytest.fixture
def yolo_yaml(zoo_dir):
    return (zoo_dir / "yolo" / "model-t.yaml").read_text()


@pytest.mark.parametrize("how", ["yaml", "folder"])
def test_detector_yaml_activation_is_not_evaluated(zoo_dir, yolo_yaml, tmp_path, how):
    marker = tmp_path / "PWNED"
    evil = f"activation: {_evil_activation(marker)!r}\n" + yolo_yaml
    if how == "yaml":
        target = tmp_path / "detector.yaml"
        target.write_text(evil)
        with pytest.raises(UnsafeCheckpointError, match=r"detector.yaml: activation .* is not one of nn\.") as e:
            YoloDetector(target)
    else:
        target = tmp_path / "det"
        shutil.copytree(zoo_dir / "yolo", target)
        (target / "model-t.yaml").write_text(evil)
        with pytest.raises(UnsafeCheckpointError, match=r"model-t.yaml: activation") as e:
            YoloDetector(target)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_detector_yaml_layer_naming_a_loader_is_refused(zoo_dir, yolo_yaml, tmp_path):
    """A layer's module name is looked up in ultralytics' globals, which hold its checkpoint loader:
    `torch_safe_load` with a path would unpickle that file."""
    marker = tmp_path / "PWNED"
    pt = tmp_path / "evil.pt"
    pt.write_bytes(pickle.dumps({"x": _WritesMarker(marker)}))
    target = tmp_path / "det"
    shutil.copytree(zoo_dir / "yolo", target)
    (target / "model-t.yaml").write_text(yolo_yaml.replace("backbone:\n", f"backbone:\n  - [-1, 1, torch_safe_load, [{str(pt)!r}]]\n", 1))
    with pytest.raises(UnsafeCheckpointError, match=r"backbone\[0\] module 'torch_safe_load' is not a torch.nn.Module"):
        load_yolo_dir(target)
    assert not marker.exists()


def test_plain_detector_yaml_and_activation_still_build(zoo_dir, yolo_yaml, tmp_path):
    target = tmp_path / "ok.yaml"
    target.write_text("activation: nn.LeakyReLU(0.1)\n" + yolo_yaml)
    det = YoloDetector(target, imgsz=64)
    assert det.identity == "yolo:ok.yaml:random" and len(det([Image.new("RGB", (64, 64))])) == 1
    assert YoloDetector(zoo_dir / "yolo", imgsz=64).names


class _EngineThatUnpickles:
    """Stands in for accelerate under FSDP2/DeepSpeed: its load_state unpickles the engine's files,
    as torch.distributed.checkpoint does with .metadata and DeepSpeed with *_states.pt."""

    def __init__(self, kind):
        self.distributed_type = kind

    def load_state(self, path):
        for f in sorted(Path(path).rglob("*")):
            if f.name == ".metadata" or f.name.endswith("_states.pt"):
                pickle.loads(f.read_bytes())


def _checkpoint(tmp_path, name, marker, *, signed):
    from harness.train import checkpoint as ckpt

    path = tmp_path / "checkpoints" / "step-00000002"
    (path / Path(name).parent).mkdir(parents=True)
    (path / name).write_bytes(pickle.dumps(_WritesMarker(marker)))
    (path / ckpt.STATE).write_text(json.dumps({"step": 2, "fingerprint": {"f": 1}}))
    ckpt.write_manifest(path)  # the harness's own manifest: files' sha256, signed with this user's key
    if not signed:  # copied from a colleague, or edited: a manifest this user's key did not sign
        m = json.loads((path / ckpt.MANIFEST).read_text())
        m["signature"] = "0" * 64
        (path / ckpt.MANIFEST).write_text(json.dumps(m))
    return path


@pytest.mark.parametrize("kind, name", [("FSDP", "pytorch_model_fsdp_0/.metadata"),
                                        ("DEEPSPEED", "pytorch_model/mp_rank_00_model_states.pt")])
def test_resume_of_an_unsigned_sharded_checkpoint_is_refused(tmp_path, monkeypatch, kind, name):
    from harness.errors import CheckpointError
    from harness.train.checkpoint import load_checkpoint

    monkeypatch.setenv("HARNESS_SIGNING_KEY_FILE", str(tmp_path / "key"))
    marker = tmp_path / "PWNED"
    path = _checkpoint(tmp_path, name, marker, signed=False)
    with pytest.raises(CheckpointError, match=rf"resuming under {kind} unpickles {re.escape(name)}.*"
                                              r"checkpoint.allow_pickle=true") as e:
        load_checkpoint(_EngineThatUnpickles(kind), path, {"f": 1})
    assert "\n" not in str(e.value) and not marker.exists()
    # the user vouches for the folder: the engine loads it (here: runs the payload, as a real pickle would)
    load_checkpoint(_EngineThatUnpickles(kind), path, {"f": 1}, allow_pickle=True)
    assert marker.exists()


def test_resume_of_a_checkpoint_this_harness_signed_is_allowed(tmp_path, monkeypatch):
    from harness.train.checkpoint import load_checkpoint

    monkeypatch.setenv("HARNESS_SIGNING_KEY_FILE", str(tmp_path / "key"))
    path = _checkpoint(tmp_path, "pytorch_model_fsdp_0/.metadata", tmp_path / "ours", signed=True)
    load_checkpoint(_EngineThatUnpickles("FSDP"), path, {"f": 1})  # our own folder resumes as before
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("HARNESS_SIGNING_KEY_FILE", str(tmp_path / "another-users-key"))
    from harness.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not signed by your harness"):
        load_checkpoint(_EngineThatUnpickles("FSDP"), path, {"f": 1})


def test_allow_pickle_detector_pt_is_still_read_weights_only(tmp_path):
    """--allow-pickle lets a .pt detector load, but only through a weights_only read: a pickle that
    builds anything but tensors and ultralytics' own layers is refused, its code never run."""
    marker = tmp_path / "PWNED"
    pt = tmp_path / "evil.pt"
    pt.write_bytes(pickle.dumps({"model": _WritesMarker(marker)}))
    with pytest.raises(UnsafeCheckpointError, match="evil.pt: ultralytics .pt files are pickles"):
        YoloDetector(pt)
    with pytest.raises(Exception, match="evil.pt: cannot load the detector") as e:
        YoloDetector(pt, allow_pickle=True)
    assert "\n" not in str(e.value) and not marker.exists()


@pytest.mark.parametrize("as_folder", [False, True])
def test_pickled_lora_is_refused_without_allow_pickle(tiny_sd_dir, tmp_path, as_folder):
    from harness.models.load import attach_lora, load_pipeline

    marker = tmp_path / "PWNED"
    folder = tmp_path / "lora"
    folder.mkdir()
    f = folder / "pytorch_lora_weights.bin"
    f.write_bytes(pickle.dumps({"unet.x.lora.down.weight": _WritesMarker(marker)}))
    pipe = load_pipeline(str(tiny_sd_dir))
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_lora_weights.bin: refused: a pickled checkpoint"):
        attach_lora(pipe, str(folder if as_folder else f))
    assert not marker.exists()

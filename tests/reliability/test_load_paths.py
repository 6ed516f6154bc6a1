"""Load paths a user may point at a file someone else wrote: nothing in the file runs as code.

Each test builds its hostile input here (a pickle or YAML whose loading would write a marker file),
hands it to the path the harness uses, and checks that the marker never appears and that the error
is one line naming the file. See SECURITY.md for the inventory of load paths."""

from __future__ import annotations

import pickle
import shutil

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

"""Detectors for the cluster-KL metric: boxes, crops and per-box features.

A detector is any callable ``list[PIL.Image] -> list[(boxes_xyxy, classes, scores)]``;
:class:`YoloDetector` wraps ultralytics (a zoo folder of config + safetensors, a ``.yaml`` for random
weights, or a pickled ``.pt`` only with ``allow_pickle``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.errors import HarnessError, UnsafeCheckpointError

log = logging.getLogger(__name__)


def as_detections(d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes, classes, scores = d
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes, np.asarray(classes, dtype=np.int64).reshape(-1), np.asarray(scores, dtype=np.float64).reshape(-1)


class YoloDetector:
    """An ultralytics detector as ``images -> [(boxes, classes, scores)]``.

    ``model``: a ``YOLO`` object, a zoo folder (``model-t.yaml`` + ``model.safetensors``), a ``.yaml``
    (random weights), or a ``.pt`` file (a pickle: needs ``allow_pickle=True``).
    """

    def __init__(self, model, *, conf: float = 0.25, imgsz: int = 640, allow_pickle: bool = False,
                 device: str = "cpu"):
        from harness.models.yolo_config import ultralytics_env

        ultralytics_env()
        self.conf, self.imgsz, self.device = conf, imgsz, device
        self.model, self.identity = self._load(model, allow_pickle)
        self.names = dict(getattr(self.model, "names", {}) or {})

    @staticmethod
    def _load(model, allow_pickle):
        if not isinstance(model, (str, Path)):
            return model, f"yolo:{type(model).__name__}"
        from harness.models.tiny import load_yolo_dir

        p = Path(model)
        if p.is_dir():
            if not (p / "model-t.yaml").is_file():
                raise HarnessError(f"{p}: not a detector folder (expected model-t.yaml + model.safetensors)")
            return load_yolo_dir(p), f"yolo:{p.resolve()}"
        if p.suffix in (".yaml", ".yml"):
            from ultralytics import YOLO

            from harness.models.yolo_config import check_yolo_yaml

            check_yolo_yaml(p)  # ultralytics eval()s parts of a model YAML
            return YOLO(str(p), task="detect"), f"yolo:{p.name}:random"
        if not allow_pickle:
            raise UnsafeCheckpointError(f"{model}: ultralytics .pt files are pickles that can run code; "
                                        "pass allow_pickle=True (--allow-pickle) if you trust it")
        from ultralytics import YOLO
        from ultralytics.nn.tasks import torch_safe_load

        try:
            # Read once with weights_only=True and ultralytics' allow-list of its own classes, whatever
            # ULTRALYTICS_SAFE_LOAD was when ultralytics was first imported: a file that passes holds
            # only tensors and known layers, so the full load that YOLO() then does builds nothing else.
            torch_safe_load(str(model), safe_only=True)
            return YOLO(str(model)), f"yolo:{model}"
        except Exception as e:
            raise HarnessError(f"{model}: cannot load the detector ({type(e).__name__}: {e})".split("\n")[0]) from e

    def __call__(self, images: list[Image.Image]):
        results = self.model.predict(images, conf=self.conf, imgsz=self.imgsz, device=self.device, verbose=False)
        out = []
        for r in results:
            b = r.boxes
            out.append((b.xyxy.cpu().numpy(), b.cls.cpu().numpy().astype(int), b.conf.cpu().numpy()))
        return out

    @torch.no_grad()
    def box_features(self, images: list[Image.Image], boxes: list[np.ndarray], batch_size: int = 16) -> list:
        """The detector's own per-box features: its neck's feature maps (what the Detect head reads,
        captured with a forward pre-hook) average-pooled inside each box with ``roi_align`` at every
        level, levels concatenated. Images are letterboxed to ``imgsz`` as predict does; ``boxes`` are
        xyxy in the original image's pixels. Returns one float32 [n_boxes, D] tensor per image."""
        from torchvision.ops import roi_align
        from ultralytics.nn.modules.head import Detect

        net = self.model.model if hasattr(self.model, "predict") else self.model
        head = next((m for m in net.modules() if isinstance(m, Detect)), None)
        if head is None:
            raise HarnessError(f"{self.identity}: no Detect head found; detector features need a YOLO detector")
        param = next(net.parameters())
        captured: list = []
        hook = head.register_forward_pre_hook(lambda _m, args: captured.append([t.float() for t in args[0]]))
        out = []
        try:
            for i in range(0, len(images), batch_size):
                chunk = images[i:i + batch_size]
                x, places = zip(*(letterbox(im, self.imgsz) for im in chunk))
                captured.clear()
                net(torch.stack(x).to(param.device, param.dtype))
                rois = [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4)) * g + torch.tensor(
                    [px, py, px, py]) for b, (g, px, py) in zip(boxes[i:i + batch_size], places)]
                rois = [r.to(param.device) for r in rois]
                levels = [roi_align(f, rois, output_size=(2, 2), spatial_scale=1.0 / float(st), sampling_ratio=2,
                                    aligned=True).mean(dim=(2, 3)) for f, st in zip(captured[0], head.stride)]
                feats = torch.cat(levels, dim=1).cpu()
                out.extend(feats.split([len(r) for r in rois]))
        finally:
            hook.remove()
        return out


def letterbox(image: Image.Image, size: int, fill: int = 114) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Resize the long side to ``size`` (aspect kept) and centre on a ``size`` square of grey, as
    ultralytics' LetterBox does; returns the [3, size, size] float tensor in [0, 1] and (gain, pad_x, pad_y)."""
    w, h = image.size
    gain = size / max(w, h)
    nw, nh = max(1, round(w * gain)), max(1, round(h * gain))
    px, py = (size - nw) // 2, (size - nh) // 2
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(image.convert("RGB").resize((nw, nh), Image.BILINEAR), (px, py))
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255).permute(2, 0, 1)
    return x, (nw / w, float(px), float(py))


class DetectorFeatures:
    """``embedder="detector"``: per-box features from the detector itself (see
    :meth:`YoloDetector.box_features`) instead of embedding crops with a separate model."""

    def __init__(self, detector):
        if not hasattr(detector, "box_features"):
            raise HarnessError(f"cluster_kl: embedder='detector' needs a detector with box_features() (such as "
                               f"YoloDetector); got {type(detector).__name__}")
        self.detector = detector
        self.identity = f"detector-features:{getattr(detector, 'identity', type(detector).__name__)}"


def crop_boxes(img: np.ndarray, boxes: np.ndarray, min_size: int) -> list[np.ndarray]:
    """Crops (HxWx3 uint8) inside the image; boxes narrower than ``min_size`` px give None."""
    h, w = img.shape[:2]
    crops = []
    for x0, y0, x1, y1 in boxes:
        a, b = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c, d = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
        crops.append(img[b:d, a:c] if (c - a) >= min_size and (d - b) >= min_size else None)
    return crops

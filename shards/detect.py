"""Object detection for pseudo-labelling: an ultralytics YOLO model over decoded images, in batches.

The model is whatever ``YOLO(path)`` loads: a trained ``.pt`` checkpoint (``yolov8n.pt``, or the toy
detector that ``mie shards fit-detector`` will write), or a ``.yaml`` architecture, which builds an
untrained model (tests; with ``conf = 0`` it still gives boxes). Its weights are then seeded from
``seed``, so an untrained model is the same in every process.

ultralytics reads its settings when it is imported, so :func:`offline_env` sets ``YOLO_OFFLINE=1``
and a private ``YOLO_CONFIG_DIR`` first, and ultralytics is only imported through this module.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mie.launch.errors import UserError
from mie.shards.writer import sha256_file


class ModelFileError(UserError):
    """A model file named in a config is missing or unusable; the message names the config key."""


@dataclass
class DetectConfig:
    model: str = "yolov8n.pt"  # a YOLO .pt checkpoint file, or a .yaml architecture (untrained; tests)
    imgsz: int = 640  # images are letterboxed to imgsz × imgsz, whatever the batch holds
    conf: float = 0.25  # minimum box score
    iou: float = 0.7  # NMS IoU threshold
    top_k: int = 10  # boxes kept per image, best first (K of soft.npz)
    device: str = "cpu"  # "cpu", "cuda", "cuda:0", ...
    batch_size: int = 32  # images per forward pass
    seed: int = 0  # initialises an untrained (.yaml) model

    def validate(self) -> None:
        if not self.model.endswith((".pt", ".yaml", ".yml")):
            raise ValueError(f"model: expected a .pt checkpoint or a .yaml architecture, got {self.model!r}")
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError("imgsz: must be a multiple of 32, at least 32")
        if not 0.0 <= self.conf <= 1.0 or not 0.0 <= self.iou <= 1.0:
            raise ValueError("conf/iou: must be in [0, 1]")
        if self.top_k < 1 or self.batch_size < 1:
            raise ValueError("top_k/batch_size: must be >= 1")


@dataclass
class Detections:
    """The top-K boxes of one image, best first: ``[x1, y1, x2, y2]`` in pixels of that image."""

    boxes: list[list[float]]
    scores: list[float]
    classes: list[int]

    def to_json(self) -> dict:
        return {"boxes": self.boxes, "scores": self.scores, "classes": self.classes}


def offline_env() -> None:
    """Keep ultralytics off the network and out of the user's settings; call before importing it."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(Path(tempfile.gettempdir()) / f"mie-ultralytics-{os.getuid()}")


def model_fingerprint(cfg: DetectConfig) -> str:
    """What the detector's outputs depend on besides the config: the checkpoint's sha256, or for an
    architecture the yaml's (a file, or the name of one that ultralytics ships) and the seed.

    Raises ModelFileError naming ``detect.model`` when there is no such file."""
    if cfg.model.endswith(".pt"):
        if not Path(cfg.model).is_file():
            # YOLO() would try to download a missing .pt by its name: refuse before it is called.
            raise ModelFileError(f"detect.model: YOLO checkpoint {cfg.model} not found")
        return "sha256:" + sha256_file(Path(cfg.model))
    offline_env()
    import ultralytics
    from ultralytics.nn.tasks import yaml_model_load

    try:
        arch = yaml_model_load(cfg.model)  # the way YOLO() reads it: a file, or a name ultralytics ships
    except FileNotFoundError:
        raise ModelFileError(f"detect.model: YOLO architecture {cfg.model} not found (neither a file nor "
                             "one that ultralytics ships)") from None
    arch = {k: v for k, v in arch.items() if k != "yaml_file"}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()
    return f"ultralytics {ultralytics.__version__} {Path(cfg.model).name} sha256:{digest} seed {cfg.seed}"


class Detector:
    """A YOLO model with the config's thresholds; call it on a list of RGB PIL images."""

    def __init__(self, cfg: DetectConfig):
        offline_env()
        import torch
        from ultralytics import YOLO

        self.cfg = cfg
        self.fingerprint = model_fingerprint(cfg)  # checks the file first
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            try:
                self.model = YOLO(cfg.model, task="detect")
            except FileNotFoundError as e:
                raise ModelFileError(f"detect.model: {cfg.model}: {_first_line(e)}") from None
            except Exception as e:  # a corrupt or foreign checkpoint: say which key points at it
                raise ModelFileError(f"detect.model: cannot load {cfg.model}: {type(e).__name__}: "
                                     f"{_first_line(e)}") from None
        if self.model.task != "detect":
            raise ModelFileError(f"detect.model: {cfg.model} is a {self.model.task} model, not a detector")

    def __call__(self, images: list[Image.Image]) -> list[Detections]:
        """Top-K detections of each image, in order, ``batch_size`` images per forward pass."""
        import torch

        out: list[Detections] = []
        threads = torch.get_num_threads()
        for i in range(0, len(images), self.cfg.batch_size):
            batch = images[i:i + self.cfg.batch_size]
            # rect=False letterboxes every image to imgsz², so a box does not depend on which other
            # images share its batch.
            try:
                results = self.model.predict(batch, imgsz=self.cfg.imgsz, conf=self.cfg.conf, iou=self.cfg.iou,
                                             max_det=self.cfg.top_k, device=self.cfg.device, rect=False,
                                             batch=len(batch), verbose=False)
            finally:
                # On the CPU, ultralytics' device setup sets torch's thread count for the whole process;
                # other models must keep theirs (their float results depend on it).
                torch.set_num_threads(threads)
            for r in results:
                data = r.boxes.data.float().cpu().numpy()  # rows: x1, y1, x2, y2, score, class; best first
                out.append(Detections(
                    boxes=[[round(float(v), 2) for v in row[:4]] for row in data[:self.cfg.top_k]],
                    scores=[round(float(row[4]), 6) for row in data[:self.cfg.top_k]],
                    classes=[int(row[5]) for row in data[:self.cfg.top_k]],
                ))
        return out


def crop(image: Image.Image, box: list[float]) -> Image.Image:
    """The pixels of ``box`` (outward to whole pixels, clipped to the image, at least 1 × 1)."""
    w, h = image.size
    x1 = min(max(0, math.floor(box[0])), w - 1)
    y1 = min(max(0, math.floor(box[1])), h - 1)
    x2 = max(x1 + 1, min(w, math.ceil(box[2])))
    y2 = max(y1 + 1, min(h, math.ceil(box[3])))
    return image.crop((x1, y1, x2, y2))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

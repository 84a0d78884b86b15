"""Object detection for pseudo-labelling: an ultralytics YOLO model over decoded images, in batches.

The model is whatever ``YOLO(path)`` loads: a trained ``.pt`` checkpoint (``yolov8n.pt``, or the toy
detector that ``mie shards fit-detector`` will write), or a ``.yaml`` architecture, which builds an
untrained model (tests; with ``conf = 0`` it still gives boxes). Its weights are then seeded from
``seed``, so an untrained model is the same in every process.

Two backends give the same boxes (within float rounding):

``tensor`` (default)  mie's batched path: images are letterboxed to ``imgsz``² on the model's device as
                      tensors (one bilinear resize per group of same-sized images, then the padding),
                      the network is ultralytics' own ``AutoBackend`` (fused, eval, fp16 on CUDA) over
                      the whole batch, then ultralytics' ``non_max_suppression`` and ``scale_boxes`` run on
                      the device too, and only the top-K rows of each image come back to the host.
``predict``           ``YOLO.predict``: letterboxing with OpenCV one image at a time on the CPU, and a
                      ``Results`` object per image. It is the reference the tensor path is tested against.

Decoding JPEGs stays on the CPU, in a thread pool (:meth:`Detector.decode`); :meth:`Detector.detect_encoded`
overlaps it with the device work of the batch before.

ultralytics reads its settings when it is imported, so :func:`offline_env` sets ``YOLO_OFFLINE=1``
and a private ``YOLO_CONFIG_DIR`` first, and ultralytics is only imported through this module.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Union

import numpy as np
from PIL import Image

from mie.launch.errors import UserError
from mie.shards.images import ImageError
from mie.shards.writer import sha256_file

Picture = Union[Image.Image, np.ndarray]  # an RGB PIL image, or its (H, W, 3) uint8 array


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
    backend: Literal["tensor", "predict"] = "tensor"  # batched tensors on the device, or YOLO.predict
    half: bool = True  # fp16 network and inputs on CUDA (both backends); the CPU always computes in fp32
    decode_workers: int = 0  # threads decoding images; 0 = every core this process may use

    def validate(self) -> None:
        if not self.model.endswith((".pt", ".yaml", ".yml")):
            raise ValueError(f"model: expected a .pt checkpoint or a .yaml architecture, got {self.model!r}")
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError("imgsz: must be a multiple of 32, at least 32")
        if not 0.0 <= self.conf <= 1.0 or not 0.0 <= self.iou <= 1.0:
            raise ValueError("conf/iou: must be in [0, 1]")
        if self.top_k < 1 or self.batch_size < 1:
            raise ValueError("top_k/batch_size: must be >= 1")
        if self.decode_workers < 0:
            raise ValueError("decode_workers: must be >= 0")


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
    """A YOLO model with the config's thresholds: call it on decoded RGB images (PIL or arrays), or give
    :meth:`detect_encoded` the encoded bytes."""

    def __init__(self, cfg: DetectConfig):
        offline_env()
        import torch
        from ultralytics import YOLO

        self.cfg, self.torch = cfg, torch
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
        try:
            self.device = torch.device(cfg.device)
        except RuntimeError as e:
            raise UserError(f"detect.device: {_first_line(e)}") from None
        self.half = cfg.half and self.device.type == "cuda"
        workers = cfg.decode_workers or len(os.sched_getaffinity(0))
        self._decoders = ThreadPoolExecutor(workers, thread_name_prefix="mie-decode")
        if cfg.backend == "tensor":
            self._setup_tensor_path()

    def _setup_tensor_path(self) -> None:
        import torch
        import torchvision  # noqa: F401 -- ultralytics' NMS uses torchvision's kernel once it is imported
        from ultralytics.data.augment import LetterBox
        from ultralytics.nn.autobackend import AutoBackend
        from ultralytics.utils import nms, ops

        self._nms, self._ops = nms, ops
        # What YOLO.predict builds for itself (BasePredictor.setup_model): its own fused copy of the
        # network, in fp16 on CUDA when asked, with the NMS head (end2end=False) that predict defaults to.
        threads = torch.get_num_threads()
        self.network = AutoBackend(model=copy.deepcopy(self.model.model), device=self.device, fp16=self.half,
                                   fuse=True, verbose=False, end2end=False).eval()
        torch.set_num_threads(threads)
        self.dtype = torch.float16 if self.network.fp16 else torch.float32
        self._letterbox = LetterBox(self.cfg.imgsz, auto=False, stride=self.network.stride)
        self._prepare = ThreadPoolExecutor(1, thread_name_prefix="mie-detect-prep")

    def __call__(self, images: list[Picture]) -> list[Detections]:
        """Top-K detections of each image, in order, ``batch_size`` images per forward pass. The images
        are RGB PIL images or ``(H, W, 3)`` uint8 arrays."""
        bs = self.cfg.batch_size
        return [d for found in self._batches(images[i:i + bs] for i in range(0, len(images), bs)) for d in found]

    def decode(self, blobs: list[bytes], arrays: bool = False) -> list[Picture | ImageError]:
        """Each encoded image decoded to RGB, in order, on the decoding threads (as PIL images, or as
        ``(H, W, 3)`` uint8 arrays); an ImageError with the reason in place of one that cannot be decoded."""
        Image.init()  # register every PIL plugin once, not from several threads at the same time
        return list(self._decoders.map(_decode_or_error, blobs, [arrays] * len(blobs)))

    def detect_encoded(self, blobs: Iterable[bytes]) -> list[Detections | ImageError]:
        """Encoded images (JPEG bytes) in, top-K detections out, ``batch_size`` at a time: decoding runs on
        the decoding threads up to two batches ahead of the device. An undecodable image gives its
        ImageError in its place."""
        Image.init()
        as_array = self.cfg.backend == "tensor"  # the tensor path's input: converted on the decoding threads
        chunks = _chunks(blobs, self.cfg.batch_size)
        window: deque[list[Future]] = deque()
        decoded: list[list[Picture | ImageError]] = []

        def submit_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                window.append([self._decoders.submit(_decode_or_error, b, as_array) for b in chunk])

        def batches():
            while window:
                got = [f.result() for f in window.popleft()]
                submit_next()
                decoded.append(got)  # before the batch goes out, so it is there when its detections return
                yield [d for d in got if not isinstance(d, ImageError)]

        for _ in range(3):
            submit_next()
        out: list[Detections | ImageError] = []
        for k, found in enumerate(self._batches(batches())):
            found = iter(found)
            out.extend(d if isinstance(d, ImageError) else next(found) for d in decoded[k])
        return out

    def _batches(self, batches: Iterator[list[Picture]]) -> Iterator[list[Detections]]:
        """The detections of each batch, in order. On the tensor path, the next batch is taken and copied
        into host tensors on a thread while the device works on this one."""
        if self.cfg.backend == "predict":
            yield from map(self._predict, batches)
            return

        def prepare():
            batch = next(batches, None)
            return None if batch is None else self._host_batch(batch)

        ahead = self._prepare.submit(prepare)
        while (host := ahead.result()) is not None:
            ahead = self._prepare.submit(prepare)
            yield self._tensor_batch(host)

    def _predict(self, batch: list[Picture]) -> list[Detections]:
        import torch

        if not batch:  # predict refuses an empty source
            return []
        # ultralytics reads an array as OpenCV's BGR; hand it RGB PIL images, as the stage does.
        batch = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in batch]
        threads = torch.get_num_threads()
        # rect=False letterboxes every image to imgsz², so a box does not depend on which other
        # images share its batch.
        try:
            results = self.model.predict(batch, imgsz=self.cfg.imgsz, conf=self.cfg.conf, iou=self.cfg.iou,
                                         max_det=self.cfg.top_k, device=self.cfg.device, rect=False,
                                         batch=len(batch), verbose=False, **({"quantize": 16} if self.half else {}))
        finally:
            # On the CPU, ultralytics' device setup sets torch's thread count for the whole process;
            # other models must keep theirs (their float results depend on it).
            torch.set_num_threads(threads)
        # rows: x1, y1, x2, y2, score, class; best first
        return [_detections(r.boxes.data.float().cpu().numpy(), self.cfg.top_k) for r in results]

    def _host_batch(self, batch: list[Picture]) -> tuple[int, list[tuple[tuple[int, int], list[int], object]]]:
        """The batch as host tensors, one ``(n, H, W, 3)`` uint8 tensor per image size (pinned for CUDA):
        ``(batch length, [((H, W), positions in the batch, tensor), ...])``."""
        torch = self.torch
        groups: dict[tuple[int, int], list[int]] = {}
        arrays = [np.asarray(im) for im in batch]
        for i, a in enumerate(arrays):
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise ValueError(f"expected an RGB image, got an array of shape {a.shape} and type {a.dtype}")
            groups.setdefault(a.shape[:2], []).append(i)
        out = []
        for (h, w), idx in groups.items():
            # one copy, straight into page-locked memory when the device is a GPU (asynchronous upload)
            host = torch.empty((len(idx), h, w, 3), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            buf = host.numpy()
            for j, i in enumerate(idx):
                buf[j] = arrays[i]
            out.append(((h, w), idx, host))
        return len(batch), out

    def letterbox(self, images: list[Picture]):
        """The network input of a batch (tensor path): ``(N, 3, imgsz, imgsz)`` on the device, in the
        network's dtype, 0–1, and each image's ``(H, W)``."""
        return self._inputs(self._host_batch(images))

    def _inputs(self, host: tuple[int, list]):
        torch, S = self.torch, self.cfg.imgsz
        n, groups = host
        sizes: list[tuple[int, int]] = [(0, 0)] * n
        with torch.inference_mode():
            # ultralytics' LetterBox (grey 114 border, image centred, its own rounding of sizes and
            # padding), with the bilinear resize rounded to whole levels as OpenCV's uint8 resize does,
            # so the network sees what YOLO.predict shows it, within one grey level.
            x = torch.full((n, 3, S, S), 114, dtype=self.dtype, device=self.device)
            for (h, w), idx, t in groups:
                p = self._letterbox.get_params({"img": np.broadcast_to(np.uint8(0), (h, w, 3))})
                (nw, nh), top, left = p["new_unpad"], p["top"], p["left"]
                t = t.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
                if (nw, nh) != (w, h):
                    t = torch.nn.functional.interpolate(t.float(), size=(nh, nw), mode="bilinear",
                                                        align_corners=False).round_().clamp_(0, 255)
                t = t.to(self.dtype)
                for j, i in enumerate(idx):  # plain indexing: a list index would be copied to the device
                    x[i, :, top:top + nh, left:left + nw] = t[j]
                    sizes[i] = (h, w)
            return x.div_(255), sizes  # as predict: uint8 levels in the network's dtype, then / 255

    def _tensor_batch(self, host: tuple[int, list]) -> list[Detections]:
        """Letterbox, network, NMS and box scaling of one batch on the device; top-K rows to the host."""
        torch, S = self.torch, self.cfg.imgsz
        if not host[0]:
            return []
        x, sizes = self._inputs(host)
        with torch.inference_mode():
            preds = self.network(x)
            rows = self._nms.non_max_suppression(preds, self.cfg.conf, self.cfg.iou, max_det=self.cfg.top_k,
                                                 end2end=self.network.end2end)
            # Scaled in fp32 (predict scales fp16 rows in fp16, whose steps are half a pixel at 640).
            rows = [r[:self.cfg.top_k, :6].float() for r in rows]
            for r, size in zip(rows, sizes):
                self._ops.scale_boxes((S, S), r[:, :4], size)
            data = torch.cat(rows).cpu().numpy()  # one copy back for the whole batch
        counts = np.cumsum([0] + [len(r) for r in rows])
        return [_detections(data[a:b], self.cfg.top_k) for a, b in zip(counts[:-1], counts[1:])]


def _detections(rows: np.ndarray, top_k: int) -> Detections:
    """Rows ``x1, y1, x2, y2, score, class`` (best first) as Detections, rounded as det.json stores them."""
    return Detections(boxes=[[round(float(v), 2) for v in row[:4]] for row in rows[:top_k]],
                      scores=[round(float(row[4]), 6) for row in rows[:top_k]],
                      classes=[int(row[5]) for row in rows[:top_k]])


def decode_rgb(data: bytes) -> Image.Image:
    """An encoded image decoded to RGB with PIL's own opener; ImageError with the reason if it cannot be.

    Importing ultralytics replaces ``Image.open`` with a wrapper that, on a file PIL cannot identify,
    tries to install and import pi-heif instead of failing."""
    pil_open = getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", Image.open)
    try:
        with pil_open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, ImportError, Image.DecompressionBombError) as e:
        # PIL names the BytesIO object by its address: leave that out, reasons must be reproducible.
        raise ImageError(f"{type(e).__name__}: {re.sub(r' <[^>]* at 0x[0-9a-f]+>', '', str(e))}") from None


def _decode_or_error(data: bytes, as_array: bool = False) -> Picture | ImageError:
    try:
        im = decode_rgb(data)
    except ImageError as e:
        return e
    return np.asarray(im) if as_array else im


def _chunks(items: Iterable, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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

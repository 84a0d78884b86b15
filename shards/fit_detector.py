"""``mie shards fit-detector``: train the toy world's YOLO detector on its known boxes (ultralytics).

An untrained detector gives noise, so the toy world's pseudo-labels need a trained one. In order:

1. the digest of everything the fit depends on (this config, the world, the architecture, ultralytics'
   version): a finished fit of the same digest in ``output`` is kept as is; another one is refused
   unless ``force`` (:class:`mie.shards.toyfit.FitOutput`);
2. a YOLO dataset written from ``truth.json`` into ``<output>.work/dataset``: ``train_images`` +
   ``val_images`` images drawn (seeded) from the world's images under ``images`` prefixes, one label
   file per image (class, centre and size, normalised), and its ``data.yaml``; built in a temp dir and
   renamed, reused by a resumed run;
3. ultralytics' own training (``YOLO(model).train``) on the CPU or GPU, from scratch, into
   ``<output>.work/train``: it saves ``last.pt`` every epoch, so a killed run resumes from it
   (``train(resume=True)``), and validates the best weights on the val images at the end;
4. the best weights are copied to ``output`` atomically, then the sidecar ``<output>.json`` (config,
   digest, sha256, mAP50 and class names) marks it complete.

Classes are the world's shapes (which are the entity types) or one ``object`` class. Nothing is
downloaded: ``YOLO_OFFLINE=1`` and a private ``YOLO_CONFIG_DIR`` (:func:`mie.shards.detect.offline_env`),
``plots=False`` and ``amp=False``, and a local font file stands in for the Arial.ttf that ultralytics'
dataset check otherwise fetches (it is only used to draw plots).
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.launch.errors import UserError
from mie.launch.log import RunLogger
from mie.shards.detect import DetectConfig, ModelFileError, model_fingerprint, offline_env
from mie.shards.toyfit import FitOutput, ToyWorldError, load_truth, world_digest
from mie.shards.writer import replace_dir


@dataclass
class FitDetectorConfig:
    world: str = "runs/toy"  # a toy world (`mie shards toy`): truth.json and its images
    output: str = "runs/models/toy/yolo-toy.pt"  # the fitted checkpoint; <output>.json and <output>.work beside it
    model: str = "yolov8n.yaml"  # architecture trained from scratch (ultralytics ships yolov8n.yaml), or a .pt to fine-tune
    classes: Literal["shape", "object"] = "shape"  # one class per shape (= entity type), or one "object" class
    images: list[str] = field(default_factory=lambda: ["images/"])  # truth.json image paths starting with one of these
    train_images: int = 1200
    val_images: int = 200
    epochs: int = 30
    batch: int = 32
    imgsz: int = 128
    optimizer: str = "AdamW"  # an ultralytics optimizer name
    lr0: float = 0.002
    mosaic: float = 1.0  # ultralytics' mosaic augmentation probability
    close_mosaic: int = 5  # last epochs without mosaic
    cache: bool = True  # decoded images kept in memory
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0 = $OMP_NUM_THREADS, else every core this process may use
    force: bool = False  # refit even when output holds a fit (of this or another config)

    def validate(self) -> None:
        if not self.model.endswith((".yaml", ".yml", ".pt")):
            raise ValueError(f"model: expected a .yaml architecture or a .pt checkpoint, got {self.model!r}")
        if self.train_images < 1 or self.val_images < 1:
            raise ValueError("train_images/val_images: must be >= 1")
        if self.epochs < 1 or self.batch < 1:
            raise ValueError("epochs/batch: must be >= 1")
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError("imgsz: must be a multiple of 32, at least 32")
        if not self.images:
            raise ValueError("images: give at least one path prefix")
        if self.threads < 0:
            raise ValueError("threads: must be >= 0")
        if not self.output.endswith(".pt"):
            raise ValueError(f"output: must name a .pt file, got {self.output!r}")


def main(cfg: FitDetectorConfig, env: DistEnv) -> dict[str, Any] | None:
    """Fit the detector into ``cfg.output``; its sidecar (config, digest, metrics), or None on ranks > 0
    (one process trains)."""
    log = RunLogger(env)
    if not env.is_main:
        return None
    offline_env()
    world = Path(cfg.world)
    truth = load_truth(world)
    try:
        arch = model_fingerprint(DetectConfig(model=cfg.model, seed=cfg.seed))
    except ModelFileError as e:  # it names detect.model; here the key is model
        raise ModelFileError(f"model: {str(e).split(': ', 1)[1]}") from None
    import ultralytics

    config = config_lib.to_dict(cfg)
    for key in ("output", "force", "threads"):
        config.pop(key)
    config.update({"world_digest": world_digest(world), "model_fingerprint": arch,
                   "ultralytics": ultralytics.__version__})
    out = FitOutput(cfg.output, config, cfg.force)
    if (done := out.done()) is not None:
        log.info(f"{cfg.output} already fitted with this config (mAP50 {done['metrics'].get('map50')}); nothing to do")
        return done

    t0 = time.time()
    work = out.work_dir()
    data = work / "dataset" / "data.yaml"
    if not data.is_file():
        n = write_dataset(truth, world, cfg, work / "dataset")
        log.info(f"YOLO dataset: {n[0]} train + {n[1]} val images from {world} -> {data.parent}")
    metrics, names = _train(cfg, work, data, log)
    best = work / "train" / "weights" / "best.pt"
    meta = out.publish(best.read_bytes(), {**metrics, "names": names, "fit_seconds": round(time.time() - t0, 1)})
    log.info(f"fitted detector -> {cfg.output}: mAP50 {metrics['map50']} on {cfg.val_images} val images "
             f"({meta['metrics']['fit_seconds']} s)")
    return meta


def write_dataset(truth: dict[str, Any], world: Path, cfg: FitDetectorConfig, dst: Path) -> tuple[int, int]:
    """A YOLO detection dataset at ``dst`` (images/, labels/, data.yaml), written in a temp dir and
    renamed; ``(train, val)`` image counts."""
    import yaml

    shapes = list(truth["shape_of_type"].values())
    names = shapes if cfg.classes == "shape" else ["object"]
    paths = sorted(k for k in truth["images"] if k.startswith(tuple(cfg.images)))
    want = cfg.train_images + cfg.val_images
    if len(paths) < want:
        raise ToyWorldError(f"train_images + val_images = {want}, but {world} has only {len(paths)} images under "
                            f"{cfg.images}")
    order = np.random.default_rng(cfg.seed).permutation(len(paths))
    splits = {"train": [paths[i] for i in order[:cfg.train_images]], "val": [paths[i] for i in order[cfg.train_images:want]]}
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, keys in splits.items():
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "labels" / split).mkdir(parents=True)
        for k in keys:
            img = truth["images"][k]
            stem = k.replace("/", "__").rsplit(".", 1)[0]  # unique across the world's folders
            shutil.copyfile(world / k, tmp / "images" / split / f"{stem}.jpg")
            w, h = img["width"], img["height"]
            lines = []
            for o in img["objects"]:
                x1, y1, x2, y2 = o["box"]
                c = shapes.index(o["shape"]) if cfg.classes == "shape" else 0
                lines.append(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
            (tmp / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Absolute, so that ultralytics does not look for it under its own datasets dir.
    doc = {"path": str(dst.resolve()), "train": "images/train", "val": "images/val",
           "names": dict(enumerate(names))}
    (tmp / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    replace_dir(tmp, dst)
    return len(splits["train"]), len(splits["val"])


def _train(cfg: FitDetectorConfig, work: Path, data: Path, log: RunLogger) -> tuple[dict[str, float], list[str]]:
    """Train (or resume, or only re-validate a finished run) in ``work/train``; the val metrics of the best
    weights and the class names."""
    import torch
    from ultralytics import YOLO

    _local_font()
    last, best = work / "train" / "weights" / "last.pt", work / "train" / "weights" / "best.pt"
    project = str(work.resolve())  # ultralytics puts a relative project under its own runs dir
    with _torch_state(cfg.threads):
        ckpt = torch.load(last, map_location="cpu", weights_only=False) if last.is_file() else None
        if ckpt is not None and ckpt.get("epoch", -1) >= 0 and ckpt.get("optimizer") is not None:
            log.info(f"resuming detector training from {last} (epoch {ckpt['epoch'] + 1} of {cfg.epochs} done)")
            model = YOLO(str(last))
            result = model.train(resume=True, data=str(data))
        elif ckpt is not None and best.is_file():  # training had finished; only the publishing was lost
            model = YOLO(str(best))
            result = model.val(data=str(data), imgsz=cfg.imgsz, batch=cfg.batch, device=cfg.device, workers=0,
                               plots=False, verbose=False, project=project, name="val", exist_ok=True)
        else:
            torch.manual_seed(cfg.seed)
            model = YOLO(cfg.model, task="detect")
            log.info(f"training {cfg.model} on the toy world's boxes: {cfg.epochs} epochs, {cfg.train_images} images, "
                     f"imgsz {cfg.imgsz}, device {cfg.device}")
            result = model.train(
                data=str(data), epochs=cfg.epochs, batch=cfg.batch, imgsz=cfg.imgsz, device=cfg.device,
                optimizer=cfg.optimizer, lr0=cfg.lr0, mosaic=cfg.mosaic, close_mosaic=cfg.close_mosaic,
                cache=cfg.cache, seed=cfg.seed, deterministic=False, pretrained=False, workers=0,
                plots=False, amp=False, val=False, project=project, name="train", exist_ok=True,
                verbose=False)
    if result is None or not best.is_file():
        raise UserError(f"ultralytics training in {work / 'train'} ended without weights; see its output above")
    box = result.box
    return ({"map50": round(float(box.map50), 4), "map50_95": round(float(box.map), 4),
             "precision": round(float(box.mp), 4), "recall": round(float(box.mr), 4)},
            [model.names[i] for i in sorted(model.names)])


@contextmanager
def _torch_state(threads: int):
    """Run with ``threads`` torch threads; give back the thread count and the deterministic-algorithms
    switch, which ultralytics' device setup and seeding change for the whole process."""
    import torch

    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def _local_font() -> None:
    """Put a font file named Arial.ttf in ultralytics' (private) config dir: its dataset check looks for
    that font and, when missing, asks the network for it. Plots are off, so any TrueType font will do:
    the DejaVu Sans that matplotlib bundles."""
    import matplotlib
    from ultralytics.utils import USER_CONFIG_DIR

    target = Path(USER_CONFIG_DIR) / "Arial.ttf"
    if not target.is_file():
        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"Arial.ttf.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)

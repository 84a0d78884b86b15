"""Pseudo-labelling throughput on the toy world, with the models the stage config names (JSON):

    .venv/bin/python bench/pseudolabel.py                              # CPU, toy config, about a minute
    .venv/bin/python bench/pseudolabel.py --device cuda --half --batch 64 --images 2048 batch_size=256
    .venv/bin/python bench/pseudolabel.py --config my.toml detect.model=yolov8n.pt detect.imgsz=640 ...

Detection, side by side on the ``jpg`` images of the input shards (JPEG bytes in → top-K boxes out, each
through the stage's own :class:`mie.shards.detect.Detector`, alternating over ``--repeats``, medians):

``one_at_a_time``  the stage's detector with ``detect.batch_size = 1``: one image per forward pass
``batched``        the same with ``--batch`` images per pass (default: the config's ``detect.batch_size``)
``predict_b1``     ``YOLO.predict`` one image at a time (``detect.backend = "predict"``), ultralytics' own path

``batched_vs_one_at_a_time`` is the issue's ratio (goal ≥ 2×). Then the whole stage
(:func:`mie.shards.pseudolabel.main`: vocabulary pass, decoding, detection, spaCy, open_clip, writing) runs
on the input set into a fresh directory, and ``stage_samples_per_s`` counts every input sample over the
wall time (model loading included; ``stage_samples_per_s_after_load`` takes off the load time of the
models, measured apart).
``key=value`` arguments override the stage config as on the ``mie`` command line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.shards import pseudolabel as pl
from mie.shards.detect import DetectConfig, Detector
from mie.shards.schema import read_index
from mie.shards.stage import read_tar
from common import device_name

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/shards/toy/pseudolabel.toml"))
    ap.add_argument("--input", default="runs/shards/toy/newsclippings/dev", help="input shard set (stage input)")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N for both models (default: the config's)")
    ap.add_argument("--half", action="store_true", help="fp16 detector and open_clip (CUDA only)")
    ap.add_argument("--batch", type=int, default=None, help="images per detector pass (default: detect.batch_size)")
    ap.add_argument("--images", type=int, default=256, help="images per detection run (repeated from the input)")
    ap.add_argument("--single-images", type=int, default=64, help="images per one-at-a-time run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-stage", action="store_true", help="only the detection rows")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="stage config overrides")
    args = ap.parse_args()

    overrides = [f"input={args.input}", "output=/nonexistent-bench-output", *args.overrides]
    if args.device:
        overrides += [f"detect.device={args.device}", f"clip.device={args.device}"]
    if args.half:
        overrides += ["detect.half=true", "clip.precision=fp16"]
    if args.batch:
        overrides.append(f"detect.batch_size={args.batch}")
    cfg = config_lib.load(pl.PseudolabelConfig, args.config, overrides)
    in_dir = Path(cfg.input)
    blobs = [s["jpg"] for sh in read_index(in_dir)["shards"] for s in read_tar(in_dir / sh["name"]) if "jpg" in s]
    if not blobs:
        ap.error(f"{in_dir}: no jpg images")
    blobs = (blobs * (-(-args.images // len(blobs))))[:args.images]
    single = blobs[:args.single_images]

    def detector(backend: str, batch: int) -> Detector:
        d = config_lib.to_dict(cfg.detect)
        return Detector(config_lib.from_dict(DetectConfig, {**d, "backend": backend, "batch_size": batch}))

    dets = {"one_at_a_time": detector(cfg.detect.backend, 1), "batched": detector(cfg.detect.backend, cfg.detect.batch_size),
            "predict_b1": detector("predict", 1)}
    for det in dets.values():  # warm-up: device context, ultralytics' predictor setup
        det.detect_encoded(blobs[:2 * det.cfg.batch_size])
    work = {"one_at_a_time": single, "batched": blobs, "predict_b1": single}
    runs: dict[str, list[float]] = {k: [] for k in work}
    for _ in range(args.repeats):
        for name, items in work.items():
            t0 = time.perf_counter()
            dets[name].detect_encoded(items)
            if dets[name].device.type == "cuda":
                torch.cuda.synchronize(dets[name].device)
            runs[name].append(len(items) / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "bench": "pseudolabel", "config": args.config, "input": str(in_dir), "overrides": args.overrides,
        "device": cfg.detect.device, "device_name": device_name(cfg.detect.device), "detect_model": cfg.detect.model,
        "imgsz": cfg.detect.imgsz, "detect_batch": cfg.detect.batch_size, "backend": cfg.detect.backend,
        "half": args.half, "images": len(blobs), "single_images": len(single), "torch_threads": torch.get_num_threads(),
        "detect_images_per_s": {k: round(v, 1) for k, v in med.items()},
        "detect_runs": {k: [round(v, 1) for v in r] for k, r in runs.items()},
        "batched_vs_one_at_a_time": round(med["batched"] / med["one_at_a_time"], 2),
        "batched_vs_predict_b1": round(med["batched"] / med["predict_b1"], 2),
    }
    del dets

    if not args.no_stage:
        out = Path(tempfile.mkdtemp(prefix="mie-bench-pl-"))
        try:
            cfg.output = str(out / "set")
            result["stage_load_seconds"] = _load_seconds(cfg)
            t0 = time.perf_counter()
            index = pl.main(cfg, DistEnv())
            wall = time.perf_counter() - t0
        finally:
            shutil.rmtree(out, ignore_errors=True)
        n = index["total"] + index["rejected"]
        result.update({"stage_samples": n, "stage_seconds": round(wall, 2),
                       "stage_samples_per_s": round(n / wall, 1),
                       "stage_samples_per_s_after_load": round(n / (wall - result["stage_load_seconds"]), 1),
                       "stage_stats": index["stats"], "stage_batch_size": cfg.batch_size})
    print(json.dumps(result, indent=1))


def _load_seconds(cfg: pl.PseudolabelConfig) -> float:
    """How long the stage's models take to load (detector, spaCy pipeline, open_clip), measured apart."""
    from mie.shards.entities import CandidateExtractor

    t0 = time.perf_counter()
    pl.ClipScorer(cfg.clip), Detector(cfg.detect), CandidateExtractor(cfg.entities)
    return round(time.perf_counter() - t0, 2)


if __name__ == "__main__":
    main()

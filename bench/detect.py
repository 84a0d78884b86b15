"""Detection throughput end to end (JPEG bytes in → top-K boxes out), side by side:

    .venv/bin/python bench/detect.py                                    # CPU, small sizes, < 1 min
    python bench/detect.py --device cuda --imgsz 640 --batch 32 --half  # the GPU run (issue 3: >= 1,000 img/s)

``predict_b1``     ``YOLO.predict`` one image at a time (``detect.backend = "predict"``, batch 1)
``predict_bN``     ``YOLO.predict`` on batches of ``--batch`` images
``tensor_bN``      mie's tensor path (``detect.backend = "tensor"``): letterbox, network, NMS and box
                   scaling on the device, batches of ``--batch``
``network_only``   the fused network's forward alone on a ready input batch on the device: the ceiling

and, to show where the time goes: ``decode_only`` (JPEG → RGB arrays on the decoding threads, nothing
else) and ``tensor_from_decoded`` (the tensor path given decoded arrays). The three end-to-end rows run
through the stage's own :class:`mie.shards.detect.Detector` (``detect_encoded``: the same decoding
threads for all, decoding up to two batches ahead of the device) and alternate over ``--repeats``;
medians are reported. The model is ``--model`` (default: the untrained ``yolov8n.yaml``, random
weights: an untrained model finds no box at ``--conf 0.25``, so NMS has little to do; ``--conf 0``
gives it every anchor). Images are synthetic JPEGs whose longest side is ``--image-side`` (shards keep
≤ 512), the other side random, so nearly every image has its own size. ``agreement`` compares the
tensor path with ``predict_bN`` on the same images. Prints JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from mie.shards.detect import DetectConfig, Detections, Detector


def synthetic_jpegs(n: int, side: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs (quality 90) of shapes on textured backgrounds, longest side ``side``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        short = int(rng.integers(side // 2, side + 1))
        w, h = (side, short) if rng.random() < 0.6 else (short, side)
        y, x = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, 3) + np.stack([x, y, x + y], -1) * rng.uniform(-0.3, 0.3, 3)
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(pixels)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 7))):
            x0, x1 = sorted(int(v) for v in rng.integers(0, w + 1, 2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, h + 1, 2))
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(fn, n: int) -> float:
    """Items per second of ``fn()``, which handles ``n`` items and returns once the device is done."""
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(a: list[Detections], b: list[Detections]) -> dict:
    """How far the tensor path's detections (a) are from predict's (b), rank by rank."""
    score_rel, box_px, same_top1, ranks = 0.0, 0.0, 0, 0
    for x, y in zip(a, b):
        k = min(len(x.scores), len(y.scores))
        same_top1 += bool(k) and x.classes[0] == y.classes[0] and \
            float(np.abs(np.subtract(x.boxes[0], y.boxes[0])).max()) <= 1.0
        same_top1 += not x.scores and not y.scores
        for i in range(k):
            ranks += 1
            score_rel = max(score_rel, abs(x.scores[i] - y.scores[i]) / max(abs(y.scores[i]), 1e-12))
            if x.classes[i] == y.classes[i]:
                box_px = max(box_px, float(np.abs(np.subtract(x.boxes[i], y.boxes[i])).max()))
    return {"images_with_same_top1_box_and_class": same_top1, "of": len(a), "ranks_compared": ranks,
            "same_box_counts": sum(len(x.scores) == len(y.scores) for x, y in zip(a, b)),
            "max_rel_score_diff_by_rank": round(score_rel, 6), "max_box_diff_px_same_class_rank": round(box_px, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--model", default="yolov8n.yaml", help="a YOLO .pt checkpoint or .yaml architecture")
    ap.add_argument("--imgsz", type=int, default=None, help="letterbox side; default 640 on cuda, 128 on cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per forward pass; default 32 on cuda, 8 on cpu")
    ap.add_argument("--half", action="store_true", help="fp16 network and inputs (CUDA only, both backends)")
    ap.add_argument("--images", type=int, default=None, help="images per timed run; default 512 on cuda, 32 on cpu")
    ap.add_argument("--single-images", type=int, default=None,
                    help="images per predict_b1 run; default min(--images, 128 on cuda, 16 on cpu)")
    ap.add_argument("--image-side", type=int, default=None, help="longest side of the JPEGs; default 512 on cuda, "
                                                                 "160 on cpu")
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--iou", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--decode-workers", type=int, default=0, help="0: every core this process may use")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.imgsz = args.imgsz or (640 if gpu else 128)
    args.batch = args.batch or (32 if gpu else 8)
    args.images = args.images or (512 if gpu else 32)
    args.single_images = args.single_images or min(args.images, 128 if gpu else 16)
    args.image_side = args.image_side or (512 if gpu else 160)
    if args.half and not gpu:
        ap.error("--half: fp16 runs on CUDA only (the CPU computes in fp32)")

    blobs = synthetic_jpegs(args.images, args.image_side)
    single_blobs = blobs[:args.single_images]

    def detector(backend: str, batch: int) -> Detector:
        return Detector(DetectConfig(model=args.model, imgsz=args.imgsz, conf=args.conf, iou=args.iou,
                                     top_k=args.top_k, device=args.device, batch_size=batch, backend=backend,
                                     half=args.half, decode_workers=args.decode_workers))

    dets = {"predict_b1": detector("predict", 1), "predict_bN": detector("predict", args.batch),
            "tensor_bN": detector("tensor", args.batch)}
    tensor = dets["tensor_bN"]
    net = tensor.network
    x = torch.rand(args.batch, 3, args.imgsz, args.imgsz, device=device).to(tensor.dtype)
    arrays = tensor.decode(blobs, arrays=True)
    n_batches = -(-args.images // args.batch)

    def forward() -> None:
        with torch.inference_mode():
            for _ in range(n_batches):
                net(x)
        sync(device)

    # Warm up every path (CUDA context, cuDNN algorithm choice, ultralytics' predictor setup).
    for name, det in dets.items():
        det.detect_encoded(blobs[:2 * det.cfg.batch_size])
    forward()

    work = {
        "predict_b1": (lambda: dets["predict_b1"].detect_encoded(single_blobs), len(single_blobs)),
        "predict_bN": (lambda: dets["predict_bN"].detect_encoded(blobs), len(blobs)),
        "tensor_bN": (lambda: tensor.detect_encoded(blobs), len(blobs)),
        "network_only": (forward, n_batches * args.batch),
        "decode_only": (lambda: tensor.decode(blobs, arrays=True), len(blobs)),
        "tensor_from_decoded": (lambda: tensor(arrays), len(blobs)),
    }
    runs: dict[str, list[float]] = {k: [] for k in work}
    for _ in range(args.repeats):
        for name, (fn, n) in work.items():
            runs[name].append(rate(fn, n))
    med = {k: statistics.median(v) for k, v in runs.items()}

    found_tensor = tensor.detect_encoded(blobs)
    found_predict = dets["predict_bN"].detect_encoded(blobs)
    result = {
        "bench": "detect", "device": args.device, "device_name": _device_name(device), "model": args.model,
        "imgsz": args.imgsz, "batch": args.batch, "half": args.half, "conf": args.conf, "iou": args.iou,
        "top_k": args.top_k, "images": len(blobs), "single_images": len(single_blobs),
        "image_side": args.image_side, "distinct_image_sizes": len({a.shape for a in arrays}),
        "decode_workers": tensor._decoders._max_workers, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "ultralytics": __import__("ultralytics").__version__,
        "images_per_s": {k: round(v, 1) for k, v in med.items()},
        "runs": {k: [round(v, 1) for v in r] for k, r in runs.items()},
        "tensor_vs_predict_bN": round(med["tensor_bN"] / med["predict_bN"], 2),
        "tensor_vs_predict_b1": round(med["tensor_bN"] / med["predict_b1"], 2),
        "tensor_share_of_network_only": round(med["tensor_bN"] / med["network_only"], 3),
        "boxes_per_image": round(sum(len(d.scores) for d in found_tensor) / len(blobs), 2),
        "agreement_tensor_vs_predict_bN": agreement(found_tensor, found_predict),
    }
    if gpu:
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    print(json.dumps(result, indent=1))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()

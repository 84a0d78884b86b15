"""Pseudo-label quality on the toy world against its ground truth (JSON):

    .venv/bin/python bench/pseudolabel_quality.py                         # the fitted toy models, dev split
    .venv/bin/python bench/pseudolabel_quality.py detect.model=yolov8n.yaml detect.conf=0  # untrained, for contrast

Runs ``mie shards pseudolabel`` (the stage's own :func:`mie.shards.pseudolabel.main`) with ``--config``
(default: the toy config, which names the fitted detector and prompter) on ``--input`` (default: the toy
world's NewsCLIPpings-style dev shards, which neither fit command trains on), on the ``jpg`` view, with
the split's own vocabulary and ``entities.top_m`` large enough to keep every candidate, so that top-1
measures the models and not the vocabulary cut. Then :func:`mie.shards.toyfit.score` compares the output
with ``truth.json``:

``map50``        detection mAP at IoU 0.5 (per shape when the detector's classes are the shapes), at the
                 config's ``detect.conf`` and ``top_k``
``top1``         object→entity: of the detected boxes of pristine posts that match a named truth object,
                 the share whose most probable candidate names that entity (goal ≥ 0.8)
``top1_colour``  the same for entities a candidate names with their colour word (the only textual link
                 to the object), ``top1_no_colour`` for the rest (spaCy split the colour off), ``top1_kept``
                 over the rows the threshold keeps

The fit sidecars' own numbers (held-out mAP50 of the detector, crop→mention top-1 of the prompter, fit
times) are copied in. ``key=value`` arguments override the stage config.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.shards import pseudolabel as pl
from mie.shards.detect import offline_env
from mie.shards.toyfit import score

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/shards/toy/pseudolabel.toml"))
    ap.add_argument("--input", default="runs/shards/toy/newsclippings/dev")
    ap.add_argument("--world", default="runs/toy")
    ap.add_argument("--out", default="runs/bench/pseudolabel_quality", help="the stage output (replaced)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="stage config overrides")
    args = ap.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # the bench's own directory: a fresh run every time
    cfg = config_lib.load(pl.PseudolabelConfig, args.config, [
        f"input={args.input}", f"output={out}", "views=[\"jpg\"]", "entities.vocab_from=\"\"",
        "entities.top_m=1000000", *args.overrides])
    t0 = time.perf_counter()
    index = pl.main(cfg, DistEnv())
    seconds = time.perf_counter() - t0
    offline_env()
    from ultralytics import YOLO

    names = YOLO(cfg.detect.model, task="detect").names
    result = {"bench": "pseudolabel_quality", "input": args.input, "world": args.world,
              "detect_model": cfg.detect.model, "detect_conf": cfg.detect.conf, "top_k": cfg.detect.top_k,
              "clip_checkpoint": cfg.clip.checkpoint, "temperature": cfg.soft.temperature,
              "threshold": cfg.soft.threshold, "vocabulary": len(json.loads((out / "vocab.json").read_text())["entities"]),
              "samples": index["total"], "rejected": index["rejected"], "stage_seconds": round(seconds, 1),
              **score(out, Path(args.world), [names[i] for i in sorted(names)])}
    for key, path in (("detector_fit", cfg.detect.model), ("prompter_fit", cfg.clip.checkpoint)):
        sidecar = Path(path + ".json")
        if sidecar.is_file():
            result[key] = json.loads(sidecar.read_text(encoding="utf-8"))["metrics"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""``mie shards inspect SHARDS --out FILE.png``: a picture of the first N samples of a shard set.

One row per sample: the original image (``jpg``) and the generated one (``gen.jpg``), each with its
detected boxes labelled by their top entity prompt and its probability, then the post text, its entity
candidates, and per image the text–image match score and the top relation prompts. Masked rows
(top probability under the stage's threshold) are drawn grey and dashed. A set that is not
pseudo-labelled yet shows its images and text only.
"""
from __future__ import annotations

import argparse
import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.launch.log import RunLogger
from mie.shards.entities import VOCAB
from mie.shards.pseudolabel import PREFIX, read_npz
from mie.shards.schema import read_index
from mie.shards.stage import read_tar
from mie.shards.writer import atomic_write_bytes

GREY = "#9a9a9a"
COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


@dataclass
class InspectConfig:
    shards: str  # a shard set directory
    out: str  # the PNG to write
    n: int = 6  # samples shown
    start: int = 0  # samples skipped first
    max_boxes: int = 5  # boxes drawn per image, best first
    top_relations: int = 3  # relation prompts listed per image

    def validate(self) -> None:
        if self.n < 1 or self.start < 0 or self.max_boxes < 0 or self.top_relations < 0:
            raise ValueError("n: must be >= 1; start, max_boxes, top_relations: must be >= 0")
        if not self.out.lower().endswith(".png"):
            raise ValueError(f"out: expected a .png file, got {self.out!r}")


def cli(argv: list[str]) -> Path:
    """``mie shards inspect SHARDS --out FILE.png [-n N] [--start S] ...``."""
    p = argparse.ArgumentParser(prog="mie shards inspect", description=__doc__.splitlines()[0])
    p.add_argument("shards", metavar="SHARDS", help="shard set directory")
    p.add_argument("--out", required=True, metavar="FILE.png", help="picture to write")
    p.add_argument("-n", type=int, default=InspectConfig.n, help="samples to show (default %(default)s)")
    p.add_argument("--start", type=int, default=0, help="samples to skip first")
    p.add_argument("--max-boxes", type=int, default=InspectConfig.max_boxes, help="boxes per image")
    p.add_argument("--top-relations", type=int, default=InspectConfig.top_relations, help="relation prompts per image")
    a = p.parse_args(argv)
    cfg = config_lib.from_dict(InspectConfig, {"shards": a.shards, "out": a.out, "n": a.n, "start": a.start,
                                               "max_boxes": a.max_boxes, "top_relations": a.top_relations},
                               "mie shards inspect")
    return main(cfg, DistEnv())


def main(cfg: InspectConfig, env: DistEnv) -> Path:
    """Draw ``cfg.n`` samples of ``cfg.shards`` into ``cfg.out``; returns its path."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    set_dir = Path(cfg.shards)
    samples = _first_samples(set_dir, cfg.start, cfg.n)
    vocab_path = set_dir / VOCAB
    vocab = json.loads(vocab_path.read_text(encoding="utf-8")) if vocab_path.is_file() else None
    threshold = read_index(set_dir)["config"].get("soft", {}).get("threshold")

    fig = Figure(figsize=(15, 4.2 * max(1, len(samples))), dpi=80)
    axes = fig.subplots(max(1, len(samples)), 3, squeeze=False, gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for row, sample in zip(axes, samples):
        soft = read_npz(sample["soft.npz"]) if "soft.npz" in sample else {}
        det = json.loads(sample["det.json"]) if "det.json" in sample else {}
        for ax, view in zip(row[:2], ("jpg", "gen.jpg")):
            _draw_image(ax, sample.get(view), view, det.get(view), soft, PREFIX[view], vocab, cfg.max_boxes)
        _draw_text(row[2], sample, soft, vocab, cfg.top_relations, threshold)
    for row in axes[len(samples):]:
        for ax in row:
            ax.axis("off")
    if not samples:
        axes[0][2].text(0, 1, f"{set_dir}: no samples from {cfg.start}", va="top", transform=axes[0][2].transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    RunLogger(env).info(f"inspect: {len(samples)} samples of {set_dir} → {out}")
    return out


def _first_samples(set_dir: Path, start: int, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen = 0
    for shard in read_index(set_dir)["shards"]:
        for sample in read_tar(set_dir / shard["name"]):
            if seen >= start:
                out.append(sample)
                if len(out) == n:
                    return out
            seen += 1
    return out


def _draw_image(ax, data: bytes | None, view: str, det: dict | None, soft: dict[str, np.ndarray], prefix: str,
                vocab: dict | None, max_boxes: int) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("original (jpg)" if view == "jpg" else "generated (gen.jpg)", fontsize=10)
    if data is None:
        ax.set_facecolor("#f2f2f2")
        ax.text(0.5, 0.5, "no image", ha="center", va="center", color=GREY, transform=ax.transAxes)
        return
    try:
        with Image.open(io.BytesIO(data)) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as e:
        ax.text(0.5, 0.5, f"undecodable: {e}", ha="center", va="center", color="red", transform=ax.transAxes, wrap=True)
        return
    ax.imshow(np.asarray(image), interpolation="nearest")
    if not det:
        return
    probs = soft.get(f"{prefix}_obj_ent")
    mask = soft.get(f"{prefix}_obj_mask")
    # Draw the best box last, so it lies on top.
    for k in reversed(range(min(max_boxes, len(det["boxes"])))):
        x1, y1, x2, y2 = det["boxes"][k]
        kept = mask is not None and k < len(mask) and bool(mask[k])
        colour = COLOURS[k % len(COLOURS)] if kept else GREY
        label = f"#{k} det {det['scores'][k]:.2f}"
        if probs is not None and k < len(probs) and probs.shape[1] and probs[k].max() > 0:
            j = int(probs[k].argmax())
            prompt = vocab["entity_prompts"][j][0] if vocab else str(j)
            label = f"{prompt} {probs[k, j]:.2f}"
        ax.add_patch(_rect(x1, y1, x2, y2, colour, kept))
        ax.text(x1 + 0.5, y1 + 0.5, label, fontsize=7, color="white" if kept else "#444444", va="top",
                bbox={"facecolor": colour, "alpha": 0.85 if kept else 0.5, "pad": 1, "edgecolor": "none"})


def _rect(x1, y1, x2, y2, colour: str, kept: bool):
    from matplotlib.patches import Rectangle

    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2 if kept else 1,
                     linestyle="-" if kept else "--")


def _draw_text(ax, sample: dict[str, Any], soft: dict[str, np.ndarray], vocab: dict | None, top: int,
               threshold: float | None) -> None:
    ax.axis("off")
    lines: list[tuple[str, str, str]] = []  # (text, colour, weight)
    lines.append((sample["__key__"], "black", "bold"))
    text = sample["txt"].decode("utf-8") if "txt" in sample else ""
    lines += [(ln, "black", "normal") for ln in textwrap.wrap(text, 70)[:4]]
    if "ents.json" in sample:
        ents = json.loads(sample["ents.json"])
        cands = [f"{c['text']}" + ("" if c["vocab_id"] >= 0 else " (out of vocab)") for c in ents["candidates"]]
        wrapped = textwrap.wrap("candidates: " + ("; ".join(cands) if cands else "none"), 70)[:3]
        lines += [(ln, "#1f4e79", "normal") for ln in wrapped]
    for view in ("jpg", "gen.jpg"):
        p = PREFIX[view]
        if f"{p}_rel" not in soft or view not in sample:
            continue
        rel, kept = soft[f"{p}_rel"], bool(soft[f"{p}_rel_mask"])
        head = f"{view}: text-image match {float(soft[f'{p}_itm']):+.3f}; relations"
        head += "" if kept else f" (masked: top < {threshold})"
        lines.append((head, "black" if kept else GREY, "bold"))
        for j in np.argsort(-rel, kind="stable")[:top]:
            name = vocab["relation_prompts"][j][0] if vocab else str(j)
            lines.append((f"  {rel[j]:.3f}  {name}", "black" if kept else GREY, "normal"))
    for i, (ln, colour, weight) in enumerate(lines):
        ax.text(0.0, 1.0 - i * 0.06, ln, fontsize=9, color=colour, fontweight=weight, va="top", family="monospace",
                transform=ax.transAxes)

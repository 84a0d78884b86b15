"""The toy world as training data and yardstick of pseudo-labelling's two models.

``mie shards fit-detector`` (:mod:`mie.shards.fit_detector`) and ``mie shards fit-prompter``
(:mod:`mie.shards.fit_prompter`) train the YOLO detector and the open_clip model that
``mie shards pseudolabel`` needs, on what the toy world knows (``truth.json``). This module holds what
they and the quality report share:

* reading the world: its truth table, and the pristine NewsCLIPpings-style pairs of a split;
* :class:`FitOutput`: a fitted model file published atomically, with a sidecar ``<file>.json`` that is
  written last (so it marks the file complete) and records the config digest it was fitted with, so a
  re-run with the same config skips and one with another config refuses unless ``force``;
* :func:`score`: a pseudo-labelled shard set against the truth: detection mAP50 (ultralytics'
  ``ap_per_class``) and object→entity top-1 accuracy where the truth is known.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mie.launch.errors import UserError
from mie.shards.schema import read_index
from mie.shards.sources import load_json
from mie.shards.stage import read_tar
from mie.shards.writer import atomic_write_bytes, atomic_write_json, sha256_file

NEWS = Path("newsclippings")
ORIGIN = NEWS / "visual_news" / "origin"  # the VisualNews-style image folder; data.json lives there


class ToyWorldError(UserError):
    """The toy world named in a config is missing or incomplete (one line, naming the key)."""


class FitMismatch(UserError):
    """The output file was fitted with another config."""


# --------------------------------------------------------------------------------------------- reading


def load_truth(world: Path, key: str = "world") -> dict[str, Any]:
    """``truth.json`` of the toy world at ``world``: per image path (relative to the world), its objects."""
    if not (world / "toy.json").is_file():
        raise ToyWorldError(f"{key}: {world} is not a finished toy world (no toy.json); run `mie shards toy` first")
    return load_json(world / "truth.json", dict, ToyWorldError, key)


def world_digest(world: Path) -> str:
    """What the world's content depends on (its generator version and config), as a digest."""
    return "sha256:" + sha256_file(world / "toy.json")


@dataclass
class Pair:
    """A pristine caption–image pair of the NewsCLIPpings-style part of the world."""

    id: str
    caption: str
    image: Path  # the image file
    truth_key: str  # its key in truth.json
    objects: list[dict[str, Any]]
    relations: list[str]  # MNRE names of the relations the image shows (see :func:`shown_relations`)


def image_records(world: Path, key: str = "world") -> dict[str, str]:
    """VisualNews record id → the image's key in truth.json."""
    records = load_json(world / ORIGIN / "data.json", list, ToyWorldError, key)
    return {str(r["id"]): (ORIGIN / Path(r["image_path"])).as_posix() for r in records}


def caption_pairs(world: Path, split: str, key: str = "world") -> list[Pair]:
    """The pristine pairs of a split (``train``, ``val`` or ``test``) of the NewsCLIPpings-style data, in
    file order, each with its image's truth objects."""
    truth = load_truth(world, key)["images"]
    near = near_px(world, key)
    records = load_json(world / ORIGIN / "data.json", list, ToyWorldError, key)
    by_id = {str(r["id"]): r for r in records}
    ann = load_json(world / NEWS / "data" / "toy" / f"{split}.json", dict, ToyWorldError, key)
    pairs = []
    for a in ann.get("annotations", []):
        if a["falsified"]:
            continue
        rec = by_id[str(a["image_id"])]
        tkey = (ORIGIN / Path(rec["image_path"])).as_posix()
        objects = truth[tkey]["objects"]
        pairs.append(Pair(str(a["id"]), by_id[str(a["id"])]["caption"], world / tkey, tkey, objects,
                          shown_relations(objects, near)))
    return pairs


def near_px(world: Path, key: str = "world") -> int:
    """The world's "nearly touching" distance in pixels (the generator's rule for related objects)."""
    from mie.shards.toy import MIN_SEP

    cfg = load_json(world / "toy.json", dict, ToyWorldError, key)["config"]
    return max(MIN_SEP, round(cfg["near_gap"] * cfg["image_size"]))


def shown_relations(objects: list[dict[str, Any]], near: int) -> list[str]:
    """MNRE names of the relations an image shows, by the world's rule: two objects of different named
    entities that nearly touch (gap <= ``near`` px) and whose shapes have a label, in object order."""
    from mie.shards.toy import RELATION_OF_TYPES, _gap

    found = []
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            if not a["entity"] or not b["entity"] or a["entity"] == b["entity"] or _gap(a["box"], b["box"]) > near:
                continue
            label = RELATION_OF_TYPES.get((a["type"], b["type"])) or RELATION_OF_TYPES.get((b["type"], a["type"]))
            if label:
                found.append(label)
    return found


def refers(candidate: str, name: str) -> bool:
    """Whether a text candidate names the entity ``name``: they share a word. Toy names are pseudo-words
    that no template, colour or cue uses, and the names of one post share no word."""
    return bool(set(candidate.lower().split()) & set(name.lower().split()))


# --------------------------------------------------------------------------------------------- publishing


class FitOutput:
    """A fitted model file ``path``, its sidecar ``<path>.json`` and its work dir ``<path>.work``.

    ``config`` is everything the fit depends on; its digest is stored in the sidecar and the work dir,
    so that a finished fit is skipped, a killed one resumes from its work dir, and a fit of another
    config into the same file is refused (``force`` discards the old one instead)."""

    def __init__(self, path: str | Path, config: dict[str, Any], force: bool = False, key: str = "output"):
        self.path, self.force, self.key = Path(path), force, key
        self.config = config
        self.digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.sidecar = self.path.with_name(self.path.name + ".json")
        self.work = self.path.with_name(self.path.name + ".work")

    def done(self) -> dict[str, Any] | None:
        """The sidecar when ``path`` is a finished fit of this config; None when it is to be (re)fitted.
        FitMismatch when it holds a fit of another config and ``force`` is off."""
        if not self.sidecar.is_file():
            return None
        try:
            meta = json.loads(self.sidecar.read_text(encoding="utf-8"))
        except ValueError:
            return None
        if meta.get("digest") != self.digest:
            if self.force:
                return None
            raise FitMismatch(f"{self.key}: {self.path} was fitted with another config (digest {meta.get('digest')}, "
                              f"now {self.digest}); name another {self.key} or set force=true to refit")
        if self.path.is_file() and sha256_file(self.path) == meta.get("sha256"):
            return meta
        return None

    def work_dir(self) -> Path:
        """The work dir of this config: kept from a killed run of the same config, else empty."""
        stamp = self.work / "digest"
        if self.force or not (stamp.is_file() and stamp.read_text(encoding="utf-8") == self.digest):
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)
            stamp.write_text(self.digest, encoding="utf-8")
        return self.work

    def publish(self, data: bytes, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write the model file, then the sidecar (the completion marker), both atomically; the sidecar."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sidecar.unlink(missing_ok=True)  # a kill in between must not pair an old sidecar with a new file
        atomic_write_bytes(self.path, data)
        meta = {"digest": self.digest, "sha256": hashlib.sha256(data).hexdigest(), "config": self.config,
                "metrics": metrics}
        atomic_write_json(self.sidecar, meta)
        return meta


# --------------------------------------------------------------------------------------------- scoring


def score(out_dir: Path, world: Path, class_names: list[str] | None, view: str = "jpg") -> dict[str, Any]:
    """Pseudo-label quality of the shard set ``out_dir`` (made from the world's NewsCLIPpings-style
    shards) against ``truth.json``, on the ``view`` images.

    * ``map50``: detection mAP at IoU 0.5 over the distinct images (ultralytics' ``ap_per_class``).
      When the detector's ``class_names`` are the world's shapes a box must also have the right shape;
      otherwise (one ``object`` class, an untrained model's names, None) detection is class-agnostic.
    * ``top1``: over the detected boxes of pristine posts that match a truth object (IoU ≥ 0.5) whose
      entity a candidate of the post names (:func:`refers`) and is in the vocabulary: the share whose
      highest object→entity probability is on such a candidate. Also given separately for entities
      that have a candidate carrying their colour word (the only text that ties a mention to an object)
      and for those that have not, and over the unmasked rows only.
    """
    import torch
    from ultralytics.utils.metrics import ap_per_class, box_iou

    from mie.shards.pseudolabel import PREFIX, read_npz

    doc = load_truth(world)
    truth, palette = doc["images"], set(doc["palette"])
    shapes = list(doc["shape_of_type"].values())
    by_shape = class_names is not None and sorted(class_names) == sorted(shapes)
    records = image_records(world)
    prefix = PREFIX[view]

    seen: set[str] = set()
    tp, conf, pred_cls, target_cls = [], [], [], []
    top1 = {"all": [0, 0], "colour": [0, 0], "no_colour": [0, 0], "kept": [0, 0]}
    posts = boxes_matched = 0
    for shard in read_index(out_dir)["shards"]:
        for s in read_tar(out_dir / shard["name"]):
            if view not in s or "det.json" not in s:
                continue
            meta = json.loads(s["json"])
            tkey = records[str(meta["image_id"])]
            objects = truth[tkey]["objects"]
            det = json.loads(s["det.json"])[view]
            scale = _scale(s[view], truth[tkey])
            pb = torch.tensor(det["boxes"], dtype=torch.float64).reshape(-1, 4) * scale
            tb = torch.tensor([o["box"] for o in objects], dtype=torch.float64).reshape(-1, 4)
            iou = box_iou(pb, tb).numpy() if len(pb) and len(tb) else np.zeros((len(pb), len(tb)))
            tcls = [shapes.index(o["shape"]) if by_shape else 0 for o in objects]
            # the detector's class ids in the world's shape order
            pcls = [shapes.index(class_names[c]) if by_shape else 0 for c in det["classes"]]
            if tkey not in seen:  # an image shows up pristine and as a falsified partner: count it once
                seen.add(tkey)
                tp.extend(_match(iou, det["scores"], pcls, tcls))
                conf.extend(det["scores"])
                pred_cls.extend(pcls)
                target_cls.extend(tcls)
            if meta.get("falsified"):
                continue
            posts += 1
            ents = json.loads(s["ents.json"])["candidates"]
            soft = read_npz(s["soft.npz"])
            probs, mask = soft[f"{prefix}_obj_ent"], soft[f"{prefix}_obj_mask"]
            for k in range(len(pb)):
                if not len(tb) or iou[k].max() < 0.5:
                    continue
                name = objects[int(iou[k].argmax())]["entity"]
                if name is None:
                    continue  # a distractor: no entity to be right about
                right = {c["vocab_id"] for c in ents if c["vocab_id"] >= 0 and refers(c["text"], name)}
                if not right or not probs[k].any():
                    continue  # the post's candidates do not name it: the truth is not known
                boxes_matched += 1
                ok = int(int(probs[k].argmax()) in right)
                coloured = any(c["vocab_id"] in right and set(c["text"].lower().split()) & palette for c in ents)
                for group in ("all", "colour" if coloured else "no_colour") + (("kept",) if mask[k] else ()):
                    top1[group][0] += ok
                    top1[group][1] += 1

    nc = len(shapes) if by_shape else 1
    ap50 = np.zeros(nc)
    if tp:
        out = ap_per_class(np.array(tp, bool)[:, None], np.array(conf), np.array(pred_cls), np.array(target_cls))
        ap50[out[6].astype(int)] = out[5][:, 0]
    present = sorted(set(target_cls))
    names = shapes if by_shape else ["object"]
    return {
        "images": len(seen), "posts_scored": posts, "boxes_scored": boxes_matched,
        "map50": round(float(ap50[present].mean()) if present else 0.0, 4),
        "ap50": {names[c]: round(float(ap50[c]), 4) for c in present},
        **{("top1" if g == "all" else f"top1_{g}"): (round(a / n, 4) if n else None) for g, (a, n) in top1.items()},
        **{("top1_n" if g == "all" else f"top1_{g}_n"): n for g, (a, n) in top1.items()},
    }


def _match(iou: np.ndarray, scores: list[float], pcls: list[int], tcls: list[int]) -> list[bool]:
    """Whether each prediction is a true positive at IoU 0.5: best score first, each truth box taken by
    at most one prediction of its class (the COCO rule)."""
    hit = [False] * len(scores)
    taken: set[int] = set()
    for k in np.argsort(-np.asarray(scores, dtype=float), kind="stable"):
        best, best_iou = -1, 0.5
        for j in range(iou.shape[1]):
            if j not in taken and tcls[j] == pcls[k] and iou[k, j] >= best_iou:
                best, best_iou = j, iou[k, j]
        if best >= 0:
            taken.add(best)
            hit[int(k)] = True
    return hit


def _scale(image: bytes, truth: dict[str, Any]) -> float:
    """Factor from the stored image's pixels to the world image's (shards may store it smaller)."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        return truth["width"] / im.size[0]

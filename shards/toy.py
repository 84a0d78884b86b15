"""The embedded toy world: a small multimodal corpus whose ground truth is known.

``mie shards toy`` renders images of coloured shapes and writes posts that name them, in the
official file layouts of Twitter-2015/2017, Twitter-GMNER, MNRE, JMERE and NewsCLIPpings, so the
real readers in :mod:`mie.shards.sources` read it unchanged. The same seed gives byte-identical files.

The world is built so that the image carries information the text does not:

* Every object is a filled shape of one colour; the shape is the entity type
  (circle PER, square ORG, triangle LOC, diamond OTHER). Colours are unique within an image,
  except that a few entities own two objects (same colour, same shape: GMNER multi-box cases).
* Names come from one pool of pseudo-words whatever their type, so a name says nothing.
* A *grounded* mention is written ``[the] <colour> <Name>``: only the image (the shape of the
  object of that colour) tells its type. An *ungroundable* mention has no object and no colour
  word but a type cue outside the span (``Mr X``, ``X Corp``, ``city of X``, ``X festival``).
* Relations (MNRE, JMERE) hold between two grounded entities whose objects nearly touch (box gap
  at most ``near_gap``), with the label fixed by the pair of shapes (:data:`RELATION_OF_TYPES`);
  objects at least ``far_gap`` apart, pairs with an ungroundable entity and type pairs without a
  label are ``None``. Layouts never put a grounded pair in between, so the label is never ambiguous.
  The templates are the same for every relation: the text alone cannot tell related from unrelated.
* Pretraining captions (NewsCLIPpings layout) name the coloured objects of their image, sometimes
  with a type cue and a spatial phrase, and each is paired once with another image (falsified).

``truth.json`` lists, per image, every object (shape, colour, type, box, entity name or null).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

from mie.launch.dist import DistEnv
from mie.launch.log import RunLogger, progress
from mie.shards.writer import replace_dir

# Bump when the generator changes what it writes for a given config: a finished world with an
# older version is regenerated instead of being reused.
TOY_VERSION = 1

TYPES = ("PER", "ORG", "LOC", "OTHER")  # CoNLL tags of Twitter-2015 / GMNER
SHAPE_OF_TYPE = {"PER": "circle", "ORG": "square", "LOC": "triangle", "OTHER": "diamond"}
TYPE_OF_SHAPE = {s: t for t, s in SHAPE_OF_TYPE.items()}
LOWER_TYPE = {"PER": "per", "ORG": "org", "LOC": "loc", "OTHER": "misc"}  # JMERE tags, MNRE prefixes

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 36, 36),
    "green": (36, 168, 60),
    "blue": (36, 76, 222),
    "yellow": (240, 212, 28),
    "purple": (138, 44, 176),
    "orange": (246, 132, 22),
    "pink": (246, 120, 196),
    "cyan": (26, 204, 214),
}

# The 23 MNRE labels, in the order of ours_rel2id.json (the file HVPNeT/MKGformer/TMR read).
MNRE_LABELS = (
    "None", "/per/per/parent", "/per/per/siblings", "/per/per/couple", "/per/per/neighbor",
    "/per/per/peer", "/per/per/charges", "/per/per/alumi", "/per/per/alternate_names",
    "/per/org/member_of", "/per/loc/place_of_residence", "/per/loc/place_of_birth",
    "/org/org/alternate_names", "/org/org/subsidiary", "/org/loc/locate_at", "/loc/loc/contain",
    "/per/misc/present_in", "/per/misc/awarded", "/per/misc/race", "/per/misc/religion",
    "/per/misc/nationality", "/misc/misc/part_of", "/misc/loc/held_on",
)

# (head type, tail type) -> the relation two nearly touching objects of those shapes express.
# ORG-OTHER has no MNRE label, so such pairs are always None.
RELATION_OF_TYPES: dict[tuple[str, str], str] = {
    ("PER", "PER"): "/per/per/peer",
    ("PER", "ORG"): "/per/org/member_of",
    ("PER", "LOC"): "/per/loc/place_of_residence",
    ("PER", "OTHER"): "/per/misc/present_in",
    ("ORG", "ORG"): "/org/org/subsidiary",
    ("ORG", "LOC"): "/org/loc/locate_at",
    ("LOC", "LOC"): "/loc/loc/contain",
    ("OTHER", "OTHER"): "/misc/misc/part_of",
    ("OTHER", "LOC"): "/misc/loc/held_on",
}

# Type cues of ungroundable mentions, kept outside the entity span: (before the name, after it).
CUES: dict[str, tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]] = {
    "PER": ((("Mr",), ("Ms",), ("Dr",), ("Mrs",)), ()),
    "ORG": ((), (("Corp",), ("Inc",), ("Ltd",), ("Co",))),
    "LOC": ((("city", "of"), ("town", "of")), (("river",), ("valley",))),
    "OTHER": ((), (("festival",), ("cup",), ("expo",), ("awards",))),
}

# Post templates: {0}.. are mentions in entity order, {pre}/{post} filler phrases. None of them
# depends on types or relations, so the wording carries neither.
POST_TEMPLATES = {
    1: ("{pre} {0} {post}", "RT @user : {pre} {0} {post}", "{0} {post}", "{pre} : {0} !"),
    2: ("{pre} {0} and {1} {post}", "RT @user : {0} with {1} {post}", "{pre} {0} , {1} {post}",
        "{0} or {1} ? {post}", "{pre} {0} vs {1} {post}", "{0} and {1} {post}"),
    3: ("{pre} {0} , {1} and {2} {post}", "RT @user : {0} with {1} and {2} {post}",
        "{0} , {1} , {2} {post}", "{pre} {0} and {1} with {2} {post}"),
}
PRE = ("", "", "look at", "photo :", "new pic :", "so happy for", "wow", "breaking :", "#tbt",
       "today", "@user", "omg", "guess who :", "throwback to")
POST = ("", "", "today", "tonight !", "#news", "lol", "via @user", "!!!", "#photo", "again",
        "#weekend", "so cool", ". #tag", "http://t.co/x")
CAPTION_TEMPLATES = {
    1: ("{cpre} {0} {cpost}", "{0} {cpost}"),
    2: ("{cpre} {0} and {1} {cpost}", "{0} with {1} {cpost}"),
    3: ("{cpre} {0} , {1} and {2} {cpost}", "{0} , {1} and {2} {cpost}"),
}
# Captions may say what the image shows about two grounded objects, as news captions often do.
CAPTION_NEAR = ("{0} next to {1} {cpost}", "{0} beside {1} {cpost}")
CAPTION_FAR = ("{0} far from {1} {cpost}", "{0} and {1} apart {cpost}")
CPRE = ("", "file photo :", "pictured :", "from left :", "in this photo")
CPOST = ("pictured on monday .", "seen here on friday .", "during a visit on tuesday .",
         "at the opening .", "in a photo released on sunday .", "earlier this year .", ".")
TOPICS = ("world", "sport", "politics", "business", "culture")

MIN_SEP = 2  # px between any two boxes, so shapes never merge into one blob


@dataclass
class ToyConfig:
    """Everything that decides the toy world. Sizes are [train, dev, test] counts of posts
    (sentences); ``newsclippings`` counts pristine pairs, each with one falsified partner."""

    seed: int = 0
    out: str = "runs/toy"
    force: bool = False  # regenerate even when ``out`` already holds this exact world
    image_size: int = 128
    jpeg_quality: int = 90
    twitter: list[int] = field(default_factory=lambda: [400, 100, 100])
    gmner: list[int] = field(default_factory=lambda: [400, 100, 100])
    mnre: list[int] = field(default_factory=lambda: [400, 100, 100])
    jmere: list[int] = field(default_factory=lambda: [400, 100, 100])
    newsclippings: list[int] = field(default_factory=lambda: [2000, 200, 200])
    name_pool: int = 800
    two_token_name_prob: float = 0.15
    ungroundable_prob: float = 0.35  # Twitter / GMNER mentions
    relation_ungroundable_prob: float = 0.2  # MNRE / JMERE mentions: fewer, so more pairs can relate
    distractor_prob: float = 0.5
    multibox_prob: float = 0.06  # per grounded entity
    min_objects: int = 2
    max_objects: int = 4
    min_object_frac: float = 0.15
    max_object_frac: float = 0.40
    near_gap: float = 0.04  # box gap (fraction of the side) at or below which two objects relate
    far_gap: float = 0.18  # unrelated grounded objects are at least this far apart
    related_prob: float = 0.7  # chance a grounded pair is laid out near
    caption_cue_prob: float = 0.5
    caption_spatial_prob: float = 0.5
    noise: float = 6.0  # std of the per-pixel noise, in 0..255 units

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.image_size < 32:
            raise ValueError("image_size: must be at least 32")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError("jpeg_quality: must be in 1..95")
        for name in ("twitter", "gmner", "mnre", "jmere", "newsclippings"):
            sizes = getattr(self, name)
            if len(sizes) != 3 or any(n < 0 for n in sizes):
                raise ValueError(f"{name}: expected [train, dev, test] counts >= 0, got {sizes}")
        if any(n == 1 for n in self.newsclippings):
            raise ValueError("newsclippings: a split of 1 has no other image to falsify with")
        for name in ("two_token_name_prob", "ungroundable_prob", "relation_ungroundable_prob", "distractor_prob",
                     "multibox_prob", "related_prob", "caption_cue_prob", "caption_spatial_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be a probability in [0, 1]")
        if not 2 <= self.min_objects <= self.max_objects <= len(PALETTE):
            raise ValueError(f"min_objects/max_objects: need 2 <= min <= max <= {len(PALETTE)}")
        if not 0.05 <= self.min_object_frac <= self.max_object_frac <= 0.45:
            raise ValueError("min_object_frac/max_object_frac: need 0.05 <= min <= max <= 0.45")
        if not 0 < self.near_gap < self.far_gap <= 0.3:
            raise ValueError("near_gap/far_gap: need 0 < near_gap < far_gap <= 0.3")
        if self.name_pool < 20:
            raise ValueError("name_pool: must be at least 20")
        if self.noise < 0:
            raise ValueError("noise: must be >= 0")


def main(cfg: ToyConfig, env: DistEnv) -> None:
    """Generate the toy world into ``cfg.out`` (single process; other ranks return at once).

    The world is written into ``<out>.partial`` and swapped in when complete, so ``out`` is always
    either absent, an older world, or a finished one. A finished world made by the same config and
    generator version is kept as is unless ``cfg.force``.
    """
    cfg.validate()
    log = RunLogger(env)
    if not env.is_main:
        return
    out = Path(cfg.out)
    stamp = {"version": TOY_VERSION, "config": _world_config(cfg)}
    if not cfg.force and _read_stamp(out) == stamp:
        log.info(f"toy world already in {out} (same config); nothing to do (force=true regenerates)")
        return
    if out.exists() and not _is_toy_dir(out):
        raise FileExistsError(f"{out} exists and is not a toy world; remove it or choose another out")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = _World(cfg, tmp)
    log.info(f"toy world: seed {cfg.seed}, {cfg.image_size}px images, {len(w.names)} names -> {out}")

    # Twitter-2015/2017 MNER: CoNLL, IMGID header, images in the shared pool.
    for split, n in zip(("train", "valid", "test"), cfg.twitter):
        posts = w.posts("twitter", split, n, "tw", _mention_count_ner, cfg.ungroundable_prob, env)
        _write_text(tmp / "twitter" / f"{split}.txt", _conll(posts, trailing_blank=False))

    # Twitter-GMNER: the same CoNLL text plus one Pascal-VOC xml per image with a grounded entity.
    for split, n in zip(("train", "dev", "test"), cfg.gmner):
        posts = w.posts("gmner", split, n, "gm", _mention_count_ner, cfg.ungroundable_prob, env)
        _write_text(tmp / "gmner" / "txt" / f"{split}.txt", _conll(posts, trailing_blank=True))
        for p in posts:
            if any(e["grounded"] for e in p["entities"]):
                _write_text(tmp / "gmner" / "xml" / f"{p['id']}.xml", _voc_xml(p, cfg.image_size))

    # MNRE: one dict literal per entity pair; the dev file name has a space, as in the release.
    mnre_files = {"train": "mnre_train.txt", "val": "mnre_val .txt", "test": "mnre_test.txt"}
    for split, n in zip(("train", "val", "test"), cfg.mnre):
        posts = w.posts("mnre", split, n, "re", _mention_count_re, cfg.relation_ungroundable_prob, env)
        lines = [repr(inst) + "\n" for p in posts for inst in _mnre_instances(p)]
        _write_text(tmp / "mnre" / "mnre_txt" / mnre_files[split], "".join(lines))
    _write_text(tmp / "mnre" / "ours_rel2id.json",
                json.dumps({r: i for i, r in enumerate(MNRE_LABELS)}, separators=(",", ":")))

    # JMERE: sentences with at least one relation, each relation a one-element list in label_list.
    for split, n in zip(("train", "val", "test"), cfg.jmere):
        posts = w.posts("jmere", split, n, "jm", _mention_count_re, cfg.relation_ungroundable_prob, env,
                        need_relation=True)
        _write_text(tmp / "jmere" / f"{split}.json", json.dumps([_jmere_record(p) for p in posts]))

    # NewsCLIPpings over a VisualNews-style data.json; images live under visual_news/origin/.
    records: list[dict[str, Any]] = []
    for split, n in zip(("train", "val", "test"), cfg.newsclippings):
        captions = w.captions(split, n, len(records) + 1, env)
        annotations = _falsify(captions, w.rng("newsclippings-pairs", split), log)
        records += [c["record"] for c in captions]
        _write_text(tmp / "newsclippings" / "data" / "toy" / f"{split}.json",
                    json.dumps({"annotations": annotations}, indent=1))
    _write_text(tmp / "newsclippings" / "visual_news" / "origin" / "data.json", json.dumps(records, indent=1))

    _write_text(tmp / "truth.json", json.dumps(_truth_doc(w.truth), sort_keys=True, separators=(",", ":")))
    _write_text(tmp / "toy.json", json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    replace_dir(tmp, out)
    log.info(f"toy world written: {len(w.truth)} images, {w.counts}")


# --------------------------------------------------------------------------------------------------
# The world: names, posts, layouts, rendering


class _World:
    """Holds what posts of all tasks share: config, name pool, output dir and the truth table."""

    def __init__(self, cfg: ToyConfig, root: Path):
        self.cfg = cfg
        self.root = root
        self.side = cfg.image_size
        self.near_px = max(MIN_SEP, round(cfg.near_gap * self.side))
        self.far_px = max(self.near_px + 1, round(cfg.far_gap * self.side))
        self.names = _name_pool(self.rng("names"), cfg.name_pool, cfg.two_token_name_prob)
        # Per-pixel noise is the slowest part of rendering: draw one tile and crop it per image.
        self.noise = self.rng("noise").standard_normal((2 * self.side, 2 * self.side, 3), dtype=np.float32)
        self.noise *= np.float32(cfg.noise)
        self.truth: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, int] = {}

    def rng(self, *keys: str) -> np.random.Generator:
        """An independent stream per (purpose, split): resizing one split leaves the others alone."""
        return np.random.default_rng([self.cfg.seed] + [zlib.crc32(k.encode()) for k in keys])

    def posts(self, task: str, split: str, n: int, prefix: str, count_fn, p_ungroundable: float, env: DistEnv,
              need_relation: bool = False) -> list[dict[str, Any]]:
        """``n`` posts with their images written to ``images/``; ids ``<prefix>_000001..`` run on
        across the task's splits, so every image name in the shared pool is unique."""
        rng = self.rng(task, split)
        out = []
        start = self.counts.get(task, 0)
        for i in progress(range(n), env, desc=f"toy {task}/{split}", total=n):
            # JMERE keeps only sentences with a relation (as the official conversion does): draw
            # again until one has; the draws are seeded, so this stays deterministic.
            while True:
                post = self._post(rng, count_fn(rng), p_ungroundable, caption=False)
                if not need_relation or any(r != "None" for r in post["relations"].values()):
                    break
            post["id"] = f"{prefix}_{start + i + 1:06d}"
            post["image"] = f"{post['id']}.jpg"
            self._save_image(rng, f"images/{post['image']}", post)
            out.append(post)
        self.counts[task] = start + n
        return out

    def captions(self, split: str, n: int, first_id: int, env: DistEnv) -> list[dict[str, Any]]:
        """``n`` VisualNews-style records (caption + image), ids ``first_id..``."""
        rng = self.rng("newsclippings", split)
        out = []
        for i in progress(range(n), env, desc=f"toy newsclippings/{split}", total=n):
            rid = first_id + i
            post = self._post(rng, _mention_count_caption(rng), 0.0, caption=True)
            rel_path = f"images/nc_{rid:06d}.jpg"
            self._save_image(rng, f"newsclippings/visual_news/origin/{rel_path}", post)
            post["record"] = {
                "id": rid,
                "caption": " ".join(post["tokens"]),
                "image_path": f"./{rel_path}",
                "article_path": f"./articles/nc_{rid:06d}.txt",
                "topic": _pick(rng, TOPICS),
                "source": "toy",
            }
            post["colors"] = sorted({e["color"] for e in post["entities"] if e["grounded"]})
            post["image_colors"] = sorted({o["color"] for o in post["objects"]})
            out.append(post)
        self.counts["newsclippings"] = self.counts.get("newsclippings", 0) + n
        return out

    def _post(self, rng: np.random.Generator, n_mentions: tuple[int, int], p_ungroundable: float,
              caption: bool) -> dict[str, Any]:
        """One post: entities, image objects, their layout, relations and tokens.

        ``n_mentions`` = (mentions that are each ungroundable with ``p_ungroundable``, mentions that
        are always ungroundable).
        """
        cfg = self.cfg
        total, extra_ungroundable = n_mentions
        grounded = [bool(rng.random() >= p_ungroundable) for _ in range(total)]
        grounded += [False] * extra_ungroundable
        if caption:  # captions interleave ungroundable mentions with the grounded ones
            grounded = [grounded[k] for k in rng.permutation(len(grounded))]
        # Never more grounded entities than the image may hold objects.
        seen = 0
        for k, g in enumerate(grounded):
            if g:
                seen += 1
                grounded[k] = seen <= cfg.max_objects
        name_idx = rng.choice(len(self.names), size=len(grounded), replace=False)
        colors = [str(c) for c in rng.permutation(list(PALETTE))]
        entities = []
        for k, g in enumerate(grounded):
            t = TYPES[int(rng.integers(len(TYPES)))]
            entities.append({"name": self.names[name_idx[k]], "type": t, "grounded": bool(g),
                             "color": colors.pop() if g else None})

        # Objects: one per grounded entity, a second one for a few (multi-box), then distractors.
        objects = [{"shape": SHAPE_OF_TYPE[e["type"]], "color": e["color"], "type": e["type"],
                    "entity": k, "primary": True} for k, e in enumerate(entities) if e["grounded"]]
        for k, e in enumerate(entities):
            if e["grounded"] and len(objects) < cfg.max_objects and rng.random() < cfg.multibox_prob:
                objects.append({"shape": SHAPE_OF_TYPE[e["type"]], "color": e["color"], "type": e["type"],
                                "entity": k, "primary": False})
        n_distract = 0
        if len(objects) < cfg.max_objects and rng.random() < cfg.distractor_prob:
            n_distract = int(rng.integers(1, cfg.max_objects - len(objects) + 1))
        n_distract = max(n_distract, cfg.min_objects - len(objects))
        for _ in range(n_distract):
            t = TYPES[int(rng.integers(len(TYPES)))]
            objects.append({"shape": SHAPE_OF_TYPE[t], "color": colors.pop(), "type": t,
                            "entity": None, "primary": False})

        ground_ids = [k for k, e in enumerate(entities) if e["grounded"]]
        targets = {(a, b): ("near" if rng.random() < cfg.related_prob else "far")
                   for i, a in enumerate(ground_ids) for b in ground_ids[i + 1:]}
        self._layout(rng, objects, targets)

        # Relations of every unordered pair, head/tail ordered so the label's type prefix fits.
        relations: dict[tuple[int, int], str] = {}
        gaps: dict[tuple[int, int], int] = {}
        for i in range(len(entities)):
            for j in range(i + 1, len(entities)):
                h, t = _head_tail(entities, i, j)
                label = "None"
                if entities[h]["grounded"] and entities[t]["grounded"]:
                    gap = min(_gap(a["box"], b["box"]) for a in objects if a["entity"] == h
                              for b in objects if b["entity"] == t)
                    gaps[(i, j)] = gap
                    if gap <= self.near_px:
                        label = RELATION_OF_TYPES.get((entities[h]["type"], entities[t]["type"]), "None")
                relations[(h, t)] = label

        tokens, spans = self._text(rng, entities, gaps, caption)
        for e, (s, end) in zip(entities, spans):
            e["pos"] = [s, end]
        return {"tokens": tokens, "entities": entities, "objects": objects, "relations": relations}

    def _text(self, rng: np.random.Generator, entities: list[dict[str, Any]], gaps: dict[tuple[int, int], int],
              caption: bool) -> tuple[list[str], list[tuple[int, int]]]:
        """Tokens of the post and the [start, end) span of each entity's name."""
        mentions = []
        for e in entities:
            name = list(e["name"])
            pre: list[str] = []
            post: list[str] = []
            if e["grounded"]:
                pre = (["the"] if rng.random() < 0.5 else []) + [e["color"]]
                if caption and rng.random() < self.cfg.caption_cue_prob:
                    cue_pre, cue_post = _cue(rng, e["type"])
                    pre, post = list(cue_pre) + pre[-1:], list(cue_post)
            else:
                cue_pre, cue_post = _cue(rng, e["type"])
                pre, post = list(cue_pre), list(cue_post)
            mentions.append((pre, name, post))

        k = len(entities)
        if caption:
            pair = gaps.get((0, 1)) if k == 2 else None
            if pair is not None and rng.random() < self.cfg.caption_spatial_prob:
                template = _pick(rng, CAPTION_NEAR if pair <= self.near_px else CAPTION_FAR)
            else:
                template = _pick(rng, CAPTION_TEMPLATES[k])
        else:
            template = _pick(rng, POST_TEMPLATES[k])
        fill = {"pre": PRE, "post": POST, "cpre": CPRE, "cpost": CPOST}
        tokens: list[str] = []
        spans: list[tuple[int, int]] = [(0, 0)] * k
        for slot in template.split():
            if slot.startswith("{") and slot.endswith("}"):
                key = slot[1:-1]
                if key.isdigit():
                    pre, name, post = mentions[int(key)]
                    tokens += pre
                    spans[int(key)] = (len(tokens), len(tokens) + len(name))
                    tokens += name + post
                else:
                    tokens += _pick(rng, fill[key]).split()
            else:
                tokens.append(slot)
        return tokens, spans

    def _layout(self, rng: np.random.Generator, objects: list[dict[str, Any]],
                targets: dict[tuple[int, int], str]) -> None:
        """Give every object a box [x1, y1, x2, y2) (pixels, x2/y2 exclusive).

        Boxes never overlap. The primary objects of two grounded entities end up either near
        (gap <= near_px) or far (gap >= far_px), as ``targets`` asks; a second box of an entity is
        far from other entities, so the entity-level gap is the primaries' gap. After many failed
        draws the targets are dropped but the no-man's-land between near and far is still kept.
        """
        side = self.side
        lo = max(8, round(self.cfg.min_object_frac * side))
        hi = max(lo, round(self.cfg.max_object_frac * side))
        for attempt in range(600):
            strict = attempt < 400
            # Crowded layouts (4 big objects with far gaps) may not fit: shrink the size range.
            top = max(lo, round(hi - (hi - lo) * min(1.0, attempt / 300)))
            boxes: list[list[int]] = []
            for o in objects:
                s = int(rng.integers(lo, top + 1))
                anchors = [boxes[q] for q, p in enumerate(objects[:len(boxes)])
                           if strict and o["primary"] and p["primary"]
                           and targets.get((p["entity"], o["entity"])) == "near"]
                for _ in range(60):
                    if anchors:
                        box = _beside(rng, anchors[int(rng.integers(len(anchors)))], s,
                                      int(rng.integers(MIN_SEP, self.near_px + 1)))
                    else:
                        x, y = rng.integers(0, side - s + 1, size=2)
                        box = [int(x), int(y), int(x) + s, int(y) + s]
                    if box[0] >= 0 and box[1] >= 0 and box[2] <= side and box[3] <= side and \
                            all(self._fits(box, o, b, p, targets, strict) for b, p in zip(boxes, objects)):
                        boxes.append(box)
                        break
                else:
                    break
            if len(boxes) == len(objects):
                for o, b in zip(objects, boxes):
                    o["box"] = b
                return
        raise RuntimeError(f"toy layout: could not place {len(objects)} objects in {side}px after 600 tries; "
                           "lower max_objects or max_object_frac")

    def _fits(self, box: list[int], o: dict[str, Any], other: list[int], p: dict[str, Any],
              targets: dict[tuple[int, int], str], strict: bool) -> bool:
        g = _gap(box, other)
        if g < MIN_SEP:
            return False
        if o["entity"] is None or p["entity"] is None or o["entity"] == p["entity"]:
            return True
        if not strict:
            return g <= self.near_px or g >= self.far_px
        if o["primary"] and p["primary"] and targets.get((p["entity"], o["entity"])) == "near":
            return g <= self.near_px
        return g >= self.far_px

    def _save_image(self, rng: np.random.Generator, rel: str, post: dict[str, Any]) -> None:
        """Render and write the post's image; record its objects in the truth table."""
        names = [" ".join(e["name"]) for e in post["entities"]]
        self.truth[rel] = {
            "width": self.side, "height": self.side,
            "objects": [{"shape": o["shape"], "color": o["color"], "type": o["type"], "box": o["box"],
                         "entity": None if o["entity"] is None else names[o["entity"]]} for o in post["objects"]],
        }
        _write_bytes(self.root / rel, _render(rng, self.side, post["objects"], self.noise, self.cfg.jpeg_quality))


def _render(rng: np.random.Generator, side: int, objects: list[dict[str, Any]], noise: np.ndarray,
            quality: int) -> bytes:
    """JPEG bytes of a textured background with the objects' filled shapes drawn in their boxes."""
    # Muted, slightly tinted background with low-frequency blotches: texture, but never a
    # saturated palette colour, so colour alone finds the objects.
    base = rng.uniform(95, 165) + rng.uniform(-15, 15, size=3)
    blotch = rng.uniform(-28, 28, size=(6, 6, 3))
    coarse = Image.fromarray(np.clip(blotch + 128, 0, 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    bg = np.asarray(coarse, dtype=np.float32) + (base - 128).astype(np.float32)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        x2, y2 = x2 - 1, y2 - 1  # PIL boxes are inclusive
        fill = tuple(min(255, max(0, c + int(j))) for c, j in zip(PALETTE[o["color"]], rng.integers(-14, 15, size=3)))
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        if o["shape"] == "circle":
            draw.ellipse([x1, y1, x2, y2], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([x1, y1, x2, y2], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(x1, y2), (x2, y2), (mx, y1)], fill=fill)
        else:  # diamond
            draw.polygon([(mx, y1), (x2, my), (mx, y2), (x1, my)], fill=fill)
    ox, oy = rng.integers(0, noise.shape[0] - side + 1, size=2)
    arr = np.asarray(img, dtype=np.float32) + noise[oy:oy + side, ox:ox + side]
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _beside(rng: np.random.Generator, anchor: list[int], s: int, gap: int) -> list[int]:
    """A box of side ``s`` on a random side of ``anchor``, ``gap`` px away, overlapping it along
    the other axis (so the Chebyshev box gap is exactly ``gap``)."""
    ax1, ay1, ax2, ay2 = anchor
    side = int(rng.integers(4))
    along = int(rng.integers(-s + 1, (ay2 - ay1) if side < 2 else (ax2 - ax1)))
    if side == 0:  # right
        x, y = ax2 + gap, ay1 + along
    elif side == 1:  # left
        x, y = ax1 - gap - s, ay1 + along
    elif side == 2:  # below
        x, y = ax1 + along, ay2 + gap
    else:  # above
        x, y = ax1 + along, ay1 - gap - s
    return [x, y, x + s, y + s]


def _gap(a: list[int], b: list[int]) -> int:
    """Chebyshev gap between two [x1, y1, x2, y2) boxes in px; <= 0 means they touch or overlap."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _head_tail(entities: list[dict[str, Any]], i: int, j: int) -> tuple[int, int]:
    """Order a pair so that (head type, tail type) has a label when either order does; the same
    order is used whether or not the pair is related, so it does not give the relation away."""
    ti, tj = entities[i]["type"], entities[j]["type"]
    if (ti, tj) not in RELATION_OF_TYPES and (tj, ti) in RELATION_OF_TYPES:
        return j, i
    return i, j


def _name_pool(rng: np.random.Generator, n: int, two_token_prob: float) -> list[tuple[str, ...]]:
    """``n`` distinct pronounceable capitalised names (tuples of 1 or 2 tokens), type-blind."""
    onsets = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "r", "s",
              "st", "t", "tr", "v", "z", "sh", "ch", "j", "w", "y")
    vowels = ("a", "e", "i", "o", "u", "ai", "ou", "ee", "ia")
    codas = ("", "", "", "n", "r", "l", "s", "th", "x", "m", "k")
    # A name must never be a word the templates, colours or cues use.
    reserved = {w.lower() for w in PALETTE}
    reserved |= {w.lower() for group in (PRE, POST, CPRE, CPOST, TOPICS) for phrase in group for w in phrase.split()}
    reserved |= {w.lower() for ts in (*POST_TEMPLATES.values(), *CAPTION_TEMPLATES.values(), CAPTION_NEAR,
                                      CAPTION_FAR) for t in ts for w in t.split()}
    reserved |= {w.lower() for before, after in CUES.values() for cue in before + after for w in cue}

    def word() -> str:
        n_syl = 2 if rng.random() < 0.7 else 3
        w = "".join(_pick(rng, onsets) + _pick(rng, vowels) + _pick(rng, codas) for _ in range(n_syl))
        return w.capitalize()

    seen: set[str] = set()
    words: list[str] = []
    while len(words) < 2 * n:  # surnames for two-token names come from the same word pool
        w = word()
        if w.lower() not in seen and w.lower() not in reserved:
            seen.add(w.lower())
            words.append(w)
    first, rest = words[:n], words[n:]
    return [(w, rest[k]) if rng.random() < two_token_prob else (w,) for k, w in enumerate(first)]


def _cue(rng: np.random.Generator, etype: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A type cue placed before or after the name (never inside the span)."""
    before, after = CUES[etype]
    options = [(b, ()) for b in before] + [((), a) for a in after]
    return options[int(rng.integers(len(options)))]


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _mention_count_ner(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2])), 0


def _mention_count_re(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.choice([2, 3], p=[0.7, 0.3])), 0


def _mention_count_caption(rng: np.random.Generator) -> tuple[int, int]:
    grounded = int(rng.choice([1, 2, 3], p=[0.3, 0.5, 0.2]))
    return grounded, int(rng.random() < 0.3 and grounded < 3)


# --------------------------------------------------------------------------------------------------
# Writers, one per official format


def _conll(posts: list[dict[str, Any]], trailing_blank: bool) -> str:
    """Twitter/GMNER CoNLL: ``IMGID:<id>``, ``token<TAB>tag`` lines, a blank line between tweets.
    Twitter-2015 files end after the last tag line, GMNER (and Twitter-2017) files with a blank line."""
    blocks = []
    for p in posts:
        tags = ["O"] * len(p["tokens"])
        for e in p["entities"]:
            s, end = e["pos"]
            tags[s:end] = [f"B-{e['type']}"] + [f"I-{e['type']}"] * (end - s - 1)
        blocks.append("\n".join([f"IMGID:{p['id']}"] + [f"{t}\t{g}" for t, g in zip(p["tokens"], tags)]) + "\n")
    text = "\n".join(blocks)
    return text + "\n" if trailing_blank and text else text


def _voc_xml(post: dict[str, Any], side: int) -> str:
    """Pascal-VOC annotation as Twitter-GMNER writes it: one <object> per box, <name> = entity text."""
    objs = []
    for o in post["objects"]:
        if o["entity"] is None:
            continue
        name = escape(" ".join(post["entities"][o["entity"]]["name"]))
        x1, y1, x2, y2 = o["box"]
        objs.append(
            f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
            f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n"
            f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        )
    return (
        f"<annotation>\n\t<folder>toy</folder>\n\t<filename>{post['image']}</filename>\n"
        f"\t<source>\n\t\t<database>mie-toy</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{side}</width>\n\t\t<height>{side}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
        f"\t<segmented>0</segmented>\n{''.join(objs)}</annotation>\n"
    )


def _mnre_instances(post: dict[str, Any]) -> list[dict[str, Any]]:
    """One MNRE instance per entity pair, keys in the release's order."""
    ents = post["entities"]
    out = []
    for (h, t), label in post["relations"].items():
        out.append({
            "token": list(post["tokens"]),
            "h": {"name": " ".join(ents[h]["name"]), "pos": list(ents[h]["pos"])},
            "t": {"name": " ".join(ents[t]["name"]), "pos": list(ents[t]["pos"])},
            "img_id": post["image"],
            "relation": label,
        })
    return out


def _jmere_record(post: dict[str, Any]) -> dict[str, Any]:
    """A JMERE sentence: positive relations only, each wrapped in a one-element list as the
    official files are (EEGA's loader reads ``triple[0]``)."""
    ents = post["entities"]

    def ent(k: int) -> dict[str, Any]:
        e = ents[k]
        return {"name": " ".join(e["name"]), "pos": list(e["pos"]), "tags": LOWER_TYPE[e["type"]]}

    labels = [[{"beg_ent": ent(h), "sec_ent": ent(t), "relation": label.rsplit("/", 1)[1]}]
              for (h, t), label in post["relations"].items() if label != "None"]
    return {"token": list(post["tokens"]), "img_id": post["image"], "label_list": labels}


def _falsify(captions: list[dict[str, Any]], rng: np.random.Generator, log: RunLogger) -> list[dict[str, Any]]:
    """Alternating pristine / falsified annotations. A falsified partner keeps the caption and takes
    the image of another record of the split: among a few random candidates, the one sharing most
    colours with the caption that still lacks one of the colours it names (a hard negative)."""
    annotations = []
    n = len(captions)
    for k, c in enumerate(captions):
        want = set(c["colors"])
        # A few random candidates first; only when none of them is a mismatch scan the whole split.
        order = [int(j) for j in rng.integers(0, n, size=8) if j != k]
        valid = [j for j in order if not want <= set(captions[j]["image_colors"])]
        if not valid:
            order = [int(j) for j in rng.permutation(n) if j != k]
            valid = [j for j in order if not want <= set(captions[j]["image_colors"])][:8]
        if valid:
            j = max(valid, key=lambda q: _jaccard(want, captions[q]["image_colors"]))
        else:
            log.warn(f"newsclippings record {c['record']['id']}: every other image shows all colours its "
                     "caption names; its falsified partner is not a true mismatch")
            j = order[0]
        rid = c["record"]["id"]
        annotations.append({"id": rid, "image_id": rid, "similarity_score": _jaccard(want, c["image_colors"]),
                            "falsified": False})
        annotations.append({"id": rid, "image_id": captions[j]["record"]["id"],
                            "similarity_score": _jaccard(want, captions[j]["image_colors"]), "falsified": True})
    return annotations


def _jaccard(a: set[str], b: list[str]) -> float:
    union = a | set(b)
    return round(len(a & set(b)) / len(union), 4) if union else 0.0


def _truth_doc(images: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """truth.json: the mapping tables and, per image path (relative to the world dir), its objects."""
    return {
        "version": TOY_VERSION,
        "shape_of_type": SHAPE_OF_TYPE,
        "palette": {k: list(v) for k, v in PALETTE.items()},
        "relation_of_types": {f"{h}-{t}": r for (h, t), r in RELATION_OF_TYPES.items()},
        "images": images,
    }


# --------------------------------------------------------------------------------------------------
# Files


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _world_config(cfg: ToyConfig) -> dict[str, Any]:
    """The config fields that decide the world's content (not where it goes or whether to redo it)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "force")}


def _read_stamp(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "toy.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_toy_dir(out: Path) -> bool:
    """Only a dir we wrote (it has toy.json) or an empty one may be replaced."""
    return out.is_dir() and ((out / "toy.json").is_file() or not any(out.iterdir()))

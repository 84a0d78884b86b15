"""The shard-set contract between stages: sample keys, file names, and ``index.json``.

A shard set is a directory of ``shard-%06d.tar`` files, an ``index.json`` that lists them with
their sha256 (written last: a set without it is not complete), and ``rejects.jsonl``. See the shard
schema table in DESIGN.md for the fields of a sample. The fields added by the enrichment stages:

``gen.jpg`` (backtranslate)
    JPEG regenerated from ``txt``.
``det.json`` (pseudolabel)
    ``{"<view>": {"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "classes": [...]}}`` for each
    view of the stage's ``views`` (``jpg``, ``gen.jpg``; one the sample lacks has empty lists): the
    top-K detections, boxes in pixels of that stored image, best first.
``ents.json`` (pseudolabel)
    ``{"candidates": [{"text", "start", "end", "kind", "vocab_id"}], "relation_prompt_ids": [...]}``:
    spaCy candidates of this post (token offsets, end exclusive; ``kind`` ent|propn|chunk; ``vocab_id``
    indexes the set's ``vocab.json`` entities, -1 when not in the top-M); ``relation_prompt_ids``: ids
    into ``vocab.json`` relations, best first by image → relation probability averaged over the kept
    ``v_rel`` rows (top ``soft.relation_top_k``; empty when none is kept).
``soft.npz`` (pseudolabel)
    ``numpy.load``-able arrays per view ``v`` in {``jpg``, ``gen``} of the stage's ``views``: ``v_obj_ent``
    (K×M float32, object → entity-prompt distribution over the ``vocab.json`` entities, rows in
    ``det.json`` order; with ``soft.over = "post"``, the default, only the post's own in-vocabulary
    candidates get probability, and a post without any has all-zero, masked rows),
    ``v_obj_mask`` (K bool, True = row kept: top probability ≥ threshold), ``v_rel`` (R float32,
    image → relation-prompt distribution), ``v_rel_mask`` (bool), ``v_itm`` (float32 text–image
    match score: cosine of the open_clip image and text embeddings). A view the sample lacks has
    K = 0, ``v_rel`` all zero and ``v_rel_mask`` False.

A pseudo-labelled set also holds ``vocab.json``: ``{"entities": [M strings], "entity_prompts":
[M lists, one prompt per template], "relations": [R names], "relation_prompts": [R lists, one prompt
per template]}``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mie.launch.errors import UserError

SCHEMA_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"
INDEX = "index.json"
REJECTS = "rejects.jsonl"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(source: str, split: str, original_id: str) -> str:
    """``<source>-<split>-<id>`` with every character that webdataset would misread (``.`` starts the
    extension, ``/`` a folder) replaced by ``_``."""
    return f"{_UNSAFE.sub('_', source)}-{_UNSAFE.sub('_', split)}-{_UNSAFE.sub('_', original_id)}"


class ShardSetError(UserError):
    """A shard set that is missing or incomplete, in one line."""


def read_index(set_dir: str | Path) -> dict[str, Any]:
    """The ``index.json`` of a complete shard set, or a ShardSetError saying why there is none."""
    path = Path(set_dir) / INDEX
    if not path.is_file():
        if not Path(set_dir).is_dir():
            raise ShardSetError(f"{set_dir}: shard set not found")
        raise ShardSetError(f"{set_dir}: shard set is incomplete (no {INDEX}); run its stage to completion")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("schema_version") != SCHEMA_VERSION:
        raise ShardSetError(f"{path}: schema_version {index.get('schema_version')} is not {SCHEMA_VERSION}")
    return index


def shard_paths(set_dir: str | Path) -> list[Path]:
    """The shard files of a complete shard set, in order."""
    return [Path(set_dir) / s["name"] for s in read_index(set_dir)["shards"]]

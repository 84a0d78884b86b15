"""The shipped configs on the real annotation files in ../shared/data: official split sizes.

Skipped where ../shared/data is absent (a clean clone elsewhere). Text-only builds (no images here).
"""
from __future__ import annotations

import json

import pytest

from conftest import REPO, SHARED_DATA, read_shards
from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.shards import build as build_mod
from mie.shards.build import BuildConfig

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not found"),
]


def build_shipped(name: str, tmp_path, monkeypatch) -> dict:
    """Build configs/shards/<name>.toml as shipped (its corpus root is relative to the repo root)."""
    monkeypatch.chdir(REPO)
    cfg = config_lib.load(BuildConfig, REPO / "configs" / "shards" / f"{name}.toml", [f"output.dir={tmp_path / name}"])
    return build_mod.main(cfg, DistEnv())


@pytest.mark.parametrize("name, sizes", [
    ("gmner", {"train": 7000, "dev": 1500, "test": 1500}),
    ("twitter2017", {"train": 3373, "dev": 723, "test": 723}),
    ("twitter2015", {"train": 4000, "dev": 1000, "test": 3257}),
    ("mnre", {"train": 12247, "dev": 1624, "test": 1614}),
])
def test_official_split_sizes(name, sizes, tmp_path, monkeypatch):
    indexes = build_shipped(name, tmp_path, monkeypatch)
    assert {split: index["total"] for split, index in indexes.items()} == sizes
    for split, index in indexes.items():
        assert index["rejected"] == 0, (tmp_path / name / split / "rejects.jsonl").read_text()[:2000]
        assert (tmp_path / name / split / "rejects.jsonl").read_text() == ""


def test_gmner_v1_test_entities_and_boxes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config_lib.load(BuildConfig, REPO / "configs" / "shards" / "gmner.toml",
                          [f"output.dir={tmp_path / 'gmner'}", 'source.splits=["test"]'])
    build_mod.main(cfg, DistEnv())
    metas = [json.loads(s["json"]) for s in read_shards(tmp_path / "gmner" / "test")]
    assert len(metas) == 1500
    entities = [e for m in metas for e in m["entities"]]
    assert len(entities) == 2542
    assert sum(1 for e in entities if e["boxes"]) == 1036
    assert sum(1 for m in metas if m["image_size"] is not None) == 855  # test images that have an xml

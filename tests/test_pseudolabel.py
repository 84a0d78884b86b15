"""``mie shards pseudolabel`` and ``mie shards inspect`` end to end, with tiny models on the CPU.

The models are real ones built from configs: ultralytics' untrained ``yolov8n.yaml`` (``conf = 0`` gives
boxes) and a tiny open_clip model whose JSON config and checkpoint the tests write, loaded through the
same ``create_model_and_transforms(name, pretrained=<file>)`` path as a real checkpoint. Every test runs
with both detection backends (``detect.backend``: the batched tensor path and ``YOLO.predict``). The data is a
small toy world, built into shards, with some samples changed: both images, the generated one only,
text only (with and without entity candidates), an undecodable image, a broken ``json`` field.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image

from conftest import kill_after_first_part, read_shards, tree_bytes
from mie.launch import cli as cli_mod
from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.shards import build as build_mod
from mie.shards import pseudolabel as pl
from mie.shards import toy
from mie.shards.pseudolabel import PseudolabelConfig, read_npz
from mie.shards.writer import ConfigMismatch, ShardSetWriter

N_POSTS = 16
PER_SHARD = 3
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
NO_CANDIDATES = ["wow", "!", "!", "!"]


@pytest.fixture(scope="module", params=["tensor", "predict"])
def world(request, data) -> dict:
    """The fixture data and the detection backend (``detect.backend``): every test runs with both."""
    return {**data, "backend": request.param}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Tiny models and the input shard set (6 shards of ≤ 3 samples)."""
    root = tmp_path_factory.mktemp("pl")
    toy_cfg = config_lib.from_dict(toy.ToyConfig, {
        "out": str(root / "toy"), "image_size": 64, "name_pool": 40, "newsclippings": [N_POSTS // 2, 0, 0],
        **{k: [0, 0, 0] for k in ("twitter", "gmner", "mnre", "jmere")}})
    toy.main(toy_cfg, DistEnv())
    nc = root / "toy" / "newsclippings"
    build_mod.main(config_lib.from_dict(build_mod.BuildConfig, {
        "source": {"format": "newsclippings", "root": str(nc / "data" / "toy"), "name": "toynews",
                   "image_dir": str(nc / "visual_news" / "origin"), "splits": ["train"]},
        "output": {"dir": str(root / "built"), "samples_per_shard": 100, "max_image_side": 64}}), DistEnv())
    samples = [fields(s) for s in read_shards(root / "built" / "train")]
    assert len(samples) == N_POSTS

    for i, s in enumerate(samples):
        meta = json.loads(s["json"])
        if i in (0, 1) or i % 3 == 0:  # a stand-in for back-translation's gen.jpg: the image mirrored
            with Image.open(io.BytesIO(s["jpg"])) as im:
                buf = io.BytesIO()
                im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, format="JPEG", quality=90)
            s["gen.jpg"] = buf.getvalue()
        if i == 1:
            del s["jpg"]  # generated image only
        if i == 2:  # text only, and spaCy finds nothing in it
            s.pop("jpg"), s.pop("gen.jpg", None)
            meta["tokens"] = NO_CANDIDATES
            s["txt"] = " ".join(NO_CANDIDATES).encode()
        if i == 4:
            del s["jpg"]  # text only, with candidates
        if i == 5:
            s["jpg"] = b"this is no JPEG"
        s["json"] = json.dumps(meta, sort_keys=True).encode() if i != 7 else b'{"tokens": ["cut off'
    units = [samples[i:i + PER_SHARD] for i in range(0, len(samples), PER_SHARD)]
    writer = ShardSetWriter(root / "input", "fixture", {}, len(units))
    for i, unit in enumerate(units):
        writer.commit(i, unit, [], {})
    assert writer.finalize()["total"] == N_POSTS

    clip_json = root / "models" / "test-clip-tiny.json"
    clip_json.parent.mkdir()
    clip_json.write_text(json.dumps(TINY_CLIP), encoding="utf-8")
    pl.init_clip_checkpoint(clip_json, root / "models" / "clip.pt", seed=0)
    pl.init_clip_checkpoint(clip_json, root / "models" / "clip-other.pt", seed=1)
    return {"root": root, "input": root / "input", "clip_json": clip_json, "clip": root / "models" / "clip.pt",
            "clip_other": root / "models" / "clip-other.pt"}


def cfg_dict(world: dict[str, Path], out: Path) -> dict:
    return {
        "input": str(world["input"]), "output": str(out), "views": ["jpg", "gen.jpg"], "batch_size": 4, "threads": 1,
        "detect": {"model": "yolov8n.yaml", "imgsz": 64, "conf": 0.0, "top_k": 3, "batch_size": 4,
                   "backend": world["backend"]},
        "entities": {"top_m": 30, "batch_size": 8},
        "clip": {"model": "test-clip-tiny", "model_config": str(world["clip_json"]), "checkpoint": str(world["clip"]),
                 "batch_size": 16},
        "soft": {"threshold": 0.2},
    }


def run(world, out: Path, *overrides: str, env: DistEnv = DistEnv()) -> dict | None:
    path = out.parent / f"{out.name}.toml"
    path.write_text(tomli_w.dumps(cfg_dict(world, out)), encoding="utf-8")
    return pl.main(config_lib.load(PseudolabelConfig, path, list(overrides)), env)


@pytest.fixture(scope="module")
def ref(world) -> Path:
    """The reference output, made once."""
    out = world["root"] / f"ref-{world['backend']}"
    assert run(world, out) is not None
    return out


def fields(sample: dict) -> dict:
    """A sample as stored: its key and fields, without what webdataset adds on reading (``__url__``)."""
    return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def by_key(set_dir: Path) -> dict[str, dict]:
    return {s["__key__"]: fields(s) for s in read_shards(set_dir)}


# ---------------------------------------------------------------------------------------------- outputs


def test_outputs_follow_the_schema(world, ref):
    index = json.loads((ref / "index.json").read_text())
    inputs = by_key(world["input"])
    keys = list(inputs)
    # accounting: every input sample is written or rejected, the undecodable image with its reason
    assert index["total"] + index["rejected"] == N_POSTS
    rejects = [json.loads(line) for line in (ref / "rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == [keys[5], keys[7]] and index["rejected"] == 2
    assert rejects[0]["reason"].startswith("undecodable jpg: ")
    assert rejects[1]["reason"].startswith("bad json field: JSONDecodeError")
    assert index["stage"] == "pseudolabel" and index["stats"]["input_samples"] == N_POSTS
    stats = index["stats"]
    assert stats["images"] == sum(v in s for s in inputs.values() for v in ("jpg", "gen.jpg")) - 2  # less the rejects
    assert stats["boxes"] == 3 * stats["images"] and 0 <= stats["boxes_kept"] <= stats["boxes"]
    assert 1 <= stats["posts_without_candidates"] and 0 <= stats["relations_kept"] <= stats["images"]
    fp = index["config"]["fingerprints"]
    assert fp["clip.checkpoint"].startswith("sha256:") and fp["clip.model_config"].startswith("sha256:")
    assert "yolov8n.yaml" in fp["detect.model"] and "batch_size" not in index["config"]

    vocab = json.loads((ref / "vocab.json").read_text())
    assert set(vocab) == {"entities", "entity_prompts", "relations", "relation_prompts"}
    M, R = len(vocab["entities"]), len(vocab["relations"])
    assert 0 < M <= 30 and R == 22 and vocab["relations"][0] == "/per/per/parent"
    assert vocab["entity_prompts"][0] == [f"a photo of {vocab['entities'][0]}"]
    assert vocab["relation_prompts"][8] == ["a photo of person member of organization"]

    out = by_key(ref)
    assert list(out) == [k for k in keys if k not in (keys[5], keys[7])]
    for i, key in enumerate(keys):
        if i in (5, 7):
            continue
        s, src = out[key], inputs[key]
        assert {k: s[k] for k in src} == src  # every earlier field kept as it was
        tokens = json.loads(s["json"])["tokens"]
        det, ents, soft = json.loads(s["det.json"]), json.loads(s["ents.json"]), read_npz(s["soft.npz"])
        assert set(det) == {"jpg", "gen.jpg"}
        assert set(soft) == {f"{p}_{a}" for p in ("jpg", "gen")
                             for a in ("obj_ent", "obj_mask", "rel", "rel_mask", "itm")}
        for c in ents["candidates"]:
            assert " ".join(tokens[c["start"]:c["end"]]) == c["text"]
            assert c["kind"] in ("ent", "propn", "chunk")
            key = c["text"].lower()
            assert c["vocab_id"] == (vocab["entities"].index(key) if key in vocab["entities"] else -1)
        post_ids = sorted({c["vocab_id"] for c in ents["candidates"] if c["vocab_id"] >= 0})
        kept_rel = []
        for view, p in (("jpg", "jpg"), ("gen.jpg", "gen")):
            d = det[view]
            obj, mask, rel = soft[f"{p}_obj_ent"], soft[f"{p}_obj_mask"], soft[f"{p}_rel"]
            assert obj.dtype == np.float32 and rel.dtype == np.float32 and mask.dtype == bool
            assert soft[f"{p}_rel_mask"].shape == () and soft[f"{p}_itm"].shape == ()
            if view not in s:  # absent view: no boxes, nothing kept
                assert d == {"boxes": [], "scores": [], "classes": []}
                assert obj.shape == (0, M) and mask.shape == (0,) and not rel.any() and not soft[f"{p}_rel_mask"]
                continue
            K = len(d["boxes"])
            assert K == 3 == len(d["scores"]) == len(d["classes"])  # conf 0: always top_k boxes
            assert d["scores"] == sorted(d["scores"], reverse=True)
            w, h = json.loads(s["json"])["jpg_size"]
            assert all(0 <= b[0] <= b[2] <= w and 0 <= b[1] <= b[3] <= h for b in d["boxes"])
            assert obj.shape == (K, M) and mask.shape == (K,)
            if post_ids:
                # a distribution over the post's own in-vocabulary candidates, zero elsewhere
                assert np.allclose(obj.sum(1), 1.0, atol=1e-5)
                assert not obj[:, [j for j in range(M) if j not in post_ids]].any()
                assert (mask == (obj.max(1) >= 0.2)).all()
            else:
                assert not obj.any() and not mask.any()
            assert np.isclose(rel.sum(), 1.0, atol=1e-5)
            assert bool(soft[f"{p}_rel_mask"]) == (rel.max() >= 0.2)
            assert -1.0 <= float(soft[f"{p}_itm"]) <= 1.0
            if soft[f"{p}_rel_mask"]:
                kept_rel.append(rel)
        expect = list(np.argsort(-np.mean(kept_rel, 0), kind="stable")[:3]) if kept_rel else []
        assert ents["relation_prompt_ids"] == expect

    # the special samples
    assert "jpg" in out[keys[0]] and "gen.jpg" in out[keys[0]]
    assert len(json.loads(out[keys[1]]["det.json"])["gen.jpg"]["boxes"]) == 3
    empty = out[keys[2]]  # text only, no candidates: kept, empty and fully masked
    assert json.loads(empty["ents.json"]) == {"candidates": [], "relation_prompt_ids": []}
    assert all(not v.any() for v in read_npz(empty["soft.npz"]).values())
    assert json.loads(out[keys[4]]["ents.json"])["candidates"]  # text only with candidates


def test_two_runs_and_other_batch_sizes_are_identical(world, ref, tmp_path):
    again = tmp_path / "again"
    run(world, again)
    assert tree_bytes(again) == tree_bytes(ref)
    assert (again / "vocab.json").read_bytes() == (ref / "vocab.json").read_bytes()
    assert (again / "rejects.jsonl").read_bytes() == (ref / "rejects.jsonl").read_bytes()
    other = tmp_path / "other"
    run(world, other, "batch_size=7", "detect.batch_size=1", "clip.batch_size=5", "entities.batch_size=1")
    a, b = by_key(ref), by_key(other)
    assert list(a) == list(b)
    for key in a:
        assert a[key]["det.json"] == b[key]["det.json"] and a[key]["ents.json"] == b[key]["ents.json"]
        sa, sb = read_npz(a[key]["soft.npz"]), read_npz(b[key]["soft.npz"])
        for name in sa:  # matrix products of other shapes may round differently in the last bits
            np.testing.assert_allclose(sa[name], sb[name], rtol=1e-4, atol=1e-6, err_msg=f"{key} {name}")
    config = json.loads((ref / "index.json").read_text())["config"]
    assert json.loads((other / "index.json").read_text())["config"] == config | {"output": str(other)}


def test_views_can_be_chosen(world, ref, tmp_path):
    out = tmp_path / "gen-only"
    index = run(world, out, 'views=["gen.jpg"]')
    assert index["total"] == N_POSTS - 1  # the undecodable jpg is not looked at; the broken json is rejected
    ref_samples = by_key(ref)
    for key, s in by_key(out).items():
        det, soft = json.loads(s["det.json"]), read_npz(s["soft.npz"])
        assert set(det) == {"gen.jpg"} and {k.split("_")[0] for k in soft} == {"gen"}
        if key in ref_samples:  # the same numbers as with both views
            assert det["gen.jpg"] == json.loads(ref_samples[key]["det.json"])["gen.jpg"]


def test_vocabulary_from_another_set(world, ref, tmp_path):
    out = tmp_path / "reused"
    run(world, out, f"entities.vocab_from={ref / 'vocab.json'}")
    assert (out / "vocab.json").read_bytes() == (ref / "vocab.json").read_bytes()
    assert not list((out / "_vocab").glob("*.json"))  # nothing counted
    assert tree_bytes(out) == tree_bytes(ref)


# ---------------------------------------------------------------------------------------------- ranks


def test_rank_split_and_vocabulary_merge(world, ref, tmp_path):
    out = tmp_path / "ranks"
    parts = out / "_vocab"
    parts.mkdir(parents=True)
    # rank 1 of 2 has counted its shards (1, 3, 5): its count files are what it would write
    for i in (1, 3, 5):
        shutil.copy(ref / "_vocab" / f"shard-{i:06d}.json", parts)
    old = 1_000_000_000
    for p in parts.iterdir():
        os.utime(p, (old, old))
    assert run(world, out, env=DistEnv(rank=0, world_size=2)) is None  # rank 1's shards still missing
    for i in range(6):
        counted_here = (parts / f"shard-{i:06d}.json").stat().st_mtime != old
        assert counted_here == (i % 2 == 0), i
    assert (out / "vocab.json").read_bytes() == (ref / "vocab.json").read_bytes()
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in (0, 2, 4)]
    assert run(world, out, env=DistEnv(rank=1, world_size=2)) is not None
    assert tree_bytes(out) == tree_bytes(ref)
    assert (out / "rejects.jsonl").read_bytes() == (ref / "rejects.jsonl").read_bytes()


def test_a_lone_rank_counts_the_whole_vocabulary(world, ref, tmp_path):
    out = tmp_path / "lone"
    assert run(world, out, env=DistEnv(rank=1, world_size=2)) is None
    assert len(list((out / "_vocab").glob("shard-*.json"))) == 6  # it did not wait for rank 0
    assert (out / "vocab.json").read_bytes() == (ref / "vocab.json").read_bytes()


# ---------------------------------------------------------------------------------------------- faults


def test_resume_after_kill(world, ref, tmp_path):
    out = tmp_path / "killed"
    cfg_path = tmp_path / "killed.toml"
    cfg_path.write_text(tomli_w.dumps(cfg_dict(world, out)), encoding="utf-8")
    kill_after_first_part(["shards", "pseudolabel", str(cfg_path)], out / "_parts")
    assert not (out / "index.json").exists()
    done = sorted(out.glob("*.tar"))
    assert 1 <= len(done) < 6, "the kill did not land mid-set"
    for tar in done:
        assert tar.read_bytes() == (ref / tar.name).read_bytes()
    (out / "shard-000005.tar.999999.tmp").write_bytes(b"half a tar")  # a kill inside a commit

    assert run(world, out) is not None
    assert tree_bytes(out) == tree_bytes(ref)
    assert not list(out.rglob("*.tmp"))


def test_other_config_or_model_into_same_dir_is_refused(world, ref, tmp_path):
    out = tmp_path / "guarded"
    run(world, out)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for override in ("detect.top_k=2", f"clip.checkpoint={world['clip_other']}", "entities.top_m=5",
                     "entities.max_words=1"):
        with pytest.raises(ConfigMismatch) as e:
            run(world, out, override)
        assert "\n" not in str(e.value) and str(out) in str(e.value), override
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert run(world, out, "batch_size=5") is not None  # batch sizes change nothing: resumes the same set


def one_line_error(capsys, *args: str) -> str:
    rc = cli_mod.main(list(args))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mie: error: ") and err.count("\n") == 1, err
    return err


def test_bad_model_paths_are_one_line_errors(world, tmp_path, capsys):
    out = tmp_path / "bad"
    cfg_path = tmp_path / "bad.toml"
    cfg_path.write_text(tomli_w.dumps(cfg_dict(world, out)), encoding="utf-8")
    cases = {"detect.model=/nowhere/yolo.pt": "detect.model",
             "detect.model=no-such-arch.yaml": "detect.model",
             "clip.checkpoint=/nowhere/clip.pt": "clip.checkpoint",
             "clip.checkpoint=": "clip.checkpoint",
             "clip.model_config=/nowhere/test-clip-tiny.json": "clip.model_config",
             "entities.pipeline=no_such_spacy_pipeline": "entities.pipeline",
             "relations.file=/nowhere/relations.txt": "relations.file",
             f"input={tmp_path / 'no-input'}": "no-input"}
    for override, key in cases.items():
        err = one_line_error(capsys, "shards", "pseudolabel", str(cfg_path), override)
        assert key in err, (override, err)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    err = one_line_error(capsys, "shards", "pseudolabel", str(cfg_path), f"clip.checkpoint={junk}")
    assert "clip.checkpoint" in err and str(junk) in err
    err = one_line_error(capsys, "shards", "pseudolabel", str(cfg_path), f"detect.model={junk}")
    assert "detect.model" in err and str(junk) in err
    assert not out.exists()  # refused before anything was written
    # the shipped configs load; the real one names model files that are not here
    toy_cfg = config_lib.load(PseudolabelConfig, cli_mod.packaged_config("shards/toy/pseudolabel.toml"))
    assert toy_cfg.clip.model == "mie-clip-tiny" and toy_cfg.detect.model == "runs/models/toy/yolo-toy.pt"
    err = one_line_error(capsys, "shards", "pseudolabel", "shards/pseudolabel.toml", f"input={world['input']}",
                         f"output={out}")
    assert "detect.model: YOLO checkpoint models/yolov8n.pt not found" in err


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_writes_a_png(world, ref, tmp_path, capsys):
    png = tmp_path / "look" / "samples.png"
    assert cli_mod.main(["shards", "inspect", str(ref), "--out", str(png), "-n", "5"]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 5 * 200
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # images and drawings, not a blank page
    plain = tmp_path / "input.png"  # a set without pseudo-labels shows its images and text
    assert cli_mod.main(["shards", "inspect", str(world["input"]), "--out", str(plain), "-n", "2"]) == 0
    assert plain.is_file()
    err = one_line_error(capsys, "shards", "inspect", str(tmp_path / "none"), "--out", str(plain))
    assert "shard set not found" in err

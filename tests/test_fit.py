"""``mie shards fit-detector`` and ``fit-prompter`` on a tiny toy world, on the CPU, and the toy quality score.

Each fit runs the libraries' own training (ultralytics ``YOLO.train``, open_clip + ``ClipLoss``) for one or a
few epochs on a few images, then its output is loaded the way ``mie shards pseudolabel`` loads it and the
stage runs with both fitted models. The fits run with the socket layer refusing and recording every
connection, so a download attempt anywhere fails the test.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from conftest import clean_env, cli, read_shards
from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.shards import build as build_mod
from mie.shards import fit_detector as fd
from mie.shards import fit_prompter as fp
from mie.shards import pseudolabel as pl
from mie.shards import toy
from mie.shards.detect import DetectConfig, Detector, ModelFileError, decode_rgb
from mie.shards.entities import relation_phrase
from mie.shards.toyfit import FitMismatch, caption_pairs, near_px, refers, score, shown_relations
from mie.shards.writer import ShardSetWriter

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _guard_network(mp: pytest.MonkeyPatch) -> list:
    """Make every way out to the network fail, and record the attempts."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2])[:200])
        raise OSError("network access refused by tests/test_fit.py")

    for obj, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "getaddrinfo"),
                      (socket, "create_connection")):
        mp.setattr(obj, name, refuse)
    return attempts


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fit")
    toy.main(config_lib.from_dict(toy.ToyConfig, {
        "out": str(root / "toy"), "image_size": 64, "name_pool": 40, "twitter": [12, 0, 0],
        "newsclippings": [10, 4, 0], **{k: [0, 0, 0] for k in ("gmner", "mnre", "jmere")}}), DistEnv())
    clip_json = root / "test-fit-clip.json"
    clip_json.write_text(json.dumps(TINY_CLIP), encoding="utf-8")
    return {"root": root, "world": root / "toy", "clip_json": clip_json}


def detector_cfg(world: dict, **over) -> dict:
    return {"world": str(world["world"]), "output": str(world["root"] / "models" / "yolo.pt"), "model": "yolov8n.yaml",
            "train_images": 8, "val_images": 4, "epochs": 1, "batch": 4, "imgsz": 64, "mosaic": 0.0,
            "close_mosaic": 0, "threads": 1, **over}


def prompter_cfg(world: dict, **over) -> dict:
    return {"world": str(world["world"]), "output": str(world["root"] / "models" / "clip.pt"), "model": "test-fit-clip",
            "model_config": str(world["clip_json"]), "epochs": 3, "batch_size": 16, "warmup_steps": 2,
            "threads": 1, **over}


@pytest.fixture(scope="module")
def fitted(world) -> dict:
    """Both models fitted once, with the network refused."""
    with pytest.MonkeyPatch.context() as mp:
        attempts = _guard_network(mp)
        det = fd.main(config_lib.from_dict(fd.FitDetectorConfig, detector_cfg(world)), DistEnv())
        clip = fp.main(config_lib.from_dict(fp.FitPrompterConfig, prompter_cfg(world)), DistEnv())
    return {"detector": det, "prompter": clip, "attempts": attempts,
            "yolo": world["root"] / "models" / "yolo.pt", "clip": world["root"] / "models" / "clip.pt"}


def test_fits_need_no_network(fitted):
    assert fitted["attempts"] == []
    assert fitted["detector"] is not None and fitted["prompter"] is not None


def test_detector_dataset_is_the_truth(world, fitted):
    """The label files mie wrote are the truth boxes, normalised, one class per shape."""
    truth = json.loads((world["world"] / "truth.json").read_text())
    shapes = list(truth["shape_of_type"].values())
    labels = sorted((world["root"] / "models" / "yolo.pt.work" / "dataset" / "labels").rglob("*.txt"))
    assert len(labels) == 12  # 8 train + 4 val
    for path in labels:
        key = path.stem.replace("__", "/") + ".jpg"
        objects = truth["images"][key]["objects"]
        rows = np.loadtxt(path, ndmin=2)
        want = [[shapes.index(o["shape"]), (o["box"][0] + o["box"][2]) / 128, (o["box"][1] + o["box"][3]) / 128,
                 (o["box"][2] - o["box"][0]) / 64, (o["box"][3] - o["box"][1]) / 64] for o in objects]
        np.testing.assert_allclose(rows, want, atol=1e-6)


def test_fitted_detector_loads_in_the_stage_detector(world, fitted):
    meta = fitted["detector"]
    truth = json.loads((world["world"] / "truth.json").read_text())
    assert meta["metrics"]["names"] == list(truth["shape_of_type"].values())  # classes in the world's order
    assert 0.0 <= meta["metrics"]["map50"] <= 1.0 and meta["sha256"]
    det = Detector(config_lib.from_dict(DetectConfig, {"model": str(fitted["yolo"]), "imgsz": 64, "conf": 0.0,
                                                       "top_k": 3, "batch_size": 2, "decode_workers": 1}))
    assert det.model.names == dict(enumerate(meta["metrics"]["names"]))
    image = decode_rgb((world["world"] / "images" / "tw_000001.jpg").read_bytes())
    found = det([image, image])
    assert len(found) == 2 and len(found[0].boxes) == 3 and all(0 <= c < 4 for c in found[0].classes)


def test_fitted_prompter_loads_in_the_stage_scorer(world, fitted):
    meta = fitted["prompter"]
    assert np.isfinite(meta["metrics"]["final_loss"]) and meta["metrics"]["eval_crops"] > 0
    assert meta["metrics"]["eval_relation_images"] >= 0 and "eval_relation_top1" in meta["metrics"]
    scorer = pl.ClipScorer(config_lib.from_dict(pl.ClipConfig, {
        "model": "test-fit-clip", "model_config": str(world["clip_json"]), "checkpoint": str(fitted["clip"])}))
    # The published weights are the trained ones, not a fresh initialisation.
    state = torch.load(fitted["clip"], map_location="cpu", weights_only=True)["state_dict"]
    init = world["root"] / "init.pt"
    pl.init_clip_checkpoint(world["clip_json"], init, seed=0)
    fresh = torch.load(init, map_location="cpu", weights_only=True)["state_dict"]
    assert state.keys() == fresh.keys() and any(not torch.equal(state[k], fresh[k]) for k in state)
    for k, v in scorer.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert scorer.texts(["a photo of red zorb"]).shape == (1, 32)


def test_relation_pairs_follow_the_world_rule(world):
    """An image shows a relation when two named objects nearly touch and their shapes have a label."""
    def obj(entity, kind, box):
        return {"entity": entity, "type": kind, "box": box}
    objects = [obj("Ann", "PER", [0, 0, 10, 10]), obj("Bo", "LOC", [13, 0, 20, 10]),  # gap 3: near
               obj(None, "ORG", [0, 12, 10, 20]),  # unnamed: never related
               obj("Cy", "OTHER", [30, 30, 40, 40]),  # far from all
               obj("Dee", "ORG", [30, 43, 40, 50]),  # near Cy, but ORG-OTHER has no label
               obj("Ann", "PER", [50, 50, 60, 60]), obj("Ann", "PER", [61, 50, 70, 60])]  # one entity's two boxes
    assert shown_relations(objects, near=3) == ["/per/loc/place_of_residence"]
    assert shown_relations(objects, near=2) == []
    assert near_px(world["world"]) == max(toy.MIN_SEP, round(0.04 * 64))
    pairs = fp.training_pairs(caption_pairs(world["world"], "train"), config_lib.from_dict(
        fp.FitPrompterConfig, prompter_cfg(world, pairs=["relation"])))[1]
    assert pairs and all(t.startswith("a photo of ") for t in pairs)
    assert set(pairs) <= {f"a photo of {relation_phrase(r)}" for r in toy.RELATION_OF_TYPES.values()}


def test_rerun_skips_and_another_config_is_refused(world, fitted):
    before = {p: p.stat().st_mtime_ns for p in (fitted["yolo"], fitted["clip"])}
    t0 = time.perf_counter()
    assert fd.main(config_lib.from_dict(fd.FitDetectorConfig, detector_cfg(world)), DistEnv()) == fitted["detector"]
    assert fp.main(config_lib.from_dict(fp.FitPrompterConfig, prompter_cfg(world)), DistEnv()) == fitted["prompter"]
    assert time.perf_counter() - t0 < 15
    assert before == {p: p.stat().st_mtime_ns for p in before}
    with pytest.raises(FitMismatch, match="output: .*yolo.pt was fitted with another config"):
        fd.main(config_lib.from_dict(fd.FitDetectorConfig, detector_cfg(world, epochs=2)), DistEnv())
    with pytest.raises(FitMismatch, match="force=true"):
        fp.main(config_lib.from_dict(fp.FitPrompterConfig, prompter_cfg(world, lr=1e-3)), DistEnv())


def test_prompter_resumes_after_a_kill(world, tmp_path):
    """A run killed after an epoch resumes from <output>.work/last.pt and ends with the same weights as a
    run that was never interrupted."""
    cfg = prompter_cfg(world, output=str(tmp_path / "killed.pt"), epochs=40, eval_split="")
    path = tmp_path / "fit.toml"
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    state = tmp_path / "killed.pt.work" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "mie.launch.cli", "shards", "fit-prompter", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    try:
        deadline = time.time() + 60
        while not state.is_file():
            assert proc.poll() is None, "the fit ended before its first epoch was saved"
            assert time.time() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "killed.pt").exists()
    done = torch.load(state, map_location="cpu", weights_only=True)["epoch"] + 1
    assert done < 40
    r = cli("shards", "fit-prompter", str(path))
    assert r.returncode == 0, r.stderr
    assert f"resuming prompter training from {state} ({done} of 40 epochs done)" in r.stdout
    whole = fp.main(config_lib.from_dict(fp.FitPrompterConfig, {**cfg, "output": str(tmp_path / "whole.pt")}),
                    DistEnv())
    a = torch.load(tmp_path / "killed.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "whole.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "killed.pt.json").read_text())["sha256"] == whole["sha256"]


def test_bad_config_is_one_line(world, tmp_path):
    path = tmp_path / "d.toml"
    path.write_text(tomli_w.dumps(detector_cfg(world)), encoding="utf-8")
    for args, msg in ((["shards", "fit-detector", str(path), "epochs=0"], "epochs/batch: must be >= 1"),
                      (["shards", "fit-detector", str(path), f"world={tmp_path / 'nowhere'}"],
                       "world: " + str(tmp_path / "nowhere") + " is not a finished toy world"),
                      (["shards", "fit-prompter", str(path)], "unknown key 'batch'"),
                      (["shards", "fit-detector", str(path), "model=missing.pt"], "model: YOLO checkpoint missing.pt not found")):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("mie: error: ") and msg in r.stderr, r.stderr
    with pytest.raises(ModelFileError, match="^model_config: .*x.json not found$"):
        fp.main(config_lib.from_dict(fp.FitPrompterConfig, prompter_cfg(world, model_config=str(tmp_path / "x.json"))),
                DistEnv())


# ---------------------------------------------------------------------------------------- the chain, scored


@pytest.fixture(scope="module")
def labelled(world, fitted) -> dict:
    """The world's NewsCLIPpings-style train pairs built into shards and pseudo-labelled with both fits."""
    nc = world["world"] / "newsclippings"
    built = world["root"] / "built"
    build_mod.main(config_lib.from_dict(build_mod.BuildConfig, {
        "source": {"format": "newsclippings", "root": str(nc / "data" / "toy"), "name": "toynews",
                   "image_dir": str(nc / "visual_news" / "origin"), "splits": ["train"]},
        "output": {"dir": str(built), "samples_per_shard": 8, "max_image_side": 64}}), DistEnv())
    out = world["root"] / "labelled"
    cfg = config_lib.from_dict(pl.PseudolabelConfig, {
        "input": str(built / "train"), "output": str(out), "views": ["jpg"], "batch_size": 8, "threads": 1,
        "detect": {"model": str(fitted["yolo"]), "imgsz": 64, "conf": 0.0, "top_k": 4, "batch_size": 8},
        "entities": {"top_m": 1000},
        "clip": {"model": "test-fit-clip", "model_config": str(world["clip_json"]), "checkpoint": str(fitted["clip"])}})
    index = pl.main(cfg, DistEnv())
    assert index["total"] == 20 and index["rejected"] == 0
    return {"out": out, "names": fitted["detector"]["metrics"]["names"]}


def test_score_of_the_fitted_chain(world, labelled):
    got = score(labelled["out"], world["world"], labelled["names"])
    assert got["images"] == 10 and got["posts_scored"] == 10
    assert 0.0 <= got["map50"] <= 1.0 and set(got["ap50"]) <= {"circle", "square", "triangle", "diamond"}
    assert got["top1_n"] == got["top1_colour_n"] + got["top1_no_colour_n"] == got["boxes_scored"]


def test_score_is_one_for_perfect_labels_and_drops_for_wrong_ones(world, labelled, tmp_path):
    """The stage's output rewritten with the truth boxes and one-hot rows on a candidate naming the right
    entity scores top-1 1.0 and full mAP50; moving each row to a candidate that does not name the entity
    gives top-1 0."""
    truth = json.loads((world["world"] / "truth.json").read_text())
    shapes = list(truth["shape_of_type"].values())
    vocab_size = len(json.loads((labelled["out"] / "vocab.json").read_text())["entities"])
    records = {str(r["id"]): r["image_path"][2:] for r in
               json.loads((world["world"] / "newsclippings/visual_news/origin/data.json").read_text())}

    def rewrite(dst: Path, wrong: bool) -> None:
        samples = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
                   for s in read_shards(labelled["out"])]
        writer = ShardSetWriter(dst, "pseudolabel", {}, 1)
        for s in samples:
            meta = json.loads(s["json"])
            objects = truth["images"]["newsclippings/visual_news/origin/" + records[str(meta["image_id"])]]["objects"]
            cands = [c for c in json.loads(s["ents.json"])["candidates"] if c["vocab_id"] >= 0]
            rows = np.zeros((len(objects), vocab_size), np.float32)
            for k, o in enumerate(objects):
                if o["entity"] is None:
                    continue
                pick = [c["vocab_id"] for c in cands if refers(c["text"], o["entity"]) != wrong]
                if pick:
                    rows[k, pick[0]] = 1.0
            s["det.json"] = json.dumps({"jpg": {"boxes": [o["box"] for o in objects], "scores": [0.9] * len(objects),
                                                "classes": [shapes.index(o["shape"]) for o in objects]}}).encode()
            s["soft.npz"] = pl.npz_bytes({"jpg_obj_ent": rows, "jpg_obj_mask": rows.max(1) > 0})
        writer.commit(0, samples, [], {})
        writer.finalize()

    rewrite(tmp_path / "perfect", wrong=False)
    perfect = score(tmp_path / "perfect", world["world"], labelled["names"])
    # 0.995, not 1: ultralytics' AP integrates a 101-point interpolated curve that ends at precision 0
    assert perfect["map50"] >= 0.99 and perfect["top1"] == 1.0 and perfect["top1_n"] > 0
    rewrite(tmp_path / "wrong", wrong=True)
    wrong = score(tmp_path / "wrong", world["world"], labelled["names"])
    assert wrong["map50"] == perfect["map50"] and wrong["top1"] == 0.0 and wrong["top1_n"] > 0

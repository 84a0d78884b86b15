"""``mie shards build`` end to end: outputs, determinism, rank splits, kill/resume, accounting."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import (clean_env, cli, kill_after_first_part, conll_text, jpeg_bytes, make_twitter_corpus, read_shards, tree_bytes,
                      tweet_rows, write_build_config, write_jpeg)
from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.shards import build as build_mod
from mie.shards.build import BuildConfig
from mie.shards.schema import read_index, shard_paths
from mie.shards.writer import ConfigMismatch

SPLITS = ("train", "dev", "test")


def make_cfg(path: Path, root: Path, image_dir: Path | None, out: Path, source: dict | None = None, **output) -> Path:
    src = {"format": "twitter", "root": str(root), "image_dir": str(image_dir or ""), **(source or {})}
    out_cfg = {"dir": str(out), "samples_per_shard": 3, "max_image_side": 48, "jpeg_quality": 80, **output}
    return write_build_config(path, src, out_cfg)


def build(cfg_path: Path, *overrides: str, env: DistEnv = DistEnv()) -> dict:
    return build_mod.main(config_lib.load(BuildConfig, cfg_path, list(overrides)), env)


def without_config(index: dict) -> dict:
    return {k: v for k, v in index.items() if k != "config"}


def assert_same_sets(a: Path, b: Path, splits=SPLITS) -> None:
    """Two shard-set trees hold the same shards, index (but for the config) and rejects."""
    assert tree_bytes(a) == tree_bytes(b)
    assert tree_bytes(a), "no shards at all"
    for split in splits:
        ia = json.loads((a / split / "index.json").read_text(encoding="utf-8"))
        ib = json.loads((b / split / "index.json").read_text(encoding="utf-8"))
        assert without_config(ia) == without_config(ib)
        assert (a / split / "rejects.jsonl").read_bytes() == (b / split / "rejects.jsonl").read_bytes()


@pytest.fixture
def cfg_path(tmp_path, twitter_corpus):
    root, image_dir = twitter_corpus
    return make_cfg(tmp_path / "build.toml", root, image_dir, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- outputs


def test_build_outputs(cfg_path, tmp_path, twitter_corpus):
    out = tmp_path / "out"
    indexes = build(cfg_path)
    assert set(indexes) == set(SPLITS)
    cfg = config_lib.load(BuildConfig, cfg_path)
    assert config_lib.load(BuildConfig, out / "config.toml") == cfg

    expected = {"train": (7, [3, 3, 1]), "dev": (3, [3]), "test": (2, [2])}
    first_id = {"train": 7000, "dev": 7007, "test": 7010}
    for split, (n, per_shard) in expected.items():
        d = out / split
        index = json.loads((d / "index.json").read_text(encoding="utf-8"))
        assert index == indexes[split] == read_index(d)
        assert index["schema_version"] == 1 and index["stage"] == "build"
        # the index records what the bytes depend on: the config less paths/workers, and the input's sha256
        assert {k: v for k, v in index["config"].items() if k != "input_sha256"} == build_mod._fingerprint(cfg)
        assert len(index["config"]["input_sha256"]) == 64
        assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(per_shard))]
        assert [s["samples"] for s in index["shards"]] == per_shard
        for s in index["shards"]:
            assert s["sha256"] == hashlib.sha256((d / s["name"]).read_bytes()).hexdigest()
        assert index["total"] == n and index["rejected"] == 0
        assert index["stats"] == {"images": n, "missing_images": 0}
        assert (d / "rejects.jsonl").read_text(encoding="utf-8") == ""
        assert shard_paths(d) == [d / s["name"] for s in index["shards"]]
        assert sorted(p.name for p in d.glob("*.tar")) == [s["name"] for s in index["shards"]]

        samples = read_shards(d)
        assert len(samples) == n
        for k, sample in enumerate(samples):
            imgid = str(first_id[split] + k)
            assert sample["__key__"] == f"twitter-{split}-{imgid}"
            assert {"txt", "json", "jpg"} <= set(sample)
            meta = json.loads(sample["json"])
            rows = tweet_rows(first_id[split] - 7000 + k)
            tokens = [t for t, _ in rows]
            assert sample["txt"].decode("utf-8") == " ".join(tokens)
            assert meta["source"] == "twitter" and meta["split"] == split and meta["id"] == imgid
            assert meta["tokens"] == tokens
            assert meta["tags"] == [g for _, g in rows]
            assert [(e["start"], e["end"], e["type"], e["text"]) for e in meta["entities"]] == [
                (1, 3, "PER", "Quorvex Taldin"), (5, 6, "LOC", "Brellham")]
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert max(im.size) <= 48
                assert list(im.size) == meta["jpg_size"]
                with Image.open(twitter_corpus[1] / f"{imgid}.jpg") as orig:
                    assert meta["image_size"] == list(orig.size)
                    scale = min(1.0, 48 / max(orig.size))
                    assert abs(im.size[0] - orig.size[0] * scale) <= 1 and abs(im.size[1] - orig.size[1] * scale) <= 1
    # the odd sizes went through: 120x40 → 48x16, 50x90 → 27x48 (rounded), 33x33 untouched
    metas = {json.loads(s["json"])["id"]: json.loads(s["json"]) for s in read_shards(out / "train")}
    assert metas["7001"]["image_size"] == [120, 40] and metas["7001"]["jpg_size"] == [48, 16]
    assert metas["7004"]["image_size"] == [50, 90] and metas["7004"]["jpg_size"] == [27, 48]
    dev = {json.loads(s["json"])["id"]: json.loads(s["json"]) for s in read_shards(out / "dev")}
    assert dev["7009"]["jpg_size"] == [33, 33]


def test_text_only_build_and_empty_split(tmp_path):
    root, _ = make_twitter_corpus(tmp_path / "c", {"train": 4, "dev": 2}, images=False)
    (root / "test.txt").write_text("", encoding="utf-8")
    cfg = make_cfg(tmp_path / "b.toml", root, None, tmp_path / "out", source={"name": "tw17"})
    indexes = build(cfg)
    assert indexes["train"]["total"] == 4 and len(indexes["train"]["shards"]) == 2
    assert indexes["test"]["total"] == 0 and indexes["test"]["shards"] == [] and indexes["test"]["rejected"] == 0
    samples = read_shards(tmp_path / "out" / "train")
    assert [s["__key__"] for s in samples] == [f"tw17-train-{7000 + k}" for k in range(4)]
    for s in samples:
        assert "jpg" not in s
        meta = json.loads(s["json"])
        assert meta["image_size"] is None and meta["source"] == "tw17"
    assert indexes["train"]["stats"] == {"images": 0, "missing_images": 0}


def test_split_files_override(tmp_path):
    root, _ = make_twitter_corpus(tmp_path / "c", {"train": 2, "test": 1}, images=False)
    assert not (root / "valid.txt").exists()  # a split that is not listed needs no file
    cfg = make_cfg(tmp_path / "b.toml", root, None, tmp_path / "out",
                   source={"splits": ["train", "test"], "split_files": {"test": "train.txt"}})
    indexes = build(cfg)
    assert set(indexes) == {"train", "test"} and indexes["test"]["total"] == 2
    assert not (tmp_path / "out" / "dev").exists()


# ---------------------------------------------------------------------------------------------- determinism


def test_two_builds_are_byte_identical(cfg_path, tmp_path):
    build(cfg_path, f"output.dir={tmp_path / 'a'}")
    build(cfg_path, f"output.dir={tmp_path / 'b'}")
    assert_same_sets(tmp_path / "a", tmp_path / "b")
    # image work in a process pool gives the same bytes
    build(cfg_path, f"output.dir={tmp_path / 'c'}", "output.workers=2")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "c")


def test_rank_split_matches_single_process(cfg_path, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    build(cfg_path, f"output.dir={one}")
    first = build(cfg_path, f"output.dir={two}", env=DistEnv(rank=0, world_size=2, launcher="torchrun"))
    # train has 3 shards: rank 0 wrote 0 and 2, so the set is not complete yet
    assert "train" not in first
    assert not (two / "train" / "index.json").exists()
    assert sorted(p.name for p in (two / "train").glob("*.tar")) == ["shard-000000.tar", "shard-000002.tar"]
    second = build(cfg_path, f"output.dir={two}", env=DistEnv(rank=1, world_size=2, launcher="torchrun"))
    assert "train" in second
    assert_same_sets(one, two)


def _wrote_message(stdout: str, split: str, shards: int, todo: int, rank: int) -> bool:
    return f"twitter/{split}: " in stdout and f"{shards} shards, {todo} to write on rank {rank}" in stdout


def test_torchrun_two_processes(cfg_path, tmp_path):
    build(cfg_path, f"output.dir={tmp_path / 'ref'}")
    out = tmp_path / "tr"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mie.launch.cli", "shards", "build", str(cfg_path), f"output.dir={out}"],
        capture_output=True, text=True, timeout=240, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # rank 0 reports its share: 2 of the 3 train shards (rank 1 wrote the other)
    assert _wrote_message(proc.stdout, "train", 3, 2, 0), proc.stdout
    assert_same_sets(tmp_path / "ref", out)


def test_slurm_array_two_tasks(cfg_path, tmp_path):
    build(cfg_path, f"output.dir={tmp_path / 'ref'}")
    out = tmp_path / "arr"
    procs = []
    for task in (3, 4):  # an array 3-4: SLURM_ARRAY_TASK_MIN=3
        env = clean_env(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="3",
                        SLURM_ARRAY_JOB_ID="4242", SLURM_JOB_ID=str(4300 + task))
        procs.append(subprocess.Popen([sys.executable, "-m", "mie.launch.cli", "shards", "build", str(cfg_path),
                                       f"output.dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=tmp_path))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o + e
    assert _wrote_message(outs[0][0], "train", 3, 2, 0), outs[0][0]
    assert outs[1][0] == ""  # task 4 is rank 1: it prints nothing
    assert_same_sets(tmp_path / "ref", out)


# ---------------------------------------------------------------------------------------------- restart


@pytest.fixture
def slow_corpus(tmp_path):
    """36 tweets whose images are one large JPEG (hard links): a build that takes a few seconds."""
    root = tmp_path / "slow"
    images = root / "images"
    big = write_jpeg(images / "big.jpg", (1800, 1800), seed=5)
    tweets = []
    for k in range(36):
        tweets.append((f"9{k:03d}", tweet_rows(k)))
        os.link(big, images / f"9{k:03d}.jpg")
    (root / "train.txt").write_text(conll_text(tweets), encoding="utf-8")
    return make_cfg(tmp_path / "slow.toml", root, images, tmp_path / "killed", source={"splits": ["train"]},
                    samples_per_shard=2, max_image_side=1024)


def test_resume_after_kill(slow_corpus, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    build(slow_corpus, f"output.dir={ref}")
    n_units = len(json.loads((ref / "train" / "index.json").read_text())["shards"])
    assert n_units == 18

    parts = out / "train" / "_parts"
    kill_after_first_part(["shards", "build", str(slow_corpus)], parts)

    d = out / "train"
    assert not (d / "index.json").exists()
    tars = sorted(d.glob("*.tar"))
    assert 1 <= len(tars) < n_units, "the kill did not land mid-build; make the corpus slower"
    for tar in tars:  # renamed into place only when complete
        assert tar.read_bytes() == (ref / "train" / tar.name).read_bytes()
    for part in parts.glob("shard-*.json"):
        meta = json.loads(part.read_text())
        assert meta["sha256"] == hashlib.sha256((d / meta["name"]).read_bytes()).hexdigest()

    # Leftovers of kills at other moments: a temp tar, a temp part beside a finished tar, a cut tar
    # without its part, and a finished shard damaged after the fact.
    missing = [i for i in range(n_units) if not (parts / f"shard-{i:06d}.json").exists()]
    a, b, c = missing[-1], missing[-2], missing[-3]
    (d / f"shard-{a:06d}.tar.999999.tmp").write_bytes(b"half a tar")
    (d / f"shard-{b:06d}.tar").write_bytes((ref / "train" / f"shard-{b:06d}.tar").read_bytes())
    (parts / f"shard-{b:06d}.json.999999.tmp").write_text('{"name": "shard-')
    (d / f"shard-{c:06d}.tar").write_bytes((ref / "train" / f"shard-{c:06d}.tar").read_bytes()[:5000])
    done = sorted(p for p in d.glob("*.tar") if (parts / (p.stem + ".json")).exists())
    damaged = done[0]
    data = bytearray(damaged.read_bytes())
    data[2000] ^= 0xFF
    damaged.write_bytes(bytes(data))

    proc2 = cli("shards", "build", str(slow_corpus), timeout=240)
    assert proc2.returncode == 0, proc2.stderr
    assert_same_sets(ref, out, splits=["train"])
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))


def test_rerun_of_complete_build_rewrites_nothing(cfg_path, tmp_path):
    out = tmp_path / "out"
    first = build(cfg_path)
    files = [p for p in out.rglob("*") if p.is_file()]
    old = 1_000_000_000
    for p in files:
        os.utime(p, (old, old))
    before = {p: p.read_bytes() for p in files}
    again = build(cfg_path)
    assert again == first
    for p in files:
        assert p.stat().st_mtime == old, f"{p.relative_to(out)} was rewritten"
        assert p.read_bytes() == before[p]
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(files)


def test_other_config_into_same_dir_is_refused(cfg_path, tmp_path):
    out = tmp_path / "out"
    build(cfg_path)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigMismatch) as e:
        build(cfg_path, "output.samples_per_shard=2")
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "another config" in msg
    proc = cli("shards", "build", str(cfg_path), "output.jpeg_quality=50")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mie: error: ") and "another config" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    # the existing set, config.toml included, is untouched
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    # without config.toml the shards' own parts still tell
    (out / "config.toml").unlink()
    with pytest.raises(ConfigMismatch) as e:
        build(cfg_path, "output.max_image_side=40")
    assert str(out / "train") in str(e.value) and "another config" in str(e.value)
    assert {p: p.read_bytes() for p in out.rglob("*.tar")} == {p: b for p, b in snapshot.items() if p.suffix == ".tar"}


# ---------------------------------------------------------------------------------------------- accounting


@pytest.fixture
def corrupt_corpus(tmp_path):
    """A Twitter-format train split with every kind of bad input item. Returns (root, images, n_items)."""
    root, images = tmp_path / "bad", tmp_path / "bad" / "images"
    images.mkdir(parents=True)
    ok = lambda i: tweet_rows(i)  # noqa: E731
    text = (
        "orphan\tO\nlines\tO\n\n"                               # item 1: token lines before any IMGID
        + conll_text([("100", ok(0)), ("101", ok(1)), ("102", ok(2))])  # 2-4: good / garbage / truncated
        + "IMGID:103\n\n"                                       # 5: empty post
        + "IMGID:104\nplint\tO\nvorra\tB-PER\tX\n\n"            # 6: malformed line
        + "IMGID:105\ngello\tQ-PER\n\n"                         # 7: bad tag
        + conll_text([("100", ok(3))])                          # 8: duplicate id
        + conll_text([("106", ok(4))])                          # 9: missing image
        + conll_text([("107", ok(5)), ("108", ok(6)), ("109", ok(7))])  # 10-12: grey png, rgba png, good
    )
    (root / "train.txt").write_text(text, encoding="utf-8")
    write_jpeg(images / "100.jpg", (40, 30), seed=1)
    (images / "101.jpg").write_bytes(b"\x00this is not an image at all\xff" * 10)
    full = jpeg_bytes((200, 150), seed=2)
    (images / "102.jpg").write_bytes(full[: len(full) // 2])
    Image.new("L", (20, 10), 128).save(images / "107.jpg", format="PNG")  # a PNG under a .jpg name
    Image.new("RGBA", (16, 64), (10, 20, 30, 40)).save(images / "108.jpg", format="PNG")
    write_jpeg(images / "109.jpg", (30, 30), seed=3)
    return root, images, 12


def test_accounting_on_corrupt_corpus(corrupt_corpus, tmp_path):
    root, images, n_items = corrupt_corpus
    cfg = make_cfg(tmp_path / "b.toml", root, images, tmp_path / "out", source={"splits": ["train"]})
    index = build(cfg)["train"]
    d = tmp_path / "out" / "train"
    rejects = [json.loads(line) for line in (d / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert index["total"] + index["rejected"] == n_items
    assert index["rejected"] == len(rejects) == 7
    assert index["total"] == sum(s["samples"] for s in index["shards"]) == len(read_shards(d)) == 5
    assert index["stats"] == {"images": 4, "missing_images": 1}
    path = root / "train.txt"
    for r in rejects:
        assert r["split"] == "train" and r["reason"]
        assert re.fullmatch(re.escape(str(path)) + r":\d+", r["where"]), r["where"]
    by_id = {r["id"]: r["reason"] for r in rejects}
    assert "undecodable" in by_id["101"] and "undecodable" in by_id["102"]
    assert "empty post" in by_id["103"]
    assert "line" in by_id["104"] and "bad BIO tag" in by_id["105"]
    assert "duplicate id" in by_id["100"]
    assert any(r["id"] is None and "IMGID" in r["reason"] for r in rejects)
    dup = next(r for r in rejects if r["id"] == "100")
    assert dup["where"] != f"{path}:4" and f"{path}:4" in dup["reason"]  # points at both occurrences
    metas = {json.loads(s["json"])["id"]: (s, json.loads(s["json"])) for s in read_shards(d)}
    assert set(metas) == {"100", "106", "107", "108", "109"}
    assert "jpg" not in metas["106"][0] and metas["106"][1]["image_size"] is None
    assert metas["100"][1]["tokens"] == [t for t, _ in tweet_rows(0)]  # the first occurrence is kept
    for key in ("107", "108"):
        with Image.open(io.BytesIO(metas[key][0]["jpg"])) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
    assert metas["108"][1]["image_size"] == [16, 64]

    # require_images: the missing image becomes a reject; the identity still holds
    strict = build(cfg, f"output.dir={tmp_path / 'strict'}", "source.require_images=true")["train"]
    assert strict["total"] == 4 and strict["rejected"] == 8
    assert strict["total"] + strict["rejected"] == n_items
    assert strict["stats"]["missing_images"] == 0
    lines = (tmp_path / "strict" / "train" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    missing = [json.loads(x) for x in lines if json.loads(x)["id"] == "106"]
    assert len(missing) == 1 and "missing image" in missing[0]["reason"]
    assert re.fullmatch(re.escape(str(path)) + r":\d+", missing[0]["where"])


def test_accounting_jsonl_corpus_through_cli(tmp_path):
    root = tmp_path / "mycorpus"
    (root / "pics").mkdir(parents=True)
    write_jpeg(root / "pics" / "a.jpg", (70, 20), seed=4)
    (root / "pics" / "bad.jpg").write_bytes(b"GIF89a" + b"\x00" * 40)
    rows = [json.dumps({"id": "a", "text": "Quorvex visits Brellham", "image": "pics/a.jpg", "topic": "t1"}),
            "{broken",
            json.dumps({"id": "b", "text": " \t "}),
            json.dumps({"id": "c", "text": "skeel drem", "image": "pics/nope.jpg"}),
            json.dumps({"id": "d", "text": "lusk", "image": "pics/bad.jpg"}),
            json.dumps({"id": "a", "text": "again"}),
            json.dumps({"id": "e", "text": "tessle"}),
            json.dumps({"id": "f.1", "text": "oqua"}),
            json.dumps({"id": "f_1", "text": "oqua"}),  # same sample key as f.1 once made safe: a duplicate
            ""]
    (root / "train.jsonl").write_text("\n".join(rows), encoding="utf-8")
    cfg = write_build_config(tmp_path / "j.toml", {"format": "jsonl", "name": "my.corpus", "root": str(root),
                                                   "splits": ["train"]},
                             {"dir": str(tmp_path / "out"), "samples_per_shard": 2, "max_image_side": 32})
    proc = cli("shards", "build", str(cfg))
    assert proc.returncode == 0, proc.stderr
    index = read_index(tmp_path / "out" / "train")
    assert index["total"] + index["rejected"] == 9
    assert (index["total"], index["rejected"]) == (4, 5)
    assert index["stats"] == {"images": 1, "missing_images": 1}
    samples = read_shards(tmp_path / "out" / "train")
    keys = [s["__key__"] for s in samples]
    assert keys == ["my_corpus-train-a", "my_corpus-train-c", "my_corpus-train-e", "my_corpus-train-f_1"]
    assert json.loads(samples[0]["json"])["topic"] == "t1"  # extra jsonl fields are kept
    assert json.loads(samples[3]["json"])["id"] == "f.1"     # the original id is kept as is
    for line in (tmp_path / "out" / "train" / "rejects.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert re.fullmatch(re.escape(str(root / "train.jsonl")) + r":\d+", r["where"]) and r["reason"]


def test_workers_change_reuses_shards_but_changed_input_is_refused(cfg_path, tmp_path):
    out = tmp_path / "out"
    first = build(cfg_path)
    tars = {p: p.stat().st_mtime for p in out.rglob("*.tar")}
    # the number of encoding workers does not change a byte, so the finished set is reused as is
    assert build(cfg_path, "output.workers=2") == first
    assert {p: p.stat().st_mtime for p in out.rglob("*.tar")} == tars
    # an edited split file gives other shards: refused instead of silently mixing
    split_file = Path(config_lib.load(BuildConfig, cfg_path).source.root) / "train.txt"
    split_file.write_text(split_file.read_text(encoding="utf-8") + "\nIMGID:extra\nword\tO\n", encoding="utf-8")
    with pytest.raises(ConfigMismatch):
        build(cfg_path)

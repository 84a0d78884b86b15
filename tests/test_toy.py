"""The toy world (mie.shards.toy): deterministic, official formats, and the information design holds."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from mie.launch.dist import DistEnv
from mie.shards import toy

SMALL = dict(
    image_size=96, name_pool=60, twitter=[8, 4, 4], gmner=[16, 4, 4], mnre=[16, 4, 4], jmere=[8, 3, 3],
    newsclippings=[12, 4, 4],
)
COLORS = set(toy.PALETTE)
CUE_WORDS = {w for before, after in toy.CUES.values() for cue in before + after for w in cue}


def _generate(out: Path, **overrides) -> Path:
    cfg = toy.ToyConfig(out=str(out), **{**SMALL, **overrides})
    toy.main(cfg, DistEnv())
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("toy") / "world")


@pytest.fixture(scope="module")
def truth(world) -> dict:
    return json.loads((world / "truth.json").read_text())["images"]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _conll(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(image id, tokens, tags) per tweet; asserts the block structure on the way."""
    text = path.read_text(encoding="utf-8")
    tweets = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        assert lines[0].startswith("IMGID:"), lines[0]
        pairs = [line.split("\t") for line in lines[1:]]
        assert pairs and all(len(p) == 2 and p[0] and " " not in p[0] for p in pairs), block
        tweets.append((lines[0][len("IMGID:"):], [p[0] for p in pairs], [p[1] for p in pairs]))
    return tweets


def _spans(tags: list[str]) -> list[tuple[int, int, str]]:
    spans, k = [], 0
    while k < len(tags):
        if tags[k].startswith("B-"):
            t, end = tags[k][2:], k + 1
            while end < len(tags) and tags[end] == f"I-{t}":
                end += 1
            spans.append((k, end, t))
            k = end
        else:
            assert tags[k] == "O", f"stray tag {tags[k]}"
            k += 1
    return spans


def _near_far(side: int) -> tuple[int, int]:
    cfg = toy.ToyConfig()
    near = max(toy.MIN_SEP, round(cfg.near_gap * side))
    return near, max(near + 1, round(cfg.far_gap * side))


def _entity_gap(objects: list[dict], a: str, b: str) -> int:
    return min(toy._gap(x["box"], y["box"]) for x in objects if x["entity"] == a for y in objects if y["entity"] == b)


# ------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(world, tmp_path):
    again = _generate(tmp_path / "again")
    assert _digests(again) == _digests(world)
    other = _digests(_generate(tmp_path / "other", seed=1))
    mine = _digests(world)
    assert other["twitter/train.txt"] != mine["twitter/train.txt"]
    assert other["images/tw_000001.jpg"] != mine["images/tw_000001.jpg"]


def test_layout_of_the_world(world):
    for rel in ["twitter/train.txt", "twitter/valid.txt", "twitter/test.txt", "gmner/txt/train.txt",
                "gmner/txt/dev.txt", "gmner/txt/test.txt", "mnre/mnre_txt/mnre_train.txt",
                "mnre/mnre_txt/mnre_val .txt", "mnre/mnre_txt/mnre_test.txt", "mnre/ours_rel2id.json",
                "jmere/train.json", "jmere/val.json", "jmere/test.json", "newsclippings/data/toy/train.json",
                "newsclippings/data/toy/val.json", "newsclippings/data/toy/test.json",
                "newsclippings/visual_news/origin/data.json", "truth.json"]:
        assert (world / rel).is_file(), rel
    assert not list(world.rglob("*.tmp")) and not world.with_name("world.partial").exists()


def test_rerun_skips_force_regenerates_and_foreign_dirs_are_kept(world, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in [world / "truth.json", world / "twitter" / "train.txt"]}
    _generate(world)  # same config: nothing is rewritten
    assert {p: p.stat().st_mtime_ns for p in before} == before

    out = _generate(tmp_path / "w", twitter=[3, 1, 1])
    digests = _digests(out)
    _generate(out, twitter=[3, 1, 1], force=True)
    assert _digests(out) == digests
    _generate(out, twitter=[2, 1, 1])  # a different config replaces the old world entirely
    assert len(_conll(out / "twitter" / "train.txt")) == 2
    assert not (out / "images" / "tw_000005.jpg").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        _generate(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_conll_files(world):
    for rel, n in [("twitter/train.txt", 8), ("twitter/test.txt", 4), ("gmner/txt/train.txt", 16),
                   ("gmner/txt/dev.txt", 4)]:
        tweets = _conll(world / rel)
        assert len(tweets) == n
        for img_id, tokens, tags in tweets:
            assert (world / "images" / f"{img_id}.jpg").is_file()
            spans = _spans(tags)
            assert 1 <= len(spans) <= 3
            assert all(t in toy.TYPES for _, _, t in spans)
    ids = [t[0] for rel in ["twitter/train.txt", "twitter/valid.txt", "twitter/test.txt", "gmner/txt/train.txt",
                            "gmner/txt/dev.txt", "gmner/txt/test.txt"] for t in _conll(world / rel)]
    assert len(ids) == len(set(ids))


def test_gmner_xml_matches_entities_and_images(world, truth):
    tweets = {i: (tok, tags) for split in ("train", "dev", "test") for i, tok, tags in
              _conll(world / "gmner" / "txt" / f"{split}.txt")}
    with_xml = 0
    for img_id, (tokens, tags) in tweets.items():
        names = {" ".join(tokens[s:e]) for s, e, _ in _spans(tags)}
        grounded = {" ".join(tokens[s:e]) for s, e, _ in _spans(tags) if tokens[s - 1] in COLORS}
        path = world / "gmner" / "xml" / f"{img_id}.xml"
        assert path.exists() == bool(grounded), img_id
        if not grounded:
            continue
        with_xml += 1
        root = ET.parse(path).getroot()
        assert root.tag == "annotation" and root.findtext("filename") == f"{img_id}.jpg"
        w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
        assert Image.open(world / "images" / f"{img_id}.jpg").size == (w, h)
        boxes: dict[str, list] = {}
        for obj in root.iter("object"):
            name = obj.findtext("name")
            assert name in names
            b = [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h
            boxes.setdefault(name, []).append(b)
        assert set(boxes) == grounded
        gold = {}
        for o in truth[f"images/{img_id}.jpg"]["objects"]:
            if o["entity"] is not None:
                gold.setdefault(o["entity"], []).append(o["box"])
        assert boxes == gold
    assert with_xml > 0
    assert len(list((world / "gmner" / "xml").iterdir())) == with_xml


def test_mnre_lines(world):
    rel2id = json.loads((world / "mnre" / "ours_rel2id.json").read_text())
    assert len(rel2id) == 23 and rel2id["None"] == 0 and sorted(rel2id.values()) == list(range(23))
    labels = set()
    for name in ("mnre_train.txt", "mnre_val .txt", "mnre_test.txt"):
        lines = (world / "mnre" / "mnre_txt" / name).read_text(encoding="utf-8").splitlines()
        assert lines
        for line in lines:
            d = ast.literal_eval(line)
            assert list(d) == ["token", "h", "t", "img_id", "relation"] and repr(d) == line
            for ent in (d["h"], d["t"]):
                s, e = ent["pos"]
                assert " ".join(d["token"][s:e]) == ent["name"]
            assert d["relation"] in rel2id
            assert (world / "images" / d["img_id"]).is_file()
            labels.add(d["relation"])
    assert "None" in labels and len(labels) > 2


def test_jmere_json(world):
    rel_names = {r.rsplit("/", 1)[1] for r in toy.MNRE_LABELS if r != "None"}
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        data = json.loads((world / "jmere" / f"{split}.json").read_text())
        assert isinstance(data, list) and len(data) == n
        for sent in data:
            assert set(sent) == {"token", "img_id", "label_list"} and sent["label_list"]
            assert (world / "images" / sent["img_id"]).is_file()
            for wrapped in sent["label_list"]:
                (triple,) = wrapped  # the official files wrap each relation in a list
                assert triple["relation"] in rel_names
                for ent in (triple["beg_ent"], triple["sec_ent"]):
                    s, e = ent["pos"]
                    assert " ".join(sent["token"][s:e]) == ent["name"]
                    assert ent["tags"] in {"per", "org", "loc", "misc"}
                full = f"/{triple['beg_ent']['tags']}/{triple['sec_ent']['tags']}/{triple['relation']}"
                assert full in toy.MNRE_LABELS


def test_newsclippings_pairs(world, truth):
    origin = world / "newsclippings" / "visual_news" / "origin"
    records = {r["id"]: r for r in json.loads((origin / "data.json").read_text())}
    assert len(records) == 20
    for r in records.values():
        assert {"id", "caption", "image_path", "article_path", "topic", "source"} <= set(r)
        assert (origin / r["image_path"]).is_file()
    seen = set()
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        anns = json.loads((world / "newsclippings" / "data" / "toy" / f"{split}.json").read_text())["annotations"]
        assert len(anns) == 2 * n
        ids = {a["id"] for a in anns}
        assert not ids & seen
        seen |= ids
        for pristine, fake in zip(anns[0::2], anns[1::2]):
            assert pristine["falsified"] is False and fake["falsified"] is True
            assert pristine["id"] == pristine["image_id"] == fake["id"]
            assert fake["image_id"] != fake["id"] and fake["image_id"] in ids
            assert isinstance(fake["similarity_score"], float)
            named = {w for w in records[fake["id"]]["caption"].split() if w in COLORS}

            def shown(rid):
                rel = "newsclippings/visual_news/origin/" + records[rid]["image_path"][2:]
                return {o["color"] for o in truth[rel]["objects"]}

            assert named <= shown(pristine["image_id"])  # the pristine caption names what its image shows
            assert not named <= shown(fake["image_id"])  # the falsified image lacks a colour it names


def test_boxes_inside_images_and_drawn_in_their_colour(world, truth):
    for rel, img in truth.items():
        assert 2 <= len(img["objects"]) <= 4
        pix = Image.open(world / rel).convert("RGB")
        assert pix.size == (img["width"], img["height"])
        for o in img["objects"]:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= img["width"] and 0 <= y1 < y2 <= img["height"]
            assert toy.SHAPE_OF_TYPE[o["type"]] == o["shape"]
            centre = pix.getpixel(((x1 + x2) // 2, (y1 + y2) // 2))
            assert sum(abs(a - b) for a, b in zip(centre, toy.PALETTE[o["color"]])) < 90, (rel, o)
        colours = [(o["color"], o["entity"]) for o in img["objects"]]
        # a colour belongs to one entity (several boxes) or one distractor, never to two things
        assert len({c for c, _ in colours}) == len(set(colours))
        assert all(e is not None for c, e in colours if [x for x, _ in colours].count(c) > 1)


def test_type_is_visible_only_in_the_image_for_grounded_mentions(world, truth):
    n_grounded = n_ungroundable = 0
    for rel in ["twitter/train.txt", "twitter/valid.txt", "twitter/test.txt",
                "gmner/txt/train.txt", "gmner/txt/dev.txt", "gmner/txt/test.txt"]:
        for img_id, tokens, tags in _conll(world / rel):
            objects = truth[f"images/{img_id}.jpg"]["objects"]
            for s, e, t in _spans(tags):
                name = " ".join(tokens[s:e])
                around = tokens[max(0, s - 2):s] + tokens[e:e + 1]
                mine = [o for o in objects if o["entity"] == name]
                if s > 0 and tokens[s - 1] in COLORS:
                    n_grounded += 1
                    assert mine and all(o["color"] == tokens[s - 1] for o in mine)
                    assert all(toy.TYPE_OF_SHAPE[o["shape"]] == t for o in mine)
                    assert not set(around) & CUE_WORDS  # no type cue in the text
                else:
                    n_ungroundable += 1
                    assert not mine and not set(around) & COLORS
                    before, after = toy.CUES[t]
                    assert any(tuple(tokens[s - len(c):s]) == c for c in before) or \
                        any(tuple(tokens[e:e + len(c)]) == c for c in after), (tokens, name, t)
    assert n_grounded and n_ungroundable
    assert 0.15 < n_ungroundable / (n_grounded + n_ungroundable) < 0.6


def test_relations_follow_shapes_and_distance(world, truth):
    positives = 0
    for name in ("mnre_train.txt", "mnre_val .txt", "mnre_test.txt"):
        for line in (world / "mnre" / "mnre_txt" / name).read_text().splitlines():
            d = ast.literal_eval(line)
            img = truth[f"images/{d['img_id']}"]
            near, far = _near_far(img["width"])
            tok = d["token"]
            grounded = [ent["pos"][0] > 0 and tok[ent["pos"][0] - 1] in COLORS for ent in (d["h"], d["t"])]
            expected = "None"
            if all(grounded):
                gap = _entity_gap(img["objects"], d["h"]["name"], d["t"]["name"])
                assert gap <= near or gap >= far, "grounded pairs are never half-near"
                shape = {o["entity"]: o["shape"] for o in img["objects"]}
                pair = (toy.TYPE_OF_SHAPE[shape[d["h"]["name"]]], toy.TYPE_OF_SHAPE[shape[d["t"]["name"]]])
                if gap <= near:
                    expected = toy.RELATION_OF_TYPES.get(pair, "None")
            assert d["relation"] == expected, d
            positives += d["relation"] != "None"
    assert positives > 0


def test_config_file_holds_the_defaults():
    path = Path(__file__).resolve().parents[1] / "configs" / "shards" / "toy.toml"
    data = tomllib.loads(path.read_text())
    defaults = dataclasses.asdict(toy.ToyConfig())
    assert data == defaults


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="mnre"):
        toy.ToyConfig(mnre=[1, 2]).validate()
    with pytest.raises(ValueError, match="near_gap"):
        toy.ToyConfig(near_gap=0.3, far_gap=0.2).validate()
    with pytest.raises(ValueError, match="newsclippings"):
        toy.ToyConfig(newsclippings=[10, 1, 0]).validate()

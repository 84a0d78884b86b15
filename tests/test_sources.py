"""Every corpus reader on fixtures written here in the official formats, awkward cases included."""
from __future__ import annotations

import json

import pytest

from conftest import conll_text
from mie.shards.sources import DEFAULT_SPLIT_FILES, FORMATS, Item, Reject, SourceError, reader
from mie.shards.sources.conll import bio_spans, ner_labels, read_conll


def items(records):
    return [r for r in records if isinstance(r, Item)]


def rejects(records):
    return [r for r in records if isinstance(r, Reject)]


def test_every_format_has_a_reader_and_split_files():
    assert set(FORMATS) == {"twitter", "gmner", "mnre", "jmere", "newsclippings", "jsonl"}
    for fmt in FORMATS:
        assert callable(reader(fmt))
        assert set(DEFAULT_SPLIT_FILES[fmt]) == {"train", "dev", "test"}
    # the official MNRE dev file name has a space before .txt
    assert DEFAULT_SPLIT_FILES["mnre"]["dev"] == "mnre_txt/mnre_val .txt"


# ---------------------------------------------------------------------------------------------- bio


@pytest.mark.parametrize("tags, opens, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], True, [(0, 2, "PER"), (3, 4, "LOC")]),
    (["B-PER", "I-PER", "O", "B-LOC"], False, [(0, 2, "PER"), (3, 4, "LOC")]),
    (["B-PER", "B-PER"], True, [(0, 1, "PER"), (1, 2, "PER")]),
    (["O", "B-ORG", "I-ORG", "I-ORG"], True, [(1, 4, "ORG")]),  # a chunk running to the end is closed
    (["O", "I-PER", "I-PER", "O"], True, [(1, 3, "PER")]),      # stray I- opens (seqeval default)
    (["O", "I-PER", "I-PER", "O"], False, []),                  # stray I- ignored (GMNER counting)
    (["B-PER", "I-LOC", "I-LOC"], True, [(0, 1, "PER"), (1, 3, "LOC")]),
    (["B-PER", "I-LOC", "I-LOC"], False, [(0, 1, "PER")]),
    (["I-OTHER"], True, [(0, 1, "OTHER")]),
    (["I-OTHER"], False, []),
    ([], True, []),
    (["O", "O"], True, []),
])
def test_bio_spans(tags, opens, expected):
    assert bio_spans(tags, stray_i_opens=opens) == expected


def test_bio_spans_default_is_seqeval_mode():
    assert bio_spans(["O", "I-LOC"]) == [(1, 2, "LOC")]


def test_ner_labels_text_and_end_exclusive():
    labels = ner_labels(["Mip", "Dunkel", "saw", "Hovarth"], ["B-PER", "I-PER", "O", "B-LOC"])
    assert labels["tags"] == ["B-PER", "I-PER", "O", "B-LOC"]
    assert labels["entities"] == [{"start": 0, "end": 2, "type": "PER", "text": "Mip Dunkel"},
                                  {"start": 3, "end": 4, "type": "LOC", "text": "Hovarth"}]


# ---------------------------------------------------------------------------------------------- twitter


def test_twitter_reader(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(conll_text([
        ("5001", [("RT", "O"), ("Quorvex", "B-PER"), ("Taldin", "I-PER"), ("in", "O"), ("Brellham", "B-LOC")]),
        ("5002", [("zorblat", "O"), ("Ostravia", "B-ORG")]),
    ]), encoding="utf-8")
    recs = list(reader("twitter")(path, tmp_path / "imgs", {}))
    assert [type(r) for r in recs] == [Item, Item]
    a, b = recs
    assert a.id == "5001" and a.tokens == ["RT", "Quorvex", "Taldin", "in", "Brellham"]
    assert a.where == f"{path}:1"
    assert b.where == f"{path}:8"
    assert a.image == tmp_path / "imgs" / "5001.jpg"
    assert a.labels["entities"] == [{"start": 1, "end": 3, "type": "PER", "text": "Quorvex Taldin"},
                                    {"start": 4, "end": 5, "type": "LOC", "text": "Brellham"}]
    assert a.labels["tags"] == ["O", "B-PER", "I-PER", "O", "B-LOC"]
    # without an image dir the items carry no image
    assert all(r.image is None for r in reader("twitter")(path, None, {}))


def test_twitter_counts_stray_i_as_seqeval_does(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(conll_text([("9", [("x", "O"), ("Hovarth", "I-LOC")])]), encoding="utf-8")
    (item,) = reader("twitter")(path, None, {})
    assert [(e["start"], e["end"], e["type"]) for e in item.labels["entities"]] == [(1, 2, "LOC")]


def test_conll_awkward_cases(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(
        "stray\tO\n"                    # 1: token lines before any IMGID
        "lines\tO\n"                    # 2
        "\n"                            # 3
        "IMGID:100\n"                   # 4: good
        "plint\tO\n"                    # 5
        "\n"                            # 6
        "IMGID:101\n"                   # 7: empty post (IMGID with no tokens)
        "\n"                            # 8
        "IMGID:102\n"                   # 9: malformed line (three columns)
        "vorra\tO\n"                    # 10
        "too\tmany\tcolumns\n"          # 11
        "\n"                            # 12
        "IMGID:103\n"                   # 13: bad tag
        "skeel\tB-\n"                   # 14
        "\n"                            # 15
        "IMGID:\n"                      # 16: empty id
        "yull\tO\n"                     # 17
        "\n"                            # 18
        "IMGID:104\n"                   # 19: directly followed by another IMGID: empty
        "IMGID:105\n"                   # 20: good, separated by spaces (some copies use spaces)
        "drem B-PER\n"                  # 21
        "lusk I-PER\n",                 # 22 (no trailing blank line)
        encoding="utf-8")
    recs = list(reader("twitter")(path, None, {}))
    assert [type(r).__name__ for r in recs] == ["Reject", "Item", "Reject", "Reject", "Reject", "Reject", "Reject", "Item"]
    stray, good, empty, bad_cols, bad_tag, no_id, empty2, good2 = recs
    assert stray.where == f"{path}:1" and "IMGID" in stray.reason and "1-2" in stray.reason
    assert good.id == "100" and good.tokens == ["plint"]
    assert empty.id == "101" and empty.where == f"{path}:7" and "empty post" in empty.reason
    assert bad_cols.id == "102" and bad_cols.where == f"{path}:9" and "line 11" in bad_cols.reason
    assert bad_tag.id == "103" and "bad BIO tag" in bad_tag.reason and "line 14" in bad_tag.reason
    assert no_id.where == f"{path}:16" and "empty id" in no_id.reason
    assert empty2.id == "104" and "empty post" in empty2.reason
    assert good2.id == "105" and good2.tokens == ["drem", "lusk"]
    assert good2.labels["entities"] == [{"start": 0, "end": 2, "type": "PER", "text": "drem lusk"}]


def test_read_conll_crlf_and_trailing_whitespace(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"IMGID:7\r\nfen\tB-ORG \r\nwick\tI-ORG\r\n\r\n")
    (rec,) = list(read_conll(path))
    assert rec[0] == "7" and rec[2] == ["fen", "wick"] and rec[3] == ["B-ORG", "I-ORG"]


# ---------------------------------------------------------------------------------------------- gmner


def voc_xml(objects: list[tuple[str, list]], size=(640, 480), name="x.jpg") -> str:
    objs = "".join(
        f"\t<object>\n\t\t<name>{n}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{b[0]}</xmin>\n\t\t\t<ymin>{b[1]}</ymin>\n"
        f"\t\t\t<xmax>{b[2]}</xmax>\n\t\t\t<ymax>{b[3]}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for n, b in objects)
    sz = "" if size is None else (f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n"
                                  f"\t\t<depth>3</depth>\n\t</size>\n")
    return (f"<annotation>\n\t<folder>f</folder>\n\t<filename>{name}</filename>\n\t<source>\n"
            f"\t\t<database>Unknown</database>\n\t</source>\n{sz}\t<segmented>0</segmented>\n{objs}</annotation>\n")


@pytest.fixture
def gmner_root(tmp_path):
    root = tmp_path / "Twitter10000"
    (root / "txt").mkdir(parents=True)
    (root / "xml").mkdir()
    (root / "txt" / "test.txt").write_text(conll_text([
        # two entities with the same surface string, one with two boxes; one ungroundable entity
        ("8001", [("Quorvex", "B-PER"), ("Taldin", "I-PER"), ("met", "O"), ("Quorvex", "B-PER"), ("Taldin", "I-PER"),
                  ("in", "O"), ("Brellham", "B-LOC")]),
        # no xml at all: every entity has no box
        ("8002", [("Ostravia", "B-ORG"), ("rinth", "O")]),
        # xml whose <name> matches no entity
        ("8003", [("Mip", "B-PER"), ("Dunkel", "I-PER"), ("gello", "O")]),
        # malformed xml
        ("8004", [("Zantor", "B-PER"), ("Vell", "I-PER")]),
        # stray I-: GMNER counts entities by B- tags only
        ("8005", [("oqua", "O"), ("Hovarth", "I-LOC"), ("drem", "O"), ("Hovarth", "B-LOC")]),
        # bad <bndbox>
        ("8006", [("Fenwick", "B-PER")]),
        # float coordinates, no <size>
        ("8007", [("Pavvo", "B-OTHER")]),
    ]), encoding="utf-8")
    (root / "xml" / "8001.xml").write_text(voc_xml([
        ("Quorvex Taldin", [10, 20, 110, 220]), ("Quorvex Taldin", [300, 40, 400, 240]), ("Brellham", [0, 0, 640, 100]),
    ], size=(640, 480)), encoding="utf-8")
    (root / "xml" / "8003.xml").write_text(voc_xml([("Mip", [5, 5, 50, 50])], size=(100, 80)), encoding="utf-8")
    (root / "xml" / "8004.xml").write_text("<annotation><object><name>Zantor Vell</name>", encoding="utf-8")
    (root / "xml" / "8005.xml").write_text(voc_xml([("Hovarth", [1, 2, 3, 4])]), encoding="utf-8")
    (root / "xml" / "8006.xml").write_text(voc_xml([("Fenwick", ["a", 2, 3, 4])]), encoding="utf-8")
    (root / "xml" / "8007.xml").write_text(voc_xml([("Pavvo", [1.5, 2, 30.25, 40])], size=None), encoding="utf-8")
    return root


def test_gmner_reader(gmner_root, tmp_path):
    path = gmner_root / "txt" / "test.txt"
    recs = list(reader("gmner")(path, tmp_path / "img", {}))
    assert [type(r).__name__ for r in recs] == ["Item", "Item", "Item", "Reject", "Item", "Reject", "Item"]
    multi, nobox, unmatched, bad_xml, stray, bad_box, floats = recs

    # multi-box entity; both mentions with that surface string get both boxes
    ents = multi.labels["entities"]
    assert [(e["start"], e["end"], e["type"], e["text"]) for e in ents] == [
        (0, 2, "PER", "Quorvex Taldin"), (3, 5, "PER", "Quorvex Taldin"), (6, 7, "LOC", "Brellham")]
    assert ents[0]["boxes"] == [[10, 20, 110, 220], [300, 40, 400, 240]]
    assert ents[1]["boxes"] == ents[0]["boxes"]
    assert ents[2]["boxes"] == [[0, 0, 640, 100]]
    assert multi.labels["unmatched_boxes"] == []
    assert multi.image_size == [640, 480]
    assert multi.image == tmp_path / "img" / "8001.jpg"
    assert all(isinstance(c, int) for c in ents[0]["boxes"][0])

    assert nobox.labels["entities"][0]["boxes"] == [] and nobox.image_size is None
    assert nobox.labels["unmatched_boxes"] == []

    # <name>Mip</name> is not the entity text "Mip Dunkel": kept aside, the entity is ungroundable
    assert unmatched.labels["entities"][0]["text"] == "Mip Dunkel"
    assert unmatched.labels["entities"][0]["boxes"] == []
    assert unmatched.labels["unmatched_boxes"] == [{"name": "Mip", "box": [5, 5, 50, 50]}]
    assert unmatched.image_size == [100, 80]

    assert bad_xml.id == "8004" and "8004.xml" in bad_xml.reason and "xml" in bad_xml.reason
    assert bad_xml.where.startswith(f"{path}:")

    # only the B- entity exists; its xml box goes to it
    assert [(e["start"], e["end"]) for e in stray.labels["entities"]] == [(3, 4)]
    assert stray.labels["entities"][0]["boxes"] == [[1, 2, 3, 4]]

    assert bad_box.id == "8006" and "bndbox" in bad_box.reason

    assert floats.labels["entities"][0]["boxes"] == [[1.5, 2, 30.25, 40]]
    assert floats.image_size is None


def test_gmner_xml_dir_option(gmner_root, tmp_path):
    other = tmp_path / "xml_v2"
    other.mkdir()
    (other / "8002.xml").write_text(voc_xml([("Ostravia", [7, 8, 9, 10])]), encoding="utf-8")
    recs = list(reader("gmner")(gmner_root / "txt" / "test.txt", None, {"xml_dir": str(other)}))
    by_id = {r.id: r for r in items(recs)}
    assert by_id["8002"].labels["entities"][0]["boxes"] == [[7, 8, 9, 10]]
    # the default xml folder is no longer read: 8001 has no boxes, 8004's broken xml is not seen
    assert by_id["8001"].labels["entities"][0]["boxes"] == []
    assert "8004" in by_id and by_id["8001"].image is None


# ---------------------------------------------------------------------------------------------- mnre


def mnre_line(tokens, h, t, rel, img="twitter_77_01.jpg"):
    return repr({"token": tokens, "h": {"name": " ".join(tokens[h[0]:h[1]]), "pos": list(h)},
                 "t": {"name": " ".join(tokens[t[0]:t[1]]), "pos": list(t)}, "img_id": img, "relation": rel})


def test_mnre_reader(tmp_path):
    marker = tmp_path / "PWNED"
    toks = ["RT", "@yull", ":", "Quorvex", "Taldin", "joins", "Ostravia", "FC"]
    lines = [
        mnre_line(toks, (3, 5), (6, 8), "/per/org/member_of"),          # 0
        mnre_line(toks, (6, 8), (3, 5), "None", img="twitter_77_02.jpg"),  # 1: None relation
        "",                                                              # 2: blank, skipped
        mnre_line(toks, (3, 5), (6, 9), "/per/org/member_of"),          # 3: pos out of range
        "{'token': ['a', 'b'], 'h': {'name': 'a', 'pos': [0, 1]}",      # 4: truncated literal
        f"__import__('os').system('touch {marker}')",                   # 5: code, must not run
        "[1, 2, 3]",                                                     # 6: not a dict
        "{'token': ['a'], 'h': {'name': 'a', 'pos': [0, 1]}, 'img_id': 'x.jpg', 'relation': 'None'}",  # 7: no 't'
        mnre_line(["solo"], (0, 1), (0, 1), "None"),                     # 8: fine (self pair)
    ]
    path = tmp_path / "mnre_test.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recs = list(reader("mnre")(path, tmp_path / "img_org", {}))
    assert not marker.exists(), "a MNRE line was executed as code"
    assert [type(r).__name__ for r in recs] == ["Item", "Item", "Reject", "Reject", "Reject", "Reject", "Reject", "Item"]
    a, none, oob, trunc, code, notdict, missing, solo = recs
    assert a.id == "0" and a.where == f"{path}:1"
    assert a.labels == {"head": {"text": "Quorvex Taldin", "start": 3, "end": 5},
                        "tail": {"text": "Ostravia FC", "start": 6, "end": 8},
                        "relation": "/per/org/member_of", "img_id": "twitter_77_01.jpg"}
    assert a.image == tmp_path / "img_org" / "twitter_77_01.jpg"
    assert a.tokens == toks
    assert none.id == "1" and none.labels["relation"] == "None"
    assert oob.id == "3" and oob.where == f"{path}:4" and "outside" in oob.reason
    assert trunc.id == "4" and "malformed" in trunc.reason
    assert code.id == "5" and "malformed" in code.reason
    assert notdict.id == "6"
    assert missing.id == "7" and "KeyError" in missing.reason
    assert solo.id == "8" and solo.where == f"{path}:9"


# ---------------------------------------------------------------------------------------------- jmere


def jmere_pair(h, ht, t, tt, rel, tokens, wrap=True):
    """One ``label_list`` entry; the official files wrap each pair in a one-element list."""
    pair = {"beg_ent": {"name": " ".join(tokens[h[0]:h[1]]), "pos": list(h), "tags": ht},
            "sec_ent": {"name": " ".join(tokens[t[0]:t[1]]), "pos": list(t), "tags": tt}, "relation": rel}
    return [pair] if wrap else pair


def test_jmere_reader(tmp_path):
    t1 = ["Mip", "Dunkel", "and", "Zantor", "Vell", "visit", "Hovarth"]
    data = [
        {"token": t1, "img_id": "twitter_stream_1.jpg", "label_list": [
            jmere_pair((0, 2), "per", (3, 5), "per", "peer", t1),
            jmere_pair((0, 2), "per", (6, 7), "loc", "present_in", t1),
            jmere_pair((3, 5), "per", (6, 7), "loc", "present_in", t1, wrap=False),  # unwrapped: accepted too
        ]},
        {"token": ["a", "b"], "img_id": "twitter_stream_2.jpg", "label_list": [
            jmere_pair((0, 1), "per", (1, 3), "org", "member_of", ["a", "b", "c"])]},  # pos past the 2 tokens
        {"token": [], "img_id": "x.jpg", "label_list": []},                            # no tokens
        {"token": ["q"], "label_list": []},                                             # no img_id
        {"token": ["lone"], "img_id": "twitter_stream_5.jpg", "label_list": []},        # no pairs: fine
        {"token": ["x", "y"], "img_id": "twitter_stream_6.jpg", "label_list": [         # two pairs in one wrapper
            jmere_pair((0, 1), "per", (1, 2), "loc", "present_in", ["x", "y"])
            + jmere_pair((1, 2), "loc", (0, 1), "per", "present_in", ["x", "y"])]},
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    recs = list(reader("jmere")(path, tmp_path / "imgs", {}))
    assert [type(r).__name__ for r in recs] == ["Item", "Reject", "Reject", "Reject", "Item", "Reject"]
    a, oob, empty, noimg, lone, two = recs
    assert a.id == "0" and a.where == f"{path}:item 0"
    assert a.image == tmp_path / "imgs" / "twitter_stream_1.jpg"
    assert a.labels["entities"] == [
        {"start": 0, "end": 2, "type": "per", "text": "Mip Dunkel"},
        {"start": 3, "end": 5, "type": "per", "text": "Zantor Vell"},
        {"start": 6, "end": 7, "type": "loc", "text": "Hovarth"},
    ]
    assert a.labels["relations"][0] == {"head": [0, 2], "head_type": "per", "tail": [3, 5], "tail_type": "per",
                                        "relation": "peer"}
    assert len(a.labels["relations"]) == 3
    assert oob.id == "1" and "outside" in oob.reason
    assert empty.id == "2" and "token" in empty.reason
    assert noimg.id == "3" and "img_id" in noimg.reason
    assert lone.labels["entities"] == [] and lone.labels["relations"] == []
    assert lone.labels["img_id"] == "twitter_stream_5.jpg"
    assert two.id == "5" and two.where == f"{path}:item 5"


def test_jmere_bad_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"token": ["a"]', encoding="utf-8")
    with pytest.raises(SourceError, match="not valid JSON"):
        list(reader("jmere")(bad, None, {}))
    bad.write_text('{"token": ["a"]}', encoding="utf-8")
    with pytest.raises(SourceError, match="JSON list"):
        list(reader("jmere")(bad, None, {}))


# ---------------------------------------------------------------------------------------------- newsclippings


@pytest.fixture
def visualnews(tmp_path):
    origin = tmp_path / "visual_news" / "origin"
    origin.mkdir(parents=True)
    recs = [
        {"id": 11, "caption": "Quorvex Taldin opens the Brellham bridge", "image_path": "./bbc/images/0001/11.jpg",
         "article_path": "./bbc/articles/11.txt", "topic": "politics", "source": "bbc"},
        {"id": 12, "caption": "Flooded streets of Ostravia", "image_path": "./guardian/images/0002/12.jpg",
         "article_path": "./guardian/articles/12.txt", "topic": "weather", "source": "guardian"},
        {"id": 13, "caption": "   ", "image_path": "./usa_today/images/13.jpg",
         "article_path": "./usa_today/articles/13.txt", "topic": "sport", "source": "usa_today"},
    ]
    (origin / "data.json").write_text(json.dumps(recs), encoding="utf-8")
    anns = {"annotations": [
        {"id": 11, "image_id": 11, "similarity_score": 0.91, "falsified": False, "source_dataset": 0},
        {"id": 11, "image_id": 12, "similarity_score": 0.77, "falsified": True, "source_dataset": 0},
        {"id": 12, "image_id": 12, "similarity_score": 0.88, "falsified": False, "source_dataset": 1},
        {"id": 12, "image_id": 999, "similarity_score": 0.51, "falsified": True, "source_dataset": 1},  # no record 999
        {"id": 13, "image_id": 13, "similarity_score": 0.5, "falsified": False},                      # empty caption
        {"id": 12, "similarity_score": 0.5, "falsified": False},                                      # no image_id
    ]}
    split = tmp_path / "news_clippings" / "data" / "merged_balanced"
    split.mkdir(parents=True)
    (split / "val.json").write_text(json.dumps(anns), encoding="utf-8")
    return split / "val.json", origin


def test_newsclippings_reader(visualnews):
    path, origin = visualnews
    recs = list(reader("newsclippings")(path, origin, {}))
    assert [type(r).__name__ for r in recs] == ["Item", "Item", "Item", "Reject", "Reject", "Reject"]
    pristine, falsified, pristine2, missing, empty, malformed = recs
    assert pristine.id == "11_11" and pristine.labels["falsified"] is False
    assert pristine.tokens == "Quorvex Taldin opens the Brellham bridge".split()
    assert pristine.image == origin / "./bbc/images/0001/11.jpg"
    assert pristine.labels["topic"] == "politics" and pristine.labels["similarity_score"] == 0.91
    # falsified: the caption of record 11 with the image of record 12
    assert falsified.id == "11_12" and falsified.labels["falsified"] is True
    assert falsified.tokens == pristine.tokens
    assert falsified.image == origin / "./guardian/images/0002/12.jpg"
    assert falsified.labels["caption_id"] == "11" and falsified.labels["image_id"] == "12"
    assert pristine2.id == "12_12"
    assert missing.id == "12_999" and "999" in missing.reason and missing.where == f"{path}:annotation 3"
    assert empty.id == "13_13" and "empty post" in empty.reason
    assert "image_id" in malformed.reason


def test_newsclippings_captions_option_and_errors(visualnews, tmp_path):
    path, origin = visualnews
    moved = tmp_path / "captions.json"
    moved.write_bytes((origin / "data.json").read_bytes())
    recs = list(reader("newsclippings")(path, None, {"captions": str(moved)}))
    assert len(items(recs)) == 3 and all(r.image is None for r in items(recs))
    with pytest.raises(SourceError, match="image_dir"):
        list(reader("newsclippings")(path, None, {}))
    with pytest.raises(SourceError, match="not found"):
        list(reader("newsclippings")(path, tmp_path / "nowhere", {}))
    bad = tmp_path / "bad.json"
    bad.write_text('{"annotations": 3}', encoding="utf-8")
    with pytest.raises(SourceError, match="annotations"):
        list(reader("newsclippings")(bad, origin, {}))
    for broken in ('[{"caption": "no id", "image_path": "a.jpg"}]', '["just a string"]', '{"id": 1}'):
        moved.write_text(broken, encoding="utf-8")
        with pytest.raises(SourceError, match="captions.json"):
            list(reader("newsclippings")(path, None, {"captions": str(moved)}))


# ---------------------------------------------------------------------------------------------- jsonl


def test_jsonl_reader(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a1", "text": "Quorvex  Taldin\tvisits Brellham", "image": "pics/a1.jpg", "lang": "xx"}),
        "",                                           # 2: blank line, skipped
        "{not json",                                  # 3
        json.dumps({"id": "a2", "text": "   "}),      # 4: blank text
        json.dumps({"text": "no id"}),                # 5
        json.dumps({"id": 7, "text": "numeric id"}),  # 6
        json.dumps(["a", "list"]),                    # 7
        json.dumps({"id": "a3", "text": 5}),          # 8: text not a string
        json.dumps({"id": "a4", "text": "x", "image": 5}),  # 9: image not a path
    ]) + "\n", encoding="utf-8")
    recs = list(reader("jsonl")(path, None, {}))
    assert [type(r).__name__ for r in recs] == ["Item", "Reject", "Reject", "Reject", "Item", "Reject", "Reject", "Reject"]
    a, badjson, blank, noid, num, alist, nottext, badimage = recs
    assert badimage.where == f"{path}:9" and badimage.id == "a4" and "image" in badimage.reason
    assert a.id == "a1" and a.tokens == ["Quorvex", "Taldin", "visits", "Brellham"]
    assert a.image == tmp_path / "pics" / "a1.jpg"  # relative to the jsonl file's folder
    assert a.labels == {"lang": "xx"} and a.where == f"{path}:1"
    assert badjson.where == f"{path}:3" and "JSON" in badjson.reason
    assert blank.where == f"{path}:4" and "empty post" in blank.reason and blank.id == "a2"
    assert noid.where == f"{path}:5"
    assert num.id == "7" and num.image is None
    assert alist.where == f"{path}:7" and nottext.where == f"{path}:8"
    # with an image dir, image paths are relative to it
    (a2,) = items(reader("jsonl")(path, tmp_path / "imgroot", {}))[:1]
    assert a2.image == tmp_path / "imgroot" / "pics" / "a1.jpg"

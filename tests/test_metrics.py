"""Scorers and ``mie evaluate`` on cases counted by hand, bad prediction files, and gold-as-prediction
on the real annotation files (skipped where ../shared/data is absent)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, cli, conll_text
from mie.finetune import evaluate as ev
from mie.finetune import metrics


def _gold_gmner(entities):
    return {"entities": [{"start": s, "end": e, "type": t, "boxes": b} for s, e, t, b in entities]}


def test_prf_and_iou():
    assert metrics.prf(2, 3, 4) == {"p": 66.67, "r": 50.0, "f1": 57.14, "correct": 2, "predicted": 3, "gold": 4}
    assert metrics.prf(0, 0, 0)["f1"] == 0.0
    assert metrics.box_iou([0, 0, 10, 10], [0, 0, 10, 5]) == 0.5
    assert metrics.box_iou([0, 0, 10, 10], [21, 21, 31, 31]) == 0.0
    assert metrics.box_iou([20, 20, 30, 30], [21, 21, 31, 31]) == pytest.approx(81 / 119)


def test_gmner_hand_case():
    gold = {
        "g1": _gold_gmner([(0, 2, "PER", [[0, 0, 10, 10], [20, 20, 30, 30]]),  # two boxes
                           (3, 4, "LOC", []), (5, 6, "ORG", [[0, 0, 10, 10]]), (6, 8, "OTHER", [])]),
        "g2": _gold_gmner([(0, 1, "PER", [[0, 0, 10, 10]]), (2, 3, "LOC", [])]),
        "g3": _gold_gmner([]),
    }
    pred = {
        "g1": {"entities": [
            {"start": 0, "end": 2, "type": "PER", "box": [21, 21, 31, 31]},  # IoU 0.68 with the 2nd box: all hit
            {"start": 3, "end": 4, "type": "LOC", "box": [0, 0, 5, 5]},  # ungroundable given a box: MNER only
            {"start": 5, "end": 6, "type": "PER", "box": [0, 0, 10, 10]},  # type error, right region: EEG only
            {"start": 6, "end": 8, "type": "OTHER", "box": None},  # ungroundable, no box: all hit
            {"start": 1, "end": 3, "type": "ORG", "box": None},  # false positive
        ]},
        "g2": {"entities": [{"start": 0, "end": 1, "type": "PER", "box": [0, 0, 10, 5]}]},  # IoU exactly 0.5
    }  # g3 missing: empty
    m = metrics.score_gmner(gold, pred)
    assert m["gmner"] == metrics.prf(2, 6, 6) and m["gmner"]["f1"] == 33.33
    assert m["mner"] == metrics.prf(4, 6, 6) and m["mner"]["f1"] == 66.67
    assert m["eeg"] == metrics.prf(3, 6, 6) and m["eeg"]["f1"] == 50.0
    # just above 0.5 is a match
    pred["g2"]["entities"][0]["box"] = [0, 0, 10, 6]
    assert metrics.score_gmner(gold, pred)["gmner"]["correct"] == 3


def test_mnre_none_handling():
    gold = {str(i): {"relation": r} for i, r in enumerate(
        ["None", "/per/per/peer", "/per/org/member_of", "None", "/loc/loc/contain"])}
    pred = {"0": {"relation": "None"}, "1": {"relation": "/per/per/peer"}, "2": {"relation": "None"},
            "3": {"relation": "/per/per/peer"}}  # 4 missing: counts as None
    m = metrics.score_mnre(gold, pred)
    assert m["re"] == metrics.prf(1, 2, 3)
    assert (m["re"]["p"], m["re"]["r"], m["re"]["f1"]) == (50.0, 33.33, 40.0)
    assert m["accuracy"] == 40.0 and m["instances"] == 5


def test_jmere_reversed_pair_is_correct():
    gold = {"0": {"entities": [{"start": 0, "end": 1, "type": "per"}, {"start": 3, "end": 5, "type": "org"},
                               {"start": 6, "end": 7, "type": "loc"}],
                  "relations": [{"head": [0, 1], "head_type": "per", "tail": [3, 5], "tail_type": "org",
                                 "relation": "member_of"},
                                {"head": [3, 5], "head_type": "org", "tail": [6, 7], "tail_type": "loc",
                                 "relation": "locate_at"}]}}
    pred = {"0": {"triples": [
        {"head": [3, 5], "head_type": "org", "tail": [0, 1], "tail_type": "per", "relation": "member_of"},  # reversed
        {"head": [3, 5], "head_type": "org", "tail": [6, 7], "tail_type": "loc", "relation": "contain"},  # wrong label
        {"head": [0, 1], "head_type": "per", "tail": [6, 7], "tail_type": "misc", "relation": "present_in"},  # FP
    ]}}
    m = metrics.score_jmere(gold, pred)
    assert m["jmere"] == metrics.prf(1, 3, 2) and m["jmere"]["f1"] == 40.0
    assert m["entity"] == metrics.prf(3, 4, 3) and m["entity"]["f1"] == 85.71
    # a prediction listing both directions of one relation is still one unit
    both = {"0": {"triples": pred["0"]["triples"][:1] + [
        {"head": [0, 1], "head_type": "per", "tail": [3, 5], "tail_type": "org", "relation": "member_of"}]}}
    assert metrics.score_jmere(gold, both)["jmere"] == metrics.prf(1, 1, 2)


# --------------------------------------------------------------------------------------------------
# Through the gold readers and the CLI


@pytest.fixture
def twitter_gold(tmp_path) -> Path:
    """Stray I- tags: seqeval (and the Twitter reader) open a chunk on them."""
    tweets = [("101", [("Zorb", "I-PER"), ("Quen", "I-PER"), ("x", "O"), ("Mard", "B-LOC"), ("Tess", "I-MISC")]),
              ("102", [("Plint", "B-ORG"), ("y", "O")]),
              ("103", [("z", "O")])]
    path = tmp_path / "test.txt"
    path.write_text(conll_text(tweets), encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_twitter_seqeval_chunks_and_missing_count(twitter_gold, tmp_path):
    gold = ev.read_gold("twitter_ner", twitter_gold)
    assert [(e["start"], e["end"], e["type"]) for e in gold["101"]["entities"]] == \
        [(0, 2, "PER"), (3, 4, "LOC"), (4, 5, "MISC")]
    pred = _jsonl(tmp_path / "p.jsonl", [
        {"id": "101", "entities": [{"start": 0, "end": 2, "type": "PER"}, {"start": 3, "end": 5, "type": "LOC"},
                                   {"start": 4, "end": 5, "type": "MISC"}]},
        {"id": 102, "entities": []},  # integer ids are accepted; 103 is missing
    ])
    r = cli("evaluate", "twitter_ner", "--pred", str(pred), "--gold", str(twitter_gold))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ner"] == metrics.prf(2, 3, 4) and out["missing"] == 1 and out["items"] == 3
    assert "1 of 3 gold ids have no prediction" in r.stderr


def _voc(path: Path, objects: list[tuple[str, list[int]]]) -> None:
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>100</width><height>80</height></size>{objs}</annotation>")


def test_gmner_gold_from_corpus_folder(tmp_path):
    """B-only chunking (stray I- ignored), boxes matched by surface string, several boxes per name."""
    root = tmp_path / "gmner"
    tweets = [("5001", [("Vorra", "B-PER"), ("Skeel", "I-PER"), ("at", "O"), ("Oqua", "B-LOC"), ("drem", "I-LOC")]),
              ("5002", [("lusk", "I-ORG"), ("Pavvo", "B-OTHER")])]
    (root / "txt").mkdir(parents=True)
    (root / "txt" / "test.txt").write_text(conll_text(tweets), encoding="utf-8")
    _voc(root / "xml" / "5001.xml", [("Vorra Skeel", [0, 0, 10, 10]), ("Vorra Skeel", [50, 40, 70, 60])])
    gold = ev.read_gold("gmner", root, "test")
    assert [(e["start"], e["end"], e["type"], e["boxes"]) for e in gold["5001"]["entities"]] == \
        [(0, 2, "PER", [[0, 0, 10, 10], [50, 40, 70, 60]]), (3, 5, "LOC", [])]
    assert [(e["start"], e["end"]) for e in gold["5002"]["entities"]] == [(1, 2)]
    pred = _jsonl(tmp_path / "p.jsonl", [
        {"id": "5001", "entities": [{"start": 0, "end": 2, "type": "PER", "box": [52, 42, 70, 60]},
                                    {"start": 3, "end": 5, "type": "LOC", "box": None}]},
        {"id": "5002", "entities": [{"start": 0, "end": 2, "type": "OTHER", "box": None}]},
    ])
    out = ev.evaluate("gmner", pred, root, "test")
    assert out["gmner"] == metrics.prf(2, 3, 3) and out["mner"] == metrics.prf(2, 3, 3)
    assert out["eeg"] == metrics.prf(2, 3, 3) and out["missing"] == 0
    assert ev.evaluate("gmner", _jsonl(tmp_path / "g.jsonl", ev.gold_as_predictions("gmner", gold)),
                       root / "txt" / "test.txt")["gmner"]["f1"] == 100.0


def test_mnre_and_jmere_gold_files(tmp_path):
    lines = [{"token": ["Zorb", "met", "Quen"], "h": {"name": "Zorb", "pos": [0, 1]}, "t": {"name": "Quen", "pos": [2, 3]},
              "img_id": "a.jpg", "relation": "/per/per/peer"},
             {"token": ["Mard", "in", "Tess"], "h": {"name": "Mard", "pos": [0, 1]}, "t": {"name": "Tess", "pos": [2, 3]},
              "img_id": "b.jpg", "relation": "None"}]
    mnre = tmp_path / "mnre_test.txt"
    mnre.write_text("".join(repr(x) + "\n" for x in lines), encoding="utf-8")
    out = ev.evaluate("mnre", _jsonl(tmp_path / "p.jsonl", [{"id": 1, "relation": "/per/per/peer"}]), mnre)
    assert out["re"] == metrics.prf(0, 1, 1) and out["accuracy"] == 0.0 and out["missing"] == 1

    ent = lambda n, s, t: {"name": n, "pos": [s, s + 1], "tags": t}  # noqa: E731
    jm = [{"token": ["Zorb", "of", "Plint"], "img_id": "c.jpg",
           "label_list": [[{"beg_ent": ent("Zorb", 0, "per"), "sec_ent": ent("Plint", 2, "org"), "relation": "member_of"}]]}]
    jpath = tmp_path / "test.json"
    jpath.write_text(json.dumps(jm), encoding="utf-8")
    rev = {"id": 0, "triples": [{"head": [2, 3], "head_type": "org", "tail": [0, 1], "tail_type": "per",
                                 "relation": "member_of"}]}
    out = ev.evaluate("jmere", _jsonl(tmp_path / "j.jsonl", [rev]), jpath)
    assert out["jmere"]["f1"] == 100.0 and out["entity"]["f1"] == 100.0


@pytest.mark.parametrize("line, message", [
    ('{"id": "101", "entities": [}', ":2: not valid JSON"),
    ('{"entities": []}', ":2: expected a JSON object with an 'id'"),
    ('{"id": "999", "entities": []}', ":2: id '999' is not in the gold file"),
    ('{"id": "101", "entities": []}', ":2: id '101' already predicted on line 1"),
    ('{"id": "102", "entities": [{"start": 1, "end": 9, "type": "PER"}]}', ":2: entities[0]: span [1, 9) is outside"),
    ('{"id": "102", "entities": [{"start": 0, "end": 1}]}', ":2: entities[0].type: expected a non-empty string"),
    ('{"id": true}', ":2: 'id' must be a string or an integer"),
])
def test_bad_prediction_file_is_one_line_error(twitter_gold, tmp_path, line, message):
    pred = _jsonl(tmp_path / "p.jsonl", [{"id": "101", "entities": []}, line])
    r = cli("evaluate", "twitter_ner", "--pred", str(pred), "--gold", str(twitter_gold))
    assert r.returncode == 2
    assert r.stderr.startswith("mie: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert f"{pred}{message}" in r.stderr, r.stderr


def test_bad_gmner_box_and_duplicate_span(tmp_path):
    gold = {"7": {"tokens": ["a", "b"], "entities": []}}
    with pytest.raises(ev.EvaluateError, match=r"p.jsonl:1: entities\[0\].box: expected"):
        ev.read_predictions("gmner", _jsonl(tmp_path / "p.jsonl", [
            {"id": "7", "entities": [{"start": 0, "end": 1, "type": "PER", "box": [1, 2, 3]}]}]), gold)
    with pytest.raises(ev.EvaluateError, match=r"p.jsonl:1: entities\[1\]: span \[0, 1\) is predicted twice"):
        ev.read_predictions("gmner", _jsonl(tmp_path / "p.jsonl", [
            {"id": "7", "entities": [{"start": 0, "end": 1, "type": "PER", "box": None},
                                     {"start": 0, "end": 1, "type": "LOC", "box": None}]}]), gold)
    with pytest.raises(ev.EvaluateError, match="--pred: .* not found"):
        ev.read_predictions("gmner", tmp_path / "nope.jsonl", gold)


# --------------------------------------------------------------------------------------------------
# Real annotation files: the gold itself, written as predictions, scores 100


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not found")
@pytest.mark.parametrize("task, gold, split, n_items, n_units", [
    ("gmner", "gmner/Twitter10000", "test", 1500, 2542),
    ("twitter_ner", "twitter2017", "test", 723, 1351),
    ("twitter_ner", "twitter2015", "test", 3257, 5207),  # seqeval chunking: 5072 B- tags + stray I-
    ("mnre", "mnre", "test", 1614, 640),
])
def test_gold_as_prediction_scores_100(task, gold, split, n_items, n_units, tmp_path):
    gold_items = ev.read_gold(task, SHARED_DATA / gold, split)
    pred = _jsonl(tmp_path / "p.jsonl", ev.gold_as_predictions(task, gold_items))
    out = ev.evaluate(task, pred, SHARED_DATA / gold, split)
    section = metrics.MAIN_METRIC[task][0]
    assert out["items"] == n_items and out["missing"] == 0
    assert out[section]["gold"] == n_units
    for name, m in out.items():
        if isinstance(m, dict):
            assert (m["p"], m["r"], m["f1"]) == (100.0, 100.0, 100.0), name

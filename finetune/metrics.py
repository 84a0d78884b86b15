"""Official scoring of the four downstream tasks, as the published scorers count.

Every scorer takes ``gold``: original id → the sample's labels (the ``json`` labels that the corpus
readers in :mod:`mie.shards.sources` produce, so gold read from the official files and gold read
from shards are the same thing) and ``pred``: original id → one prediction row (the formats of
DESIGN.md; ids absent from ``pred`` are scored as empty predictions). Counts are micro-averaged over
the whole split; P, R and F1 are percentages rounded to two decimals.

* **twitter_ner** (UMT / HVPNeT / TMR, seqeval micro avg): a unit is ``(span, type)``; gold chunks
  come from seqeval's conlleval chunking (a stray ``I-`` opens a chunk), done by the reader.
* **gmner** (H-Index ``model/metrics.py``): units keyed by span. A predicted span is a GMNER hit iff
  the gold entity with that span has the same type and the region matches: for an entity with gold
  boxes the predicted box has IoU strictly greater than 0.5 with any of them (IoU as
  ``torchvision.ops.box_iou``: continuous coordinates, no +1), for an entity without boxes the
  prediction is ``null``. MNER drops the region, EEG drops the type.
* **mnre** (OpenNRE ``eval_result``): P = correct non-None / predicted non-None, R = correct
  non-None / gold non-None; accuracy over all instances. A missing prediction counts as ``None``.
* **jmere** (EEGA ``Metric``): quintuples ``(head span, head type, tail span, tail type, relation)``,
  exact on all five parts and direction-agnostic (EEGA enumerates both orders from a symmetric tag
  matrix, so ``(A, B, r)`` and ``(B, A, r)`` are one unit); entity F1 over ``(span, type)``.
"""
from __future__ import annotations

from typing import Any, Iterable

Rows = dict[str, dict[str, Any]]
Gold = dict[str, dict[str, Any]]

TASKS = ("gmner", "mnre", "jmere", "twitter_ner")
# The number each task selects its best dev epoch by: (section, key).
MAIN_METRIC = {"gmner": ("gmner", "f1"), "mnre": ("re", "f1"), "jmere": ("jmere", "f1"),
               "twitter_ner": ("ner", "f1")}
NO_RELATION = "None"


def prf(correct: int, predicted: int, gold: int) -> dict[str, Any]:
    """Micro precision, recall and F1 in percent (rounded to 2 decimals) with the counts behind them."""
    p = correct / predicted if predicted else 0.0
    r = correct / gold if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"p": round(100 * p, 2), "r": round(100 * r, 2), "f1": round(100 * f, 2),
            "correct": correct, "predicted": predicted, "gold": gold}


def box_iou(a: Iterable[float], b: Iterable[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes, as ``torchvision.ops.box_iou`` computes it."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def region_matches(box: list[float] | None, gold_boxes: list[list[float]]) -> bool:
    """GMNER's region rule: a groundable entity needs a box with IoU > 0.5 (strictly) with one of
    its gold boxes; an ungroundable one needs ``None``."""
    if not gold_boxes:
        return box is None
    return box is not None and any(box_iou(box, g) > 0.5 for g in gold_boxes)


def score_twitter_ner(gold: Gold, pred: Rows) -> dict[str, Any]:
    """Exact span+type micro P/R/F1 (seqeval's "micro avg" row)."""
    c = p = g = 0
    for sid, labels in gold.items():
        gs = {(e["start"], e["end"], e["type"]) for e in labels["entities"]}
        ps = {(e["start"], e["end"], e["type"]) for e in pred.get(sid, {}).get("entities", [])}
        c, p, g = c + len(gs & ps), p + len(ps), g + len(gs)
    return {"ner": prf(c, p, g)}


def score_gmner(gold: Gold, pred: Rows) -> dict[str, Any]:
    """GMNER (span, type, region), MNER (span, type) and EEG (span, region) micro P/R/F1.

    Predicted spans are unique within a row (the official scorer keys predictions by span)."""
    hits = {"gmner": 0, "mner": 0, "eeg": 0}
    n_pred = n_gold = 0
    for sid, labels in gold.items():
        by_span = {(e["start"], e["end"]): e for e in labels["entities"]}
        ents = pred.get(sid, {}).get("entities", [])
        n_pred, n_gold = n_pred + len(ents), n_gold + len(by_span)
        for e in ents:
            g = by_span.get((e["start"], e["end"]))
            if g is None:
                continue
            type_ok = e["type"] == g["type"]
            region_ok = region_matches(e.get("box"), g.get("boxes") or [])
            hits["mner"] += type_ok
            hits["eeg"] += region_ok
            hits["gmner"] += type_ok and region_ok
    return {k: prf(v, n_pred, n_gold) for k, v in hits.items()}


def score_mnre(gold: Gold, pred: Rows) -> dict[str, Any]:
    """Micro P/R/F1 over the non-None labels and accuracy over all instances."""
    correct_pos = pred_pos = gold_pos = right = 0
    for sid, labels in gold.items():
        g = labels["relation"]
        p = pred.get(sid, {}).get("relation", NO_RELATION)
        right += p == g
        pred_pos += p != NO_RELATION
        gold_pos += g != NO_RELATION
        correct_pos += p == g and g != NO_RELATION
    acc = round(100 * right / len(gold), 2) if gold else 0.0
    return {"re": prf(correct_pos, pred_pos, gold_pos), "accuracy": acc, "instances": len(gold)}


def _pair_key(head, head_type, tail, tail_type, relation) -> tuple:
    a, b = (tuple(head), head_type), (tuple(tail), tail_type)
    return (min(a, b), max(a, b), relation)  # one unit for both directions


def jmere_entities(row: dict[str, Any]) -> set[tuple[int, int, str]]:
    """``(start, end, type)`` of a JMERE prediction row: its ``entities`` when given, else the
    heads and tails of its triples."""
    if "entities" in row:
        return {(e["start"], e["end"], e["type"]) for e in row["entities"]}
    return {(*t[k], t[f"{k}_type"]) for t in row.get("triples", []) for k in ("head", "tail")}


def score_jmere(gold: Gold, pred: Rows) -> dict[str, Any]:
    """Direction-agnostic exact quintuple micro P/R/F1, and entity (span, type) micro P/R/F1."""
    qc = qp = qg = ec = ep = eg = 0
    for sid, labels in gold.items():
        row = pred.get(sid, {})
        gq = {_pair_key(r["head"], r["head_type"], r["tail"], r["tail_type"], r["relation"])
              for r in labels["relations"]}
        pq = {_pair_key(t["head"], t["head_type"], t["tail"], t["tail_type"], t["relation"])
              for t in row.get("triples", [])}
        ge = {(e["start"], e["end"], e["type"]) for e in labels["entities"]}
        pe = jmere_entities(row)
        qc, qp, qg = qc + len(gq & pq), qp + len(pq), qg + len(gq)
        ec, ep, eg = ec + len(ge & pe), ep + len(pe), eg + len(ge)
    return {"jmere": prf(qc, qp, qg), "entity": prf(ec, ep, eg)}


SCORERS = {"gmner": score_gmner, "mnre": score_mnre, "jmere": score_jmere, "twitter_ner": score_twitter_ner}


def score(task: str, gold: Gold, pred: Rows) -> dict[str, Any]:
    """The official metrics of ``task``."""
    return SCORERS[task](gold, pred)


def main_metric(task: str, metrics: dict[str, Any]) -> float:
    """The F1 that model selection on dev uses."""
    section, key = MAIN_METRIC[task]
    return metrics[section][key]

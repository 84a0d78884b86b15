"""JMERE (EEGA release): a JSON list of ``{"token", "img_id", "label_list": [[{"beg_ent", "sec_ent",
"relation"}], ...]}`` (each pair in a one-element list, as EEGA's loader unwraps it with
``triple[0]``; unwrapped pairs are accepted too). Entities are the distinct (span, type) of all pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mie.shards.sources import Item, Record, Reject, image_path, load_json


def read(path: Path, image_dir: Path | None, options: dict[str, str]) -> Iterator[Record]:
    """Yield one Item per sentence: ``entities`` (start, end exclusive, type) and ``relations``
    (quintuples ``head, head_type, tail, tail_type, relation``)."""
    data = load_json(path, list)
    for i, rec in enumerate(data):
        where = f"{path}:item {i}"
        try:
            labels = _labels(rec)
        except (ValueError, TypeError, KeyError) as e:
            yield Reject(where, f"malformed JMERE item: {type(e).__name__}: {e}", str(i))
            continue
        yield Item(str(i), rec["token"], where, labels=labels, image=image_path(image_dir, rec["img_id"]))


def _labels(rec: Any) -> dict:
    tokens = rec["token"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("'token' must be a non-empty list of strings")
    if not isinstance(rec["img_id"], str):
        raise TypeError("'img_id' must be a string")
    entities: dict[tuple, dict] = {}
    relations = []
    for pair in rec["label_list"]:
        if isinstance(pair, list):  # the official files wrap each pair in a one-element list
            (pair,) = pair
        ends = []
        for k in ("beg_ent", "sec_ent"):
            e = pair[k]
            s, end = e["pos"]
            if not (isinstance(s, int) and isinstance(end, int) and 0 <= s < end <= len(tokens)):
                raise ValueError(f"'{k}.pos' {e['pos']} is outside the {len(tokens)} tokens")
            entities.setdefault((s, end, e["tags"]), {"start": s, "end": end, "type": e["tags"], "text": " ".join(tokens[s:end])})
            ends.append((s, end, e["tags"]))
        (hs, he, ht), (ts, te, tt) = ends
        relations.append({"head": [hs, he], "head_type": ht, "tail": [ts, te], "tail_type": tt, "relation": pair["relation"]})
    return {"entities": sorted(entities.values(), key=lambda e: (e["start"], e["end"])), "relations": relations,
            "img_id": rec["img_id"]}

"""MNRE: one Python dict literal per line (one entity pair each), parsed with ``ast.literal_eval``.

The original id of an instance is its 0-based line number, which is also what ``mie evaluate mnre``
prediction rows refer to. Blank lines are not instances and are skipped, keeping line numbering.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Iterator

from mie.shards.sources import Item, Record, Reject, image_path


def read(path: Path, image_dir: Path | None, options: dict[str, str]) -> Iterator[Record]:
    """Yield one Item per line: ``head``/``tail`` (text, start, end exclusive), ``relation``, ``img_id``."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{path}:{lineno + 1}"
            try:
                rec = ast.literal_eval(line.strip())
                labels = _labels(rec)
            except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError) as e:
                yield Reject(where, f"malformed MNRE line: {type(e).__name__}: {e}", str(lineno))
                continue
            yield Item(str(lineno), rec["token"], where, labels=labels, image=image_path(image_dir, rec["img_id"]))


def _labels(rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise TypeError(f"expected a dict literal, got {type(rec).__name__}")
    tokens = rec["token"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("'token' must be a non-empty list of strings")
    ents = {}
    for k, name in (("h", "head"), ("t", "tail")):
        e = rec[k]
        s, end = e["pos"]
        if not (isinstance(s, int) and isinstance(end, int) and 0 <= s < end <= len(tokens)):
            raise ValueError(f"'{k}.pos' {e['pos']} is outside the {len(tokens)} tokens")
        ents[name] = {"text": str(e["name"]), "start": s, "end": end}
    if not isinstance(rec["relation"], str) or not isinstance(rec["img_id"], str):
        raise TypeError("'relation' and 'img_id' must be strings")
    return {**ents, "relation": rec["relation"], "img_id": rec["img_id"]}

"""Plain jsonl for any user corpus: one ``{"id", "text", "image"?}`` object per line.

``image`` is relative to the image dir when one is configured, else to the jsonl file's folder.
Any other fields are kept as labels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from mie.shards.sources import Item, Record, Reject


def read(path: Path, image_dir: Path | None, options: dict[str, str]) -> Iterator[Record]:
    """Yield one Item per non-blank line; tokens are the text split on whitespace."""
    base = image_dir if image_dir is not None else path.parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield Reject(where, f"not valid JSON ({e.msg})")
                continue
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("text"), str):
                yield Reject(where, "expected an object with 'id' and a string 'text'")
                continue
            tokens = rec["text"].split()
            if not tokens:
                yield Reject(where, "empty post: 'text' is blank", str(rec["id"]))
                continue
            image = rec.get("image")
            if image is not None and not isinstance(image, str):
                yield Reject(where, "'image' must be a string (a path)", str(rec["id"]))
                continue
            labels = {k: v for k, v in rec.items() if k not in ("id", "text", "image")}
            yield Item(str(rec["id"]), tokens, where, labels=labels, image=base / image if image else None)

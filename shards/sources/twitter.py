"""Twitter-2015/2017 MNER (UMT release): CoNLL BIO with ``IMGID:`` headers; image ``<IMGID>.jpg``."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from mie.shards.sources import Item, Record, image_path
from mie.shards.sources.conll import ner_labels, read_conll


def read(path: Path, image_dir: Path | None, options: dict[str, str]) -> Iterator[Record]:
    """Yield one Item per tweet, with its BIO ``tags`` and ``entities`` (token offsets, end exclusive)."""
    for rec in read_conll(path):
        if not isinstance(rec, tuple):
            yield rec
            continue
        imgid, where, tokens, tags = rec
        yield Item(imgid, tokens, where, labels=ner_labels(tokens, tags), image=image_path(image_dir, f"{imgid}.jpg"))


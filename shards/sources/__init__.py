"""One reader per corpus format. Each yields, in file order, an :class:`Item` per usable input item
and a :class:`Reject` per unusable one, so the build can account for every input item."""
from __future__ import annotations

import json

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mie.launch.errors import UserError


@dataclass
class Item:
    """One post: its original id, tokens, corpus labels (copied into the sample's ``json``), and the
    image path it refers to (None when the corpus has no image for it)."""

    id: str
    tokens: list[str]
    where: str  # file:line, for rejects found later (bad image, duplicate id)
    labels: dict[str, Any] = field(default_factory=dict)
    image: Path | None = None
    image_size: list[int] | None = None  # size stated by the annotations (e.g. VOC <size>), if any


@dataclass
class Reject:
    """An input item that cannot be used, with where it is and why."""

    where: str
    reason: str
    id: str | None = None


class SourceError(UserError):
    """A problem with the corpus as a whole (missing split file), stated in one line."""


Record = Item | Reject
# A reader takes (split file, image dir or None, source options) and yields records.
Reader = Callable[[Path, Path | None, dict[str, str]], Iterator[Record]]


def reader(fmt: str) -> Reader:
    """The reader function of format ``fmt``."""
    from mie.shards.sources import gmner, jmere, jsonl, mnre, newsclippings, twitter

    return {
        "twitter": twitter.read,
        "gmner": gmner.read,
        "mnre": mnre.read,
        "jmere": jmere.read,
        "newsclippings": newsclippings.read,
        "jsonl": jsonl.read,
    }[fmt]


# Split name → file, relative to the corpus root, as the official releases name them.
DEFAULT_SPLIT_FILES: dict[str, dict[str, str]] = {
    "twitter": {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"},
    "gmner": {"train": "txt/train.txt", "dev": "txt/dev.txt", "test": "txt/test.txt"},
    "mnre": {"train": "mnre_txt/mnre_train.txt", "dev": "mnre_txt/mnre_val .txt", "test": "mnre_txt/mnre_test.txt"},
    "jmere": {"train": "train.json", "dev": "val.json", "test": "test.json"},
    "newsclippings": {"train": "train.json", "dev": "val.json", "test": "test.json"},
    "jsonl": {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"},
}
FORMATS = tuple(DEFAULT_SPLIT_FILES)


def load_json(path: Path, kind: type, error: type[UserError] = SourceError, key: str = "") -> Any:
    """The JSON document at ``path``, which must be a ``kind`` (list or dict); otherwise ``error`` with
    a one-line message naming the config ``key`` (if any), the file, the line and the reason."""
    where = f"{key}: {path}" if key else str(path)
    if not path.is_file():
        raise error(f"{where}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, kind):
        raise error(f"{where}: expected a JSON {kind.__name__}, got {type(data).__name__}")
    return data


def image_path(image_dir: Path | None, name: str) -> Path | None:
    """Where image ``name`` lives, or None when the corpus is built without images."""
    return None if image_dir is None else image_dir / name

"""Twitter-GMNER: CoNLL BIO txt plus Pascal-VOC xml boxes, one xml per image with grounded entities.

Boxes are matched to entities by surface string, as the official H-Index data pipe does: an xml
``<name>`` equals the entity's tokens joined by one space, and every entity with that surface string
gets the boxes. Names that match no entity are kept in ``unmatched_boxes`` (they cannot be scored).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

from mie.shards.sources import Item, Record, Reject, image_path
from mie.shards.sources.conll import ner_labels, read_conll


def read(path: Path, image_dir: Path | None, options: dict[str, str]) -> Iterator[Record]:
    """Yield one Item per tweet; its entities carry ``boxes`` (``[x1,y1,x2,y2]`` in original pixels)."""
    xml_dir = Path(options["xml_dir"]) if "xml_dir" in options else path.parent.parent / "xml"
    for rec in read_conll(path):
        if not isinstance(rec, tuple):
            yield rec
            continue
        imgid, where, tokens, tags = rec
        labels = ner_labels(tokens, tags, stray_i_opens=False)
        xml = xml_dir / f"{imgid}.xml"
        size = None
        objects: list[tuple[str, list[float]]] = []
        if xml.is_file():
            try:
                size, objects = parse_voc(xml)
            except ValueError as e:
                yield Reject(where, f"{xml}: {e}", imgid)
                continue
        matched = set()
        for ent in labels["entities"]:
            ent["boxes"] = [box for name, box in objects if name == ent["text"]]
            if ent["boxes"]:
                matched.add(ent["text"])
        labels["unmatched_boxes"] = [{"name": n, "box": b} for n, b in objects if n not in matched]
        yield Item(imgid, tokens, where, labels=labels, image=image_path(image_dir, f"{imgid}.jpg"), image_size=size)


def parse_voc(xml: Path) -> tuple[list[int] | None, list[tuple[str, list[float]]]]:
    """``([width, height] or None, [(name, [xmin, ymin, xmax, ymax]), ...])`` of a VOC file."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        raise ValueError(f"not well-formed xml ({e})") from None
    size = None
    w, h = root.findtext("size/width"), root.findtext("size/height")
    if w and h:
        try:
            size = [int(float(w)), int(float(h))]
        except ValueError:
            raise ValueError(f"bad <size> {w!r}x{h!r}") from None
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        coords = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
        try:
            box = [_num(c) for c in coords]
        except (TypeError, ValueError):
            raise ValueError(f"object {name!r}: bad <bndbox> {coords}") from None
        if not name:
            raise ValueError("object with an empty <name>")
        objects.append((name, box))
    return size, objects


def _num(text: str) -> float | int:
    v = float(text)
    return int(v) if v.is_integer() else v

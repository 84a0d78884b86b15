"""NewsCLIPpings: a split's annotation json plus VisualNews ``data.json`` and images.

An annotation pairs the caption of VisualNews record ``id`` with the image of record ``image_id``;
pristine pairs and their falsified partners are both kept, marked by ``falsified``. The original id of
a sample is ``<id>_<image_id>``, since a caption appears once pristine and once falsified.
The image dir is VisualNews' ``origin`` folder; ``data.json`` is read from there unless the source
option ``captions`` names it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from mie.shards.sources import Item, Record, Reject, SourceError, load_json


def read(path: Path, image_dir: Path | None, options: dict[str, str]) -> Iterator[Record]:
    """Yield one Item per annotation with ``falsified``, ``caption_id``, ``image_id``, ``similarity_score``."""
    captions_file = Path(options["captions"]) if "captions" in options else (image_dir / "data.json" if image_dir else None)
    if captions_file is None:
        raise SourceError("newsclippings: set source.image_dir (VisualNews origin folder) or source.options.captions")
    data = load_json(captions_file, list)
    try:
        records = {str(r["id"]): r for r in data}
    except (KeyError, TypeError):
        raise SourceError(f"{captions_file}: expected a list of VisualNews records, each an object with an 'id'") from None
    annotations = load_json(path, dict).get("annotations")
    if not isinstance(annotations, list):
        raise SourceError(f"{path}: expected {{\"annotations\": [...]}}")
    for i, ann in enumerate(annotations):
        where = f"{path}:annotation {i}"
        try:
            cid, iid = str(ann["id"]), str(ann["image_id"])
            caption, image_rec = records.get(cid), records.get(iid)
            if caption is None or image_rec is None:
                missing = cid if caption is None else iid
                yield Reject(where, f"VisualNews record {missing} is not in {captions_file}", f"{cid}_{iid}")
                continue
            tokens = str(caption.get("caption") or "").split()
            if not tokens:
                yield Reject(where, "empty post: caption is empty", f"{cid}_{iid}")
                continue
            labels = {"falsified": bool(ann["falsified"]), "caption_id": cid, "image_id": iid,
                      "similarity_score": ann.get("similarity_score"), "topic": caption.get("topic")}
            image = image_dir / image_rec["image_path"] if image_dir else None
        except (KeyError, TypeError) as e:
            yield Reject(where, f"malformed annotation: missing or bad field {e}")
            continue
        yield Item(f"{cid}_{iid}", tokens, where, labels=labels, image=image)


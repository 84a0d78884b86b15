"""Reading shard sets: the webdataset pipeline that training stages build on.

The pipeline is a list of stages, as in open_clip's ``get_wds_dataset``: shard list → split by node →
split by worker → tar members to samples → decode. Bad samples go to a :class:`CountingHandler`
that logs each one with its shard and counts it, so a corrupt shard is visible, never silent.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds
from PIL import Image

from mie.shards.schema import shard_paths


class CountingHandler:
    """A webdataset error handler that reports and counts bad samples, then keeps going.

    ``max_errors`` bounds how much damage is tolerated: past it the error is raised, since a loader
    that skips most of its data is worse than one that stops."""

    def __init__(self, max_errors: int = 100):
        self.count = 0
        self.max_errors = max_errors

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        print(f"[mie loader] bad sample skipped ({self.count}): {type(exn).__name__}: {exn}", file=sys.stderr)
        if self.count > self.max_errors:
            raise RuntimeError(f"more than {self.max_errors} bad samples; last: {exn}") from exn
        return True


def shard_urls(set_dirs: str | Path | Iterable[str | Path]) -> list[str]:
    """The shard files of one or more complete shard sets, in order."""
    dirs = [set_dirs] if isinstance(set_dirs, (str, Path)) else list(set_dirs)
    return [str(p) for d in dirs for p in shard_paths(d)]


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members → ``{"__key__", "txt": str, "json": dict, "jpg": RGB PIL image or None, ...}``.

    Fields are decoded by their extension; ones this function does not know stay bytes."""
    out: dict[str, Any] = {"__key__": sample["__key__"], "jpg": None}
    for k, v in sample.items():
        if k.startswith("__"):
            continue
        if k == "txt":
            out[k] = v.decode("utf-8")
        elif k.endswith("json"):
            out[k] = json.loads(v)
        elif k.endswith("jpg"):
            with Image.open(io.BytesIO(v)) as im:
                out[k] = im.convert("RGB")
        else:
            out[k] = v
    return out


def sample_pipeline(urls: list[str], handler: CountingHandler | None = None, decode: bool = True,
                    by_node: bool = True) -> wds.DataPipeline:
    """Decoded samples of ``urls``, split by node (torch.distributed rank; ``by_node=False``: every rank
    reads every shard) and by DataLoader worker."""
    handler = handler or CountingHandler()
    stages: list[Any] = [wds.SimpleShardList(urls), *([wds.split_by_node] if by_node else []), wds.split_by_worker,
                         wds.tarfile_to_samples(handler=handler)]
    if decode:
        stages.append(wds.map(decode_sample, handler=handler))
    return wds.DataPipeline(*stages)

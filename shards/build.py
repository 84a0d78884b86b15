"""``mie shards build``: a corpus in its official format → one WebDataset shard set per split.

Every rank parses the whole split (cheap, and it fixes every item's position), cuts it into units of
``samples_per_shard`` input items, and writes the units ``i`` with ``i % world == rank``; the image
work, which dominates, is what gets divided. Shard contents therefore do not depend on the number of
ranks, and a re-run skips finished shards (see :mod:`mie.shards.writer`).
"""
from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.launch.log import RunLogger, progress
from mie.shards.images import ImageError, reencode
from mie.shards.schema import sample_key
from mie.shards.sources import DEFAULT_SPLIT_FILES, Item, Record, Reject, SourceError, reader
from mie.shards.writer import ConfigMismatch, ShardSetWriter, sha256_file

Format = Literal["twitter", "gmner", "mnre", "jmere", "newsclippings", "jsonl"]


@dataclass
class SourceConfig:
    format: Format
    root: str  # corpus folder; split files are relative to it
    name: str = ""  # key prefix `<name>-<split>-<id>`; defaults to the format
    image_dir: str = ""  # "" builds text-only shards
    require_images: bool = False  # reject items whose image file is missing (else count them)
    splits: list[str] = field(default_factory=lambda: ["train", "dev", "test"])
    split_files: dict[str, str] = field(default_factory=dict)  # split → file, overriding the official names
    options: dict[str, str] = field(default_factory=dict)  # format-specific: gmner xml_dir, newsclippings captions


@dataclass
class OutputConfig:
    dir: str
    samples_per_shard: int = 1000
    max_image_side: int = 512
    jpeg_quality: int = 90
    workers: int = 0  # image re-encoding processes per rank; 0 = in the main process

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard: must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality: must be in 1..100")
        if self.max_image_side < 8:
            raise ValueError("max_image_side: must be >= 8")


@dataclass
class BuildConfig:
    source: SourceConfig
    output: OutputConfig


def main(cfg: BuildConfig, env: DistEnv) -> dict[str, dict[str, Any]]:
    """Build every split of ``cfg.source`` into ``<output.dir>/<split>/``; the split → index map of the
    sets this call completed (a rank that is not the last to finish returns fewer)."""
    src, out = cfg.source, Path(cfg.output.dir)
    name = src.name or src.format
    split_files = _split_files(src)
    image_dir = _image_dir(src)
    log = RunLogger(env)
    if env.is_main:
        _save_config(cfg, out / "config.toml")
    indexes = {}
    for split, path in split_files.items():
        records = _dedupe(reader(src.format)(path, image_dir, src.options), name, split)
        n = cfg.output.samples_per_shard
        units = [records[i:i + n] for i in range(0, len(records), n)]
        writer = ShardSetWriter(out / split, "build", {**_fingerprint(cfg), "input_sha256": sha256_file(path)},
                                len(units))
        todo = [i for i in range(env.rank, len(units), env.world_size) if not writer.is_done(i)]
        log.info(f"{name}/{split}: {len(records)} input items, {len(units)} shards, "
                 f"{len(todo)} to write on rank {env.rank}")
        jobs = [(writer, i, units[i], name, split, cfg.output, src.require_images) for i in todo]
        bar = progress(None, env, f"{name}/{split}", total=sum(len(units[i]) for i in todo), unit="item")
        if cfg.output.workers > 0 and len(jobs) > 1:
            with ProcessPoolExecutor(cfg.output.workers) as pool:
                for size in pool.map(_write_unit, jobs):
                    bar.update(size)
        else:
            for job in jobs:
                bar.update(_write_unit(job))
        bar.close()
        index = writer.finalize()
        if index is None:
            log.info(f"{name}/{split}: shards of other ranks still missing; the last rank to finish writes index.json")
            continue
        indexes[split] = index
        log.info(f"{name}/{split}: {index['total']} samples in {len(index['shards'])} shards, "
                 f"{index['rejected']} rejected, {index['stats'].get('missing_images', 0)} missing images "
                 f"→ {out / split}")
    return indexes


def _save_config(cfg: BuildConfig, path: Path) -> None:
    """Write ``config.toml``, refusing (before anything of the set is touched) when the directory holds
    shards of a config that gives other bytes; a re-run of the same config rewrites nothing."""
    if path.is_file():
        if path.read_text(encoding="utf-8") == config_lib.dumps(cfg):
            return
        if _fingerprint(config_lib.load(BuildConfig, path)) != _fingerprint(cfg):
            raise ConfigMismatch(f"{path.parent}: holds shards made with another config ({path} differs); "
                                 "use a new output directory or delete this one")
    config_lib.save(cfg, path)


def _fingerprint(cfg: BuildConfig) -> dict[str, Any]:
    """The part of the config the shard bytes depend on: not where the corpus or output lives (the
    split file's sha256 is added per split) nor how many workers encode it."""
    d = config_lib.to_dict(cfg)
    for section, key in (("source", "root"), ("source", "image_dir"), ("output", "dir"), ("output", "workers")):
        d[section].pop(key)
    return d


def _split_files(src: SourceConfig) -> dict[str, Path]:
    root = Path(src.root)
    if not root.is_dir():
        raise SourceError(f"source.root: corpus folder {root} not found")
    unknown = sorted(set(src.split_files) - set(src.splits))
    if unknown:
        raise SourceError(f"source.split_files: split {unknown[0]!r} is not in source.splits {src.splits}")
    files = {}
    for split in src.splits:
        rel = src.split_files.get(split) or DEFAULT_SPLIT_FILES[src.format].get(split)
        if rel is None:
            raise SourceError(f"source.split_files: no file for split {split!r} (format {src.format} names "
                              f"{', '.join(DEFAULT_SPLIT_FILES[src.format])}); set source.split_files.{split}")
        path = root / rel
        if not path.is_file():
            raise SourceError(f"{path}: split file of {split!r} not found")
        files[split] = path
    return files


def _image_dir(src: SourceConfig) -> Path | None:
    if not src.image_dir:
        return None
    image_dir = Path(src.image_dir)
    if not image_dir.is_dir():
        raise SourceError(f"source.image_dir: image folder {image_dir} not found")
    return image_dir


def _dedupe(records: Any, name: str, split: str) -> list[Record]:
    """The records in order, a later item whose key repeats an earlier one turned into a Reject."""
    seen: dict[str, str] = {}
    out: list[Record] = []
    for rec in records:
        if isinstance(rec, Item):
            key = sample_key(name, split, rec.id)
            if key in seen:
                rec = Reject(rec.where, f"duplicate id {rec.id!r} (key {key} first at {seen[key]})", rec.id)
            else:
                seen[key] = rec.where
        out.append(rec)
    return out


def _write_unit(job: tuple) -> int:
    """Encode and commit one shard; returns the number of input items it covered."""
    writer, i, unit, name, split, ocfg, require_images = job
    samples, rejects = [], []
    stats = {"images": 0, "missing_images": 0}
    for rec in unit:
        if isinstance(rec, Reject):
            rejects.append({"split": split, "where": rec.where, "id": rec.id, "reason": rec.reason})
            continue
        try:
            sample = _sample(rec, name, split, ocfg, require_images, stats)
        except ImageError as e:
            rejects.append({"split": split, "where": rec.where, "id": rec.id, "reason": str(e)})
            continue
        samples.append(sample)
    writer.commit(i, samples, rejects, stats)
    return len(unit)


def _sample(item: Item, name: str, split: str, ocfg: OutputConfig, require_images: bool,
            stats: dict[str, int]) -> dict[str, Any]:
    meta = {**item.labels, "source": name, "split": split, "id": item.id, "tokens": item.tokens,
            "image_size": item.image_size}
    sample = {"__key__": sample_key(name, split, item.id), "txt": " ".join(item.tokens).encode("utf-8")}
    if item.image is not None:
        if item.image.is_file():
            sample["jpg"], meta["image_size"], meta["jpg_size"] = reencode(item.image, ocfg.max_image_side,
                                                                           ocfg.jpeg_quality)
            stats["images"] += 1
        elif require_images:
            raise ImageError(f"missing image {item.image}")
        else:
            stats["missing_images"] += 1
    sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return sample

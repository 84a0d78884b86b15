"""Deterministic, atomic, resumable shard-set writing, shared by every shard stage.

A stage cuts its input into units by position, and unit ``i`` becomes ``shard-%06d.tar`` written by
rank ``i % world``. For each unit the writer:

1. writes the tar to a temp name (``*.tmp``, never matched by ``*.tar`` globs) and renames it;
2. then writes ``_parts/shard-%06d.json`` (samples, sha256, rejects, stats), also by rename.

The part file is the unit's completion marker, so a killed run leaves at worst a temp file or a
finished tar without its part, both redone on the next run. Whoever commits the last part writes
``rejects.jsonl`` and then ``index.json`` (the set's completion marker). Tars are byte-identical for
identical input: sorted members, mtime 0, fixed owner, no compression.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds

from mie.launch.errors import UserError
from mie.shards.schema import INDEX, REJECTS, SCHEMA_VERSION, SHARD_PATTERN


class ConfigMismatch(UserError):
    """The output directory holds a shard set made with another config."""


def write_tar(path: Path, samples: Iterable[dict[str, Any]]) -> tuple[int, str]:
    """Stream samples (``__key__`` plus ``bytes`` fields) into ``path`` atomically; ``(count, sha256)``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    count = 0
    with open(tmp, "wb") as f:
        out = _HashingWriter(f)
        # PAX, so long keys are fine; mtime 0 and a fixed owner make the bytes depend on content only.
        with wds.TarWriter(out, user="mie", group="mie", mode=0o644, encoder=False, mtime=0, format="PAX_FORMAT") as sink:
            for sample in samples:
                sink.write(sample)
                count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count, out.sha256.hexdigest()


class _HashingWriter:
    """A write-only file that hashes what passes through (tarfile's stream mode only calls write)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.f.write(data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, and rename it into place."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def replace_dir(tmp: Path, dst: Path) -> None:
    """Put the finished directory ``tmp`` in place of ``dst`` by renames; the old ``dst`` is moved aside
    first and removed after, so a kill leaves either the old or the new directory under ``dst``'s name
    (or nothing), never a half-written one."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, _json_bytes(obj))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardSetWriter:
    """One output shard set of a stage: which units are done, committing units, and the index."""

    def __init__(self, set_dir: str | Path, stage: str, config: dict[str, Any], num_shards: int):
        self.dir = Path(set_dir)
        self.parts = self.dir / "_parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.config = config
        self.digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        self.num_shards = num_shards
        for part in sorted(self.parts.glob("shard-*.json")):
            other = json.loads(part.read_text(encoding="utf-8")).get("config_digest")
            if other != self.digest:
                raise ConfigMismatch(
                    f"{self.dir}: holds shards made with another config (digest {other}, now {self.digest}); "
                    "use a new output directory or delete this one"
                )

    def shard_path(self, i: int) -> Path:
        return self.dir / SHARD_PATTERN.format(i)

    def _part_path(self, i: int) -> Path:
        return self.parts / (SHARD_PATTERN.format(i)[: -len(".tar")] + ".json")

    def is_done(self, i: int) -> bool:
        """Whether unit ``i`` is complete: its part exists and the tar's sha256 matches it."""
        part, tar = self._part_path(i), self.shard_path(i)
        if not (part.is_file() and tar.is_file()):
            return False
        return json.loads(part.read_text(encoding="utf-8"))["sha256"] == sha256_file(tar)

    def clean_temp(self, i: int) -> None:
        """Remove temp files a killed run left for unit ``i`` (its tar's and its part's)."""
        name = SHARD_PATTERN.format(i)
        for tmp in [*self.dir.glob(f"{name}.*.tmp"), *self.parts.glob(f"{self._part_path(i).name}.*.tmp")]:
            tmp.unlink(missing_ok=True)

    def commit(self, i: int, samples: Iterable[dict[str, Any]], rejects: list[dict[str, Any]],
               stats: dict[str, int]) -> int:
        """Write unit ``i``'s tar, then its part file; returns the number of samples written."""
        self.clean_temp(i)
        count, sha = write_tar(self.shard_path(i), samples)
        atomic_write_json(self._part_path(i), {
            "name": self.shard_path(i).name, "samples": count, "sha256": sha, "rejects": rejects,
            "stats": stats, "config_digest": self.digest,
        })
        return count

    def finalize(self) -> dict[str, Any] | None:
        """Write ``rejects.jsonl`` and ``index.json`` if every unit is committed; the index or None.

        Serialized by a lock file so that, of ranks finishing together, the last one sees all parts."""
        with _locked(self.dir / ".lock"):
            parts = []
            for i in range(self.num_shards):
                p = self._part_path(i)
                if not p.is_file():
                    return None
                parts.append(json.loads(p.read_text(encoding="utf-8")))
            stats: dict[str, int] = {}
            rejects = []
            for part in parts:
                rejects.extend(part["rejects"])
                for k, v in part["stats"].items():
                    stats[k] = stats.get(k, 0) + v
            _write_if_changed(self.dir / REJECTS, "".join(
                json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects).encode("utf-8"))
            index = {
                "schema_version": SCHEMA_VERSION, "stage": self.stage, "config": self.config,
                "shards": [{"name": p["name"], "samples": p["samples"], "sha256": p["sha256"]} for p in parts],
                "total": sum(p["samples"] for p in parts), "rejected": len(rejects), "stats": stats,
            }
            # Index last: it marks the set complete. A re-run of a complete set rewrites nothing.
            _write_if_changed(self.dir / INDEX, _json_bytes(index))
            return index


def _write_if_changed(path: Path, data: bytes) -> None:
    """``atomic_write_bytes`` unless ``path`` already holds exactly ``data``."""
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


@contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

"""The skeleton shared by shard → shard stages (back-translation, pseudo-labelling).

Input shard ``i`` becomes output shard ``i`` with the same keys, every earlier field kept and new
fields added; it is written by rank ``i % world`` and skipped when already complete, through
:class:`mie.shards.writer.ShardSetWriter`. A stage supplies only a batch function.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

from mie.launch.dist import DistEnv
from mie.launch.log import RunLogger, progress
from mie.shards.schema import read_index
from mie.shards.writer import ShardSetWriter

# A batch function gets raw samples (``__key__`` + bytes fields) and returns, for each, either the
# fields to add (``{"gen.jpg": b"..."}``) or a string: the reason the sample is rejected.
BatchFn = Callable[[list[dict[str, Any]]], list[dict[str, bytes] | str]]


def read_tar(path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard in file order, fields as raw bytes (our own shards group members by key)."""
    with tarfile.open(path) as tf:
        sample: dict[str, Any] = {}
        for member in tf:
            key, _, ext = member.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            sample[ext] = tf.extractfile(member).read()
        if sample:
            yield sample


def map_shard_set(in_dir: str | Path, out_dir: str | Path, stage: str, config: dict[str, Any], env: DistEnv,
                  fn: BatchFn, batch_size: int, log: RunLogger | None = None,
                  counters: dict[str, int] | None = None) -> dict[str, Any] | None:
    """Apply ``fn`` in batches to every sample of the shard set ``in_dir``, writing ``out_dir``.

    ``config`` is what the outputs depend on (its hash guards against mixing two configs in one set).
    ``counters`` are totals that ``fn`` adds to (e.g. model evaluations); each shard's share goes into
    its stats, summed in the index.
    Returns the output index when this call completed the set, else None (other ranks still working)."""
    counters = {} if counters is None else counters
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    log = log or RunLogger(env)
    src = read_index(in_dir)
    shards = src["shards"]
    writer = ShardSetWriter(out_dir, stage, {**config, "input": str(in_dir)}, len(shards))
    todo = [i for i in range(env.rank, len(shards), env.world_size) if not writer.is_done(i)]
    log.info(f"{stage} {in_dir} → {out_dir}: {len(shards)} shards, {len(todo)} to write on rank {env.rank}")
    bar = progress(None, env, stage, total=sum(shards[i]["samples"] for i in todo), unit="sample")
    for i in todo:
        out_samples, rejects = [], []
        before = dict(counters)
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            for sample, result in zip(batch, fn(batch)):
                if isinstance(result, str):
                    rejects.append({"key": sample["__key__"], "reason": result, "where": f"{shards[i]['name']}"})
                else:
                    out_samples.append({**sample, **result})
            bar.update(len(batch))
            batch.clear()

        for sample in read_tar(in_dir / shards[i]["name"]):
            batch.append(sample)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        writer.commit(i, out_samples, rejects, {"input_samples": shards[i]["samples"],
                                                **{k: v - before.get(k, 0) for k, v in counters.items()}})
    bar.close()
    index = writer.finalize()
    if index is not None:
        log.info(f"{stage}: {index['total']} samples, {index['rejected']} rejected → {out_dir}")
    return index

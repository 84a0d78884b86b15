"""Shard build throughput, and the mie loader against a bare tarfile read of the same shards.

    .venv/bin/python bench/shards_read.py [--pairs 2000] [--image-size 224] [--repeats 5]

The toy world's NewsCLIPpings-style corpus (pristine + falsified pairs, with images) is built into
shards; both readers then decode every sample the same way (``decode_sample``: UTF-8 text, JSON, PIL
RGB image), alternating runs so that both see the same machine state. Prints JSON; the goal is
``loader_vs_bare >= 0.9``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.shards import build, toy
from mie.shards.loader import decode_sample, sample_pipeline, shard_urls
from mie.shards.stage import read_tar

REPO = Path(__file__).resolve().parents[1]


def bare_read(urls: list[str]) -> int:
    """Plain tarfile iteration grouped by key, same decode: the floor any tar loader pays."""
    return sum(1 for url in urls for sample in read_tar(Path(url)) if decode_sample(sample))


def loader_read(urls: list[str]) -> int:
    return sum(1 for _ in sample_pipeline(urls))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2000, help="pristine pairs (each has a falsified partner)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "shards_read"))
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out / "shards", ignore_errors=True)
    small = [8, 4, 4]
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
        toy.main(config_lib.from_dict(toy.ToyConfig, {
            "out": str(out / "toy"), "image_size": args.image_size, "newsclippings": [args.pairs, 4, 4],
            "twitter": small, "gmner": small, "mnre": small, "jmere": small}), DistEnv())
        cfg = config_lib.load(build.BuildConfig, REPO / "configs" / "shards" / "toy" / "newsclippings.toml", [
            f"source.root={json.dumps(str(out / 'toy' / 'newsclippings' / 'data' / 'toy'))}",
            f"source.image_dir={json.dumps(str(out / 'toy' / 'newsclippings' / 'visual_news' / 'origin'))}",
            f"output.dir={json.dumps(str(out / 'shards'))}", f"output.max_image_side={args.image_size}",
            'source.splits=["train"]'])
        t0 = time.perf_counter()
        index = build.main(cfg, DistEnv())["train"]
        build_s = time.perf_counter() - t0
    urls = shard_urls(out / "shards" / "train")
    loader_read(urls)  # warm the page cache and imports once, for both readers
    rates: dict[str, list[float]] = {"bare_tarfile": [], "mie_loader": []}
    for _ in range(args.repeats):
        for name, fn in (("bare_tarfile", bare_read), ("mie_loader", loader_read)):
            t0 = time.perf_counter()
            n = fn(urls)
            rates[name].append(n / (time.perf_counter() - t0))
            assert n == index["total"], f"{name} read {n} of {index['total']} samples"
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({
        "bench": "shards_read",
        "samples": index["total"], "shards": len(urls), "image_side": args.image_size,
        "build_items_per_s": round((index["total"] + index["rejected"]) / build_s, 1),
        "read_samples_per_s": {k: round(v, 1) for k, v in med.items()},
        "read_runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "loader_vs_bare": round(med["mie_loader"] / med["bare_tarfile"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()

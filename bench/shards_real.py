"""Build the real annotation sets into shards and report sizes and build times as JSON.

    .venv/bin/python bench/shards_real.py [--data ../shared/data] [--out runs/bench/shards_real]

Images are not available here, so these are text-only builds (parsing, labels, tar writing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.shards import build

REPO = Path(__file__).resolve().parents[1]
SETS = {  # config → corpus folder under the data dir
    "gmner": "gmner/Twitter10000",
    "twitter2015": "twitter2015",
    "twitter2017": "twitter2017",
    "mnre": "mnre",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "shards_real"))
    args = ap.parse_args()
    results = {}
    for name, rel in SETS.items():
        out = Path(args.out) / name
        shutil.rmtree(out, ignore_errors=True)
        cfg = config_lib.load(build.BuildConfig, REPO / "configs" / "shards" / f"{name}.toml",
                              [f"source.root={json.dumps(str(Path(args.data) / rel))}", f"output.dir={json.dumps(str(out))}"])
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
            indexes = build.main(cfg, DistEnv())
        seconds = time.perf_counter() - t0
        items = sum(ix["total"] + ix["rejected"] for ix in indexes.values())
        results[name] = {
            "splits": {s: {"total": ix["total"], "rejected": ix["rejected"]} for s, ix in indexes.items()},
            "seconds": round(seconds, 2), "items_per_s": round(items / seconds, 1),
        }
    print(json.dumps({"bench": "shards_real", "text_only": True, "results": results}, indent=1))


if __name__ == "__main__":
    main()

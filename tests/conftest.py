"""Shared fixtures: small corpora in the official formats, written by the tests themselves.

Every token, name and id here is invented; nothing is copied from ../shared/data.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Invented words, so the fixtures share nothing with the real corpora.
WORDS = ["zorblat", "quenvik", "mardo", "tessle", "plint", "vorra", "skeel", "brondak", "yull", "fenwick",
         "oqua", "drem", "lusk", "pavvo", "rinth", "gello"]
NAMES = ["Quorvex Taldin", "Brellham", "Ostravia", "Mip Dunkel", "Zantor Vell", "Hovarth"]


def jpeg_bytes(size: tuple[int, int], seed: int = 0, quality: int = 85) -> bytes:
    """A small, deterministic, non-uniform JPEG of ``size`` (w, h)."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y + seed * 37) % 256], -1)
    noise = rng.integers(-12, 13, base.shape)
    arr = np.clip(base + noise, 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(size, seed))
    return path


def conll_text(tweets: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """CoNLL BIO as the UMT / GMNER releases write it: ``IMGID:<id>``, ``token<TAB>tag``, blank line."""
    blocks = []
    for imgid, rows in tweets:
        blocks.append("\n".join([f"IMGID:{imgid}"] + [f"{tok}\t{tag}" for tok, tag in rows]))
    return "\n\n".join(blocks) + "\n\n"


def tweet_rows(i: int) -> list[tuple[str, str]]:
    """A deterministic tagged tweet: some words, a two-token PER, a LOC."""
    w = [WORDS[(i + k) % len(WORDS)] for k in range(4)]
    return [(w[0], "O"), ("Quorvex", "B-PER"), ("Taldin", "I-PER"), (w[1], "O"), (w[2], "O"),
            ("Brellham", "B-LOC"), (w[3] + str(i), "O")]


def write_build_config(path: Path, source: dict[str, Any], output: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({"source": source, "output": output}), encoding="utf-8")
    return path


def make_twitter_corpus(root: Path, n: dict[str, int], image_size=(64, 48), images: bool = True,
                        image_sizes: dict[int, tuple[int, int]] | None = None) -> tuple[Path, Path | None]:
    """A Twitter-2015/2017-format corpus: train.txt/valid.txt/test.txt and ``<imgid>.jpg`` images.

    ``n`` maps split → number of tweets. Returns (corpus root, image dir or None)."""
    files = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}
    root.mkdir(parents=True, exist_ok=True)
    image_dir = root / "images" if images else None
    k = 0
    for split, count in n.items():
        tweets = []
        for _ in range(count):
            imgid = f"{7000 + k}"
            tweets.append((imgid, tweet_rows(k)))
            if images:
                size = (image_sizes or {}).get(k, image_size)
                write_jpeg(image_dir / f"{imgid}.jpg", size, seed=k)
            k += 1
        (root / files[split]).write_text(conll_text(tweets), encoding="utf-8")
    return root, image_dir


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None,
        module: str = "mie.launch.cli") -> subprocess.CompletedProcess:
    """Run ``python -m mie.launch.cli ARGS`` (the ``mie`` command) and capture its output."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else clean_env(), cwd=cwd or REPO)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith("SLURM_") and not k.startswith("TORCHELASTIC_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def read_shards(set_dir: Path) -> list[dict[str, Any]]:
    """Every sample of a complete shard set, read back with webdataset, fields as raw bytes."""
    import webdataset as wds

    index = json.loads((set_dir / "index.json").read_text(encoding="utf-8"))
    urls = [str(set_dir / s["name"]) for s in index["shards"]]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def tree_bytes(d: Path, pattern: str = "**/*.tar") -> dict[str, bytes]:
    """Relative path → content of the files under ``d`` matching ``pattern``."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.glob(pattern)) if p.is_file()}


@pytest.fixture
def twitter_corpus(tmp_path: Path) -> tuple[Path, Path]:
    """A small Twitter-format corpus with real images (some larger than the shard max side)."""
    sizes = {1: (120, 40), 4: (50, 90), 9: (33, 33)}
    return make_twitter_corpus(tmp_path / "corpus", {"train": 7, "dev": 3, "test": 2}, image_sizes=sizes)


def kill_after_first_part(args: list[str], parts: Path, timeout: float = 120, **popen) -> None:
    """Run ``mie ARGS`` in a subprocess and SIGKILL it as soon as a part file (a committed shard)
    appears in ``parts``: the kill lands mid-set, after one unit is complete."""
    proc = subprocess.Popen([sys.executable, "-m", "mie.launch.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **{"env": clean_env(), **popen})
    deadline = time.time() + timeout
    try:
        while not list(parts.glob("shard-*.json")):
            assert proc.poll() is None, "the stage ended before any shard was committed"
            assert time.time() < deadline, f"no shard committed in {timeout} s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

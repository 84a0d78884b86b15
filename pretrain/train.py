"""``mie pretrain CONFIG [key=value ...]``: alignment pretraining under DeepSpeed.

The same code runs on GPUs (NCCL, bf16) and on the CPU (``DS_ACCELERATOR=cpu``, gloo, fp32) for tests and
the quickstart. Start one process per GPU with ``torchrun`` or ``srun``; a plain ``mie pretrain`` is a world
of one. ``pretrain`` reads top to bottom: set up, build, resume, loop over ``train_step`` (→ ``forward_backward``
per micro-batch), checkpoint, log, plot. ``main`` runs it with SIGUSR1/SIGTERM turned into "checkpoint at the
next step boundary, requeue, exit 75" (:mod:`mie.launch.preempt`).
"""
from __future__ import annotations

import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv, max_over_ranks
from mie.launch.errors import UserError
from mie.launch.log import RunLogger, WandbConfig
from mie.launch.preempt import Preemption
from mie.pretrain.checkpoint import (CheckpointConfig, Checkpointer, changed_settings, find_resume, git_revision,
                                     set_rng_state)
from mie.pretrain.data import DataConfig, PretrainData
from mie.pretrain.losses import LossConfig, Objectives
from mie.pretrain.model import ModelConfig, build_model, load_tokenizer, save_skeleton

OBJECTIVES = ("itc", "itm", "entity", "relation")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup
    warmup_steps: int = 100  # DeepSpeed warms up for at least 2 steps
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of lr
    clip: float = 1.0  # global gradient-norm clipping; 0 = off

    def validate(self) -> None:
        if not self.lr > 0 or self.weight_decay < 0 or self.clip < 0 or self.warmup_steps < 0:
            raise ValueError("lr: must be > 0; weight_decay, clip, warmup_steps: >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas: two numbers in [0, 1)")


@dataclass
class EngineConfig:
    zero_stage: Literal[0, 1, 2] = 2
    precision: Literal["auto", "fp32", "bf16", "amp_bf16"] = "auto"  # auto: amp_bf16 on GPU, fp32 on CPU
    grad_accum: int = 1
    compile: bool = False  # engine.compile() (torch.compile under DeepSpeed)
    ds: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed config (expert knobs)

    def validate(self) -> None:
        if self.grad_accum < 1:
            raise ValueError("grad_accum: must be >= 1")


@dataclass
class LogConfig:
    every_steps: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PretrainConfig:
    out: str
    model: ModelConfig
    data: DataConfig
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    max_steps: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if self.max_steps < 1:
            raise ValueError("max_steps: must be >= 1")


class Diverged(UserError):
    """A non-finite loss: the step, the samples of the batch and the last good checkpoint, in one line."""


def main(cfg: PretrainConfig, env: DistEnv) -> dict[str, Any]:
    """Train; returns the final metrics row (rank 0's view). A preemption signal ends the process (exit 75)
    after a checkpoint."""
    # From the first line on, so that a signal during setup is not fatal either: it is acted on at step 0.
    with Preemption(env) as pre:
        return pretrain(cfg, env, pre)


def pretrain(cfg: PretrainConfig, env: DistEnv, pre: Preemption) -> dict[str, Any]:
    """Set up, resume, train to ``max_steps``; ``pre`` is asked at every step boundary."""
    out = Path(cfg.out)
    # Inputs first (checkpoint, tokenizer, shard sets, model files): a bad config fails in seconds, before DeepSpeed.
    resume_from = find_resume(cfg.checkpoint, out, env, config_lib.to_dict(cfg))
    log = RunLogger(env, out, cfg.log.wandb, config_lib.to_dict(cfg))
    if resume_from is not None:
        for change in changed_settings(resume_from, config_lib.to_dict(cfg)):
            log.warn(f"resuming with a changed setting, not an exact continuation: {change}")
    tokenizer = load_tokenizer(cfg.model.text)
    views = cfg.loss.used_views()
    data = PretrainData(cfg.data, tokenizer, cfg.model.text.max_len, cfg.model.text.prompt_len,
                        cfg.model.vision.image_size, cfg.model.max_boxes, views, env, cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    objectives = Objectives(build_model(cfg.model, tokenizer), cfg.loss, data.prompts)
    skipped = [n for n in ("entity", "relation") if getattr(cfg.loss.weights, n) > 0 and not objectives.active[n]]
    if skipped:
        log.warn(f"{' and '.join(skipped)} objective skipped: no shard set has a vocab.json with its prompts")
    device = setup_distributed(env)
    engine = build_engine(objectives, cfg, device)
    if env.is_main:
        config_lib.save(cfg, out / "config.toml")
        save_skeleton(objectives.model, tokenizer, out / "model")
    ckpt = Checkpointer(engine, cfg.checkpoint, out, env, log, {"config": config_lib.to_dict(cfg), "git": git_revision()})
    step, loader_state, rng = ckpt.resume(resume_from)
    seed_everything(cfg.seed + 1 + env.rank)  # dropout and negative sampling differ per rank
    loader = data.loader(loader_state)
    with pre.shielded():  # the forked workers ignore the preemption signals: this process acts on them
        loader.start()  # draws the DataLoader's seed from the torch generator: before restoring RNG states
    if rng is not None:
        set_rng_state(rng)
    log.info(f"pretraining {count_params(objectives.model)} parameters on {env.world_size} × {device.type}, "
             f"{data.samples} samples in {len(cfg.data.sets)} set(s), views {views}, step {step} → {cfg.max_steps}")
    meter = Meter(engine, cfg.data.batch_size * cfg.engine.grad_accum * env.world_size)
    row: dict[str, Any] = {}
    saved = step  # the newest checkpoint's step (0: none, and nothing trained to lose)
    while step < cfg.max_steps:
        if pre.requested(max_over_ranks):
            stop_preempted(pre, ckpt, loader, log, step, saved, row)
        step += 1
        losses = train_step(engine, loader, device, step, ckpt)
        meter.add(losses)
        if step % cfg.log.every_steps == 0 or step == cfg.max_steps:
            row = meter.flush(loader.stats())
            log.metrics(step, row)
            log.info(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
        if ckpt.due(step) or step == cfg.max_steps:
            ckpt.save(step, loader.state_dict(), {"data": loader.stats(), "losses": row})
            saved = step
    loader.close()
    if env.is_main:
        plot_losses(out / "metrics.jsonl", out / "loss_curve.png")
    log.close()
    return row


def stop_preempted(pre: Preemption, ckpt: Checkpointer, loader, log: RunLogger, step: int, saved: int,
                   row: dict[str, Any]) -> NoReturn:
    """Every rank at the same step boundary: checkpoint ``step`` (unless it is saved already, e.g. the signal
    came during that save, or nothing has been trained yet), then requeue and exit 75."""
    if step > saved:
        ckpt.save(step, loader.state_dict(), {"data": loader.stats(), "losses": row})
    where = f"checkpoint {ckpt.last}" if ckpt.last is not None else "nothing trained yet, no checkpoint"
    log.info(f"preempted by {pre.signal_name} at step {step}; {where}")
    loader.close()
    log.close()
    pre.finish(log.info, barrier=dist.barrier)


def train_step(engine, loader, device: torch.device, step: int, ckpt: Checkpointer) -> dict[str, float]:
    """One optimizer step: ``grad_accum`` micro-batches through :func:`forward_backward`; the losses
    averaged over micro-batches and ranks."""
    total: dict[str, float] = {}
    accum = engine.gradient_accumulation_steps()
    for _ in range(accum):
        for k, v in forward_backward(engine, next(loader), device, step, ckpt).items():
            total[k] = total.get(k, 0.0) + v / accum
    return total


def forward_backward(engine, batch: dict[str, Any], device: torch.device, step: int,
                     ckpt: Checkpointer) -> dict[str, float]:
    """Forward, check that the loss is finite on every rank (before it can reach the weights), backward,
    and ``engine.step()`` (DeepSpeed applies the update at the accumulation boundary)."""
    keys = batch.pop("keys")
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out = engine(batch)
    names = [n for n in OBJECTIVES if n in out]
    values = torch.stack([out["loss"].detach().float(), *[out[n].float() for n in names]])
    finite = torch.isfinite(values).all()
    # One collective gives both the rank-mean losses and whether any rank went non-finite.
    reduced = torch.cat([torch.where(finite, values, torch.zeros_like(values)), (~finite).float()[None]])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(reduced)
        reduced[:-1] /= dist.get_world_size()
    reduced = reduced.tolist()
    if reduced[-1] > 0:
        here = "on this rank" if not bool(finite) else "on another rank"
        parts = ", ".join(f"{n}={float(out[n].detach()):.4g}" for n in ["loss", *names])
        raise Diverged(f"step {step}: loss is not finite {here} ({parts}); batch samples: {', '.join(keys[:8])}"
                       f"{' …' if len(keys) > 8 else ''}; last good checkpoint: {ckpt.last or 'none yet'}")
    engine.backward(out["loss"])
    engine.step()
    return dict(zip(["loss", *names], reduced[:-1]))


def setup_distributed(env: DistEnv) -> torch.device:
    """Pick the accelerator, give DeepSpeed the launcher variables it reads, init the process group."""
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.launcher == "single":
        # DeepSpeed looks for MPI unless it sees a launcher's variables.
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif env.launcher == "slurm":
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
        if "MASTER_ADDR" not in os.environ:
            raise UserError("SLURM launch: set MASTER_ADDR (e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST "
                            "| head -n1)) and MASTER_PORT in the sbatch script")
        os.environ.setdefault("MASTER_PORT", "29500")
    import deepspeed

    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return precision


def ds_config(cfg: PretrainConfig, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config the TOML describes (``engine.ds`` merged in last)."""
    o = cfg.optim
    warmup = max(1, o.warmup_steps)
    schedulers = {
        "cosine": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.max_steps, "warmup_num_steps": warmup, "warmup_min_ratio": 0.0,
            "cos_min_ratio": o.min_lr_ratio, "warmup_type": "linear"}},
        "linear": {"type": "WarmupDecayLR", "params": {
            "total_num_steps": cfg.max_steps, "warmup_num_steps": warmup, "warmup_min_lr": 0.0,
            "warmup_max_lr": o.lr, "warmup_type": "linear"}},
        "constant": {"type": "WarmupLR", "params": {
            "warmup_num_steps": warmup, "warmup_min_lr": 0.0, "warmup_max_lr": o.lr, "warmup_type": "linear"}},
    }
    return base_ds_config(cfg.data.batch_size, cfg.engine.grad_accum, o.clip, cfg.engine.zero_stage,
                          resolve_precision(cfg.engine.precision, device), device.type,
                          {"scheduler": schedulers[o.schedule]}, cfg.engine.ds)


def base_ds_config(micro_batch: int, grad_accum: int, clip: float, zero_stage: int, precision: str,
                   device_type: str, *overlays: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config every mie engine shares (pretraining, fine-tuning), ``overlays`` merged in order."""
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip,
        # Contiguous gradients guard GPU memory against fragmentation; on the CPU they are one more copy of
        # every gradient per step (ZeRO-2 step overhead 1.12 → 1.05 on the quickstart's model, bench/RESULTS.md).
        "zero_optimization": {"stage": zero_stage, "contiguous_gradients": device_type != "cpu"},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # the torch optimizer we pass in
        "steps_per_print": 2**31 - 1,  # mie logs itself
        "wall_clock_breakdown": False,
    }
    if precision == "amp_bf16":
        conf["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    for overlay in overlays:
        conf = _merge(conf, overlay)
    return conf


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k, {})), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def make_optimizer(model: torch.nn.Module, o: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW, fused (on GPUs, and on the CPU, where it is ~5x faster than the per-tensor loop); no weight
    decay on biases, norms and temperatures. A torch optimizer is passed in because a config-named one becomes a
    compiled DeepSpeed op (FusedAdam / CPUAdam)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=device.type in ("cpu", "cuda"))


def build_engine(objectives: Objectives, cfg: PretrainConfig, device: torch.device):
    """``deepspeed.initialize`` with the TOML's DeepSpeed config and a torch optimizer."""
    import deepspeed

    objectives.to(device)
    optimizer = make_optimizer(objectives, cfg.optim, device)
    engine, _, _, _ = deepspeed.initialize(model=objectives, optimizer=optimizer, config=ds_config(cfg, device))
    if cfg.engine.compile:
        engine.compile()
    return engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_params(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


class Meter:
    """Losses averaged since the last log line, samples/s over the steps' wall time, LR and gradient norm."""

    def __init__(self, engine, samples_per_step: int):
        self.engine, self.samples_per_step = engine, samples_per_step
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def flush(self, data_stats: dict[str, Any]) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t0
        row: dict[str, Any] = {k: v / max(1, self.steps) for k, v in self.sums.items()}
        row["samples_per_s"] = self.samples_per_step * self.steps / max(elapsed, 1e-9)
        row["lr"] = float(self.engine.get_lr()[0])
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            row["grad_norm"] = float(norm)
        row["bad_samples"] = data_stats["bad_samples"]
        self.sums, self.steps, self.t0 = {}, 0, time.perf_counter()
        return row


def plot_losses(metrics: Path, png: Path) -> None:
    """Loss per objective against step (the last row of a step wins: a resumed run re-logs steps)."""
    if not metrics.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[int, dict[str, Any]] = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("loss", *OBJECTIVES):
        pts = [(s, rows[s][name]) for s in steps if isinstance(rows[s].get(name), float) and math.isfinite(rows[s][name])]
        if pts:
            ax.plot(*zip(*pts), label=name, linewidth=2 if name == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)

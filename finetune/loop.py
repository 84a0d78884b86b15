"""``mie finetune TASK CONFIG [key=value ...]``: the one fine-tuning loop, for every task.

A task plug-in (:mod:`mie.finetune.tasks`) gives the training targets of an example, its head (loss
and decode into prediction rows) and its label vocabulary; this loop does the rest, the same for all:

1. read the train/dev/test shard sets (a webdataset pipeline; images kept as JPEG bytes and decoded
   per batch, only when the modality uses them);
2. build the backbone (:mod:`mie.finetune.backbone`) and the task head, seeded by ``seed``;
3. AdamW (backbone at ``lr``, new parameters at ``head_lr``) with warmup then decay, gradient
   clipping; after each epoch, score dev with the official scorer (:mod:`mie.finetune.metrics`),
   keep the best-dev checkpoint, stop early after ``patience`` epochs without improvement;
4. reload the best checkpoint, predict test, and write the run directory:
   ``predictions.jsonl`` (the ``mie evaluate`` format), ``results.json`` (config, seed, dev/test
   metrics, training minutes), ``curve.png``, ``best/`` (``model.safetensors`` + ``meta.json``),
   ``metrics.jsonl`` and ``config.toml``.

``results.json`` is written last: a run directory without it is unfinished, and a re-run starts it
over. A finished run with the same config is not redone; one with another config is refused. Single process; multi-process launch is
refused with a clear error until it is wired.
"""
from __future__ import annotations

import importlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from mie.finetune import metrics
from mie.shards.writer import atomic_write_bytes, replace_dir
from mie.finetune.backbone import VIEWS, Backbone, BackboneConfig, load_backbone
from mie.finetune.tasks.gmner import GmnerOptions
from mie.finetune.tasks.jmere import JmereOptions
from mie.finetune.tasks.mnre import MnreOptions
from mie.finetune.tasks.twitter_ner import NerOptions
from mie.launch import config as config_lib
from mie.launch.config import ConfigError
from mie.launch.dist import DistEnv
from mie.launch.log import RunLogger, WandbConfig, progress
from mie.shards.loader import CountingHandler, sample_pipeline, shard_urls

Task = Literal["gmner", "mnre", "jmere", "twitter_ner"]


@dataclass
class DataConfig:
    shards: str  # folder with one shard set per split, as `mie shards build` writes it (train/ dev/ test/)
    train: str = "train"
    dev: str = "dev"  # "" = no dev set: the last epoch is kept
    test: str = "test"  # "" = no test predictions
    limit: int = 0  # read only the first N samples of each split (0 = all): smoke runs
    workers: int = 0  # DataLoader worker processes


@dataclass
class OptimConfig:
    epochs: int = 10
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 5e-5  # pretrained parameters
    head_lr: float = 1e-3  # new parameters: heads, CRF, fusion, a randomly initialised vision encoder
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    patience: int = 3  # epochs without a better dev score before stopping (0 = never stop early)
    max_steps: int = 0  # stop after this many optimizer steps in all (0 = no limit): smoke runs
    log_every: int = 20

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs/batch_size/eval_batch_size: must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio: must be in [0, 1)")


@dataclass
class FinetuneConfig:
    task: Task
    out: str  # run directory
    backbone: BackboneConfig
    data: DataConfig
    seed: int = 0
    modality: Literal["text", "image", "both"] = "text"  # text only; + jpg; + jpg and gen.jpg
    device: str = "auto"  # auto = cuda when available, else cpu
    threads: int = 0  # torch CPU threads (0 = torch's default)
    optim: OptimConfig = field(default_factory=OptimConfig)
    twitter_ner: NerOptions = field(default_factory=NerOptions)
    gmner: GmnerOptions = field(default_factory=GmnerOptions)
    mnre: MnreOptions = field(default_factory=MnreOptions)
    jmere: JmereOptions = field(default_factory=JmereOptions)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Example:
    """One sample of a split: its labels (the shard ``json``), images (JPEG bytes per view) and
    detections, plus what the task derives from them (encoder ``words``, training ``target``)."""

    key: str
    id: str
    labels: dict[str, Any]
    images: dict[str, bytes]
    det: dict[str, Any] | None
    words: list[str] = field(default_factory=list)
    target: Any = None


class Model(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head


def main(cfg: FinetuneConfig, env: DistEnv) -> dict[str, Any]:
    """Fine-tune, predict test, write the run directory; returns the ``results.json`` content."""
    if env.world_size > 1:
        raise ConfigError("mie finetune: multi-process fine-tuning is not wired yet; run a single process")
    out = Path(cfg.out)
    finished = _finished(out, cfg)
    if finished is not None:
        RunLogger(env).info(f"{out} already holds a finished run of this config; nothing to do")
        return finished
    _clear(out)
    config_lib.save(cfg, out / "config.toml")
    log = RunLogger(env, out, cfg.wandb, config_lib.to_dict(cfg))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    seed_everything(cfg.seed)

    task_module = importlib.import_module(f"mie.finetune.tasks.{cfg.task}")
    views = VIEWS[cfg.modality]
    splits = {s: load_split(Path(cfg.data.shards) / name, views, cfg.data.limit, log)
              for s, name in (("train", cfg.data.train), ("dev", cfg.data.dev), ("test", cfg.data.test)) if name}
    if not splits.get("train"):
        raise ConfigError(f"data.shards: the train set {Path(cfg.data.shards) / cfg.data.train} has no samples")
    task = task_module.Task(getattr(cfg, cfg.task), splits["train"])
    for examples in splits.values():
        for ex in examples:
            task.prepare(ex)
    if getattr(task, "dropped", 0):
        log.warn(f"{task.dropped} overlapping gold spans cannot be BIO-tagged and are left out of training targets")
    log.info(f"{cfg.task}: " + ", ".join(f"{s} {len(x)}" for s, x in splits.items()) + f"; modality {cfg.modality}")

    backbone = load_backbone(cfg.backbone, cfg.modality)
    model = Model(backbone, task.head(backbone)).to(device)
    collate_fn = partial(collate, tokenizer=backbone.tokenizer, max_length=cfg.backbone.max_length, views=views,
                         image_size=backbone.image_size, task=task)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=cfg.optim.batch_size, shuffle=True,
                                               collate_fn=collate_fn, generator=generator,
                                               num_workers=cfg.data.workers)
    total_steps = cfg.optim.epochs * len(train_loader)
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)

    def evaluate_split(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        rows = predict(model, task, splits[name], collate_fn, cfg.optim.eval_batch_size, device, env, name)
        return metrics.score(cfg.task, {ex.id: ex.labels for ex in splits[name]}, rows), rows

    t0 = time.time()
    step, best, best_epoch, stale, history, stopped_early = 0, -math.inf, 0, 0, [], False
    losses: list[tuple[int, float]] = []
    for epoch in range(1, cfg.optim.epochs + 1):
        model.train()
        for batch in progress(train_loader, env, f"epoch {epoch}", unit="batch"):
            batch = to_device(batch, device)
            loss = model.head.loss(model.backbone(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                         if cfg.optim.grad_clip > 0 else torch.tensor(0.0))
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append((step, loss.item()))
            if step % cfg.optim.log_every == 0:
                log.metrics(step, {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]})
            if cfg.optim.max_steps and step >= cfg.optim.max_steps:
                break
        epoch_loss = float(np.mean([v for s, v in losses if s > step - len(train_loader)] or [0.0]))
        dev_metrics = evaluate_split("dev")[0] if "dev" in splits else {}
        score = metrics.main_metric(cfg.task, dev_metrics) if dev_metrics else float(epoch)
        history.append({"epoch": epoch, "step": step, "train_loss": round(epoch_loss, 5), "dev": dev_metrics})
        log.metrics(step, {"epoch": epoch, "train_loss": epoch_loss, "dev_main": score if dev_metrics else None})
        log.info(f"epoch {epoch}: train loss {epoch_loss:.4f}" + (f", dev F1 {score:.2f}" if dev_metrics else ""))
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            save_checkpoint(model, out / "best", {"epoch": epoch, "step": step, "dev": dev_metrics,
                                                 "task": cfg.task, "task_state": task.state()})
        else:
            stale += 1
        if cfg.optim.patience and stale >= cfg.optim.patience:
            stopped_early = True
            log.info(f"no better dev score for {stale} epochs: stopping early")
            break
        if cfg.optim.max_steps and step >= cfg.optim.max_steps:
            break
    train_minutes = (time.time() - t0) / 60

    load_checkpoint(model, out / "best")
    results: dict[str, Any] = {
        "task": cfg.task, "seed": cfg.seed, "modality": cfg.modality, "config": config_lib.to_dict(cfg),
        "best_epoch": best_epoch, "epochs_run": len(history), "steps": step, "stopped_early": stopped_early,
        "training_minutes": round(train_minutes, 3), "samples": {s: len(x) for s, x in splits.items()},
        "task_state": task.state(), "dev": history[best_epoch - 1]["dev"], "test": {}, "history": history,
    }
    if "test" in splits:
        results["test"], rows = evaluate_split("test")
        _write_jsonl(out / "predictions.jsonl", [rows[ex.id] for ex in splits["test"]])
    plot_curve(out / "curve.png", losses, history, cfg.task)
    results["total_minutes"] = round((time.time() - t0) / 60, 3)
    _write_json(out / "results.json", results)
    log.info(f"best epoch {best_epoch}; test {json.dumps(results['test'])} → {out}")
    log.close()
    return results


# ------------------------------------------------------------------------------------------------
# Data


def load_split(set_dir: Path, views: tuple[str, ...], limit: int, log: RunLogger) -> list[Example]:
    """Every sample of a shard set (the first ``limit`` when > 0), images only for ``views``."""
    handler = CountingHandler()
    examples = []
    for raw in sample_pipeline(shard_urls(set_dir), handler, decode=False):
        meta = json.loads(raw["json"])
        det = json.loads(raw["det.json"]) if "det.json" in raw else None
        examples.append(Example(raw["__key__"], str(meta["id"]), meta, {v: raw[v] for v in views if v in raw}, det))
        if limit and len(examples) >= limit:
            break
    if handler.count:
        log.warn(f"{set_dir}: {handler.count} bad samples skipped")
    return examples


def collate(examples: list[Example], tokenizer: Any, max_length: int, views: tuple[str, ...], image_size: int,
            task: Any) -> dict[str, Any]:
    """Tokenize the words (first subword of each word → ``word_index``), decode and resize images,
    then let the task add its tensors."""
    enc = tokenizer([ex.words for ex in examples], is_split_into_words=True, truncation=True, max_length=max_length,
                    padding=True, return_tensors="pt")
    n_words = max(len(ex.words) for ex in examples)
    word_index = torch.zeros(len(examples), n_words, dtype=torch.long)
    word_mask = torch.zeros(len(examples), n_words, dtype=torch.bool)
    for i in range(len(examples)):
        for t, w in enumerate(enc.word_ids(i)):
            if w is not None and not word_mask[i, w]:
                word_index[i, w], word_mask[i, w] = t, True
    batch: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "word_index": word_index, "word_mask": word_mask, "examples": examples}
    if views:
        batch["images"] = {v: _images(examples, v, image_size) for v in views}
    task.collate(examples, batch)
    return batch


def _images(examples: list[Example], view: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels in [0, 1], (B, 3, size, size); present (B,) bool) of one view; absent images are zeros."""
    pixels = torch.zeros(len(examples), 3, size, size)
    present = torch.zeros(len(examples), dtype=torch.bool)
    for i, ex in enumerate(examples):
        data = ex.images.get(view)
        if data is None:
            continue
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        pixels[i] = torch.from_numpy(arr).permute(2, 0, 1)
        present[i] = True
    return pixels, present


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors (also inside the ``images`` views) moved to ``device``; other entries as they are."""
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v
    return {k: (v if k == "examples" else move(v)) for k, v in batch.items()}


@torch.no_grad()
def predict(model: Model, task: Any, examples: list[Example], collate_fn: Any, batch_size: int,
            device: torch.device, env: DistEnv, desc: str) -> dict[str, dict[str, Any]]:
    """Original id → prediction row (``mie evaluate`` format) for every example."""
    model.eval()
    rows: dict[str, dict[str, Any]] = {}
    loader = torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for batch in progress(loader, env, f"predict {desc}", unit="batch"):
        batch = to_device(batch, device)
        for ex, row in zip(batch["examples"], model.head.predict(model.backbone(batch), batch)):
            rows[ex.id] = {"id": task.row_id(ex), **row}
    return rows


# ------------------------------------------------------------------------------------------------
# Optimisation, seeding, checkpoints, outputs


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) through transformers' helper."""
    from transformers import set_seed

    set_seed(seed)


def build_optimizer(model: Model, cfg: OptimConfig, total_steps: int):
    """AdamW over two groups (pretrained parameters at ``lr``, new ones at ``head_lr``; no weight
    decay on biases and norms) and the warmup + decay schedule."""
    from transformers import get_scheduler

    pretrained = {id(p) for p in model.backbone.pretrained_parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            no_decay = p.dim() < 2 or "norm" in name.lower()
            groups.setdefault((id(p) in pretrained, no_decay), []).append(p)
    param_groups = [{"params": ps, "lr": cfg.lr if pre else cfg.head_lr, "weight_decay": 0.0 if nd else cfg.weight_decay}
                    for (pre, nd), ps in groups.items()]
    optimizer = torch.optim.AdamW(param_groups)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=max(1, total_steps))
    return optimizer, scheduler


def save_checkpoint(model: Model, path: Path, meta: dict[str, Any]) -> None:
    """``path/model.safetensors`` + ``path/meta.json``, swapped in whole (never half written)."""
    from safetensors.torch import save_model

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    replace_dir(tmp, path)


def load_checkpoint(model: Model, path: Path) -> dict[str, Any]:
    """Load ``path/model.safetensors`` into ``model`` (no unpickling); returns its meta."""
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def plot_curve(path: Path, losses: list[tuple[int, float]], history: list[dict[str, Any]], task: str) -> None:
    """Training loss per step and the dev main metric per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        a.plot([s for s, _ in losses], [v for _, v in losses], lw=0.8)
    a.set(xlabel="step", ylabel="train loss", title=f"{task}: training loss")
    dev = [(h["step"], metrics.main_metric(task, h["dev"])) for h in history if h["dev"]]
    if dev:
        b.plot([s for s, _ in dev], [v for _, v in dev], marker="o")
    b.set(xlabel="step", ylabel="F1 (%)", title=f"{task}: dev {'/'.join(metrics.MAIN_METRIC[task])}")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))


def _finished(out: Path, cfg: FinetuneConfig) -> dict[str, Any] | None:
    """The results of a finished run of exactly this config in ``out``; None when ``out`` holds no
    finished run. A finished run of another config is never overwritten."""
    try:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if results.get("config") != config_lib.to_dict(cfg):
        raise ConfigError(f"out: {out} holds a finished run of another config (its results.json); "
                          "choose another out or delete it")
    return results


def _clear(out: Path) -> None:
    """Remove what an earlier (unfinished or different) run left, so nothing stale looks current."""
    for name in ("results.json", "predictions.jsonl", "curve.png", "metrics.jsonl", "config.toml"):
        (out / name).unlink(missing_ok=True)
    for name in ("best", "best.partial", "best.old"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

"""``mie finetune TASK CONFIG [key=value ...]``: the one fine-tuning loop, for every task.

A task plug-in (:mod:`mie.finetune.tasks`) gives the training targets of an example, its head (loss
and decode into prediction rows) and its label vocabulary; this loop does the rest, the same for all:

1. read the train/dev/test shard sets (a webdataset pipeline; images kept as JPEG bytes and decoded
   per batch, only when the modality uses them);
2. build the backbone (:mod:`mie.finetune.backbone`) and the task head, seeded by ``seed``;
3. AdamW (backbone at ``lr``, new parameters at ``head_lr``) with warmup then decay, gradient
   clipping; after each epoch, score dev with the official scorer (:mod:`mie.finetune.metrics`),
   keep the best-dev checkpoint, stop early after ``patience`` epochs without improvement (with
   ``optim.ema``, dev is scored and the checkpoint kept with a moving average of the weights);
4. reload the best checkpoint, predict test, and write the run directory:
   ``predictions.jsonl`` (the ``mie evaluate`` format), ``results.json`` (config, seed, dev/test
   metrics, training minutes), ``curve.png``, ``best/`` (``model.safetensors`` + ``meta.json``),
   ``metrics.jsonl`` and ``config.toml``.

**Engines.** A single process trains with plain torch (the default). Under ``torchrun``/``srun`` with
more than one rank (or with ``engine.kind = "deepspeed"``) the same loop drives a DeepSpeed engine
(ZeRO 0/1/2, gloo on the CPU, NCCL on GPUs): every rank trains on its share of each epoch's seeded
permutation (a ``DistributedSampler``), predicts its share of dev/test, and the rows are gathered, so
every rank sees the same scores and takes the same best/early-stop decisions; rank 0 writes the files.

**Resume.** ``last/`` holds everything an exact continuation needs (weights, optimizer, scheduler, the
position in the epoch, best-so-far, history, every RNG state including the DataLoader generator's). It
is written at every epoch end, and mid-epoch when SIGUSR1/SIGTERM asks the run to stop
(:mod:`mie.launch.preempt`: checkpoint at the next step boundary, exit 75, requeue under SLURM). With
``resume = "auto"`` a re-run of the same config continues from it, skipping the batches of the epoch's
permutation already trained, and ends with the same predictions and results as an uninterrupted run
(all but the wall-clock minutes). A checkpoint of another config is set aside (the run starts over);
one written by another world size or engine is refused.

``results.json`` is written last: a run directory without it is unfinished. A finished run with the
same config is not redone; one with another config is refused.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from mie.finetune import metrics
from mie.finetune.backbone import VIEWS, Backbone, BackboneConfig, Encoded, load_backbone, word_shape
from mie.finetune.tasks.gmner import GmnerOptions
from mie.finetune.tasks.jmere import JmereOptions
from mie.finetune.tasks.mnre import MnreOptions
from mie.finetune.tasks.twitter_ner import NerOptions
from mie.launch import config as config_lib
from mie.launch.config import ConfigError
from mie.launch.dist import DistEnv, barrier, max_over_ranks
from mie.launch.log import RunLogger, WandbConfig, progress
from mie.launch.preempt import Preemption
from mie.pretrain.checkpoint import ResumeError, rng_state, set_rng_state
from mie.shards.loader import CountingHandler, sample_pipeline, shard_urls
from mie.shards.writer import atomic_write_bytes, atomic_write_json, replace_dir

Task = Literal["gmner", "mnre", "jmere", "twitter_ner"]
LAST = "last"  # the resume checkpoint's directory in the run directory


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
    batch_size: int = 16  # per rank
    eval_batch_size: int = 64
    lr: float = 5e-5  # pretrained parameters
    head_lr: float = 1e-3  # new parameters: heads, CRF, fusion, a randomly initialised vision encoder
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    patience: int = 3  # epochs without a better dev score before stopping (0 = never stop early)
    max_steps: int = 0  # stop after this many optimizer steps in all (0 = no limit): smoke runs
    # Batches of similar length (less padding, faster CPU steps): each run of 50 batches of the epoch's
    # shuffled order is sorted by length, so batches stay random in content and position.
    group_by_length: bool = False
    # Decay of an exponential moving average of the trained weights (0 = off). With it, dev is scored, and the
    # best checkpoint kept, with the averaged weights; the average warms up as min(ema, (1 + t) / (10 + t)).
    ema: float = 0.0
    log_every: int = 20

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs/batch_size/eval_batch_size: must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio: must be in [0, 1)")
        if not 0 <= self.ema < 1:
            raise ValueError("ema: must be in [0, 1) (0 = no weight averaging)")


@dataclass
class EngineConfig:
    kind: Literal["auto", "torch", "deepspeed"] = "auto"  # auto: DeepSpeed when launched with > 1 rank, else torch
    zero_stage: Literal[0, 1, 2] = 1  # DeepSpeed only
    ds: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed config (expert knobs)


@dataclass
class FinetuneConfig:
    task: Task
    out: str  # run directory
    backbone: BackboneConfig
    data: DataConfig
    seed: int = 0
    modality: Literal["text", "image", "both"] = "text"  # text only; + jpg; + jpg and gen.jpg
    device: str = "auto"  # single process: auto = cuda when available, else cpu (DeepSpeed: one GPU per rank)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    # bf16: the encoders run under bf16 autocast (fp32 weights and optimizer), on GPUs and on CPUs with
    # AVX512-BF16/AMX, where it is ~1.5x faster per step; fp32 everywhere else.
    precision: Literal["fp32", "bf16"] = "fp32"
    resume: Literal["auto", "never"] = "auto"  # auto: continue the run directory's last/ checkpoint of this config
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
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
    def __init__(self, backbone: Backbone, head: nn.Module, precision: str = "fp32"):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.bf16 = precision == "bf16"

    def encode(self, batch: dict[str, Any]) -> Encoded:
        """The backbone's states of a batch. With ``precision = "bf16"`` the encoders run under bf16 autocast
        (the weights and the optimizer stay fp32) and the heads, CRF included, get fp32 states."""
        if not self.bf16:
            return self.backbone(batch)
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
            return self.backbone(batch).float()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of a batch (what a DeepSpeed engine's forward returns)."""
        return self.head.loss(self.encode(batch), batch)


@dataclass
class Progress:
    """Where training stands: all of it goes into ``last/meta.json``, so a re-run continues exactly."""

    epoch: int = 0  # epochs finished (trained and scored on dev)
    batch: int = 0  # batches of epoch ``epoch + 1`` already trained (a mid-epoch checkpoint)
    step: int = 0  # optimizer steps in all
    best: float | None = None  # best dev score so far
    best_epoch: int = 0
    stale: int = 0  # epochs since the best
    stopped_early: bool = False
    done: bool = False  # training is over: only the test predictions and the files are left
    train_seconds: float = 0.0  # training wall time up to the checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    losses: list[list[float]] = field(default_factory=list)  # [step, loss] per optimizer step


def main(cfg: FinetuneConfig, env: DistEnv) -> dict[str, Any]:
    """Fine-tune (or continue a checkpointed run), predict test, write the run directory; returns the
    ``results.json`` content."""
    out = Path(cfg.out)
    finished = _finished(out, cfg)
    if finished is not None:
        RunLogger(env).info(f"{out} already holds a finished run of this config; nothing to do")
        return finished
    # From here on SIGUSR1/SIGTERM only raise a flag. Training reads it after every optimizer step (and
    # at epoch ends), checkpoints and exits 75; one that lands after training lets the run finish.
    with Preemption(env) as preempt:
        return fine_tune(cfg, env, preempt)


def fine_tune(cfg: FinetuneConfig, env: DistEnv, preempt: Preemption) -> dict[str, Any]:
    """:func:`main` once the run is known to be unfinished: set up, resume, train, predict, write."""
    out = Path(cfg.out)
    use_deepspeed = cfg.engine.kind == "deepspeed" or (cfg.engine.kind == "auto" and env.world_size > 1)
    if env.world_size > 1 and not use_deepspeed:
        raise ConfigError(f"engine.kind: 'torch' trains in one process, but this launch has {env.world_size} ranks; "
                          "use engine.kind=auto or deepspeed")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if use_deepspeed:
        from mie.pretrain.train import setup_distributed

        device = setup_distributed(env)
    else:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if cfg.device == "auto" else cfg.device))
    engine_name = "deepspeed" if use_deepspeed else "torch"
    resume_from, set_aside = find_last(out, cfg, env, engine_name)
    barrier()  # every rank has decided before rank 0 clears anything
    if env.is_main and resume_from is None:
        _clear(out)
        config_lib.save(cfg, out / "config.toml")
    barrier()
    log = RunLogger(env, out, cfg.wandb, config_lib.to_dict(cfg))
    if set_aside:
        log.warn(f"{out / LAST} was written by another config ({', '.join(set_aside)} differ): starting over")
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
    log.info(f"{cfg.task}: " + ", ".join(f"{s} {len(x)}" for s, x in splits.items()) + f"; modality {cfg.modality}; "
             f"{env.world_size} × {device.type} ({engine_name})")

    model, collate_fn = build_model(cfg, task, device)
    # The sampler permutes each epoch from (seed, epoch) alone; the generator only seeds loader workers.
    # Both are part of the checkpoint, so a resumed epoch sees the same batches in the same order.
    sampler = EpochSampler(splits["train"], env, cfg.seed,
                           (lambda ex: len(ex.words), cfg.optim.batch_size) if cfg.optim.group_by_length else None)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=cfg.optim.batch_size, sampler=sampler,
                                               collate_fn=collate_fn, generator=generator,
                                               num_workers=cfg.data.workers)
    batches_per_epoch = math.ceil(sampler.num_samples / cfg.optim.batch_size)
    total_steps = cfg.optim.epochs * batches_per_epoch
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)
    trainer = Trainer(model, *build_optimizer(model, cfg.optim, total_steps), cfg, env, device, use_deepspeed)
    state = Progress()
    if resume_from is not None:
        state, loader_state, rng = trainer.resume(resume_from)
        generator.set_state(loader_state)
        set_rng_state(rng)  # last, so nothing built above draws from the restored streams
        if env.is_main:
            _truncate_metrics(out / "metrics.jsonl", state.step)
        log.info(f"resumed from {resume_from}: epoch {state.epoch + 1}, batch {state.batch}, step {state.step}")

    def evaluate_split(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        rows = predict_split(model, task, splits[name], collate_fn, cfg.optim.eval_batch_size, device, env, name)
        return metrics.score(cfg.task, {ex.id: ex.labels for ex in splits[name]}, rows), rows

    def steps_left() -> bool:
        return not cfg.optim.max_steps or state.step < cfg.optim.max_steps

    def checkpoint(loader_state: torch.Tensor) -> None:
        state.train_seconds = time.time() - t0
        save_last(trainer, out, env, state, loader_state, {"config": _identity(cfg), "engine": engine_name})

    t0 = time.time() - state.train_seconds
    any_rank = max_over_ranks if dist.is_initialized() and env.world_size > 1 else None
    while not state.done:
        epoch = state.epoch + 1
        epoch_start_step = state.step - state.batch
        trainer.train()
        sampler.set_epoch(epoch, skip=state.batch * cfg.optim.batch_size)
        epoch_loader_state = generator.get_state()  # the iterator draws the workers' seed from it
        with preempt.shielded():  # worker processes forked here ignore the signals: this process acts on them
            batches = iter(train_loader) if steps_left() else iter(())
        for batch in progress(batches, env, f"epoch {epoch}", total=len(train_loader), unit="batch"):
            loss = trainer.forward(to_device(batch, device))
            grad_norm = trainer.step(loss)
            state.step += 1
            state.batch += 1
            state.losses.append([state.step, loss.item()])
            if state.step % cfg.optim.log_every == 0:
                log.metrics(state.step, {"loss": loss.item(), "grad_norm": grad_norm, "lr": trainer.lr()})
            if preempt.requested(any_rank):
                checkpoint(epoch_loader_state)
                log.info(f"{preempt.signal_name}: checkpointed epoch {epoch} at batch {state.batch} "
                         f"(step {state.step}) in {out / LAST}; a re-run continues from there")
                log.close()
                preempt.finish(log.info, barrier=barrier)
            if not steps_left():
                break
        epoch_loss = float(np.mean([v for s, v in state.losses if s > epoch_start_step] or [0.0]))
        with trainer.averaged():  # dev is scored, and best/ written, with the averaged weights when optim.ema > 0
            dev_metrics = evaluate_split("dev")[0] if "dev" in splits else {}
            score = metrics.main_metric(cfg.task, dev_metrics) if dev_metrics else float(epoch)
            better = state.best is None or score > state.best
            if better and env.is_main:
                save_checkpoint(model, out / "best", {"epoch": epoch, "step": state.step, "dev": dev_metrics,
                                                     "task": cfg.task, "task_state": task.state()})
        state.history.append({"epoch": epoch, "step": state.step, "train_loss": round(epoch_loss, 5),
                              "dev": dev_metrics})
        log.metrics(state.step, {"epoch": epoch, "train_loss": epoch_loss,
                                 "dev_main": score if dev_metrics else None})
        log.info(f"epoch {epoch}: train loss {epoch_loss:.4f}" + (f", dev F1 {score:.2f}" if dev_metrics else ""))
        if better:
            state.best, state.best_epoch, state.stale = score, epoch, 0
        else:
            state.stale += 1
        state.epoch, state.batch = epoch, 0
        if cfg.optim.patience and state.stale >= cfg.optim.patience:
            state.stopped_early = True
            log.info(f"no better dev score for {state.stale} epochs: stopping early")
        state.done = state.stopped_early or not steps_left() or epoch >= cfg.optim.epochs
        checkpoint(generator.get_state())
        if not state.done and preempt.requested(any_rank):
            log.info(f"{preempt.signal_name}: stopping after epoch {epoch}, checkpointed in {out / LAST}")
            log.close()
            preempt.finish(log.info, barrier=barrier)
    train_minutes = (time.time() - t0) / 60

    load_checkpoint(model, out / "best")
    results: dict[str, Any] = {
        "task": cfg.task, "seed": cfg.seed, "modality": cfg.modality, "config": config_lib.to_dict(cfg),
        "best_epoch": state.best_epoch, "epochs_run": len(state.history), "steps": state.step,
        "stopped_early": state.stopped_early, "training_minutes": round(train_minutes, 3),
        "samples": {s: len(x) for s, x in splits.items()}, "task_state": task.state(),
        "dev": state.history[state.best_epoch - 1]["dev"], "test": {}, "history": state.history,
    }
    rows: dict[str, dict[str, Any]] = {}
    if "test" in splits:
        results["test"], rows = evaluate_split("test")
    if env.is_main:
        if "test" in splits:
            _write_jsonl(out / "predictions.jsonl", [rows[ex.id] for ex in splits["test"]])
        plot_curve(out / "curve.png", state.losses, state.history, cfg.task)
    results["total_minutes"] = round((time.time() - t0) / 60, 3)
    if env.is_main:
        _write_json(out / "results.json", results)  # last: the run is complete from here on
        for name in (LAST, LAST + ".old"):  # only a resume needs it, and a finished run is never resumed
            shutil.rmtree(out / name, ignore_errors=True)
    barrier()
    log.info(f"best epoch {state.best_epoch}; test {json.dumps(results['test'])} → {out}")
    log.close()
    return results


# ------------------------------------------------------------------------------------------------
# Data


def load_split(set_dir: Path, views: tuple[str, ...], limit: int, log: RunLogger) -> list[Example]:
    """Every sample of a shard set (the first ``limit`` when > 0), images only for ``views``."""
    handler = CountingHandler()
    examples = []
    # Every rank reads the whole split: the training sampler and predict_split share it out.
    for raw in sample_pipeline(shard_urls(set_dir), handler, decode=False, by_node=False):
        meta = json.loads(raw["json"])
        det = json.loads(raw["det.json"]) if "det.json" in raw else None
        examples.append(Example(raw["__key__"], str(meta["id"]), meta, {v: raw[v] for v in views if v in raw}, det))
        if limit and len(examples) >= limit:
            break
    if handler.count:
        log.warn(f"{set_dir}: {handler.count} bad samples skipped")
    return examples


def collate(examples: list[Example], tokenizer: Any, max_length: int, views: tuple[str, ...], image_size: int,
            task: Any, word_shapes: bool = False) -> dict[str, Any]:
    """Tokenize the words (first subword of each word → ``word_index``; with ``word_shapes``, each subword's
    word shape → ``shape_ids``), decode and resize images, then let the task add its tensors."""
    enc = tokenizer([ex.words for ex in examples], is_split_into_words=True, truncation=True, max_length=max_length,
                    padding=True, return_tensors="pt")
    n_words = max(len(ex.words) for ex in examples)
    word_index = torch.zeros(len(examples), n_words, dtype=torch.long)
    word_mask = torch.zeros(len(examples), n_words, dtype=torch.bool)
    shape_ids = torch.zeros_like(enc["input_ids"]) if word_shapes else None
    for i, ex in enumerate(examples):
        shapes = [word_shape(w) for w in ex.words] if word_shapes else None
        for t, w in enumerate(enc.word_ids(i)):
            if w is None:
                continue
            if shapes is not None:
                shape_ids[i, t] = shapes[w]
            if not word_mask[i, w]:
                word_index[i, w], word_mask[i, w] = t, True
    batch: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "word_index": word_index, "word_mask": word_mask, "examples": examples}
    if word_shapes:
        batch["shape_ids"] = shape_ids
    if views:
        batch["images"] = {v: _images(examples, v, image_size) for v in views}
        batch["det_boxes"], batch["det_mask"], batch["det_classes"] = _detections(examples)
    task.collate(examples, batch)
    return batch


def _detections(examples: list[Example], top_k: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-K ``jpg`` detections of each sample (``det.json``) as fractions of the image side, (B, K, 4), their
    mask and their detector class ids (B, K): the region tokens a pretrained backbone's fusion takes (as in
    pretraining) and what relation heads read of each region."""
    k = max([1] + [min(top_k, len(((ex.det or {}).get("jpg") or {}).get("boxes", []))) for ex in examples])
    boxes, mask = torch.zeros(len(examples), k, 4), torch.zeros(len(examples), k, dtype=torch.bool)
    classes = torch.zeros(len(examples), k, dtype=torch.long)
    for i, ex in enumerate(examples):
        view = (ex.det or {}).get("jpg") or {}
        found = view.get("boxes", [])[:k]
        size = ex.labels.get("jpg_size")
        if not found or not size:
            continue
        w, h = size
        boxes[i, :len(found)] = torch.tensor([[b[0] / w, b[1] / h, b[2] / w, b[3] / h] for b in found]).clamp(0, 1)
        mask[i, :len(found)] = True
        classes[i, :len(found)] = torch.tensor([int(c) for c in view.get("classes", [0] * len(found))[:k]])
    return boxes, mask, classes


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


def build_model(cfg: FinetuneConfig, task: Any, device: torch.device) -> tuple[Model, Any]:
    """The backbone of ``cfg`` with the task's head, on ``device``, and the collate function of its inputs."""
    views = VIEWS[cfg.modality]
    backbone = load_backbone(cfg.backbone, cfg.modality)
    backbone.set_attention(cfg.backbone.attn, device)
    model = Model(backbone, task.head(backbone), cfg.precision).to(device)
    collate_fn = partial(collate, tokenizer=backbone.tokenizer, max_length=cfg.backbone.max_length, views=views,
                         image_size=backbone.image_size, task=task, word_shapes=cfg.backbone.word_shapes)
    return model, collate_fn


@torch.no_grad()
def head_outputs(model: Model, examples: list[Example], collate_fn: Any, batch_size: int, device: torch.device,
                 env: DistEnv, desc: str, output: str = "predict") -> dict[str, Any]:
    """Original id → what the head's ``output`` method (``predict``: a prediction row; ``scores``: label
    probabilities) gives for that example, in eval mode."""
    model.eval()
    outs: dict[str, Any] = {}
    loader = torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for batch in progress(loader, env, f"predict {desc}", unit="batch"):
        batch = to_device(batch, device)
        outs.update(zip((ex.id for ex in batch["examples"]), getattr(model.head, output)(model.encode(batch), batch)))
    return outs


def predict(model: Model, task: Any, examples: list[Example], collate_fn: Any, batch_size: int,
            device: torch.device, env: DistEnv, desc: str) -> dict[str, dict[str, Any]]:
    """Original id → prediction row (``mie evaluate`` format) for every example."""
    rows = head_outputs(model, examples, collate_fn, batch_size, device, env, desc)
    return {ex.id: {"id": task.row_id(ex), **rows[ex.id]} for ex in examples}


def predict_split(model: Model, task: Any, examples: list[Example], collate_fn: Any, batch_size: int,
                  device: torch.device, env: DistEnv, desc: str) -> dict[str, dict[str, Any]]:
    """:func:`predict` over every example; across ranks each predicts every ``world_size``-th example and
    the rows are gathered on every rank, so all ranks score the same rows and agree on best/stop."""
    if not (dist.is_initialized() and env.world_size > 1):
        return predict(model, task, examples, collate_fn, batch_size, device, env, desc)
    mine = predict(model, task, examples[env.rank::env.world_size], collate_fn, batch_size, device, env, desc)
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


class EpochSampler(torch.utils.data.DistributedSampler):
    """This rank's share of epoch ``e``'s permutation, drawn from ``(seed, e)`` alone, from position
    ``skip`` on: a resumed epoch leaves out the batches it already trained (a world of one gets all).
    With ``group_by`` (example → length, and the batch size), each run of 50 batches of that order is
    sorted by length, longest first: the order is still a function of ``(seed, e)`` alone."""

    GROUP = 50  # batches per length-sorted run

    def __init__(self, dataset: list[Example], env: DistEnv, seed: int,
                 group_by: tuple[Any, int] | None = None):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
        self.skip = 0
        self.lengths = [group_by[0](ex) for ex in dataset] if group_by else None
        self.run = self.GROUP * group_by[1] if group_by else 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        order = list(super().__iter__())
        if self.lengths is not None:
            order = [i for k in range(0, len(order), self.run)
                     for i in sorted(order[k:k + self.run], key=lambda i: -self.lengths[i])]
        return itertools.islice(order, self.skip, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


# ------------------------------------------------------------------------------------------------
# Optimisation, seeding, checkpoints, outputs


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) through transformers' helper."""
    from transformers import set_seed

    set_seed(seed)


def build_optimizer(model: Model, cfg: OptimConfig, total_steps: int):
    """AdamW over two groups (pretrained parameters at ``lr``, new ones at ``head_lr``; no weight
    decay on biases and norms) and the warmup + decay schedule. The fused AdamW kernel runs on the CPU
    too, where it is ~5x faster than the per-tensor loop (all-MiniLM-L6-v2, 2 cores: 15–19 vs 91–107 ms a step)."""
    from transformers import get_scheduler

    pretrained = {id(p) for p in model.backbone.pretrained_parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            no_decay = p.dim() < 2 or "norm" in name.lower()
            groups.setdefault((id(p) in pretrained, no_decay), []).append(p)
    param_groups = [{"params": ps, "lr": cfg.lr if pre else cfg.head_lr, "weight_decay": 0.0 if nd else cfg.weight_decay}
                    for (pre, nd), ps in groups.items()]
    fused = all(p.device.type in ("cpu", "cuda") for g in param_groups for p in g["params"])
    optimizer = torch.optim.AdamW(param_groups, fused=fused)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=max(1, total_steps))
    return optimizer, scheduler


def save_checkpoint(model: Model, path: Path, meta: dict[str, Any]) -> None:
    """``path/model.safetensors`` + ``path/meta.json``, swapped in whole (never half written)."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / "model.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    replace_dir(tmp, path)


def load_checkpoint(model: Model, path: Path) -> dict[str, Any]:
    """Load ``path/model.safetensors`` into ``model`` (no unpickling); returns its meta."""
    load_weights(model, path / "model.safetensors")
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state, each tensor once (a tied weight under its first name)."""
    seen: set[int] = set()
    unique = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            unique[name] = t
    return unique


def save_weights(model: nn.Module, file: Path) -> None:
    """The model's weights as safetensors. Each tensor is copied into its own storage: under ZeRO 1/2,
    DeepSpeed keeps the parameters as views into one flat buffer, which safetensors refuses to write."""
    from safetensors.torch import save_file

    save_file({k: t.detach().to("cpu", copy=True).contiguous() for k, t in _unique_tensors(model).items()}, str(file))


def load_weights(model: nn.Module, file: Path) -> None:
    """Load :func:`save_weights`' file into ``model`` (in place, so DeepSpeed's flat buffers stay valid)."""
    from safetensors.torch import load_file

    state = load_file(str(file))
    expected = set(_unique_tensors(model))
    if set(state) != expected:
        diff = sorted(expected ^ set(state))
        raise ResumeError(f"{file}: holds other weights than this model ({len(diff)} names differ, e.g. {diff[0]})")
    model.load_state_dict(state, strict=False)  # tied aliases are left out of the file


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
    if {k: v for k, v in results.get("config", {}).items() if k != "resume"} != _identity(cfg):
        raise ConfigError(f"out: {out} holds a finished run of another config (its results.json); "
                          "choose another out or delete it")
    return results


def _clear(out: Path) -> None:
    """Remove what an earlier (unfinished or different) run left, so nothing stale looks current."""
    for name in ("results.json", "predictions.jsonl", "curve.png", "metrics.jsonl", "config.toml"):
        (out / name).unlink(missing_ok=True)
    for name in ("best", "best.partial", "best.old", LAST, LAST + ".partial", LAST + ".old"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


class Trainer:
    """The optimizer step of the one loop and the state it saves: plain torch in one process, or a
    DeepSpeed engine around the same model, torch AdamW and schedule (DeepSpeed then reduces gradients
    across ranks, clips, steps the schedule and writes the ZeRO-partitioned optimizer state)."""

    def __init__(self, model: Model, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: FinetuneConfig,
                 env: DistEnv, device: torch.device, use_deepspeed: bool):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.clip, self.env = cfg.optim.grad_clip, env
        self.engine = None
        # The weight average (optim.ema): an fp32 shadow of every trained parameter, updated after each step.
        self.ema, self.ema_updates = cfg.optim.ema, 0
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.trained] if self.ema else []
        if use_deepspeed:
            import deepspeed

            from mie.pretrain.train import base_ds_config

            conf = base_ds_config(cfg.optim.batch_size, 1, cfg.optim.grad_clip, cfg.engine.zero_stage, "fp32",
                                  device.type, cfg.engine.ds)
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=conf)

    def train(self) -> None:
        (self.model if self.engine is None else self.engine).train()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's training loss (through the engine's forward under DeepSpeed)."""
        return self.model(batch) if self.engine is None else self.engine(batch)

    def step(self, loss: torch.Tensor) -> float:
        """Backward, clip, update, advance the schedule; returns the gradient norm (0 when not clipping)."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            self.update_average()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip) if self.clip > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.update_average()
        return float(norm) if norm is not None else 0.0

    @torch.no_grad()
    def update_average(self) -> None:
        """Move the weight average toward the weights just stepped (nothing when ``optim.ema`` is 0). Its
        decay warms up, so the first steps, far from where training ends, soon weigh little."""
        if not self.ema:
            return
        self.ema_updates += 1
        decay = min(self.ema, (1 + self.ema_updates) / (10 + self.ema_updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.trained], 1 - decay)

    @contextlib.contextmanager
    def averaged(self):
        """Within the block the model holds the averaged weights (the trained ones when ``optim.ema`` is 0);
        they are put back after it, so training continues from where it was."""
        if not self.ema:
            yield
            return
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.trained]
            torch._foreach_copy_([p.data for p in self.trained], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.trained], kept)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path) -> None:
        """Weights, optimizer, schedule and weight average into the directory ``path`` (collective under
        DeepSpeed)."""
        if self.ema and self.env.is_main:
            from safetensors.torch import save_file

            save_file({str(i): t for i, t in enumerate(self.shadow)}, str(path / "ema.safetensors"),
                      metadata={"updates": str(self.ema_updates)})
        if self.engine is not None:
            self.engine.save_checkpoint(str(path), tag="engine", save_latest=False)
            return
        save_weights(self.model, path / "model.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   path / "optim.pt")

    def resume(self, path: Path) -> tuple[Progress, torch.Tensor, dict[str, Any]]:
        """Load the ``last`` checkpoint ``path``: ``(progress, loader generator state, RNG states)``."""
        if self.engine is not None:
            loaded, _ = self.engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
            if loaded is None:
                raise ResumeError(f"resume: DeepSpeed found no checkpoint in {path}")
        else:
            load_weights(self.model, path / "model.safetensors")
            saved = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema:
            self.load_average(path / "ema.safetensors")
        mine = torch.load(path / f"rank{self.env.rank:05d}.pt", map_location="cpu", weights_only=True)
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return Progress(**meta["progress"]), mine["loader"], mine["rng"]

    def load_average(self, file: Path) -> None:
        """Load the weight average (and its update count) that :meth:`save` wrote to ``file``."""
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            if len(f.keys()) != len(self.shadow):
                raise ResumeError(f"{file}: averages {len(f.keys())} tensors, this model trains {len(self.shadow)}")
            self.ema_updates = int(f.metadata()["updates"])
            for i, t in enumerate(self.shadow):
                t.copy_(f.get_tensor(str(i)))


def save_last(trainer: Trainer, out: Path, env: DistEnv, state: Progress, loader_state: torch.Tensor,
              meta: dict[str, Any]) -> None:
    """Write ``out/last`` (every rank takes part): the trainer's state, per rank the RNG states and the
    loader generator's state, then ``meta.json`` (the progress; written last, after every rank is done),
    and swap the directory in whole, so a kill at any point leaves the previous checkpoint or this one."""
    tmp = out / (LAST + ".partial")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    trainer.save(tmp)
    torch.save({"loader": loader_state, "rng": rng_state()}, tmp / f"rank{env.rank:05d}.pt")
    barrier()
    if env.is_main:
        atomic_write_json(tmp / "meta.json", {**meta, "world_size": env.world_size, "progress": asdict(state)})
        replace_dir(tmp, out / LAST)
    barrier()


def find_last(out: Path, cfg: FinetuneConfig, env: DistEnv, engine: str) -> tuple[Path | None, list[str]]:
    """The ``last`` checkpoint this run continues from (None: a fresh start), and the config keys that
    differ when a checkpoint of another config was found (it is set aside). One of another world size or
    engine is refused."""
    if cfg.resume == "never":
        return None, []
    # ``last.old`` alone: the run was killed between replace_dir's two renames.
    path = next((out / n for n in (LAST, LAST + ".old") if (out / n / "meta.json").is_file()), None)
    if path is None:
        return None, []
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    then, now = meta.get("config", {}), _identity(cfg)
    if then != now:
        return None, sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
    if (meta.get("world_size"), meta.get("engine")) != (env.world_size, engine):
        raise ResumeError(f"resume: {path} was written by {meta.get('world_size')} rank(s) with {meta.get('engine')}, "
                          f"this run has {env.world_size} with {engine}; an exact resume needs the same "
                          "(resume=never starts over)")
    if not (path / f"rank{env.rank:05d}.pt").is_file():
        raise ResumeError(f"resume: {path}: not a complete checkpoint (no rank{env.rank:05d}.pt)")
    return path, []


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the metrics rows after ``step`` (a resumed run logs them again) and any line a kill cut short."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_bytes(path, "".join(keep).encode("utf-8"))


def _identity(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config as a run is identified by: everything but ``resume`` (how a run starts, not what it is)."""
    d = config_lib.to_dict(cfg)
    d.pop("resume", None)
    return d



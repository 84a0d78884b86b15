"""``mie shards fit-prompter``: train the small open_clip model of pseudo-labelling on the toy world.

The soft labels score each detected object's crop against prompts of the post's entity candidates
("a photo of red zaisste"); in the toy world only the colour word ties a mention to its object, so the
model must learn colour words from pixels. It is trained contrastively (``open_clip.loss.ClipLoss``,
open_clip's own model and tokenizer) on two kinds of pairs, mixed in every batch:

``caption``  the pristine NewsCLIPpings-style pairs of a split: whole image ↔ caption. This is the
             ordinary CLIP signal; alone it ties sets of colours to sets of colour words, which is a
             weak teacher for single objects at this scale.
``crop``     each truth object of those images, its box jittered by a few pixels (detected boxes are
             never exact), ↔ ``crop_template`` filled with "<colour> <entity name>" (the form of the
             post's own candidates), or "<colour> <shape>" for an object no caption mentions. This is
             the entity-object alignment the soft labels are scored on, with the truth boxes as labels.

``relation`` each image that shows a relation (two named objects nearly touching, :func:`~mie.shards.toyfit.
             shown_relations`) ↔ ``relation_template`` filled with the relation's phrase ("person member of
             organization", the phrase the pseudolabel stage's default relations file gives it). A real
             teacher (a web-scale CLIP) has seen "a person in front of a building"; without this the
             prompter has never seen a relation phrase and its image → relation soft labels are noise.

The names are random pseudo-words, so the model learns that they say nothing and the colour word
decides. Images are preprocessed once with the model's own eval transform and texts tokenized once; the
loop is plain AdamW with open_clip_train's warm-up + cosine schedule. ``<output>.work/last.pt`` holds the
model, optimizer and epoch after every epoch, so a killed run resumes there (the shuffling is seeded
per epoch). The result is written as ``{"state_dict": ...}``, the file ``open_clip.create_model_and_
transforms(model, pretrained=<file>)`` loads, like :func:`mie.shards.pseudolabel.init_clip_checkpoint`'s,
then the sidecar ``<output>.json`` with the held-out crop→mention accuracy on ``eval_split``.
"""
from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.launch.log import RunLogger
from mie.shards.detect import ModelFileError, crop
from mie.shards.pseudolabel import ClipConfig, check_clip_files
from mie.shards.entities import relation_phrase
from mie.shards.toy import MNRE_LABELS
from mie.shards.toyfit import FitOutput, Pair, ToyWorldError, caption_pairs, world_digest
from mie.shards.writer import atomic_write_bytes, sha256_file

PairKind = Literal["caption", "crop", "relation"]


@dataclass
class FitPrompterConfig:
    world: str = "runs/toy"  # a toy world (`mie shards toy`)
    split: str = "train"  # its NewsCLIPpings-style split to train on: train | val | test
    eval_split: str = "val"  # held-out split for the crop→mention accuracy in the sidecar; "" = none
    output: str = "runs/models/toy/mie-clip-tiny-fit.pt"  # the open_clip checkpoint; <output>.json/.work beside it
    model: str = "mie-clip-tiny"  # open_clip model name: built in, or the file stem of model_config
    model_config: str = "configs/shards/toy/mie-clip-tiny.json"  # JSON architecture ("" for a built-in model)
    init_checkpoint: str = ""  # start from this open_clip checkpoint; "" = random weights seeded by seed
    pairs: list[PairKind] = field(default_factory=lambda: ["caption", "crop", "relation"])
    crop_template: str = "a photo of {}"  # the pseudolabel stage's entity template
    relation_template: str = "a photo of {}"  # the pseudolabel stage's relation template
    box_jitter: float = 0.1  # crop boxes moved by up to this fraction of their side, per edge
    max_pairs: int = 0  # use the first N captions of the split; 0 = all
    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0 = $OMP_NUM_THREADS, else every core this process may use
    force: bool = False  # refit even when output holds a fit (of this or another config)

    def validate(self) -> None:
        if not self.pairs or len(set(self.pairs)) != len(self.pairs):
            raise ValueError("pairs: give each of caption|crop|relation at most once, at least one")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs: must be >= 1; batch_size: must be >= 2 (contrastive)")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.max_pairs < 0:
            raise ValueError("lr: must be > 0; weight_decay/warmup_steps/max_pairs: must be >= 0")
        if not 0.0 <= self.box_jitter < 0.5:
            raise ValueError("box_jitter: must be in [0, 0.5)")
        for key in ("crop_template", "relation_template"):
            if getattr(self, key).count("{}") != 1:
                raise ValueError(f"{key}: must contain exactly one {{}}, got {getattr(self, key)!r}")
        if self.threads < 0:
            raise ValueError("threads: must be >= 0")


def main(cfg: FitPrompterConfig, env: DistEnv) -> dict[str, Any] | None:
    """Fit the open_clip model into ``cfg.output``; its sidecar, or None on ranks > 0 (one process trains)."""
    import torch

    log = RunLogger(env)
    if not env.is_main:
        return None
    torch.set_num_threads(cfg.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0)))
    world = Path(cfg.world)
    train_pairs = caption_pairs(world, cfg.split)
    if cfg.max_pairs:
        train_pairs = train_pairs[:cfg.max_pairs]
    if len(train_pairs) < 2:
        raise ToyWorldError(f"split: {world} has {len(train_pairs)} pristine pairs in split {cfg.split!r}; need >= 2")
    model, preprocess, tokenizer = load_model(cfg)
    import open_clip

    config = config_lib.to_dict(cfg)
    for key in ("output", "force", "threads"):
        config.pop(key)
    config.update({"world_digest": world_digest(world), "open_clip": open_clip.__version__})
    for key in ("model_config", "init_checkpoint"):
        if getattr(cfg, key):
            config[f"{key}_sha256"] = sha256_file(Path(getattr(cfg, key)))
    out = FitOutput(cfg.output, config, cfg.force)
    if (done := out.done()) is not None:
        log.info(f"{cfg.output} already fitted with this config (held-out top-1 {done['metrics'].get('eval_top1')}); "
                 "nothing to do")
        return done

    t0 = time.time()
    work = out.work_dir()
    images, texts = training_pairs(train_pairs, cfg)
    log.info(f"prompter pairs: {len(images)} ({', '.join(cfg.pairs)}) from {len(train_pairs)} captions of "
             f"{world} {cfg.split}")
    x = torch.stack([preprocess(im) for im in images])
    tokens = tokenizer(texts)
    loss = train(model, x, tokens, cfg, work / "last.pt", log)
    metrics: dict[str, Any] = {"final_loss": round(loss, 4), "pairs": len(images),
                               "fit_seconds": round(time.time() - t0, 1)}
    if cfg.eval_split:
        held_out = caption_pairs(world, cfg.eval_split)
        metrics.update(crop_accuracy(model, preprocess, tokenizer, held_out, cfg))
        if "relation" in cfg.pairs:
            metrics.update(relation_accuracy(model, preprocess, tokenizer, held_out, cfg))
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buf)
    meta = out.publish(buf.getvalue(), metrics)
    log.info(f"fitted prompter -> {cfg.output}: loss {metrics['final_loss']}, held-out crop→mention top-1 "
             f"{metrics.get('eval_top1')} ({metrics['fit_seconds']} s)")
    return meta


def load_model(cfg: FitPrompterConfig):
    """The open_clip model (train mode), its eval image transform and its tokenizer; random weights
    seeded by ``cfg.seed`` unless ``init_checkpoint`` names a file."""
    import open_clip
    import torch

    # Missing files are refused before open_clip sees them: it takes an unknown path for a tag to download.
    if cfg.init_checkpoint and not Path(cfg.init_checkpoint).is_file():
        raise ModelFileError(f"init_checkpoint: open_clip checkpoint {cfg.init_checkpoint} not found")
    if cfg.model_config and not Path(cfg.model_config).is_file():
        raise ModelFileError(f"model_config: open_clip model config {cfg.model_config} not found")
    if cfg.model_config:
        # The pseudolabel stage's checks of a model config (file, name, keys); there is no checkpoint to
        # check yet, so the config file stands in for it.
        try:
            check_clip_files(ClipConfig(model=cfg.model, checkpoint=cfg.model_config, model_config=cfg.model_config))
        except ModelFileError as e:
            raise ModelFileError(str(e).replace("clip.model_config", "model_config")) from None
    if cfg.model_config:
        open_clip.add_model_config(cfg.model_config)
    if cfg.model not in open_clip.list_models():
        raise ModelFileError(f"model: open_clip has no model {cfg.model!r}; name a built-in one or give its JSON "
                             "config as model_config")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.model, pretrained=cfg.init_checkpoint or None, device=cfg.device)
        except Exception as e:  # a checkpoint of another architecture
            raise ModelFileError(f"init_checkpoint: cannot load {cfg.init_checkpoint} as {cfg.model}: "
                                 f"{type(e).__name__}: {str(e).strip()[:300]}") from None
    return model.train(), preprocess, open_clip.get_tokenizer(cfg.model)


def training_pairs(pairs: list[Pair], cfg: FitPrompterConfig):
    """``(images, texts)``: the caption pairs and the crop pairs the config asks for, in a fixed order."""
    from PIL import Image

    rng = np.random.default_rng(cfg.seed)
    images, texts = [], []
    for p in pairs:
        with Image.open(p.image) as im:
            im = im.convert("RGB")
        if "caption" in cfg.pairs:
            images.append(im)
            texts.append(p.caption)
        if "crop" in cfg.pairs:
            for o in p.objects:
                images.append(crop(im, _jitter(rng, o["box"], cfg.box_jitter)))
                texts.append(cfg.crop_template.format(mention(o)))
        if "relation" in cfg.pairs:
            for name in p.relations:
                images.append(im)
                texts.append(cfg.relation_template.format(relation_phrase(name)))
    return images, texts


def mention(obj: dict[str, Any]) -> str:
    """How a post names a truth object: "<colour> <name>", or "<colour> <shape>" for an unnamed one."""
    return f"{obj['color']} {obj['entity'] or obj['shape']}".lower()


def _jitter(rng: np.random.Generator, box: list[int], frac: float) -> list[float]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    dx1, dy1, dx2, dy2 = rng.uniform(-frac, frac, size=4)
    return [x1 + dx1 * w, y1 + dy1 * h, x2 + dx2 * w, y2 + dy2 * h]


def train(model, x, tokens, cfg: FitPrompterConfig, state_path: Path, log: RunLogger) -> float:
    """Contrastive training over the pairs ``(x[i], tokens[i])``; resumes from ``state_path`` (written
    after every epoch). The mean loss of the last epoch."""
    import torch
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr

    n = len(x)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs  # whole batches only: a batch of 1 has no negatives
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
    rest = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in name)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = cosine_lr(opt, cfg.lr, cfg.warmup_steps, cfg.epochs * steps_per_epoch)
    loss_fn = ClipLoss()
    start, last_loss = 0, math.nan
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, last_loss = int(state["epoch"]) + 1, float(state["loss"])
        log.info(f"resuming prompter training from {state_path} ({start} of {cfg.epochs} epochs done)")
    device = torch.device(cfg.device)
    for epoch in range(start, cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        total = 0.0
        for b in range(steps_per_epoch):
            schedule(epoch * steps_per_epoch + b)
            idx = order[b * bs:(b + 1) * bs]
            img = model.encode_image(x[idx].to(device), normalize=True)
            txt = model.encode_text(tokens[idx].to(device), normalize=True)
            loss = loss_fn(img, txt, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # CLIP clamps the learned temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            total += float(loss.detach())
        last_loss = total / steps_per_epoch
        log.info(f"prompter epoch {epoch + 1}/{cfg.epochs}: loss {last_loss:.4f}")
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "loss": last_loss}, buf)
        atomic_write_bytes(state_path, buf.getvalue())
    return last_loss


def crop_accuracy(model, preprocess, tokenizer, pairs: list[Pair], cfg: FitPrompterConfig) -> dict[str, Any]:
    """Held-out top-1: each truth crop of a named object (exact box) against the prompts of its image's
    named objects ("<colour> <name>"): the share of crops whose best prompt is their own."""
    import torch
    from PIL import Image

    model.eval()
    right = total = 0
    with torch.inference_mode():
        for p in pairs:
            named = [o for o in p.objects if o["entity"]]
            if len(named) < 2:
                continue  # one candidate: always right, says nothing
            with Image.open(p.image) as im:
                im = im.convert("RGB")
            x = torch.stack([preprocess(crop(im, o["box"])) for o in named]).to(cfg.device)
            t = tokenizer([cfg.crop_template.format(mention(o)) for o in named]).to(cfg.device)
            sim = model.encode_image(x, normalize=True) @ model.encode_text(t, normalize=True).T
            right += int((sim.argmax(1) == torch.arange(len(named), device=sim.device)).sum())
            total += len(named)
    model.train()
    return {"eval_split": cfg.eval_split, "eval_top1": round(right / total, 4) if total else None, "eval_crops": total}


def relation_accuracy(model, preprocess, tokenizer, pairs: list[Pair], cfg: FitPrompterConfig) -> dict[str, Any]:
    """Held-out top-1 over the MNRE relation phrases: each image that shows exactly one relation, its best
    phrase against the shown one."""
    import torch
    from PIL import Image

    names = list(MNRE_LABELS[1:])
    shown = [p for p in pairs if len(p.relations) == 1]
    if not shown:
        return {"eval_relation_top1": None, "eval_relation_images": 0}
    model.eval()
    with torch.inference_mode():
        t = model.encode_text(tokenizer([cfg.relation_template.format(relation_phrase(n)) for n in names]).to(cfg.device),
                              normalize=True)
        right = 0
        for i in range(0, len(shown), cfg.batch_size):
            part = shown[i:i + cfg.batch_size]
            ims = []
            for p in part:
                with Image.open(p.image) as im:
                    ims.append(preprocess(im.convert("RGB")))
            best = (model.encode_image(torch.stack(ims).to(cfg.device), normalize=True) @ t.T).argmax(1).tolist()
            right += sum(names[b] == p.relations[0] for b, p in zip(best, part))
    model.train()
    return {"eval_relation_top1": round(right / len(shown), 4), "eval_relation_images": len(shown)}

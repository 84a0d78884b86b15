"""The four pretraining objectives (PROMU's alignments with TMR's generated-image view).

1. **ITC**: symmetric InfoNCE between projected unimodal text and image features; negatives come from
   every rank through a gradient-carrying all-gather (open_clip's ``gather_features``).
2. **ITM**: a binary match head on the multimodal ``[CLS]``. Positives are matched pairs; negatives are
   hard negatives drawn from the in-batch ITC similarities (ALBEF) and NewsCLIPpings' falsified pairs.
3. **Entity–object**: fused region features score the entity prompts (cosine / temperature against the
   text encoder's prompt embeddings); KL toward ``soft.npz``'s object → entity distributions.
4. **Relation–image**: the fused ``[CLS]`` scores the relation prompts; KL toward the image → relation
   distribution.

Masked rows (no box, low-confidence pseudo-label, no image of that view) are skipped, never averaged in as
zeros. In PROMU's ``online`` mode the soft targets come from the model's own unimodal encoders instead of
``soft.npz`` (region/image feature against the prompt embeddings, detached).

The functions are pure (tensors in, scalar out) and tested on hand-computed values; :class:`Objectives`
wires them to :class:`mie.pretrain.model.MieModel` and a batch from :mod:`mie.pretrain.data`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

View = Literal["jpg", "gen"]
VIEWS: tuple[str, ...] = ("jpg", "gen")


@dataclass
class LossWeights:
    itc: float = 1.0
    itm: float = 1.0
    entity: float = 1.0
    relation: float = 1.0

    def validate(self) -> None:
        for name in ("itc", "itm", "entity", "relation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")


@dataclass
class LossViews:
    """Which image view trains each objective: the original (``jpg``), the regenerated one (``gen``), or both
    (TMR's pair; the objective is averaged over the two)."""

    itc: list[View] = field(default_factory=lambda: ["jpg"])
    itm: list[View] = field(default_factory=lambda: ["jpg"])
    entity: list[View] = field(default_factory=lambda: ["jpg"])
    relation: list[View] = field(default_factory=lambda: ["jpg"])

    def validate(self) -> None:
        for name in ("itc", "itm", "entity", "relation"):
            views = getattr(self, name)
            if not views or len(set(views)) != len(views):
                raise ValueError(f"{name}: list one or both of {list(VIEWS)}, each once")


@dataclass
class LossConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    views: LossViews = field(default_factory=LossViews)
    gather: bool = True  # ITC negatives from every rank
    local_loss: bool = True  # each rank scores its own rows against all columns (open_clip's local_loss)
    hard_negatives: bool = True  # ITM negatives sampled from ITC similarities (else a random other sample)
    soft_labels: Literal["file", "online"] = "file"  # soft.npz, or PROMU's online mode
    online_threshold: float = 0.0  # online mode: rows whose top probability is lower are masked
    prompt_grad: bool = True  # backpropagate the alignments into the prompt encodings
    # Entity prompts scored per step (0 = every prompt): the ones the batch's soft labels name, plus random
    # others up to this many (a sampled softmax). Encoding a vocabulary of thousands of prompts each step
    # otherwise costs many times the batch itself.
    entity_prompts_per_step: int = 0

    def validate(self) -> None:
        if self.entity_prompts_per_step < 0:
            raise ValueError("entity_prompts_per_step: must be >= 0")

    def used_views(self, objectives: tuple[str, ...] = ("itc", "itm", "entity", "relation")) -> list[str]:
        """The views some objective with a non-zero weight needs, in a fixed order."""
        wanted = {v for name in objectives if getattr(self.weights, name) > 0 for v in getattr(self.views, name)}
        return [v for v in VIEWS if v in wanted]


# -- distributed helpers ------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the sum over ranks of the gradient of its
    slice (what ``torch.distributed.nn``'s all-gather does, with one all-reduce that every backend has;
    the features are small, so the extra bytes do not matter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 (rank order; every rank passes the same shape).

    ``with_grad``: the backward sums the gradients of every rank's loss into each local slice, so that after
    the data-parallel gradient average the update equals the one of the global-batch loss (open_clip's
    ``gather_with_grad``). Without it, other ranks' slices are constants and only the local slice, put back
    in place, carries a gradient (open_clip's default)."""
    rank, world = _world()
    if world == 1:
        return x
    if with_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def gather_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor of every rank concatenated (no gradient; gloo has no bool collectives)."""
    rank, world = _world()
    if world == 1:
        return mask
    parts = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(parts, mask.to(torch.uint8).contiguous())
    return torch.cat(parts, dim=0).bool()


def _fp32(t: torch.Tensor):
    """Autocast off: the similarity logits and their masks are computed in fp32 even in a bf16 step."""
    return torch.autocast(t.device.type, enabled=False)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 when nothing is kept). Written without ``mask.any()`` so that it
    never waits for the GPU; left-out entries may hold anything, even ``inf``: ``where`` drops them and
    sends them a zero gradient, and the result stays in the graph, as data-parallel reduction expects."""
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() / mask.sum().clamp(min=1)


# -- 1. ITC --------------------------------------------------------------------------------------------------
def itc_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
             positive: torch.Tensor, image_present: torch.Tensor, gather: bool = True,
             local_loss: bool = True, text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised features scaled by ``exp(logit_scale)`` (clamped to 100).

    ``positive`` (B,) marks rows whose own pair is a match (not falsified, image present): only they are
    scored. ``image_present`` (B,) marks images that exist: the others are never a text's negative. Texts
    are always present. ``text_ids`` (B, L), when given, removes false negatives: another column with the
    very same text as an image's own caption (NewsCLIPpings pairs each caption with a second, falsified
    image, and both samples can meet in one global batch) is left out of that image's softmax. Every rank
    must pass the same B."""
    with _fp32(image_features):
        return _itc(image_features.float(), text_features.float(), logit_scale.float(), positive, image_present,
                    gather, local_loss, text_ids)


def _itc(image_features, text_features, logit_scale, positive, image_present, gather, local_loss, text_ids=None):
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    scale = logit_scale.exp().clamp(max=100)
    rank, world = _world()
    b = img.shape[0]
    all_ids = text_ids
    if gather and world > 1:
        all_img, all_txt = gather_features(img), gather_features(txt)
        all_pos, all_present = gather_mask(positive), gather_mask(image_present)
        if text_ids is not None:
            all_ids = gather_features(text_ids, with_grad=False)
    else:
        all_img, all_txt, all_pos, all_present, rank = img, txt, positive, image_present, 0
    if local_loss or not gather:
        rows_img, rows_txt, rows_pos, rows_ids = img, txt, positive, text_ids
        labels = torch.arange(b, device=img.device) + rank * b
    else:
        rows_img, rows_txt, rows_pos, rows_ids = all_img, all_txt, all_pos, all_ids
        labels = torch.arange(all_img.shape[0], device=img.device)
    logits_i2t = scale * rows_img @ all_txt.T
    if text_ids is not None:
        twin = (rows_ids[:, None, :] == all_ids[None, :, :]).all(-1)
        twin[torch.arange(len(labels), device=img.device), labels] = False
        logits_i2t = logits_i2t.masked_fill(twin, torch.finfo(torch.float32).min)
    logits_t2i = (scale * rows_txt @ all_img.T).masked_fill(~all_present[None, :], torch.finfo(torch.float32).min)
    ce_i2t = F.cross_entropy(logits_i2t, labels, reduction="none")
    ce_t2i = F.cross_entropy(logits_t2i, labels, reduction="none")
    return (_masked_mean(ce_i2t, rows_pos) + _masked_mean(ce_t2i, rows_pos)) / 2


# -- 2. ITM --------------------------------------------------------------------------------------------------
def sample_negatives(similarity: torch.Tensor, allowed: torch.Tensor, hard: bool = True) -> torch.Tensor:
    """For each row of ``similarity`` (B, C), a column index drawn with probability ``softmax(similarity)``
    over the ``allowed`` columns (uniformly when not ``hard``), or -1 where no column is allowed.

    Draws use the global torch generator, so a run restored with its RNG state draws the same negatives."""
    with torch.no_grad():
        # Non-finite similarities (a diverging model) must not crash the draw: the loss check reports them.
        scores = (torch.nan_to_num(similarity.float(), nan=0.0, posinf=0.0, neginf=0.0) if hard
                  else torch.zeros_like(similarity, dtype=torch.float32))
        scores = scores.masked_fill(~allowed, float("-inf"))
        has = allowed.any(dim=1)
        weights = torch.softmax(torch.where(has[:, None], scores, torch.zeros_like(scores)), dim=1)
        picks = torch.multinomial(weights, 1).squeeze(1)
        return torch.where(has, picks, torch.full_like(picks, -1))


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2-way match logits (N, 2) against ``labels`` (1 = match) over ``rows``."""
    ce = F.cross_entropy(logits.float(), labels.long(), reduction="none")
    return _masked_mean(ce, rows)


# -- 3./4. soft-label alignments ------------------------------------------------------------------------------
def soft_kl(logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor,
            allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over kept ``rows`` of KL(target ‖ softmax(logits)), with the softmax restricted to ``allowed``
    classes. ``logits``/``target`` (..., C), ``rows`` (...) bool, ``allowed`` broadcastable to ``logits``.
    Targets are distributions over allowed classes (0·log 0 counts as 0)."""
    logits = logits.float()
    # Masked rows' targets are zeroed, not just left out of the mean: garbage there (NaN in a row the
    # pseudo-labeller masked) would otherwise still reach the gradient as 0 · NaN.
    target = torch.where(rows[..., None], target.float(), torch.zeros((), device=target.device))
    if allowed is not None:
        logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
    log_q = F.log_softmax(logits, dim=-1)
    kl = (torch.special.xlogy(target, target) - target * log_q).sum(-1)
    return _masked_mean(kl, rows)


def scaled_cosine(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) · cos(a, b)`` for every pair: a (..., E) against b (P, E) → (..., P)."""
    with _fp32(a):
        scale = logit_scale.float().exp().clamp(max=100)
        return scale * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


# -- the module the engine runs ------------------------------------------------------------------------------
class Objectives(nn.Module):
    """Wraps a :class:`MieModel`; ``forward(batch)`` returns ``{"loss": weighted sum, "itc": ..., ...}`` (the
    parts detached, for logging). This is the module handed to DeepSpeed; the backbone is ``self.model``.

    ``prompts`` holds the tokenized entity and relation prompts of every shard set in the run and, per set,
    which of them its soft labels range over (see :class:`mie.pretrain.data.Prompts`)."""

    def __init__(self, model: nn.Module, cfg: LossConfig, prompts=None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        empty = torch.zeros(0, 1, dtype=torch.long)
        for name in ("entity", "relation"):
            p = getattr(prompts, name, None) if prompts is not None else None
            self.register_buffer(f"{name}_ids", p.input_ids if p is not None else empty, persistent=False)
            self.register_buffer(f"{name}_mask", p.attention_mask if p is not None else empty, persistent=False)
            self.register_buffer(f"{name}_owner", p.owner if p is not None else empty[:, 0], persistent=False)
            self.register_buffer(f"{name}_allowed", p.allowed if p is not None else torch.zeros(1, 0, dtype=torch.bool),
                                 persistent=False)
        self.active = {name: getattr(cfg.weights, name) > 0 for name in ("itc", "itm", "entity", "relation")}
        for name in ("entity", "relation"):
            if getattr(self, f"{name}_ids").shape[0] == 0:
                self.active[name] = False  # no prompts in any set: nothing to align to (train.py says so)

    def _prompt_embeddings(self, name: str, columns: torch.Tensor | None = None) -> torch.Tensor:
        """(P, E): each prompt's template texts encoded, L2-normalised and averaged (CLIP's prompt ensembling);
        only the prompts ``columns`` lists, in that order, when given."""
        ids, mask, owner = getattr(self, f"{name}_ids"), getattr(self, f"{name}_mask"), getattr(self, f"{name}_owner")
        n = getattr(self, f"{name}_allowed").shape[1]
        if columns is not None:
            new_index = torch.full((n,), -1, dtype=torch.long, device=owner.device)
            new_index[columns] = torch.arange(len(columns), device=owner.device)
            rows = new_index[owner] >= 0
            ids, mask, owner, n = ids[rows], mask[rows], new_index[owner][rows], len(columns)
        with torch.set_grad_enabled(self.cfg.prompt_grad and torch.is_grad_enabled()):
            states = self.model.encode_text(ids, mask)
            texts = F.normalize(self.model.text_proj(self.model.text_feature(states, mask)).float(), dim=-1)
            if texts.shape[0] == n:  # one text per prompt
                return texts
            total = torch.zeros(n, texts.shape[1], device=texts.device).index_add(0, owner, texts)
            return total / torch.bincount(owner, minlength=n).clamp(min=1)[:, None]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m, cfg = self.model, self.cfg
        text = m.encode_text(batch["input_ids"], batch["attention_mask"])
        text_feat = m.text_proj(m.text_feature(text, batch["attention_mask"]))
        falsified = batch["falsified"].bool()
        columns = self._entity_columns(batch)
        prompts = {name: self._prompt_embeddings(name, columns if name == "entity" else None)
                   for name in ("entity", "relation") if self.active[name]}
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.active}
        for view in VIEWS:
            wants = [name for name, on in self.active.items() if on and view in getattr(cfg.views, name)]
            if not wants:
                continue
            images, present = batch[f"{view}.images"], batch[f"{view}.present"].bool()
            boxes, box_mask = batch[f"{view}.boxes"], batch[f"{view}.box_mask"].bool() & present[:, None]
            image = m.encode_image(images)
            image_feat = m.image_proj(image["global"])
            regions = m.region_features(image, boxes, images, box_mask) if set(wants) - {"itc"} else None
            if "itc" in wants:
                parts["itc"].append(itc_loss(image_feat, text_feat, m.logit_scale, present & ~falsified, present,
                                             cfg.gather, cfg.local_loss, batch["input_ids"]))
            if not set(wants) - {"itc"}:
                continue
            cls, fused_regions = m.fuse(text, batch["attention_mask"], image["tokens"], regions, boxes, box_mask)
            if "itm" in wants:
                parts["itm"].append(self._itm(text, text_feat, image, image_feat, regions, boxes, box_mask, cls,
                                              present, falsified, batch["attention_mask"]))
            allowed_rows = {name: getattr(self, f"{name}_allowed")[batch["set_index"]] for name in prompts}
            if "entity" in wants:
                pred = scaled_cosine(m.region_proj(fused_regions), prompts["entity"], m.align_logit_scale)
                allowed = allowed_rows["entity"][:, None, :]
                if columns is not None:
                    allowed = allowed[..., columns]
                if cfg.soft_labels == "online":
                    target, rows = self._online(m.image_proj(regions), prompts["entity"], allowed, box_mask)
                else:
                    target, rows = batch[f"{view}.obj_ent"], batch[f"{view}.obj_mask"].bool() & box_mask
                    if columns is not None:
                        target = target[..., columns]
                parts["entity"].append(soft_kl(pred, target, rows, allowed))
            if "relation" in wants:
                pred = scaled_cosine(m.relation_proj(cls), prompts["relation"], m.align_logit_scale)
                allowed = allowed_rows["relation"]
                if cfg.soft_labels == "online":
                    target, rows = self._online(image_feat, prompts["relation"], allowed, present)
                else:
                    target, rows = batch[f"{view}.rel"], batch[f"{view}.rel_mask"].bool() & present
                parts["relation"].append(soft_kl(pred, target, rows, allowed))
        out: dict[str, torch.Tensor] = {}
        total = text_feat.sum() * 0.0
        for name, values in parts.items():
            if values:
                value = torch.stack(values).mean()
                total = total + getattr(cfg.weights, name) * value
                out[name] = value.detach()
        out["loss"] = total
        return out

    def _entity_columns(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The entity prompts this step scores under ``entity_prompts_per_step``: every prompt a soft label of
        the batch puts mass on, then random others (the torch RNG, so a resumed run draws the same) up to the
        budget, sorted. None: all of them."""
        budget, total = self.cfg.entity_prompts_per_step, self.entity_allowed.shape[1]
        if not self.active["entity"] or budget == 0 or total <= budget:
            return None
        named = torch.zeros(total, dtype=torch.bool, device=self.entity_allowed.device)
        if self.cfg.soft_labels == "file":
            for view in self.cfg.views.entity:
                if f"{view}.obj_ent" in batch:
                    named |= (batch[f"{view}.obj_ent"] > 0).flatten(0, -2).any(0)
        others = (~named).nonzero().squeeze(1)
        extra = max(0, budget - int(named.sum()))
        pick = others[torch.randperm(len(others))[:extra].to(others.device)]
        return torch.cat([named.nonzero().squeeze(1), pick]).sort().values

    def _online(self, features: torch.Tensor, prompt_emb: torch.Tensor, allowed: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PROMU's online soft labels: the unimodal feature's prompt distribution, detached; rows whose top
        probability is under ``online_threshold`` (or that have no allowed prompt) are masked."""
        with torch.no_grad():
            logits = scaled_cosine(features, prompt_emb, self.model.logit_scale)
            logits = logits.masked_fill(~allowed, float("-inf"))
            ok = allowed.any(-1).expand(logits.shape[:-1])
            target = torch.softmax(torch.where(ok[..., None], logits, torch.zeros_like(logits)), -1)
            target = torch.where(ok[..., None] & allowed, target, torch.zeros_like(target))
            keep = rows & ok & (target.max(-1).values >= self.cfg.online_threshold)
        return target, keep

    def _itm(self, text, text_feat, image, image_feat, regions, boxes, box_mask, cls, present, falsified, text_mask):
        """ITM over three sets of pairs of equal size B: the batch's own pairs (label: not falsified), each
        matched text with a hard-negative image, and each matched image with a hard-negative text."""
        m = self.model
        b = text.shape[0]
        matched = present & ~falsified
        with torch.no_grad():
            sim = scaled_cosine(text_feat, image_feat, torch.zeros(1, device=text_feat.device))  # text × image
            eye = torch.eye(b, dtype=torch.bool, device=sim.device)
            neg_image = sample_negatives(sim, present[None, :] & ~eye, self.cfg.hard_negatives)  # per text
            neg_text = sample_negatives(sim.T, ~eye, self.cfg.hard_negatives)  # per image
        ni, nt = neg_image.clamp(min=0), neg_text.clamp(min=0)
        cls_neg_image, _ = m.fuse(text, text_mask, image["tokens"][ni], regions[ni], boxes[ni], box_mask[ni])
        cls_neg_text, _ = m.fuse(text[nt], text_mask[nt], image["tokens"], regions, boxes, box_mask)
        logits = m.itm_head(torch.cat([cls, cls_neg_image, cls_neg_text]))
        labels = torch.cat([matched, torch.zeros_like(matched), torch.zeros_like(matched)])
        rows = torch.cat([present, matched & (neg_image >= 0), matched & (neg_text >= 0)])
        return itm_loss(logits, labels, rows)

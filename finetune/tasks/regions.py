"""Entities grounded in the image regions they refer to (MNRE and JMERE pairs; GMNER's prompts).

A relation in a post with an image is often a fact about two objects of the picture: what each is and
where they are. The text states of the two entities alone cannot carry that unless the backbone has
already tied each mention to its object. :class:`PairRegions` makes the tie explicit and latent: each
entity's state attends over the sample's detected regions (``det.json``'s top-K ``jpg`` boxes) plus a
"no region" slot, and a pair is described by the two attended region states, the two attended
detector-class embeddings (YOLO's class of a box: "person", "car"; in the toy world, the shape) and
their product, and the geometry of the two attended boxes (centre offset, gaps, distance, sizes). No
box label supervises the attention (only the relation loss, and JMERE's typing loss), so a backbone
whose regions are already aligned with entity mentions (alignment pretraining's entity–object
objective) grounds from the first step, while one with fresh weights must discover the tie from the
task's labels alone. From a ``mie export`` the attention adds pretraining's own entity–object logits
(:meth:`Encoded.region_alignment`) of the entity's prompt (:class:`RegionOptions`): ``template`` filled
with the mention and the ``context_words`` words before it, as pretraining's entity prompts are noun
chunks ("a photo of the red zorb") while an annotated span is often the name alone.

The region states are the backbone's fused region tokens (:attr:`Encoded.regions`, a ``mie export``),
else features pooled inside each box from the vision feature map (a Hugging Face text encoder + timm
backbone). In text mode, or for a post without image or detections, only the "no region" slot exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mie.finetune.backbone import Encoded, roi_features

GEOMETRY = 10  # features of a box pair, see :func:`pair_geometry`


@dataclass
class RegionOptions:
    """How an entity's prompt for pretraining's entity–object alignment is written."""

    template: str = "a photo of {}"  # the pseudolabel stage's entity template
    context_words: int = 1  # words before the mention included in its prompt (its modifiers)
    classes: int = 80  # detector class ids embedded (det.json ``classes``; COCO's 80); larger ids share the last

    def validate(self) -> None:
        if self.template.count("{}") != 1:
            raise ValueError(f"template: must contain exactly one {{}}, got {self.template!r}")
        if self.context_words < 0 or self.classes < 1:
            raise ValueError("context_words: must be >= 0; classes: must be >= 1")

    def prompt(self, words: list[str], start: int, end: int) -> str:
        """The prompt of the mention ``words[start:end]``."""
        return self.template.format(" ".join(words[max(0, start - self.context_words):end]))


def pair_geometry(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P, 10) geometry of box pairs given as fractions (x1, y1, x2, y2), (P, 4) each: the centre offset,
    horizontal and vertical gaps between the boxes (0 when they overlap on that axis), the larger gap,
    the centre distance, and both boxes' width and height."""
    centre = lambda x: (x[:, :2] + x[:, 2:]) / 2  # noqa: E731
    offset = centre(b) - centre(a)
    gap = torch.stack([torch.maximum(a[:, 0], b[:, 0]) - torch.minimum(a[:, 2], b[:, 2]),
                       torch.maximum(a[:, 1], b[:, 1]) - torch.minimum(a[:, 3], b[:, 3])], -1).clamp(min=0)
    size = lambda x: x[:, 2:] - x[:, :2]  # noqa: E731
    return torch.cat([offset, gap, gap.max(-1, keepdim=True).values, offset.norm(dim=-1, keepdim=True),
                      size(a), size(b)], -1)


class PairRegions(nn.Module):
    """Grounds entity states in the detected regions and describes entity pairs by them; output (P, 6H)."""

    def __init__(self, hidden: int, vision_dim: int, image_size: int, fused_regions: bool, classes: int):
        super().__init__()
        self.image_size, self.classes = image_size, classes
        self.class_embed = nn.Embedding(classes + 1, hidden)  # the last row: "no region"
        self.fused = fused_regions
        self.vis = nn.Linear(vision_dim, hidden) if vision_dim and not fused_regions else None
        self.query, self.key = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))
        self.geo = nn.Sequential(nn.Linear(GEOMETRY, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.out_dim = 6 * hidden

    def regions(self, enc: Encoded, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Region states (B, 1 + K, H), boxes (B, 1 + K, 4) as fractions, mask (B, 1 + K) and class
        embeddings (B, 1 + K, H); slot 0 is "no region" (a learned state, an all-zero box), always present."""
        b, dev = enc.words.shape[0], enc.words.device
        null = self.null.expand(b, -1, -1)
        boxes, mask = batch.get("det_boxes"), batch.get("det_mask")
        feats = None
        if boxes is not None and enc.image_present is not None:
            boxes, mask = boxes.to(dev), mask.to(dev) & enc.image_present[:, None]
            if self.fused and enc.regions is not None and enc.regions.shape[1] == boxes.shape[1]:
                feats = enc.regions
            elif self.vis is not None and enc.image_map is not None:
                b_idx, k_idx = mask.nonzero(as_tuple=True)
                feats = null.new_zeros(b, boxes.shape[1], null.shape[-1])
                if len(b_idx):
                    pooled = roi_features(enc.image_map, boxes[b_idx, k_idx] * self.image_size, b_idx, self.image_size)
                    feats = feats.index_put((b_idx, k_idx), self.vis(pooled))
        none = torch.full((b, 1), self.classes, dtype=torch.long, device=dev)
        if feats is None:
            return (null, null.new_zeros(b, 1, 4), torch.ones(b, 1, dtype=torch.bool, device=dev),
                    self.class_embed(none))
        ones = torch.ones(b, 1, dtype=torch.bool, device=dev)
        classes = torch.cat([none, batch["det_classes"].to(dev).clamp(0, self.classes - 1)], 1)
        return (torch.cat([null, feats], 1), torch.cat([boxes.new_zeros(b, 1, 4), boxes], 1),
                torch.cat([ones, mask], 1), self.class_embed(classes))

    def ground(self, enc: Encoded, b_idx: torch.Tensor, states: torch.Tensor, prompts: list[str],
               regions: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attended region state (E, H), box (E, 4) and class embedding (E, H) of each entity (its state
        (E, H) and prompt) of example ``b_idx``.

        The attention logits are a learned bilinear score of the entity's state and each region, plus, from
        a ``mie export``, pretraining's entity–object alignment logits of its prompt (:meth:`Encoded.
        region_alignment`)."""
        feats, boxes, mask, classes = (r[b_idx] for r in regions)
        scores = torch.einsum("eh,ekh->ek", self.query(states), self.key(feats)) / feats.shape[-1] ** 0.5
        prior = enc.region_alignment(b_idx, prompts) if feats.shape[1] > 1 else None
        if prior is not None and prior.shape[1] == scores.shape[1] - 1:
            scores = scores + torch.cat([prior.new_zeros(len(prior), 1), prior], 1)
        att = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)
        return (torch.einsum("ek,ekh->eh", att, feats), torch.einsum("ek,ekc->ec", att, boxes),
                torch.einsum("ek,ekh->eh", att, classes))

    def pairs(self, head: tuple[torch.Tensor, ...], tail: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(P, 6H): both attended region states, both class embeddings and their product, and the geometry
        of the two boxes."""
        (rh, bh, ch), (rt, bt, ct) = head, tail
        return torch.cat([rh, rt, ch, ct, ch * ct, self.geo(pair_geometry(bh, bt))], -1)

"""GMNER (Twitter-GMNER): MNER tagging plus grounding over detector candidates, H-Index style.

* Entities: the CRF tagger of :mod:`mie.finetune.tasks.twitter_ner` over the (fused) word states.
* Regions: the top-K boxes of the sample's ``det.json`` (view ``jpg``, best first, in pixels of the
  stored image) are the candidates. Each candidate is a box-geometry embedding (+ its detector score),
  plus, when the modality uses images, the vision feature map pooled inside the box (RoIAlign), and,
  with a pretrained ``mie export`` backbone, the box's multimodal region feature from its fusion layers.
  Each candidate also embeds its detector class. An entity (mean of its word states) scores every
  candidate and a "no region" slot (from a ``mie export``, pretraining's entity–object logits of the
  entity's prompt are added, see :class:`~mie.finetune.tasks.regions.RegionOptions`); the softmax
  over the K + 1 slots is trained with KL toward H-Index's target: the candidates whose IoU with
  any gold box of the entity is > 0.5, weighted by that IoU and normalised, or "no region" for an
  ungroundable entity and for one no candidate covers. A sample without ``det.json`` has no
  candidates, so its entities are predicted "no region".
* Types: the CRF finds the spans; each span is typed again from its words and the region it grounds to
  (the expected candidate feature under the grounding distribution), since the picture shows what a
  mention is; that type is the one predicted.
* Training grounds and types the gold entities; prediction grounds the decoded ones and writes the
  chosen box in original-image pixels (the gold xml's frame).

Prediction rows: ``{"id": "<IMGID>", "entities": [{"start", "end", "type", "box": [x1,y1,x2,y2] | null}]}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mie.finetune.backbone import Encoded, roi_features
from mie.finetune.metrics import box_iou
from mie.finetune.tasks.regions import RegionOptions
from mie.finetune.tasks.twitter_ner import CrfTagger, bio_tags, entity_types

MASKED = -1e4  # logit of a padded candidate slot (finite, so KL with a zero target stays 0)


@dataclass
class GmnerOptions:
    dropout: float = 0.1
    top_k: int = 10  # detector candidates per image
    grounding_weight: float = 1.0
    regions: RegionOptions = field(default_factory=RegionOptions)

    def validate(self) -> None:
        if self.top_k < 0:
            raise ValueError("top_k: must be >= 0")


def candidates(labels: dict[str, Any], det: dict[str, Any] | None, top_k: int) -> dict[str, list]:
    """The sample's top-K ``jpg`` detections: boxes in stored-image pixels and in original pixels,
    their scores and detector classes. Empty without ``det.json`` or a stored image size."""
    view = (det or {}).get("jpg") or {}
    stored, original = labels.get("jpg_size"), labels.get("image_size")
    boxes = view.get("boxes", [])[:top_k]
    if not boxes or not stored or not original:
        return {"stored": [], "original": [], "scores": [], "classes": []}
    sx, sy = original[0] / stored[0], original[1] / stored[1]
    scores = list(view.get("scores", [1.0] * len(boxes)))[:len(boxes)]
    classes = [int(c) for c in view.get("classes", [0] * len(boxes))][:len(boxes)]
    return {"stored": [list(map(float, b)) for b in boxes],
            "original": [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes], "scores": scores,
            "classes": classes}


def grounding_target(gold_boxes: list[list[float]], cand_original: list[list[float]]) -> list[float]:
    """H-Index's target over K candidates + "no region": IoU (max over gold boxes) kept where > 0.5,
    normalised; "no region" when the entity has no box or no candidate covers one."""
    ious = [max((box_iou(c, g) for g in gold_boxes), default=0.0) for c in cand_original]
    kept = [v if v > 0.5 else 0.0 for v in ious]
    total = sum(kept)
    if total == 0:
        return [0.0] * len(cand_original) + [1.0]
    return [v / total for v in kept] + [0.0]


class Grounder(nn.Module):
    """Scores K candidate regions and a "no region" slot for each entity."""

    def __init__(self, hidden: int, vision_dim: int, dropout: float, fused_regions: bool = False, classes: int = 80):
        super().__init__()
        self.classes = classes
        self.geo = nn.Sequential(nn.Linear(6, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(classes, hidden)
        self.none = nn.Parameter(torch.zeros(hidden))  # the "no region" slot's feature (for typing)
        self.vis = nn.Linear(vision_dim, hidden) if vision_dim else None
        self.fused = nn.Linear(hidden, hidden) if fused_regions else None
        self.ent = nn.Linear(hidden, hidden)
        self.score = nn.Sequential(nn.Dropout(dropout), nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.no_region = nn.Linear(hidden, 1)

    def candidate_features(self, enc: Encoded, batch: dict[str, Any], image_size: int) -> torch.Tensor:
        """(B, K, H) features of every candidate slot of the batch."""
        feats = self.geo(batch["cand_geo"]) + self.class_embed(batch["cand_classes"].clamp(0, self.classes - 1))
        if self.vis is not None and enc.image_map is not None and batch["cand_mask"].any():
            b_idx, k_idx = batch["cand_mask"].nonzero(as_tuple=True)
            pooled = roi_features(enc.image_map, batch["cand_boxes"][b_idx, k_idx], b_idx, image_size)
            vis = torch.zeros(*feats.shape[:2], pooled.shape[-1], device=feats.device, dtype=pooled.dtype)
            vis[b_idx, k_idx] = pooled * enc.image_present[b_idx, None]
            feats = feats + self.vis(vis)
        if self.fused is not None and enc.regions is not None:
            present = enc.image_present[:, None, None] & batch["cand_mask"][..., None]
            feats = feats + self.fused(enc.regions) * present
        return feats

    def forward(self, ents: torch.Tensor, cands: torch.Tensor, cand_mask: torch.Tensor,
                prior: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities (E, K + 1) over the candidates of each entity's example and "no region";
        ``prior`` (E, K): logits added to the candidates' (pretraining's entity–object alignment)."""
        e = self.ent(ents)[:, None].expand(-1, cands.shape[1], -1)
        logits = self.score(torch.cat([e, cands, e * cands], -1)).squeeze(-1)
        if prior is not None:
            logits = logits + prior
        logits = logits.masked_fill(~cand_mask, MASKED)
        return F.log_softmax(torch.cat([logits, self.no_region(ents)], -1), -1)


class Head(nn.Module):
    def __init__(self, hidden: int, vision_dim: int, image_size: int, types: list[str], opts: GmnerOptions,
                 fused_regions: bool = False):
        super().__init__()
        self.tagger = CrfTagger(hidden, types, opts.dropout)
        self.grounder = Grounder(hidden, vision_dim, opts.dropout, fused_regions, opts.regions.classes)
        self.types = types
        self.typer = nn.Sequential(nn.Dropout(opts.dropout), nn.Linear(2 * hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, len(types)))
        self.image_size, self.weight, self.opts = image_size, opts.grounding_weight, opts

    def _ground(self, enc: Encoded, batch: dict[str, Any], spans: list[list[tuple[int, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Grounding log-probabilities (E, K + 1) and type logits (E, T) of the entities ``spans``."""
        dev = enc.words.device
        b_idx = torch.tensor([i for i, ss in enumerate(spans) for _ in ss], dtype=torch.long, device=dev)
        starts = torch.tensor([s for ss in spans for s, _ in ss], dtype=torch.long, device=dev)
        ends = torch.tensor([e for ss in spans for _, e in ss], dtype=torch.long, device=dev)
        cands = self.grounder.candidate_features(enc, batch, self.image_size)
        words = [ex.words for ex in batch["examples"]]
        prior = enc.region_alignment(b_idx, [self.opts.regions.prompt(words[b], s, e)
                                             for b, ss in enumerate(spans) for s, e in ss])
        ents = enc.span_mean(b_idx, starts, ends)
        logp = self.grounder(ents, cands[b_idx], batch["cand_mask"][b_idx],
                             prior if prior is not None and prior.shape[1] == cands.shape[1] else None)
        slots = torch.cat([cands[b_idx], self.grounder.none.expand(len(ents), 1, -1)], 1)
        referred = torch.einsum("ek,ekh->eh", logp.exp(), slots)
        return logp, self.typer(torch.cat([ents, referred], -1))

    def loss(self, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
        examples = batch["examples"]
        loss = self.tagger.loss(enc, [ex.target["tags"] for ex in examples])
        spans = [[(e["start"], e["end"]) for e in ex.labels["entities"]] for ex in examples]
        if any(spans):
            logp, type_logits = self._ground(enc, batch, spans)
            k = batch["cand_mask"].shape[1]
            target = torch.zeros(logp.shape)
            row = 0
            for ex in examples:
                n = len(ex.target["cands"]["stored"])
                for t in ex.target["ground"]:
                    target[row, :n], target[row, k] = torch.tensor(t[:n]), t[n]
                    row += 1
            target = target.to(logp.device)
            loss = loss + self.weight * F.kl_div(logp, target, reduction="sum") / logp.shape[0]
            gold_types = torch.tensor([t for ex in examples for t in ex.target["types"]], dtype=torch.long,
                                      device=logp.device)
            loss = loss + F.cross_entropy(type_logits, gold_types)
        return loss

    def predict(self, enc: Encoded, batch: dict[str, Any]) -> list[dict[str, Any]]:
        decoded = self.tagger.decode(enc)
        rows = [{"entities": []} for _ in decoded]
        if not any(decoded):
            return rows
        logp, type_logits = self._ground(enc, batch, [[(s, e) for s, e, _ in d] for d in decoded])
        choice, kinds = logp.argmax(-1).tolist(), type_logits.argmax(-1).tolist()
        k = batch["cand_mask"].shape[1]
        row = 0
        for i, (ex, spans) in enumerate(zip(batch["examples"], decoded)):
            for s, e, _ in spans:
                c, t = choice[row], self.types[kinds[row]]
                row += 1
                box = None if c == k else [round(v, 2) for v in ex.target["cands"]["original"][c]]
                rows[i]["entities"].append({"start": s, "end": e, "type": t, "box": box})
        return rows


class Task:
    name = "gmner"

    def __init__(self, opts: GmnerOptions, train: list[Any], state: dict[str, Any] | None = None):
        self.opts = opts
        self.types = state["types"] if state else entity_types(train)
        self.type_index = {t: i for i, t in enumerate(self.types)}
        self.dropped = 0

    def state(self) -> dict[str, Any]:
        return {"types": self.types, "top_k": self.opts.top_k}

    def prepare(self, ex: Any) -> None:
        ex.words = ex.labels["tokens"]
        ents = ex.labels["entities"]
        tags, dropped = bio_tags(len(ex.words), [(e["start"], e["end"], e["type"]) for e in ents])
        self.dropped += dropped
        cands = candidates(ex.labels, ex.det, self.opts.top_k)
        ex.target = {"tags": tags, "cands": cands, "types": [self.type_index.get(e["type"], 0) for e in ents],
                     "ground": [grounding_target(e.get("boxes") or [], cands["original"]) for e in ents]}

    def head(self, backbone: Any) -> Head:
        return Head(backbone.hidden, backbone.vision_dim, backbone.image_size, self.types, self.opts,
                    backbone.fused_regions)

    def collate(self, examples: list[Any], batch: dict[str, Any]) -> None:
        """Candidate slots: boxes in model-input pixels, geometry features, detector classes, and the slot mask."""
        k = max(1, max(len(ex.target["cands"]["stored"]) for ex in examples))
        size = batch["images"]["jpg"][0].shape[-1] if "images" in batch else 1
        boxes, geo = torch.zeros(len(examples), k, 4), torch.zeros(len(examples), k, 6)
        mask = torch.zeros(len(examples), k, dtype=torch.bool)
        classes = torch.zeros(len(examples), k, dtype=torch.long)
        for i, ex in enumerate(examples):
            c = ex.target["cands"]
            if not c["stored"]:
                continue
            w, h = ex.labels["jpg_size"]
            for j, (b, score) in enumerate(zip(c["stored"], c["scores"])):
                x1, y1, x2, y2 = b[0] / w, b[1] / h, b[2] / w, b[3] / h
                geo[i, j] = torch.tensor([x1, y1, x2, y2, (x2 - x1) * (y2 - y1), float(score)])
                boxes[i, j] = torch.tensor([x1 * size, y1 * size, x2 * size, y2 * size])
                mask[i, j] = True
            classes[i, :len(c["classes"])] = torch.tensor(c["classes"], dtype=torch.long)
        batch.update(cand_boxes=boxes, cand_geo=geo, cand_mask=mask, cand_classes=classes)

    def row_id(self, ex: Any) -> str | int:
        return ex.id

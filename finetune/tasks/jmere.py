"""JMERE: entities and relations jointly, as quintuples.

Choice: a **joint NER + pairwise relation head**, not EEGA's word-pair tagging. Entity spans come from
the CRF tagger of :mod:`mie.finetune.tasks.twitter_ner` (types of the training set: per, org, loc,
misc); each span is then typed again from its words and the image region it refers to (grounded as for
the relations below), and that type is the one predicted. Every unordered pair of entities of a sentence
is classified into the relations of the training set or ``None``, from the two entities' mean word
states, their product, a type embedding of each, the post's ``[CLS]`` state and, with an image, the
regions the two entities attend to and their geometry (:class:`~mie.finetune.tasks.regions.PairRegions`,
as MNRE). Training classifies the gold entities' pairs; prediction the decoded entities' pairs. The
official scorer is direction-agnostic (EEGA enumerates both orders from a symmetric
word-pair matrix), so a pair is written with the earlier entity as head.

Prediction rows: ``{"id": <0-based index>, "triples": [{"head": [s, e], "head_type", "tail": [s, e],
"tail_type", "relation"}], "entities": [{"start", "end", "type"}]}`` (every decoded entity, for the
entity F1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mie.finetune.backbone import Encoded
from mie.finetune.tasks.regions import PairRegions, RegionOptions
from mie.finetune.tasks.twitter_ner import CrfTagger, bio_tags, entity_types

NONE = "None"


@dataclass
class JmereOptions:
    dropout: float = 0.1
    relation_weight: float = 1.0
    regions: RegionOptions = field(default_factory=RegionOptions)


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


class Head(nn.Module):
    def __init__(self, hidden: int, types: list[str], relations: list[str], opts: JmereOptions, regions: PairRegions):
        super().__init__()
        self.regions = regions
        self.tagger = CrfTagger(hidden, types, opts.dropout)
        self.types = types
        self.type_index = {t: i for i, t in enumerate(types)}
        self.type_embed = nn.Embedding(len(types), hidden)
        # An entity's type from its words and the region it refers to (the picture shows what it is).
        self.typer = nn.Sequential(nn.Dropout(opts.dropout), nn.Linear(3 * hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, len(types)))
        self.relations = relations
        self.classify = nn.Sequential(nn.Dropout(opts.dropout), nn.Linear(6 * hidden + regions.out_dim, hidden), nn.GELU(),
                                      nn.Dropout(opts.dropout), nn.Linear(hidden, len(relations)))
        self.weight = opts.relation_weight
        self.opts = opts

    def _entities(self, enc: Encoded, batch: dict[str, Any], ents: list[list[tuple[int, int, str]]]) -> dict[str, Any]:
        """The flat entity list of the batch: example index, mean word state, grounding (region state, box,
        class embedding) and type logits."""
        dev = enc.words.device
        cols = list(zip(*[(b, s, e) for b, es in enumerate(ents) for s, e, _ in es]))
        b_idx, starts, ends = (torch.tensor(c, dtype=torch.long, device=dev) for c in cols)
        feats = enc.span_mean(b_idx, starts, ends)
        examples = batch["examples"]
        prompts = [self.opts.regions.prompt(examples[b].words, s, e) for b, es in enumerate(ents) for s, e, _ in es]
        grounded = self.regions.ground(enc, b_idx, feats, prompts, self.regions.regions(enc, batch))
        type_logits = self.typer(torch.cat([feats, grounded[0], grounded[2]], -1))
        return {"b_idx": b_idx, "feats": feats, "grounded": grounded, "type_logits": type_logits}

    def _pair_logits(self, enc: Encoded, info: dict[str, Any], ents: list[list[tuple[int, int, str]]]) -> torch.Tensor:
        """Logits (P, R) of every pair (i < j, in entity order) of every example."""
        dev = enc.words.device
        types = torch.tensor([self.type_index.get(t, 0) for es in ents for _, _, t in es], dtype=torch.long, device=dev)
        feats, grounded, b_idx, typed = info["feats"], info["grounded"], info["b_idx"], self.type_embed(types)
        offsets, first, second = 0, [], []
        for es in ents:
            for i, j in _pairs(len(es)):
                first.append(offsets + i)
                second.append(offsets + j)
            offsets += len(es)
        a, b = torch.tensor(first, device=dev), torch.tensor(second, device=dev)
        pair = self.regions.pairs(tuple(g[a] for g in grounded), tuple(g[b] for g in grounded))
        return self.classify(torch.cat([enc.tokens[b_idx[a], 0], feats[a], feats[b], feats[a] * feats[b], typed[a],
                                        typed[b], pair], -1))

    def loss(self, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
        examples = batch["examples"]
        loss = self.tagger.loss(enc, [ex.target["tags"] for ex in examples])
        ents = [ex.target["entities"] for ex in examples]
        if not any(ents):
            return loss
        info = self._entities(enc, batch, ents)
        dev = enc.words.device
        gold_types = torch.tensor([self.type_index.get(t, 0) for es in ents for _, _, t in es], dtype=torch.long, device=dev)
        loss = loss + F.cross_entropy(info["type_logits"], gold_types)
        labels = [lab for ex in examples for lab in ex.target["pair_labels"]]
        if labels:
            target = torch.tensor(labels, dtype=torch.long, device=dev)
            loss = loss + self.weight * F.cross_entropy(self._pair_logits(enc, info, ents), target)
        return loss

    def predict(self, enc: Encoded, batch: dict[str, Any]) -> list[dict[str, Any]]:
        decoded = self.tagger.decode(enc)
        if any(decoded):  # the CRF finds the spans; the typer, which sees the referred region, types them
            info = self._entities(enc, batch, decoded)
            kinds = iter(info["type_logits"].argmax(-1).tolist())
            decoded = [[(s, e, self.types[next(kinds)]) for s, e, _ in es] for es in decoded]
        rows = [{"triples": [], "entities": [{"start": s, "end": e, "type": t} for s, e, t in d]} for d in decoded]
        if not any(len(d) > 1 for d in decoded):
            return rows
        choice = iter(self._pair_logits(enc, info, decoded).argmax(-1).tolist())
        for row, es in zip(rows, decoded):
            for i, j in _pairs(len(es)):
                rel = self.relations[next(choice)]
                if rel != NONE:
                    (hs, he, ht), (ts, te, tt) = es[i], es[j]
                    row["triples"].append({"head": [hs, he], "head_type": ht, "tail": [ts, te], "tail_type": tt,
                                           "relation": rel})
        return rows


class Task:
    name = "jmere"

    def __init__(self, opts: JmereOptions, train: list[Any], state: dict[str, Any] | None = None):
        self.opts = opts
        if state:
            self.types, self.relations = state["types"], state["relations"]
        else:
            self.types = entity_types(train)
            self.relations = [NONE] + sorted({r["relation"] for ex in train for r in ex.labels["relations"]} - {NONE})
        self.rel_index = {r: i for i, r in enumerate(self.relations)}
        self.dropped = 0

    def state(self) -> dict[str, Any]:
        return {"types": self.types, "relations": self.relations}

    def prepare(self, ex: Any) -> None:
        ex.words = ex.labels["tokens"]
        ents = sorted({(e["start"], e["end"], e["type"]) for e in ex.labels["entities"]})
        tags, dropped = bio_tags(len(ex.words), ents)
        self.dropped += dropped
        related: dict[tuple, str] = {}
        for r in ex.labels["relations"]:
            a, b = (*r["head"], r["head_type"]), (*r["tail"], r["tail_type"])
            related[(min(a, b), max(a, b))] = r["relation"]
        pair_labels = [self.rel_index.get(related.get((ents[i], ents[j]), NONE), 0) for i, j in _pairs(len(ents))]
        ex.target = {"tags": tags, "entities": ents, "pair_labels": pair_labels}

    def head(self, backbone: Any) -> Head:
        return Head(backbone.hidden, self.types, self.relations, self.opts,
                    PairRegions(backbone.hidden, backbone.vision_dim, backbone.image_size, backbone.fused_regions,
                               self.opts.regions.classes))

    def collate(self, examples: list[Any], batch: dict[str, Any]) -> None:
        """Nothing beyond the loop's tensors: entity spans and pair labels are read from the examples."""

    def row_id(self, ex: Any) -> int:
        return int(ex.id)

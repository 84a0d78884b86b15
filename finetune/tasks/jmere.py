"""JMERE: entities and relations jointly, as quintuples.

Choice: a **joint NER + pairwise relation head**, not EEGA's word-pair tagging. Entities come from
the CRF tagger of :mod:`mie.finetune.tasks.twitter_ner` (types of the training set: per, org, loc,
misc); every unordered pair of entities of a sentence is classified into the relations of the
training set or ``None``, from the two entities' mean word states, their product and a type
embedding of each. Training classifies the gold entities' pairs; prediction the decoded entities'
pairs. The official scorer is direction-agnostic (EEGA enumerates both orders from a symmetric
word-pair matrix), so a pair is written with the earlier entity as head.

Prediction rows: ``{"id": <0-based index>, "triples": [{"head": [s, e], "head_type", "tail": [s, e],
"tail_type", "relation"}], "entities": [{"start", "end", "type"}]}`` (every decoded entity, for the
entity F1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mie.finetune.backbone import Encoded
from mie.finetune.tasks.twitter_ner import CrfTagger, bio_tags, entity_types

NONE = "None"


@dataclass
class JmereOptions:
    dropout: float = 0.1
    relation_weight: float = 1.0


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


class Head(nn.Module):
    def __init__(self, hidden: int, types: list[str], relations: list[str], opts: JmereOptions):
        super().__init__()
        self.tagger = CrfTagger(hidden, types, opts.dropout)
        self.type_index = {t: i for i, t in enumerate(types)}
        self.type_embed = nn.Embedding(len(types), hidden)
        self.relations = relations
        self.classify = nn.Sequential(nn.Dropout(opts.dropout), nn.Linear(5 * hidden, hidden), nn.GELU(),
                                      nn.Dropout(opts.dropout), nn.Linear(hidden, len(relations)))
        self.weight = opts.relation_weight

    def _pair_logits(self, enc: Encoded, ents: list[list[tuple[int, int, str]]]) -> torch.Tensor:
        """Logits (P, R) of every pair (i < j, in entity order) of every example."""
        dev = enc.words.device
        flat = [(b, s, e, self.type_index.get(t, 0)) for b, es in enumerate(ents) for s, e, t in es]
        cols = list(zip(*flat))
        b_idx, starts, ends, types = (torch.tensor(c, dtype=torch.long, device=dev) for c in cols)
        feats = enc.span_mean(b_idx, starts, ends)
        typed = self.type_embed(types)
        offsets, first, second = 0, [], []
        for es in ents:
            for i, j in _pairs(len(es)):
                first.append(offsets + i)
                second.append(offsets + j)
            offsets += len(es)
        a, b = torch.tensor(first, device=dev), torch.tensor(second, device=dev)
        return self.classify(torch.cat([feats[a], feats[b], feats[a] * feats[b], typed[a], typed[b]], -1))

    def loss(self, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
        examples = batch["examples"]
        loss = self.tagger.loss(enc, [ex.target["tags"] for ex in examples])
        ents = [ex.target["entities"] for ex in examples]
        labels = [lab for ex in examples for lab in ex.target["pair_labels"]]
        if labels:
            target = torch.tensor(labels, dtype=torch.long, device=enc.words.device)
            loss = loss + self.weight * F.cross_entropy(self._pair_logits(enc, ents), target)
        return loss

    def predict(self, enc: Encoded, batch: dict[str, Any]) -> list[dict[str, Any]]:
        decoded = self.tagger.decode(enc)
        rows = [{"triples": [], "entities": [{"start": s, "end": e, "type": t} for s, e, t in d]} for d in decoded]
        if not any(len(d) > 1 for d in decoded):
            return rows
        choice = iter(self._pair_logits(enc, decoded).argmax(-1).tolist())
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
        return Head(backbone.hidden, self.types, self.relations, self.opts)

    def collate(self, examples: list[Any], batch: dict[str, Any]) -> None:
        """Nothing beyond the loop's tensors: entity spans and pair labels are read from the examples."""

    def row_id(self, ex: Any) -> int:
        return int(ex.id)

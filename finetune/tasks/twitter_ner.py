"""Twitter-2015/2017 MNER: word tagging with a linear-chain CRF (``pytorch-crf``) over BIO tags.

Each word is represented by its first subword's (fused) state. Entity types are the ones of the
training set (Twitter-2017 writes MISC where Twitter-2015 and GMNER write OTHER). Decoding turns the
Viterbi tags into spans with conlleval's chunking (:func:`mie.shards.sources.conll.bio_spans`), the
same rule the seqeval scorer applies to gold.

Prediction rows: ``{"id": "<IMGID>", "entities": [{"start", "end", "type"}]}`` (end exclusive).

:class:`CrfTagger` and :func:`bio_tags` are shared with the GMNER and JMERE tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchcrf import CRF

from mie.finetune.backbone import Encoded
from mie.shards.sources.conll import bio_spans


@dataclass
class NerOptions:
    dropout: float = 0.1


def tag_names(types: list[str]) -> list[str]:
    """``O`` then ``B-T, I-T`` for each type."""
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def bio_tags(n: int, spans: list[tuple[int, int, str]]) -> tuple[list[str], int]:
    """BIO tags of ``n`` words from ``(start, end, type)`` spans, and how many overlapping spans had
    to be left out (BIO cannot hold them; the first by start wins)."""
    tags, dropped = ["O"] * n, 0
    for s, e, t in sorted(spans):
        if any(tag != "O" for tag in tags[s:e]):
            dropped += 1
            continue
        tags[s:e] = [f"B-{t}"] + [f"I-{t}"] * (e - s - 1)
    return tags, dropped


def entity_types(examples: list[Any], key: str = "entities") -> list[str]:
    """The sorted entity types of the training examples."""
    return sorted({e["type"] for ex in examples for e in ex.labels.get(key, [])})


class CrfTagger(nn.Module):
    """Emissions from word states, a CRF on top. Words without a subword (dropped by the tokenizer
    or truncated) are packed out of the sequence, since the CRF needs a contiguous mask."""

    def __init__(self, hidden: int, types: list[str], dropout: float):
        super().__init__()
        self.tags = tag_names(types)
        self.index = {t: i for i, t in enumerate(self.tags)}
        self.drop = nn.Dropout(dropout)
        self.emit = nn.Linear(hidden, len(self.tags))
        self.crf = CRF(len(self.tags), batch_first=True)

    def _packed(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """(emissions (B, K, T), mask (B, K), kept word indices per example)."""
        kept = [m.nonzero().flatten().tolist() for m in enc.word_mask]
        k = max(1, max(len(x) for x in kept))
        b = len(kept)
        index = torch.zeros(b, k, dtype=torch.long, device=enc.words.device)
        mask = torch.zeros(b, k, dtype=torch.bool, device=enc.words.device)
        for i, ks in enumerate(kept):
            index[i, :len(ks)] = torch.tensor(ks, dtype=torch.long)
            mask[i, :len(ks)] = True
        mask[:, 0] = True  # the CRF needs a first step; an example with no word keeps a dummy one
        words = torch.gather(enc.words, 1, index[..., None].expand(-1, -1, enc.words.shape[-1]))
        return self.emit(self.drop(words)), mask, kept

    def loss(self, enc: Encoded, gold_tags: list[list[str]]) -> torch.Tensor:
        """Mean negative log-likelihood of the gold word tags."""
        emissions, mask, kept = self._packed(enc)
        target = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        for i, ks in enumerate(kept):
            target[i, :len(ks)] = torch.tensor([self.index.get(gold_tags[i][w], 0) for w in ks], dtype=torch.long)
        return -self.crf(emissions, target, mask=mask, reduction="mean")

    def decode(self, enc: Encoded) -> list[list[tuple[int, int, str]]]:
        """Entity spans ``(start, end, type)`` in original word offsets, per example."""
        emissions, mask, kept = self._packed(enc)
        out = []
        for ks, path in zip(kept, self.crf.decode(emissions, mask=mask)):
            tags = [self.tags[t] for t in path[:len(ks)]]
            # A span over packed positions covers the original words between its ends.
            out.append([(ks[s], ks[e - 1] + 1, t) for s, e, t in bio_spans(tags)])
        return out


class Head(nn.Module):
    def __init__(self, hidden: int, types: list[str], opts: NerOptions):
        super().__init__()
        self.tagger = CrfTagger(hidden, types, opts.dropout)

    def loss(self, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
        return self.tagger.loss(enc, [ex.target["tags"] for ex in batch["examples"]])

    def predict(self, enc: Encoded, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"entities": [{"start": s, "end": e, "type": t} for s, e, t in spans]}
                for spans in self.tagger.decode(enc)]


class Task:
    """The plug-in the loop drives: labels from the training set, per-example targets, the head."""

    name = "twitter_ner"

    def __init__(self, opts: NerOptions, train: list[Any], state: dict[str, Any] | None = None):
        self.opts = opts
        self.types = state["types"] if state else entity_types(train)
        self.dropped = 0

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the head."""
        return {"types": self.types}

    def prepare(self, ex: Any) -> None:
        """Set ``ex.words`` (encoder input) and ``ex.target`` (training target) from ``ex.labels``."""
        ex.words = ex.labels["tokens"]
        tags, dropped = bio_tags(len(ex.words), [(e["start"], e["end"], e["type"]) for e in ex.labels["entities"]])
        self.dropped += dropped
        ex.target = {"tags": tags}

    def head(self, backbone: Any) -> Head:
        return Head(backbone.hidden, self.types, self.opts)

    def collate(self, examples: list[Any], batch: dict[str, Any]) -> None:
        """Task tensors of a batch (none: NER targets are per-word lists)."""

    def row_id(self, ex: Any) -> str | int:
        return ex.id

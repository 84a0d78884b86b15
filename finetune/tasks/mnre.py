"""MNRE: one relation among the 23 labels (``None`` included) for each given entity pair.

The head and tail are wrapped in marker words in the encoder input (by default ``[ head ]`` and
``{ tail }``: punctuation markers in the style of Zhou & Chen's, in every vocabulary, so no embedding
is added; not their ``@``/``#``, which in tweets open @mentions and #hashtags). The classifier reads
the pooled entity features: the state of each start marker, the mean state of each entity's words and
the post's ``[CLS]`` state (with an image: the multimodal ``[CLS]``, the state pretraining's
relation–image objective trains), concatenated, and, when the post has an image, the pair as the
image shows it: the regions the two entities attend to and their geometry
(:class:`~mie.finetune.tasks.regions.PairRegions`).

Labels are the 23 of ``ours_rel2id.json`` (HVPNeT / MKGformer / TMR order); a label the training set
has beyond them is appended.

Prediction rows: ``{"id": <0-based line number>, "relation": "<label>"}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mie.finetune.backbone import Encoded
from mie.finetune.tasks.regions import PairRegions, RegionOptions
from mie.shards.toy import MNRE_LABELS


@dataclass
class MnreOptions:
    dropout: float = 0.1
    markers: list[str] = field(default_factory=lambda: ["[", "]", "{", "}"])  # head start/end, tail start/end
    regions: RegionOptions = field(default_factory=RegionOptions)

    def validate(self) -> None:
        if len(self.markers) != 4 or not all(m.strip() for m in self.markers):
            raise ValueError("markers: expected 4 non-empty words (head start, head end, tail start, tail end)")


def with_markers(tokens: list[str], head: tuple[int, int], tail: tuple[int, int], markers: list[str]) -> tuple[list[str], dict[str, int]]:
    """``tokens`` with the marker words inserted around head and tail; the new positions of the
    start markers and of the entity spans (``h_start``/``h_end``, ``t_start``/``t_end``)."""
    opens: dict[int, list[tuple[str, str]]] = {}
    opens.setdefault(head[0], []).append(("h", markers[0]))
    opens.setdefault(tail[0], []).append(("t", markers[2]))
    closes: dict[int, list[tuple[str, str]]] = {}
    closes.setdefault(tail[1], []).append(("t", markers[3]))
    closes.setdefault(head[1], []).append(("h", markers[1]))
    words: list[str] = []
    pos: dict[str, int] = {}
    for i in range(len(tokens) + 1):
        for who, m in closes.get(i, []):
            pos[f"{who}_end"] = len(words)
            words.append(m)
        if i == len(tokens):
            break
        for who, m in opens.get(i, []):
            pos[f"{who}_marker"] = len(words)
            words.append(m)
            pos[f"{who}_start"] = len(words)
        words.append(tokens[i])
    return words, pos


class Head(nn.Module):
    def __init__(self, hidden: int, labels: list[str], dropout: float, regions: PairRegions):
        super().__init__()
        self.regions = regions
        self.classify = nn.Sequential(nn.Dropout(dropout), nn.Linear(5 * hidden + regions.out_dim, hidden), nn.GELU(),
                                      nn.Dropout(dropout), nn.Linear(hidden, len(labels)))
        self.labels = labels

    def logits(self, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
        dev = enc.words.device
        pos = {k: torch.tensor([ex.target[k] for ex in batch["examples"]], dtype=torch.long, device=dev)
               for k in ("h_marker", "t_marker", "h_start", "h_end", "t_start", "t_end")}
        b = torch.arange(enc.words.shape[0], device=dev)
        h_mean, t_mean = enc.span_mean(b, pos["h_start"], pos["h_end"]), enc.span_mean(b, pos["t_start"], pos["t_end"])
        regions = self.regions.regions(enc, batch)
        prompts = [[ex.target["prompts"][i] for ex in batch["examples"]] for i in (0, 1)]
        pair = self.regions.pairs(self.regions.ground(enc, b, h_mean, prompts[0], regions),
                                  self.regions.ground(enc, b, t_mean, prompts[1], regions))
        feats = torch.cat([enc.tokens[:, 0], enc.words[b, pos["h_marker"]], enc.words[b, pos["t_marker"]], h_mean, t_mean,
                           pair], -1)
        return self.classify(feats)

    def loss(self, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
        target = torch.tensor([ex.target["label"] for ex in batch["examples"]], dtype=torch.long, device=enc.words.device)
        return F.cross_entropy(self.logits(enc, batch), target)

    def scores(self, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
        """Label probabilities, one row per example (what ``mie ensemble`` averages)."""
        return self.logits(enc, batch).softmax(-1)

    def decode(self, scores: torch.Tensor) -> list[dict[str, Any]]:
        """Prediction rows from label scores: the most likely label."""
        return [{"relation": self.labels[i]} for i in scores.argmax(-1).tolist()]

    def predict(self, enc: Encoded, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return self.decode(self.logits(enc, batch))


class Task:
    name = "mnre"

    def __init__(self, opts: MnreOptions, train: list[Any], state: dict[str, Any] | None = None):
        self.opts = opts
        if state:
            self.labels = state["labels"]
        else:
            extra = sorted({ex.labels["relation"] for ex in train} - set(MNRE_LABELS))
            self.labels = list(MNRE_LABELS) + extra
        self.index = {r: i for i, r in enumerate(self.labels)}

    def state(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def prepare(self, ex: Any) -> None:
        h, t = ex.labels["head"], ex.labels["tail"]
        ex.words, pos = with_markers(ex.labels["tokens"], (h["start"], h["end"]), (t["start"], t["end"]), self.opts.markers)
        tokens = ex.labels["tokens"]
        prompts = [self.opts.regions.prompt(tokens, e["start"], e["end"]) for e in (h, t)]
        ex.target = {**pos, "label": self.index.get(ex.labels["relation"], 0), "prompts": prompts}

    def head(self, backbone: Any) -> Head:
        return Head(backbone.hidden, self.labels, self.opts.dropout,
                    PairRegions(backbone.hidden, backbone.vision_dim, backbone.image_size, backbone.fused_regions,
                               self.opts.regions.classes))

    def collate(self, examples: list[Any], batch: dict[str, Any]) -> None:
        """Nothing beyond the loop's tensors: marker positions are read from the examples."""

    def row_id(self, ex: Any) -> int:
        return int(ex.id)

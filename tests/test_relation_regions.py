"""Relation heads read the regions their entities refer to (finetune/tasks/regions.py): the box-pair
geometry, the entity prompt, the grounding attention with pretraining's entity–object logits, and the
detector classes of the batch."""
from __future__ import annotations

import math

import pytest
import torch

from mie.finetune import loop
from mie.finetune.backbone import BackboneConfig, Encoded, load_backbone
from mie.finetune.tasks.regions import PairRegions, RegionOptions, pair_geometry
from mie.launch import config as config_lib
from mie.pretrain.losses import scaled_cosine
from test_finetune import world  # noqa: F401  (the module-scoped toy world fixture)
from test_finetune_backbone import export_dir  # noqa: F401


def test_pair_geometry_by_hand():
    a = torch.tensor([[0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.3, 0.1, 0.5, 0.2]])
    g = pair_geometry(a, b)[0].tolist()
    # centre offset (0.3, 0.05); gaps x 0.1, y 0 (the boxes overlap vertically); larger gap 0.1; distance;
    # sizes (0.2, 0.2) and (0.2, 0.1)
    expected = [0.3, 0.05, 0.1, 0.0, 0.1, math.hypot(0.3, 0.05), 0.2, 0.2, 0.2, 0.1]
    assert g == pytest.approx(expected, abs=1e-6)
    assert pair_geometry(b, a)[0, 2:5].tolist() == pytest.approx([0.1, 0.0, 0.1])  # gaps do not depend on order


def test_entity_prompt_takes_the_words_before_the_mention():
    words = ["look", "the", "red", "Zorb", "Quux", "!"]
    assert RegionOptions().prompt(words, 3, 5) == "a photo of red Zorb Quux"
    assert RegionOptions(context_words=0, template="{} .").prompt(words, 3, 5) == "Zorb Quux ."
    assert RegionOptions(context_words=3).prompt(words, 0, 1) == "a photo of look"
    with pytest.raises(ValueError, match="template"):
        config_lib.from_dict(RegionOptions, {"template": "no slot"})


def _encoded(b: int, k: int, hidden: int = 8) -> Encoded:
    words = torch.randn(b, 5, hidden)
    return Encoded(tokens=words, words=words, word_mask=torch.ones(b, 5, dtype=torch.bool), image_map=None,
                   image_present=torch.ones(b, dtype=torch.bool), regions=torch.randn(b, k, hidden))


def test_grounding_adds_the_alignment_logits_and_masks_missing_regions():
    torch.manual_seed(0)
    heads = PairRegions(hidden=8, vision_dim=0, image_size=64, fused_regions=True, classes=4)
    for lin in (heads.query, heads.key):  # no learned score: the attention is the prior alone
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    enc = _encoded(2, 3)
    enc.align_regions, enc.align_scale = torch.randn(2, 3, 6), torch.tensor(10.0)
    enc.encode_prompts = lambda texts: torch.randn(len(texts), 6, generator=torch.Generator().manual_seed(len(texts)))
    batch = {"det_boxes": torch.rand(2, 3, 4), "det_mask": torch.tensor([[True, True, False], [True, True, True]]),
             "det_classes": torch.tensor([[0, 3, 9], [1, 2, 2]])}
    regions = heads.regions(enc, batch)
    assert regions[0].shape == (2, 4, 8) and regions[2][:, 0].all() and not regions[2][0, 3]
    b_idx = torch.tensor([0, 1])
    prior = enc.region_alignment(b_idx, ["a photo of red x", "a photo of blue y"])
    state, box, cls = heads.ground(enc, b_idx, torch.randn(2, 8), ["a photo of red x", "a photo of blue y"], regions)
    logits = torch.cat([torch.zeros(2, 1), prior], 1).masked_fill(~regions[2], float("-inf"))
    att = logits.softmax(-1)
    assert att[0, 3] == 0
    torch.testing.assert_close(state, torch.einsum("ek,ekh->eh", att, regions[0]))
    torch.testing.assert_close(box, torch.einsum("ek,ekc->ec", att, regions[1]))
    # class 9 is past `classes`: it shares the last class's embedding; slot 0 is the "no region" row
    torch.testing.assert_close(regions[3][0, 3], heads.class_embed.weight[3])
    torch.testing.assert_close(regions[3][0, 0], heads.class_embed.weight[4])
    torch.testing.assert_close(cls, torch.einsum("ek,ekh->eh", att, regions[3]))
    assert heads.pairs((state, box, cls), (state.flip(0), box.flip(0), cls.flip(0))).shape == (2, heads.out_dim)


def test_text_mode_has_only_the_no_region_slot():
    heads = PairRegions(hidden=8, vision_dim=0, image_size=64, fused_regions=False, classes=4)
    enc = _encoded(2, 3)
    enc.image_present = None
    feats, boxes, mask, cls = heads.regions(enc, {})
    assert feats.shape == (2, 1, 8) and mask.all() and not boxes.any()
    state, _, _ = heads.ground(enc, torch.tensor([0, 1]), torch.randn(2, 8), ["x", "y"], (feats, boxes, mask, cls))
    torch.testing.assert_close(state, heads.null[0].expand(2, -1))


def test_region_alignment_scores_prompts_as_the_entity_objective(world, export_dir):  # noqa: F811
    """An export's alignment logits equal pretraining's: the entity prompt through the text encoder, pooled and
    projected, against the fused regions through region_proj, scaled by the learned alignment scale."""
    bb = load_backbone(config_lib.from_dict(BackboneConfig, {"path": str(export_dir)}), "image").eval()
    m = bb.model
    words = [["the", "red", "x"], ["a", "blue", "y", "z"]]
    tok = bb.tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
    boxes = torch.tensor([[[0, 0, .5, .5], [.25, .25, 1, 1]], [[0, 0, .1, .1], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    batch = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
             "word_index": torch.tensor([[1, 2, 3, 0], [1, 2, 3, 4]]),
             "word_mask": torch.tensor([[True, True, True, False], [True] * 4]),
             "images": {"jpg": (torch.rand(2, 3, 64, 64), torch.tensor([True, True]))},
             "det_boxes": boxes, "det_mask": mask}
    prompts = ["a photo of red x", "a photo of blue y z"]
    with torch.no_grad():
        got = bb(batch).region_alignment(torch.tensor([0, 1]), prompts)
        fused = m(tok["input_ids"], tok["attention_mask"], (batch["images"]["jpg"][0] * 255), boxes, mask)["fused_regions"]
        p = bb.tokenizer(prompts, padding=True, return_tensors="pt")
        text = m.text_proj(m.text_feature(m.encode_text(p["input_ids"], p["attention_mask"]), p["attention_mask"]))
        for i in range(2):
            want = scaled_cosine(text[i:i + 1], m.region_proj(fused[i]), m.align_logit_scale)[0]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
    assert load_backbone(config_lib.from_dict(BackboneConfig, {"path": str(world["bert"])}), "text") is not None


def test_detections_carry_their_classes():
    ex = loop.Example(key="k", id="0", labels={"jpg_size": [100, 50]}, images={},
                      det={"jpg": {"boxes": [[10, 5, 50, 25], [0, 0, 100, 50]], "classes": [2, 7], "scores": [.9, .5]}})
    bare = loop.Example(key="b", id="1", labels={}, images={}, det=None)
    boxes, mask, classes = loop._detections([ex, bare])
    torch.testing.assert_close(boxes[0], torch.tensor([[0.1, 0.1, 0.5, 0.5], [0, 0, 1, 1]]))
    assert mask.tolist() == [[True, True], [False, False]] and classes.tolist() == [[2, 7], [0, 0]]


def test_gmner_grounding_adds_the_alignment_logits_and_types_from_the_referred_region():
    from mie.finetune.tasks import gmner

    torch.manual_seed(0)
    head = gmner.Head(8, 0, 64, ["LOC", "PER"], gmner.GmnerOptions(), fused_regions=False)
    last = head.grounder.score[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    torch.nn.init.zeros_(head.grounder.no_region.weight)
    torch.nn.init.zeros_(head.grounder.no_region.bias)
    enc = _encoded(1, 2)
    enc.align_regions, enc.align_scale = torch.randn(1, 2, 6), torch.tensor(5.0)
    enc.encode_prompts = lambda texts: torch.ones(len(texts), 6)
    ex = loop.Example(key="k", id="a", labels={}, images={}, det=None, words=["the", "red", "x", "!", "y"])
    batch = {"examples": [ex], "cand_geo": torch.rand(1, 2, 6), "cand_boxes": torch.rand(1, 2, 4) * 64,
             "cand_mask": torch.tensor([[True, True]]), "cand_classes": torch.tensor([[1, 0]])}
    logp, types = head._ground(enc, batch, [[(2, 3), (4, 5)]])
    prior = enc.region_alignment(torch.tensor([0, 0]), ["a photo of red x", "a photo of ! y"])
    torch.testing.assert_close(logp, torch.cat([prior, torch.zeros(2, 1)], 1).log_softmax(-1))
    assert types.shape == (2, 2)

"""Fine-tuning from a ``mie export`` backbone: the pretrained text, vision and fusion parts are what the
task heads sit on in the image modalities, and ``backbone.init=random`` is the same architecture with
fresh weights (the unpretrained control of the quickstart's ablation)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mie.finetune import evaluate as ev
from mie.finetune import loop
from mie.finetune.backbone import BackboneConfig, PretrainedBackbone, load_backbone
from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.pretrain.export import _write_backbone
from mie.pretrain.model import ModelConfig, build_model, load_tokenizer, save_skeleton
from test_finetune import gold_path, make_cfg, world  # noqa: F401  (the module-scoped toy world fixture)


@pytest.fixture(scope="module")
def export_dir(world) -> Path:  # noqa: F811
    """A backbone written by the export's own writer from a tiny MieModel with random weights."""
    cfg = config_lib.from_dict(ModelConfig, {
        "text": {"dir": str(world["bert"]), "max_len": 48, "prompt_len": 8},
        "vision": {"name": "vit_tiny_patch16_224", "image_size": 64,
                   "kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 16}},
        "fusion_layers": 1, "embed_dim": 16, "max_boxes": 4})
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.text)
    model = build_model(cfg, tokenizer)
    run, out = world["root"] / "run", world["root"] / "export"
    save_skeleton(model, tokenizer, run / "model")
    out.mkdir(parents=True, exist_ok=True)
    _write_backbone(model, run, out, {"step": 0, "git": "test"})
    return out


def test_export_backbone_loads_pretrained_weights_or_fresh_ones(export_dir):
    from safetensors.torch import load_file

    saved = load_file(str(export_dir / "model.safetensors"))
    pre = load_backbone(config_lib.from_dict(BackboneConfig, {"path": str(export_dir)}), "image")
    assert isinstance(pre, PretrainedBackbone) and pre.fused_regions and pre.image_size == 64
    for k, v in pre.model.state_dict().items():
        torch.testing.assert_close(v, saved[k], msg=k)
    rand = load_backbone(config_lib.from_dict(BackboneConfig, {"path": str(export_dir), "init": "random"}), "image")
    fresh = rand.model.state_dict()
    assert fresh.keys() == saved.keys()
    changed = [k for k in saved if saved[k].numel() > 1 and saved[k].float().std() > 0
               and not torch.equal(fresh[k], saved[k])]
    assert any(k.startswith("vision.") for k in changed) and any(k.startswith("fusion.") for k in changed)
    text = load_backbone(config_lib.from_dict(BackboneConfig, {"path": str(export_dir)}), "text")
    assert not isinstance(text, PretrainedBackbone) and text.vision is None


def test_pretrained_fusion_gives_region_features_for_candidates(export_dir):
    bb = load_backbone(config_lib.from_dict(BackboneConfig, {"path": str(export_dir)}), "image").eval()
    tok = bb.tokenizer([["the", "red", "x"], ["a", "blue", "y", "z"]], is_split_into_words=True, padding=True,
                       return_tensors="pt")
    batch = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
             "word_index": torch.tensor([[1, 2, 3, 0], [1, 2, 3, 4]]),
             "word_mask": torch.tensor([[True, True, True, False], [True] * 4]),
             "images": {"jpg": (torch.rand(2, 3, 64, 64), torch.tensor([True, False]))},
             "cand_boxes": torch.tensor([[[0, 0, 32, 32], [16, 16, 64, 64]], [[0, 0, 8, 8], [0, 0, 0, 0]]]).float(),
             "cand_mask": torch.tensor([[True, True], [True, False]])}
    with torch.no_grad():
        enc = bb(batch)
        text_only = bb.model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert enc.regions.shape == (2, 2, bb.hidden) and enc.image_map.shape[:2] == (2, 32)
    assert not torch.allclose(enc.tokens[0], text_only[0])  # the image changed the first post's states
    torch.testing.assert_close(enc.tokens[1], text_only[1])  # the second has no image: text states


@pytest.mark.parametrize("task", ["gmner", "mnre", "jmere"])
def test_finetune_from_export_in_image_mode(world, export_dir, tmp_path, task):  # noqa: F811
    over = {"backbone.path": str(export_dir), "modality": "image", "optim.epochs": 1,
            "data.shards": str(world[f"{task}_det"]), "backbone.word_shapes": task == "gmner"}
    res = loop.main(make_cfg(world, task, tmp_path / "run", **over), DistEnv())
    scored = ev.evaluate(task, tmp_path / "run" / "predictions.jsonl", gold_path(world, task), "test")
    assert {k: v for k, v in scored.items() if k in res["test"]} == res["test"]
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    assert any(k.startswith("backbone.model.fusion.") for k in state)
    if task == "gmner":  # with word shapes, fed to the pretrained text encoder as input embeddings
        assert "head.grounder.fused.weight" in state and state["backbone.shape_embed.weight"].abs().sum() > 0
    else:  # the relation heads ground their entities in the detections
        assert "head.regions.class_embed.weight" in state
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["backbone"]["init"] == "pretrained"


def test_attention_kernel_choice_keeps_the_encoder_output(world):  # noqa: F811
    """``backbone.attn``: auto picks eager on the CPU (faster there), and both kernels compute the same states;
    an unknown kernel is a config error naming the key."""
    bb = load_backbone(config_lib.from_dict(BackboneConfig, {"path": str(world["bert"])}), "text").eval()
    ids = bb.tokenizer(["red apple pie", "a much longer line of words"], padding=True, return_tensors="pt")
    bb.set_attention("sdpa", torch.device("cpu"))
    with torch.no_grad():
        sdpa = bb.text(**ids).last_hidden_state
    bb.set_attention("auto", torch.device("cpu"))
    assert bb.text.config._attn_implementation == "eager"
    with torch.no_grad():
        eager = bb.text(**ids).last_hidden_state
    mask = ids["attention_mask"].bool()
    torch.testing.assert_close(eager[mask], sdpa[mask], atol=1e-5, rtol=1e-4)
    with pytest.raises(config_lib.ConfigError, match="attn"):
        config_lib.from_dict(BackboneConfig, {"path": str(world["bert"]), "attn": "flash"})

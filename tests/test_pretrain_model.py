"""The backbone: region pooling on hand values, crop regions, bidirectional fusion, vision checkpoints
(safetensors and tensor-only torch files; pickles refused), and one-line errors for missing files."""
from __future__ import annotations

import pickle

import pytest
import torch

from mie.launch import config as config_lib
from mie.pretrain.model import (ModelConfig, ModelError, MieModel, VisionConfig, build_vision_encoder, load_tokenizer,
                                pool_regions)
from test_pretrain_fixtures import tiny_model


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return config_lib.from_dict(ModelConfig, tiny_model())


def test_pool_regions_hand_values():
    # A 2×2 grid of 1-d patch tokens 1, 2 / 3, 4 (row-major); patch centres at 0.25 and 0.75.
    patches = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0],     # left column: (1 + 3) / 2
                           [0.0, 0.0, 1.0, 1.0],     # everything: 2.5
                           [0.6, 0.6, 0.65, 0.65],   # no centre inside: the patch under its centre, 4
                           [0.2, 0.7, 0.8, 0.8]]])   # bottom row: (3 + 4) / 2
    out = pool_regions(patches, (2, 2), boxes)
    assert out.squeeze(-1).tolist() == [[2.0, 2.5, 4.0, 3.5]]


def test_model_parts_shapes_and_crop_regions(cfg):
    torch.manual_seed(0)
    model = MieModel(cfg, vocab_size=2048)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    image = model.encode_image(images)
    assert image["grid"] == (4, 4) and image["patches"].shape == (2, 16, 32) and image["tokens"].shape == (2, 17, 32)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]] * 2)
    mask = torch.tensor([[True, True], [True, False]])
    pooled = model.region_features(image, boxes, images, mask)
    assert pooled.shape == (2, 2, 32)
    torch.testing.assert_close(pooled[0, 0], image["patches"][0, [0, 1, 4, 5]].mean(0))
    crop = MieModel(config_lib.from_dict(ModelConfig, tiny_model(regions="crop")), vocab_size=2048)
    crop.load_state_dict(model.state_dict())
    crops = crop.region_features(crop.encode_image(images), boxes, images, mask)
    assert crops.shape == (2, 2, 32) and crops[1, 1].abs().sum() == 0 and crops[0, 0].abs().sum() > 0
    # A crop of the whole image encodes like the image itself (roi_align resamples it to the same size).
    whole = crop.region_features(None, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), images[:1], torch.tensor([[True]]))
    torch.testing.assert_close(whole[0, 0], image["global"][0], atol=0.15, rtol=0.1)
    out = model(torch.randint(1000, 2000, (2, 10)), torch.ones(2, 10, dtype=torch.long), images, boxes, mask)
    assert out["cls"].shape == (2, 32) and out["fused_regions"].shape == (2, 2, 32)


def test_fusion_is_bidirectional_and_masks_padding(cfg):
    torch.manual_seed(0)
    model = MieModel(cfg, vocab_size=2048).eval()
    text = torch.randn(1, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    image = torch.randn(1, 17, 32)
    regions, boxes, box_mask = torch.randn(1, 2, 32), torch.rand(1, 2, 4), torch.tensor([[True, False]])
    cls, fused = model.fuse(text, mask, image, regions, boxes, box_mask)
    later = text.clone()
    later[0, 3] += 1.0  # a later, unpadded token: [CLS] must see it (no causal mask)
    assert not torch.allclose(model.fuse(later, mask, image, regions, boxes, box_mask)[0], cls)
    padded = text.clone()
    padded[0, 5] += 1.0  # a padded token: nobody sees it
    torch.testing.assert_close(model.fuse(padded, mask, image, regions, boxes, box_mask)[0], cls)
    masked_region = regions.clone()
    masked_region[0, 1] += 1.0  # a masked box
    torch.testing.assert_close(model.fuse(text, mask, image, masked_region, boxes, box_mask)[0], cls)


def test_vision_checkpoint_files(tmp_path):
    from safetensors.torch import save_file

    vcfg = VisionConfig(name="vit_tiny_patch16_224", image_size=32,
                        kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
    torch.manual_seed(1)
    source = build_vision_encoder(vcfg)
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "v.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "v.pth")
    for name in ("v.safetensors", "v.pth"):
        torch.manual_seed(2)
        loaded = build_vision_encoder(VisionConfig(**{**vcfg.__dict__, "checkpoint": str(tmp_path / name)}))
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items()), name
    # A torch file holding arbitrary objects is refused, never unpickled.
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": _NotATensor()}, protocol=2))
    with pytest.raises(ModelError, match="not a tensor-only checkpoint"):
        build_vision_encoder(VisionConfig(**{**vcfg.__dict__, "checkpoint": str(tmp_path / "evil.pth")}))
    assert not _NotATensor.unpickled
    # Weights of another architecture do not fit: one line naming the file.
    other = VisionConfig(**{**vcfg.__dict__, "kwargs": {**vcfg.kwargs, "depth": 3}, "checkpoint": str(tmp_path / "v.pth")})
    with pytest.raises(ModelError, match="does not fit"):
        build_vision_encoder(other)


class _NotATensor:
    unpickled = False

    def __reduce__(self):
        return (_mark_unpickled, ())


def _mark_unpickled():
    _NotATensor.unpickled = True
    return None


def test_missing_files_are_one_line_errors(tmp_path):
    bad = [
        (tiny_model(text={"dir": str(tmp_path / "nope")}), "model.text.dir: .*nope not found"),
        (tiny_model(vision={"name": "vit_tiny_patch16_224", "checkpoint": str(tmp_path / "w.safetensors")}),
         "model.vision.checkpoint: .* not found"),
        (tiny_model(vision={"name": "no_such_model_xyz"}), "model.vision: timm cannot build 'no_such_model_xyz'"),
    ]
    for model_cfg, message in bad:
        cfg = config_lib.from_dict(ModelConfig, model_cfg)
        with pytest.raises(ModelError, match=message) as e:
            MieModel(cfg, vocab_size=100)
        assert "\n" not in str(e.value)
    cfg = config_lib.from_dict(ModelConfig, tiny_model(tokenizer="package:no_such_package_xyz"))
    with pytest.raises(ModelError, match="no installed package no_such_package_xyz"):
        load_tokenizer(cfg.text)
    (tmp_path / "empty").mkdir()
    cfg = config_lib.from_dict(ModelConfig, tiny_model(tokenizer=str(tmp_path / "empty")))
    with pytest.raises(ModelError, match="not a tokenizer directory"):
        load_tokenizer(cfg.text)

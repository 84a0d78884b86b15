"""The pretraining loader on toy NewsCLIPpings shards enriched with synthetic enrichment fields: well-formed
batches, split by rank and worker, mixing weights, exact resume, bad samples counted, bad inputs refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.pretrain.data import DataConfig, PretrainData
from mie.pretrain.model import ModelConfig, load_tokenizer
from mie.shards.schema import ShardSetError
from mie.shards.stage import map_shard_set
from test_pretrain_fixtures import ENTITIES, PAIRS, RELATIONS, synthetic_fields, tiny_model, toy_shards, write_vocab

MODEL = config_lib.from_dict(ModelConfig, tiny_model())
VIEWS = ["jpg", "gen"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return toy_shards(tmp_path_factory.getbasetemp() / "pretrain_shards")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL.text)


def make_data(tokenizer, sets, env=DistEnv(), views=VIEWS, **data) -> PretrainData:
    cfg = config_lib.from_dict(DataConfig, {"sets": [{"dir": str(d), "weight": w} for d, w in sets],
                                            "batch_size": 4, "workers": 0, **data})
    return PretrainData(cfg, tokenizer, MODEL.text.max_len, MODEL.text.prompt_len, MODEL.vision.image_size,
                        MODEL.max_boxes, views, env, seed=3)


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def test_batches_are_well_formed_and_an_epoch_sees_every_sample_once(shards, tokenizer):
    data = make_data(tokenizer, [(shards["enriched"], 1.0)])
    assert data.prompts.entity.prompts == [(f"a photo of the {e} object", f"the {e} thing") for e in ENTITIES]
    assert data.prompts.entity.input_ids.shape == (2 * len(ENTITIES), MODEL.text.prompt_len)
    assert data.prompts.entity.owner.tolist() == [i // 2 for i in range(2 * len(ENTITIES))]
    assert data.prompts.relation.prompts == [(f"two objects: {r}",) for r in RELATIONS]
    batches = take(data.loader(), 2 * PAIRS // 4)  # one epoch: 48 samples
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 2 * PAIRS
    b = batches[0]
    assert b["input_ids"].shape == (4, MODEL.text.max_len) and b["input_ids"].dtype == torch.int64
    assert b["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    for view in VIEWS:
        assert b[f"{view}.images"].shape == (4, 3, 32, 32) and b[f"{view}.images"].dtype == torch.uint8
        assert b[f"{view}.present"].all()
        assert b[f"{view}.boxes"].shape == (4, MODEL.max_boxes, 4)
        assert (b[f"{view}.boxes"] >= 0).all() and (b[f"{view}.boxes"] <= 1).all()
        assert b[f"{view}.box_mask"].all()  # 5 detections written, 3 kept, all non-degenerate
        ent, mask = b[f"{view}.obj_ent"], b[f"{view}.obj_mask"]
        assert ent.shape == (4, MODEL.max_boxes, len(ENTITIES))
        torch.testing.assert_close(ent[mask].sum(-1), torch.ones(int(mask.sum())))
        assert b[f"{view}.rel"].shape == (4, len(RELATIONS))
    falsified = torch.cat([b["falsified"] for b in batches])
    assert falsified.sum().item() == PAIRS  # each pristine pair has one falsified partner
    # The values are the ones written into the shard (first box of the first sample, original view).
    first = b["keys"][0]
    det = _raw_field(shards["enriched"], first, "det.json")
    w, h = 64, 64
    expected = np.clip(np.array(json.loads(det)["jpg"]["boxes"][0]) / [w, h, w, h], 0, 1)
    np.testing.assert_allclose(b["jpg.boxes"][0, 0].numpy(), expected, rtol=1e-5)


def _raw_field(set_dir: Path, key: str, field: str) -> bytes:
    import webdataset as wds

    urls = sorted(str(p) for p in set_dir.glob("shard-*.tar"))
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if sample["__key__"] == key:
            return sample[field]
    raise KeyError(key)


def test_ranks_and_workers_split_the_shards(shards, tokenizer):
    seen = []
    for rank in range(2):
        data = make_data(tokenizer, [(shards["enriched"], 1.0)], env=DistEnv(rank, 2, rank, "torchrun"), workers=2)
        # Slots of this rank: shards_of_epoch is the whole split; every shard read once per epoch.
        own = sorted(i for slot in range(2) for i in data.shards_of_epoch(0, 0, slot))
        seen.append(own)
        batches = take(data.loader(), 6)  # 24 samples: this rank's epoch
        keys = {k for b in batches for k in b["keys"]}
        assert len(keys) == 24
        seen.append(keys)
    assert set(seen[0]).isdisjoint(seen[2]) and sorted(seen[0] + seen[2]) == list(range(8))
    assert seen[1].isdisjoint(seen[3]) and len(seen[1] | seen[3]) == 2 * PAIRS
    # Another epoch visits the shards in another order.
    data = make_data(tokenizer, [(shards["enriched"], 1.0)])
    assert data.shards_of_epoch(0, 0, 0) != data.shards_of_epoch(0, 1, 0)


def test_mixing_weights_and_a_set_without_enrichment(shards, tokenizer):
    data = make_data(tokenizer, [(shards["enriched"], 3.0), (shards["plain"], 1.0)], batch_size=8)
    batches = take(data.loader(), 25)
    sets = torch.cat([b["set_index"] for b in batches])
    assert 0.65 < (sets == 0).float().mean().item() < 0.85
    b = torch.cat([b["gen.present"] for b in batches])
    assert b[sets == 1].sum() == 0 and b[sets == 0].all()  # the plain set has no regenerated image
    # Plain samples have no soft labels and no prompt of theirs; the enriched set's prompts are allowed.
    assert data.prompts.entity.allowed.tolist() == [[True] * len(ENTITIES), [False] * len(ENTITIES)]
    mask = torch.cat([b["jpg.obj_mask"] for b in batches])
    assert mask[sets == 1].sum() == 0 and mask[sets == 0].sum() > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_exact_stream(shards, tokenizer, workers):
    sets = [(shards["enriched"], 2.0), (shards["plain"], 1.0)]
    data = make_data(tokenizer, sets, workers=workers)
    reference = take(data.loader(), 17)  # past an epoch of each slot
    first = data.loader()
    take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # plain data (it goes into a checkpoint)
    first.close()
    resumed = take(make_data(tokenizer, sets, workers=workers).loader(state), 10)
    for want, got in zip(reference[7:], resumed):
        assert want["keys"] == got["keys"]
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, got[name]), name
    # A loader of another shape cannot continue that position.
    with pytest.raises(ShardSetError, match="exact resume needs the same world size, data.workers"):
        make_data(tokenizer, sets, workers=workers + 2).loader(state)


def test_bad_samples_are_counted_and_skipped(shards, tokenizer, tmp_path, capfd):
    bad_keys = {}

    def corrupt(batch):
        out = []
        for s in batch:
            fields = synthetic_fields(s["__key__"], s["jpg"])
            if len(bad_keys) == 0:  # soft labels whose rows do not match the boxes
                fields = synthetic_fields(s["__key__"], s["jpg"], jpg_obj_ent=np.ones((2, len(ENTITIES)), np.float32))
                bad_keys[s["__key__"]] = "shape"
            elif len(bad_keys) == 1:  # a truncated image
                fields["gen.jpg"] = fields["gen.jpg"][:100]
                bad_keys[s["__key__"]] = "jpeg"
            elif len(bad_keys) == 2:  # NaN soft labels
                fields = synthetic_fields(s["__key__"], s["jpg"], gen_rel=np.full(len(RELATIONS), np.nan, np.float32))
                bad_keys[s["__key__"]] = "nan"
            out.append(fields)
        return out

    bad_set = tmp_path / "bad"
    map_shard_set(shards["plain"], bad_set, "test-corrupt", {"corrupt": 1}, DistEnv(), corrupt, batch_size=4)
    write_vocab(bad_set)
    data = make_data(tokenizer, [(bad_set, 1.0)], batch_size=5)
    loader = data.loader()
    batches = take(loader, 9)  # 45 of the 48 samples are good
    keys = {k for b in batches for k in b["keys"]}
    assert len(keys) == 45 and keys.isdisjoint(bad_keys)
    take(loader, 1)  # into the next epoch: every bad sample of the first has been drawn
    assert loader.stats()["bad_samples"] == 3
    err = capfd.readouterr().err
    for key in bad_keys:
        assert key in err and "bad sample skipped" in err


def test_bad_inputs_are_one_line_errors(shards, tokenizer, tmp_path):
    with pytest.raises(ShardSetError, match="shard set not found"):
        make_data(tokenizer, [(tmp_path / "missing", 1.0)])
    (tmp_path / "incomplete").mkdir()
    with pytest.raises(ShardSetError, match=r"incomplete \(no index.json\)"):
        make_data(tokenizer, [(tmp_path / "incomplete", 1.0)])
    with pytest.raises(ShardSetError, match=r"has 8 non-empty shards, fewer than ranks × workers = 4 × 3"):
        make_data(tokenizer, [(shards["enriched"], 1.0)], env=DistEnv(0, 4, 0, "torchrun"), workers=3)
    with pytest.raises(config_lib.ConfigError, match="sets: list at least one shard set"):
        config_lib.from_dict(DataConfig, {"sets": []})
    with pytest.raises(config_lib.ConfigError, match=r"sets\[0\].weight: must be > 0"):
        config_lib.from_dict(DataConfig, {"sets": [{"dir": "x", "weight": 0}]})

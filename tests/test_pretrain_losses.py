"""The four objectives on hand-computed values, the gradient-correct all-gather, and the wired-up module."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mie.launch import config as config_lib
from mie.pretrain.losses import (LossConfig, Objectives, itc_loss, itm_loss, sample_negatives,
                                 soft_kl)
from mie.pretrain.model import ModelConfig, MieModel
from test_pretrain_fixtures import tiny_model


def test_itc_hand_values():
    eye = torch.eye(3)
    # Orthonormal features, scale exp(0) = 1: a row's logits are 1 on its own pair and 0 elsewhere.
    loss = itc_loss(eye[:2], eye[:2], torch.zeros(1), torch.tensor([True, True]), torch.tensor([True, True]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # Row 2 is falsified (not a positive) and its image is absent (never a text's negative):
    # image→text rows see 3 text columns, text→image rows only the 2 present images.
    loss = itc_loss(eye, eye, torch.zeros(1), torch.tensor([True, True, False]), torch.tensor([True, True, False]))
    expected = (math.log(1 + 2 / math.e) + math.log(1 + 1 / math.e)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # No image of this view in the batch: a zero that still backpropagates (finite) gradients.
    feats = eye.clone().requires_grad_(True)
    none = torch.zeros(3, dtype=torch.bool)
    loss = itc_loss(feats, feats, torch.zeros(1), none, none)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(feats.grad).all()
    # The scale is exp(logit_scale): ln 2 doubles the logits.
    loss = itc_loss(eye[:2], eye[:2], torch.tensor([math.log(2.0)]), torch.ones(2, dtype=torch.bool),
                    torch.ones(2, dtype=torch.bool))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_itm_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0], [5.0, -5.0]])
    labels = torch.tensor([1, 0, 1])
    # Row 2 (a confidently wrong prediction) is not kept: it must not count.
    loss = itm_loss(logits, labels, torch.tensor([True, True, False]))
    assert loss.item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_soft_kl_hand_values_and_masked_rows():
    target = torch.tensor([[0.5, 0.5, 0.0], [float("nan"), 1.0, 0.0]])
    logits = torch.tensor([[0.0, math.log(3.0), 7.0], [1.0, 2.0, 3.0]], requires_grad=True)
    allowed = torch.tensor([True, True, False])
    # Row 0: q = softmax over the allowed [0, ln 3] = [1/4, 3/4]; KL = ½ln(½/¼) + ½ln(½/¾) = ½ln(4/3).
    # Row 1 is masked: its (garbage) target is skipped, not averaged in.
    loss = soft_kl(logits, target, torch.tensor([True, False]), allowed)
    assert loss.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0 and logits.grad[0, 2] == 0
    # A target equal to the prediction costs nothing; every row masked gives a connected zero.
    p = torch.softmax(torch.tensor([[0.3, -1.0, 2.0]]), -1)
    assert soft_kl(torch.log(p), p, torch.tensor([True])).item() == pytest.approx(0.0, abs=1e-6)
    logits.grad = None
    zero = soft_kl(logits, target, torch.tensor([False, False]))
    zero.backward()
    assert zero.item() == 0.0 and logits.grad.abs().sum() == 0


def test_sample_negatives():
    sim = torch.tensor([[0.0, 50.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    eye = torch.eye(3, dtype=torch.bool)
    allowed = ~eye
    allowed[2] = False  # row 2 has no candidate
    allowed[1, 2] = False  # row 1 has exactly one
    torch.manual_seed(0)
    picks = sample_negatives(sim, allowed)
    assert picks.tolist() == [1, 0, -1]  # row 0: e^-50 odds against column 2
    # Not hard: uniform over the allowed columns.
    torch.manual_seed(0)
    draws = sample_negatives(torch.zeros(4000, 3), ~torch.eye(3, dtype=torch.bool).repeat(1334, 1)[:4000], hard=False)
    first = draws[0::3]  # rows like row 0: columns 1 and 2 allowed
    assert set(first.tolist()) == {1, 2} and 0.45 < (first == 1).float().mean().item() < 0.55
    # The same seed draws the same negatives (a resumed run restores the generator).
    torch.manual_seed(7)
    a = sample_negatives(torch.randn(6, 6), ~torch.eye(6, dtype=torch.bool))
    torch.manual_seed(7)
    b = sample_negatives(torch.randn(6, 6), ~torch.eye(6, dtype=torch.bool))
    assert torch.equal(a, b)


# -- gradient-correct all-gather ------------------------------------------------------------------------------
def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.nn.Linear(5, 4)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(4, 5, generator=g))
        proj.bias.copy_(torch.randn(4, generator=g))
    x_img, x_txt = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    present = torch.tensor([True, True, True, True, False, True, True, True])
    positive = present & torch.tensor([True, True, False, True, True, True, True, False])  # 3 rows on rank 0, 2 on rank 1
    return proj, x_img, x_txt, positive, present


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for local_loss in (False, True):
        proj, x_img, x_txt, positive, present = _features()
        sl = slice(rank * 4, rank * 4 + 4)
        loss = itc_loss(proj(x_img[sl]), proj(x_txt[sl]), torch.tensor([0.5]), positive[sl], present[sl],
                        gather=True, local_loss=local_loss)
        loss.backward()
        grads = torch.cat([proj.weight.grad.flatten(), proj.bias.grad])
        dist.all_reduce(grads)  # what data-parallel training does: the mean of the ranks' gradients
        grads /= world
        value = loss.detach().clone()
        dist.all_reduce(value)
        queue.put((local_loss, (value / world).item(), grads.tolist()))  # plain data: the process exits next
    dist.destroy_process_group()


def _expected(local_loss: bool) -> tuple[float, torch.Tensor]:
    proj, x_img, x_txt, positive, present = _features()
    feats = proj(x_img), proj(x_txt)
    if local_loss:  # each rank's loss is the mean over its own rows: the objective is the mean of the two
        half = torch.arange(8) < 4
        loss = (itc_loss(*feats, torch.tensor([0.5]), positive & half, present, gather=False)
                + itc_loss(*feats, torch.tensor([0.5]), positive & ~half, present, gather=False)) / 2
    else:  # every rank scores the whole global batch
        loss = itc_loss(*feats, torch.tensor([0.5]), positive, present, gather=False)
    loss.backward()
    return loss.item(), torch.cat([proj.weight.grad.flatten(), proj.bias.grad])


def test_gathered_itc_gradient_equals_global_batch():
    """Two gloo ranks with half the batch each, gradients averaged as data parallelism does, give the
    gradient of the global-batch loss (both with every rank scoring all rows and with local rows only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in range(4)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for local_loss, value, grads in results:
        loss, expected = _expected(local_loss)
        assert value == pytest.approx(loss, abs=1e-5)
        torch.testing.assert_close(torch.tensor(grads), expected, atol=1e-6, rtol=1e-5)


# -- the module ---------------------------------------------------------------------------------------------
class _Prompts:
    def __init__(self, n_sets: int, p: int, length: int = 6):
        g = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(1000, 2000, (p, length), generator=g)
        self.input_ids[:, 0] = 101
        self.attention_mask = torch.ones(p, length, dtype=torch.long)
        self.owner = torch.arange(p)
        self.allowed = torch.ones(n_sets, p, dtype=torch.bool)
        self.allowed[1, p // 2:] = False


class _AllPrompts:
    def __init__(self):
        self.entity, self.relation = _Prompts(2, 6), _Prompts(2, 4)


def synthetic_batch(b: int = 4, k: int = 3, p_ent: int = 6, p_rel: int = 4, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(1000, 2000, (b, 12), generator=g), "attention_mask": torch.ones(b, 12, dtype=torch.long),
             "falsified": torch.tensor([False, True] * (b // 2)), "set_index": torch.tensor([0, 1] * (b // 2))}
    batch["attention_mask"][:, 9:] = 0
    for view in ("jpg", "gen"):
        x1 = torch.rand(b, k, 2, generator=g) * 0.5
        boxes = torch.cat([x1, x1 + 0.3], -1)
        ent = torch.softmax(torch.randn(b, k, p_ent, generator=g), -1)
        rel = torch.softmax(torch.randn(b, p_rel, generator=g), -1)
        batch.update({f"{view}.images": torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8),
                      f"{view}.present": torch.tensor([True] * (b - 1) + [view == "jpg"]),
                      f"{view}.boxes": boxes, f"{view}.box_mask": torch.tensor([[True, True, False]] * b),
                      f"{view}.obj_ent": ent, f"{view}.obj_mask": torch.tensor([[True, False, True]] * b),
                      f"{view}.rel": rel, f"{view}.rel_mask": torch.tensor([True, False] * (b // 2))})
    return batch


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return config_lib.from_dict(ModelConfig, tiny_model())


@pytest.mark.parametrize("loss_cfg", [
    {"views": {"itc": ["jpg", "gen"], "itm": ["jpg", "gen"], "entity": ["jpg"], "relation": ["gen"]}},
    {"soft_labels": "online", "hard_negatives": False},
])
def test_objectives_train_every_parameter(tiny_cfg, loss_cfg):
    torch.manual_seed(0)
    model = MieModel(tiny_cfg, vocab_size=2048)
    obj = Objectives(model, config_lib.from_dict(LossConfig, loss_cfg), _AllPrompts())
    out = obj(synthetic_batch())
    assert set(out) == {"loss", "itc", "itm", "entity", "relation"}
    assert all(torch.isfinite(v) for v in out.values()) and out["loss"].requires_grad
    weights = obj.cfg.weights
    total = sum(getattr(weights, n) * out[n] for n in ("itc", "itm", "entity", "relation"))
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    out["loss"].backward()
    no_grad = [n for n, p in obj.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []


def test_prompt_templates_are_averaged(tiny_cfg):
    torch.manual_seed(0)
    prompts = _AllPrompts()
    prompts.entity.owner = torch.tensor([0, 0, 1, 2, 2, 2])  # 3 prompts with 2, 1 and 3 template texts
    prompts.entity.allowed = torch.ones(2, 3, dtype=torch.bool)
    obj = Objectives(MieModel(tiny_cfg, vocab_size=2048), LossConfig(), prompts).eval()
    emb = obj._prompt_embeddings("entity")
    texts = torch.nn.functional.normalize(obj.model.text_proj(obj.model.encode_text(
        prompts.entity.input_ids, prompts.entity.attention_mask)[:, 0]), dim=-1)
    torch.testing.assert_close(emb, torch.stack([texts[:2].mean(0), texts[2], texts[3:].mean(0)]))


def test_zero_weight_objective_is_not_computed(tiny_cfg):
    torch.manual_seed(0)
    obj = Objectives(MieModel(tiny_cfg, vocab_size=2048),
                     config_lib.from_dict(LossConfig, {"weights": {"entity": 0.0, "relation": 0.0}}), _AllPrompts())
    out = obj(synthetic_batch())
    assert set(out) == {"loss", "itc", "itm"}
    assert obj.cfg.used_views() == ["jpg"]


def test_entity_prompt_sampling_keeps_named_prompts_and_matches_the_full_loss(tiny_cfg):
    torch.manual_seed(0)
    prompts = _AllPrompts()
    prompts.entity = _Prompts(2, 12)
    prompts.entity.allowed[:] = True
    model = MieModel(tiny_cfg, vocab_size=2048).eval()
    batch = synthetic_batch(p_ent=12)
    named = torch.zeros(12, dtype=torch.bool)
    for cols in ([1, 4], [4, 7]):  # soft labels that name prompts 1, 4 and 7 only
        ent = torch.zeros(4, 3, 12)
        ent[..., cols] = 0.5
        batch["jpg.obj_ent"] = batch["gen.obj_ent"] = ent
        named[cols] = True
    cfg = {"views": {"entity": ["jpg"]}, "weights": {"itc": 0.0, "itm": 0.0, "relation": 0.0}}
    sampled = Objectives(model, config_lib.from_dict(LossConfig, {**cfg, "entity_prompts_per_step": 5}), prompts)
    cols = sampled._entity_columns(batch)
    assert len(cols) == 5 and torch.equal(cols, cols.sort().values) and {4, 7} <= set(cols.tolist())
    # With every prompt in the budget the sampled loss is the full one; with fewer it is the same KL over
    # the drawn columns (the target's mass is all inside them).
    full = Objectives(model, config_lib.from_dict(LossConfig, cfg), prompts)(batch)["entity"]
    everything = Objectives(model, config_lib.from_dict(LossConfig, {**cfg, "entity_prompts_per_step": 12}), prompts)
    assert everything._entity_columns(batch) is None
    torch.manual_seed(3)
    cols = sampled._entity_columns(batch)
    torch.manual_seed(3)
    part = sampled(batch)["entity"]
    full_emb = Objectives(model, config_lib.from_dict(LossConfig, cfg), prompts)._prompt_embeddings("entity")
    torch.testing.assert_close(sampled._prompt_embeddings("entity", cols), full_emb[cols])
    assert torch.isfinite(part) and part.item() <= full.item() + 1e-6  # fewer competitors, no larger KL


def test_itc_leaves_out_the_falsified_twin_of_an_images_caption():
    # rows: image A with caption a (pristine), image B with caption a again (falsified twin), image C with c.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([[5, 6], [5, 6], [7, 8]])
    positive, present = torch.tensor([True, False, True]), torch.ones(3, dtype=torch.bool)
    with_twin = itc_loss(img, txt, torch.zeros(1), positive, present)
    without = itc_loss(img, txt, torch.zeros(1), positive, present, text_ids=ids)

    def ce(logits, label):
        return -torch.log_softmax(torch.tensor(logits), 0)[label].item()

    s = img @ txt.T
    # image A's softmax without column 1 (the same text a); texts' softmaxes are unchanged
    i2t = [ce([s[0, 0], s[0, 2]], 0), ce(s[2].tolist(), 2)]
    t2i = [ce(s[:, 0].tolist(), 0), ce(s[:, 2].tolist(), 2)]
    assert without.item() == pytest.approx((sum(i2t) / 2 + sum(t2i) / 2) / 2, abs=1e-5)
    assert without.item() < with_twin.item()

"""``mie finetune``: every task trains a few steps on the toy world (tiny BERT written by the test,
tiny timm ViT), predicts, and its predictions score the same through ``mie evaluate``; image modes,
seeding, restart, bad configs, and the task pieces computed by hand."""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch

from conftest import cli, clean_env
from mie.finetune import evaluate as ev
from mie.finetune import loop
from mie.finetune.backbone import Encoded
from mie.finetune.tasks import gmner, jmere, mnre, twitter_ner
from mie.launch import config as config_lib
from mie.launch.config import ConfigError
from mie.launch.dist import DistEnv
from mie.shards import build as build_mod
from mie.shards import toy
from mie.shards.build import BuildConfig
from mie.shards.stage import map_shard_set

SIZES = dict(twitter=[24, 8, 8], gmner=[24, 8, 8], mnre=[16, 6, 6], jmere=[16, 6, 6], newsclippings=[0, 0, 0])
TINY_VIT = {"model": "vit_tiny_patch16_224", "image_size": 64,
            "kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 16}}
CORPUS = {"twitter_ner": "twitter", "gmner": "gmner", "mnre": "mnre", "jmere": "jmere"}


def tiny_text_encoder(d: Path) -> Path:
    """A one-layer BERT with a character-level WordPiece vocabulary, saved as a Hugging Face dir."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + ["##" + c for c in chars] + list(toy.PALETTE)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(d)
    return d


def add_detections(in_dir: Path, out_dir: Path, truth: dict) -> None:
    """A detector fixture: the image's true object boxes, jittered by up to 2 px, plus one
    background box, written as ``det.json`` through the shard → shard stage skeleton."""
    def fn(batch):
        out = []
        for s in batch:
            meta = json.loads(s["json"])
            rng = random.Random(meta["id"])
            objs = truth[f"images/{meta.get('img_id') or meta['id'] + '.jpg'}"]["objects"]
            boxes = [[v + rng.uniform(-2, 2) for v in o["box"]] for o in objs] + [[0.0, 0.0, 12.0, 12.0]]
            classes = [list(toy.TYPE_OF_SHAPE).index(o["shape"]) for o in objs] + [0]  # a shape detector's
            det = {"jpg": {"boxes": boxes, "scores": [0.9] * len(objs) + [0.3], "classes": classes}}
            out.append({"det.json": json.dumps(det).encode()})
        return out
    map_shard_set(in_dir, out_dir, "detect-fixture", {"jitter": 2}, DistEnv(), fn, batch_size=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    toy.main(toy.ToyConfig(out=str(root / "toy"), image_size=64, name_pool=60, **SIZES), DistEnv())
    paths = {"root": root, "toy": root / "toy", "bert": tiny_text_encoder(root / "bert")}
    for corpus in ("twitter", "gmner", "mnre", "jmere"):
        cfg = config_lib.from_dict(BuildConfig, {
            "source": {"format": corpus, "name": f"toy{corpus}", "root": str(root / "toy" / corpus),
                       "image_dir": str(root / "toy" / "images"), "require_images": True},
            "output": {"dir": str(root / "shards" / corpus), "samples_per_shard": 10, "max_image_side": 128}})
        build_mod.main(cfg, DistEnv())
        paths[corpus] = root / "shards" / corpus
    truth = json.loads((root / "toy" / "truth.json").read_text())["images"]
    for corpus in ("gmner", "mnre", "jmere"):
        for split in ("train", "dev", "test"):
            add_detections(root / "shards" / corpus / split, root / "shards" / f"{corpus}_det" / split, truth)
        paths[f"{corpus}_det"] = root / "shards" / f"{corpus}_det"
    return paths


def make_cfg(world, task: str, out: Path, **over) -> loop.FinetuneConfig:
    d = {"task": task, "out": str(out), "backbone": {"path": str(world["bert"]), "vision": TINY_VIT},
         "data": {"shards": str(world[CORPUS[task]])},
         "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "head_lr": 5e-3, "log_every": 2}}
    for key, value in over.items():
        node = d
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config_lib.from_dict(loop.FinetuneConfig, d)


def gold_path(world, task: str) -> Path:
    return {"twitter_ner": world["toy"] / "twitter" / "test.txt", "gmner": world["toy"] / "gmner",
            "mnre": world["toy"] / "mnre" / "mnre_txt" / "mnre_test.txt", "jmere": world["toy"] / "jmere" / "test.json"}[task]


@pytest.mark.parametrize("task", ["twitter_ner", "gmner", "mnre", "jmere"])
def test_task_trains_predicts_and_scores_like_mie_evaluate(world, tmp_path, task):
    out = tmp_path / "run"
    res = loop.main(make_cfg(world, task, out), DistEnv())
    for name in ("predictions.jsonl", "results.json", "curve.png", "config.toml", "metrics.jsonl",
                 "best/model.safetensors", "best/meta.json"):
        assert (out / name).is_file(), name
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["seed"] == 0 and saved["config"]["task"] == task and saved["training_minutes"] > 0
    assert saved["epochs_run"] == 2 and 1 <= saved["best_epoch"] <= 2 and saved["dev"] and saved["test"]
    losses = [h["train_loss"] for h in saved["history"]]
    assert losses[1] < losses[0], losses  # it learns something in two epochs
    # the run's predictions, scored against the official gold file, give the run's test metrics
    scored = ev.evaluate(task, out / "predictions.jsonl", gold_path(world, task), "test")
    assert scored["missing"] == 0
    assert {k: v for k, v in scored.items() if k in res["test"]} == res["test"]


def test_gmner_image_mode_grounds_on_detector_candidates(world, tmp_path):
    cfg = make_cfg(world, "gmner", tmp_path / "img", modality="image", **{"data.shards": str(world["gmner_det"]),
                   "optim.epochs": 2, "gmner.top_k": 8})
    res = loop.main(cfg, DistEnv())
    assert res["test"]["gmner"]["predicted"] > 0
    rows = [json.loads(x) for x in (tmp_path / "img" / "predictions.jsonl").read_text().splitlines()]
    truth = json.loads((world["toy"] / "truth.json").read_text())["images"]
    for r in rows:  # a chosen box is one of that image's candidates (original pixels)
        cands = [o["box"] for o in truth[f"images/{r['id']}.jpg"]["objects"]] + [[0, 0, 12, 12]]
        for e in r["entities"]:
            if e["box"] is not None:
                assert min(max(abs(a - b) for a, b in zip(e["box"], c)) for c in cands) <= 2.01
    scored = ev.evaluate("gmner", tmp_path / "img" / "predictions.jsonl", world["toy"] / "gmner")
    assert {k: scored[k] for k in ("gmner", "mner", "eeg")} == res["test"]
    # the vision encoder and the fusion were trained: the fusion gate left zero
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "img" / "best" / "model.safetensors"))
    assert float(state["backbone.fusion.gate"].abs()) > 0
    assert any(k.startswith("backbone.vision.") for k in state)


def test_gmner_head_writes_the_chosen_candidate_in_original_pixels():
    head = gmner.Head(4, 0, 64, ["PER"], gmner.GmnerOptions(dropout=0.0))
    with torch.no_grad():
        head.tagger.emit.weight.zero_()
        head.tagger.emit.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # every word: B-PER
        for p in (head.tagger.crf.transitions, head.tagger.crf.start_transitions, head.tagger.crf.end_transitions):
            p.zero_()
        head.grounder.no_region.bias.fill_(-50.0)  # always pick a candidate
    labels = {"tokens": ["x"], "jpg_size": [32, 32], "image_size": [64, 64], "entities": []}
    det = {"jpg": {"boxes": [[1, 2, 3, 4]], "scores": [0.5]}}
    ex_a, ex_b = (loop.Example("k", "a", labels, {}, det), loop.Example("k2", "b", dict(labels), {}, None))
    task = gmner.Task(gmner.GmnerOptions(), [ex_a])
    for ex in (ex_a, ex_b):
        task.prepare(ex)
    batch = {"examples": [ex_a, ex_b]}
    task.collate([ex_a, ex_b], batch)
    enc = Encoded(torch.zeros(2, 3, 4), torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool), None, None)
    rows = head.predict(enc, batch)
    assert rows == [{"entities": [{"start": 0, "end": 1, "type": "PER", "box": [2.0, 4.0, 6.0, 8.0]}]},
                    {"entities": [{"start": 0, "end": 1, "type": "PER", "box": None}]}]  # no det.json: no region


def test_both_mode_without_generated_images_and_text_mode_ignores_images(world, tmp_path):
    res = loop.main(make_cfg(world, "mnre", tmp_path / "both", modality="both", **{"optim.max_steps": 2}), DistEnv())
    assert res["modality"] == "both" and res["steps"] == 2
    from safetensors.torch import load_file
    assert "backbone.fusion.view_embed" in load_file(str(tmp_path / "both" / "best" / "model.safetensors"))
    text = loop.main(make_cfg(world, "mnre", tmp_path / "text", **{"optim.max_steps": 2}), DistEnv())
    assert not any(k.startswith("backbone.vision") for k in load_file(str(tmp_path / "text" / "best" / "model.safetensors")))
    assert text["modality"] == "text"


def test_bf16_precision_runs_the_encoders_in_bf16_and_the_heads_in_fp32(world, tmp_path):
    from types import SimpleNamespace

    from mie.finetune.backbone import BackboneConfig, load_backbone
    backbone = load_backbone(BackboneConfig(path=str(world["bert"])), "text")
    seen = []
    backbone.text.encoder.layer[0].output.dense.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ex = loop.Example("k", "0", {}, {}, None, words=["a", "red", "zorb"])
    batch = loop.collate([ex], backbone.tokenizer, 16, (), 64, SimpleNamespace(collate=lambda e, b: None))
    enc = loop.Model(backbone, torch.nn.Identity(), "bf16").encode(batch)
    assert seen == [torch.bfloat16] and enc.tokens.dtype == enc.words.dtype == torch.float32
    # the whole loop in bf16, image mode with grounding (CRF and KL computed in fp32): finite, and it learns
    res = loop.main(make_cfg(world, "gmner", tmp_path / "run", modality="image", precision="bf16",
                             **{"data.shards": str(world["gmner_det"])}), DistEnv())
    losses = [h["train_loss"] for h in res["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0], losses


def test_word_shapes_give_an_uncased_encoder_the_case_it_cannot_see(world, tmp_path):
    from types import SimpleNamespace

    from mie.finetune.backbone import SHAPES, BackboneConfig, load_backbone, word_shape
    words = ["red", "Red", "RED", "iPhone", "3G", ",", "@zorb", "#red", "https://t.co/x", "I", "@"]
    assert [SHAPES[word_shape(w) - 1] for w in words] == [
        "lower", "title", "upper", "mixed", "number", "punct", "mention", "hashtag", "url", "title", "punct"]

    backbone = load_backbone(BackboneConfig(path=str(world["bert"]), word_shapes=True), "text").eval()
    plain = load_backbone(BackboneConfig(path=str(world["bert"])), "text").eval()
    exs = [loop.Example("k", str(i), {}, {}, None, words=["the", w, "zorb"]) for i, w in enumerate(["red", "Red"])]
    batch = loop.collate(exs, backbone.tokenizer, 16, (), 64, SimpleNamespace(collate=lambda e, b: None),
                         word_shapes=True)
    # The uncased tokenizer gives both posts the same ids; only the shapes tell them apart (0 on [CLS]/[SEP]).
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    word_ids = backbone.tokenizer(["the", "Red", "zorb"], is_split_into_words=True).word_ids()
    lower, title = 1 + SHAPES.index("lower"), 1 + SHAPES.index("title")
    assert batch["shape_ids"][1].tolist() == [0 if w is None else title if w == 1 else lower for w in word_ids]
    assert batch["shape_ids"][0].tolist() == [0 if w is None else lower for w in word_ids]
    with torch.no_grad():
        enc = backbone(batch)
        assert torch.allclose(enc.tokens, plain(batch).tokens, atol=1e-6)  # zero-initialised: nothing changes yet
        assert torch.allclose(enc.words[0], enc.words[1])
        backbone.shape_embed.weight.normal_()
        enc = backbone(batch)
        assert not torch.allclose(enc.words[0, 1], enc.words[1, 1], atol=1e-3)
    # in the loop, the shape table trains (at the head learning rate: it is new)
    from safetensors.torch import load_file
    loop.main(make_cfg(world, "twitter_ner", tmp_path / "run", **{"backbone.word_shapes": True, "optim.max_steps": 3}),
              DistEnv())
    weights = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    assert weights["backbone.shape_embed.weight"].abs().sum() > 0


def test_seed_reproduces_and_finished_run_is_kept(world, tmp_path):
    runs = [loop.main(make_cfg(world, "twitter_ner", tmp_path / f"r{i}", seed=7, **{"optim.max_steps": 5}), DistEnv())
            for i in range(2)]
    assert runs[0]["history"] == runs[1]["history"]
    assert (tmp_path / "r0" / "predictions.jsonl").read_text() == (tmp_path / "r1" / "predictions.jsonl").read_text()
    other = loop.main(make_cfg(world, "twitter_ner", tmp_path / "r2", seed=8, **{"optim.max_steps": 5}), DistEnv())
    assert other["history"][0]["train_loss"] != runs[0]["history"][0]["train_loss"]
    before = (tmp_path / "r0" / "results.json").stat().st_mtime_ns
    again = loop.main(make_cfg(world, "twitter_ner", tmp_path / "r0", seed=7, **{"optim.max_steps": 5}), DistEnv())
    assert again == runs[0] and (tmp_path / "r0" / "results.json").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="holds a finished run of another config"):
        loop.main(make_cfg(world, "twitter_ner", tmp_path / "r0", seed=9, **{"optim.max_steps": 5}), DistEnv())


def test_bad_configs_are_one_line_errors(world, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optim.lr_typo'"):
        make_cfg(world, "mnre", tmp_path / "x", **{"optim.lr_typo": 1.0})
    r = cli("finetune", "mnre", "configs/finetune/mnre.toml", f"out={tmp_path / 'x'}", f"backbone.path={tmp_path / 'nope'}",
            f"data.shards={world['mnre']}", env=clean_env(HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "backbone.path:" in r.stderr and "nope" in r.stderr
    r = cli("finetune", "mnre", "configs/finetune/mnre.toml", f"out={tmp_path / 'x'}", f"backbone.path={world['bert']}",
            f"data.shards={tmp_path / 'missing'}", env=clean_env(HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and "shard set not found" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# --------------------------------------------------------------------------------------------------
# Task pieces, by hand


def test_grounding_target_follows_h_index():
    cands = [[0, 0, 10, 10], [0, 0, 10, 6], [50, 50, 60, 60], [0, 0, 10, 5]]
    t = gmner.grounding_target([[0, 0, 10, 10]], cands)  # IoUs 1.0, 0.6, 0, 0.5 (not > 0.5)
    assert t == pytest.approx([1 / 1.6, 0.6 / 1.6, 0.0, 0.0, 0.0])
    assert gmner.grounding_target([], cands) == [0, 0, 0, 0, 1.0]  # ungroundable
    assert gmner.grounding_target([[100, 100, 120, 120]], cands) == [0, 0, 0, 0, 1.0]  # not covered
    assert gmner.grounding_target([[0, 0, 10, 10]], []) == [1.0]  # no det.json
    labels = {"jpg_size": [50, 40], "image_size": [100, 80]}
    c = gmner.candidates(labels, {"jpg": {"boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "scores": [0.9, 0.8]}}, top_k=1)
    assert c == {"stored": [[1.0, 2.0, 3.0, 4.0]], "original": [[2.0, 4.0, 6.0, 8.0]], "scores": [0.9], "classes": [0]}
    det = {"jpg": {"boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "scores": [0.9, 0.8], "classes": [3, 1]}}
    assert gmner.candidates(labels, det, top_k=5)["classes"] == [3, 1]
    assert gmner.candidates(labels, None, 5)["original"] == []


def test_bio_tags_markers_and_packed_crf_decode():
    tags, dropped = twitter_ner.bio_tags(5, [(0, 2, "PER"), (1, 3, "LOC"), (4, 5, "MISC")])
    assert tags == ["B-PER", "I-PER", "O", "O", "B-MISC"] and dropped == 1
    words, pos = mnre.with_markers(["a", "b", "c", "d"], (2, 4), (0, 1), ["@", "@", "#", "#"])
    assert words == ["#", "a", "#", "b", "@", "c", "d", "@"]
    assert pos == {"t_marker": 0, "t_start": 1, "t_end": 2, "h_marker": 4, "h_start": 5, "h_end": 7}
    # a word with no subword (mask hole) is packed out; spans map back to original offsets
    tagger = twitter_ner.CrfTagger(4, ["PER"], 0.0)
    with torch.no_grad():
        tagger.emit.weight.zero_()
        tagger.emit.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # every kept word: B-PER
        tagger.crf.transitions.zero_()
        tagger.crf.start_transitions.zero_()
        tagger.crf.end_transitions.zero_()
    mask = torch.tensor([[True, False, True]])
    enc = Encoded(torch.zeros(1, 4, 4), torch.zeros(1, 3, 4), mask, None, None)
    assert tagger.decode(enc) == [[(0, 1, "PER"), (2, 3, "PER")]]


def test_jmere_pairs_are_direction_agnostic_targets():
    opts = jmere.JmereOptions()

    class Ex:  # the loop's Example carries labels, words and target the same way
        def __init__(self, labels):
            self.labels, self.words, self.target = labels, [], None

    labels = {"tokens": ["A", "of", "B", "in", "C"],
              "entities": [{"start": 0, "end": 1, "type": "per"}, {"start": 2, "end": 3, "type": "org"},
                           {"start": 4, "end": 5, "type": "loc"}],
              "relations": [{"head": [2, 3], "head_type": "org", "tail": [0, 1], "tail_type": "per",
                             "relation": "member_of"}]}
    ex = Ex(labels)
    task = jmere.Task(opts, [ex])
    task.prepare(ex)
    assert task.relations == ["None", "member_of"]
    assert ex.target["pair_labels"] == [1, 0, 0]  # (A,B) related though written (B,A); (A,C), (B,C) not


def test_group_by_length_sorts_runs_of_the_epoch_order():
    """`optim.group_by_length`: the same samples as the plain epoch order, each run of 50 batches sorted by
    length, the order a function of (seed, epoch) alone, and `skip` still counts positions in that order."""
    from mie.launch.dist import DistEnv as Env

    data = [loop.Example(key=str(i), id=str(i), labels={}, images={}, det=None, words=["w"] * (i % 37 + 1))
            for i in range(250)]
    plain = loop.EpochSampler(data, Env(), seed=3)
    grouped = loop.EpochSampler(data, Env(), seed=3, group_by=(lambda ex: len(ex.words), 2))
    for s in (plain, grouped):
        s.set_epoch(1)
    p, g = list(plain), list(grouped)
    assert sorted(p) == sorted(g) == list(range(250)) and p != g
    for k in range(0, 250, 100):  # runs of 50 batches × 2
        run = g[k:k + 100]
        assert sorted(run) == sorted(p[k:k + 100])
        assert [len(data[i].words) for i in run] == sorted((len(data[i].words) for i in run), reverse=True)
    grouped.set_epoch(1, skip=7)
    assert list(grouped) == g[7:]
    grouped.set_epoch(2)
    assert list(grouped) != g


def test_weight_average_follows_every_step_and_is_swapped_in_for_scoring_only(world, tmp_path):
    """`optim.ema`: after each step the average moves toward the weights by 1 - min(ema, (1+t)/(10+t));
    inside `averaged()` the model holds it, and the trained weights are back exactly afterwards."""
    torch.manual_seed(0)
    for ema in (0.5, 0.0):
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = make_cfg(world, "mnre", tmp_path / "x", **{"optim.ema": ema})
        trainer = loop.Trainer(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), cfg, DistEnv(),
                               torch.device("cpu"), False)
        expected = [p.detach().clone() for p in model.parameters()]
        for t in range(1, 7):
            trainer.step(model(torch.randn(4, 3)).pow(2).sum())
            d = min(ema, (1 + t) / (10 + t))
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        trained = [p.detach().clone() for p in model.parameters()]
        with trainer.averaged():
            for p, e, w in zip(model.parameters(), expected, trained):
                torch.testing.assert_close(p.detach(), e if ema else w)
                assert torch.equal(e, w) == (ema == 0)  # with ema the average is not the last weights
        assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), trained))
    with pytest.raises(ConfigError, match="ema"):
        make_cfg(world, "mnre", tmp_path / "x", **{"optim.ema": 1.0})


def test_ensemble_takes_the_label_of_the_mean_probability(world, tmp_path):
    """`mie ensemble`: one member reproduces its run's predictions; two members keep every label they agree
    on (the mean of two distributions peaked at the same label peaks there too), score as `mie evaluate`
    scores their file, and add up their training minutes; runs that cannot be members are one-line errors."""
    from mie.finetune import ensemble

    runs = {s: loop.main(make_cfg(world, "mnre", tmp_path / f"s{s}", seed=s, **{"optim.epochs": 1}), DistEnv())
            for s in (0, 1)}
    one = ensemble.main([tmp_path / "s0"], tmp_path / "e1")
    assert (tmp_path / "e1" / "predictions.jsonl").read_text() == (tmp_path / "s0" / "predictions.jsonl").read_text()
    assert one["test"] == runs[0]["test"]
    two = ensemble.main([tmp_path / "s0", tmp_path / "s1"], tmp_path / "e2")
    rows = [[json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
            for d in ("s0", "s1", "e2")]
    agreed = [(a, c) for a, b, c in zip(*rows) if a["relation"] == b["relation"]]
    assert agreed and all(c["relation"] == a["relation"] for a, c in agreed)
    scored = ev.evaluate("mnre", tmp_path / "e2" / "predictions.jsonl", gold_path(world, "mnre"), "test")
    assert {k: v for k, v in scored.items() if k in two["test"]} == two["test"]
    assert two["training_minutes"] == round(runs[0]["training_minutes"] + runs[1]["training_minutes"], 3)
    assert [m["seed"] for m in two["members"]] == [0, 1]

    r = cli("ensemble", str(tmp_path / "s0"), str(tmp_path / "nope"), "--out", str(tmp_path / "e3"))
    assert r.returncode == 2 and "nope: not a finished" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    loop.main(make_cfg(world, "twitter_ner", tmp_path / "ner", **{"optim.max_steps": 2}), DistEnv())
    r = cli("ensemble", str(tmp_path / "ner"), "--out", str(tmp_path / "e4"))
    assert r.returncode == 2 and "twitter_ner predictions cannot be ensembled" in r.stderr, r.stderr

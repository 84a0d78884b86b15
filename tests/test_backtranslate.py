"""``mie shards backtranslate`` with the tiny pipeline: determinism, resume, accounting, errors, prompts."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import tomli_w
from PIL import Image

from conftest import REPO, WORDS, cli, kill_after_first_part, jpeg_bytes, read_shards, tree_bytes
from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.launch.errors import UserError
from mie.shards import backtranslate as bt_mod
from mie.shards import tiny_diffusion
from mie.shards.backtranslate import BacktranslateConfig, ModelError, PromptCleaner, PromptConfig, sample_seed
from mie.shards.writer import ConfigMismatch, ShardSetWriter

SIDE = 32  # generated image side: 16×16 latents through the tiny VAE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny pipeline, saved once and loaded by every run through ``from_pretrained``."""
    out = tmp_path_factory.mktemp("models") / "tiny-sd"
    tiny_diffusion.main(config_lib.from_dict(tiny_diffusion.TinyDiffusionConfig, {"out": str(out)}), DistEnv())
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(model_dir / "tokenizer")


def post(i: int) -> str:
    """An invented post, as `shards build` stores text: tokens joined by single spaces."""
    w = [WORDS[(i * 3 + k) % len(WORDS)] for k in range(5)]
    extras = ["", " http://t.co/abc", " #news", " RT @user : wow", " 🎉"]
    return f"{w[0]} {w[1]} , the red {w[2]} next to {w[3]} {w[4]}{i}{extras[i % 5]}"


# Samples that cannot be back-translated, and why (checked against rejects.jsonl).
BAD = {3: ("no txt", "no txt field"), 7: (b"\xff\xfe bad bytes", "txt is not UTF-8"),
       12: ("http://t.co/x 😀 🎉", "empty prompt after cleaning")}


def write_input(set_dir: Path, shard_sizes: list[int]) -> list[str]:
    """A shard set as `shards build` leaves it (txt, json, some jpg), with the BAD cases; its keys."""
    writer = ShardSetWriter(set_dir, "build", {"test": str(set_dir)}, len(shard_sizes))
    keys, k = [], 0
    for i, size in enumerate(shard_sizes):
        samples = []
        for _ in range(size):
            key = f"fixture-train-{k}"
            sample = {"__key__": key, "json": json.dumps({"id": str(k)}).encode()}
            text = BAD.get(k, (post(k), ""))[0]
            if text != "no txt":
                sample["txt"] = text if isinstance(text, bytes) else text.encode("utf-8")
            if k % 2 == 0:
                sample["jpg"] = jpeg_bytes((24, 16), seed=k)
            samples.append(sample)
            keys.append(key)
            k += 1
        writer.commit(i, samples, [], {})
    assert writer.finalize() is not None
    return keys


def write_config(path: Path, input_dir: Path, model_dir: Path, out: Path, **model) -> Path:
    data = {"input": str(input_dir), "batch_size": 4, "seed": 7,
            "model": {"path": str(model_dir), "height": SIDE, "width": SIDE, "device": "cpu", **model},
            "output": {"dir": str(out)}}
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def run(cfg_path: Path, *overrides: str, env: DistEnv = DistEnv()):
    return bt_mod.main(config_lib.load(BacktranslateConfig, cfg_path, list(overrides)), env)


@pytest.fixture(scope="module")
def input_set(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("input") / "train"
    return d, write_input(d, [6, 5, 5])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, input_set, model_dir) -> Path:
    """One uninterrupted run at batch size 4: what every other run must reproduce byte for byte."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp / "bt.toml", input_set[0], model_dir, tmp / "out")
    assert run(cfg) is not None
    return tmp / "out"


def test_outputs_and_accounting(reference, input_set):
    in_dir, keys = input_set
    index = json.loads((reference / "index.json").read_text(encoding="utf-8"))
    assert index["stage"] == "backtranslate"
    # The accounting identity: every input sample is in the output or in rejects.jsonl, once.
    assert index["total"] + index["rejected"] == len(keys)
    out = {s["__key__"]: s for s in read_shards(reference)}
    rejects = [json.loads(line) for line in (reference / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(list(out) + [r["key"] for r in rejects]) == sorted(keys)
    assert {r["key"]: r["reason"].split(":")[0].split(" (")[0] for r in rejects} == {
        f"fixture-train-{k}": reason for k, (_, reason) in BAD.items()}
    # Earlier fields are kept byte for byte; gen.jpg is a JPEG of the configured size.
    inputs = {s["__key__"]: s for s in read_shards(in_dir)}
    for key, s in out.items():
        assert {k: v for k, v in s.items() if k not in ("gen.jpg", "__url__", "__local_path__")} == \
            {k: v for k, v in inputs[key].items() if k not in ("__url__", "__local_path__")}
        with Image.open(io.BytesIO(s["gen.jpg"])) as im:
            assert im.format == "JPEG" and im.size == (SIDE, SIDE)
    # One step without guidance: one UNet evaluation per image, padding rows not counted.
    assert index["stats"]["images"] == index["total"] == len(out)
    assert index["stats"]["unet_evaluations"] == index["total"]
    assert {k: index["config"]["resolved"][k] for k in ("device", "dtype", "compile")} == {
        "device": "cpu", "dtype": "float32", "compile": "none"}
    assert len({s["gen.jpg"] for s in out.values()}) == len(out), "seeds differ per key, so images differ"


def test_unet_evaluations_with_guidance(tmp_path, model_dir):
    in_dir = tmp_path / "in"
    write_input(in_dir, [3])
    cfg = write_config(tmp_path / "bt.toml", in_dir, model_dir, tmp_path / "out", steps=3, guidance_scale=4.0)
    index = run(cfg)
    assert index["total"] == 3 and index["stats"]["unet_evaluations"] == 3 * 3 * 2  # steps × CFG's 2 rows


def test_deterministic_across_runs_batch_sizes_and_world_sizes(tmp_path, reference, input_set, model_dir):
    in_dir, _ = input_set
    want = tree_bytes(reference, "*.tar")
    assert len(want) == 3
    # Another run, another batch size (a multiple of 4: see the module docstring about CPU kernels),
    # two ranks: each writes its shards, the last one to finish writes the index.
    cfg = write_config(tmp_path / "w2.toml", in_dir, model_dir, tmp_path / "w2")
    assert run(cfg, "batch_size=8", env=DistEnv(1, 2)) is None
    assert run(cfg, "batch_size=8", env=DistEnv(0, 2)) is not None
    assert tree_bytes(tmp_path / "w2", "*.tar") == want
    assert (tmp_path / "w2" / "rejects.jsonl").read_bytes() == (reference / "rejects.jsonl").read_bytes()


def test_other_config_refused_batch_size_change_resumes(tmp_path, input_set, model_dir):
    in_dir, _ = input_set
    cfg = write_config(tmp_path / "bt.toml", in_dir, model_dir, tmp_path / "out")
    first = run(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*")}
    assert run(cfg, "batch_size=1") == first  # the batch size is not part of the outputs' config
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*")} == before
    with pytest.raises(ConfigMismatch, match="another config"):
        run(cfg, "seed=8")
    with pytest.raises(ConfigMismatch, match="another config"):
        run(cfg, 'prompt.template="a photo of {text}"')


def test_resume_after_kill(tmp_path, model_dir):
    """SIGKILL a CLI run after its first shard; the re-run redoes what is missing or damaged and
    ends byte-identical to an uninterrupted run."""
    in_dir = tmp_path / "in"
    keys = write_input(in_dir, [4, 16, 4])  # a long middle shard: the kill lands inside it
    cfg = write_config(tmp_path / "bt.toml", in_dir, model_dir, tmp_path / "out")
    run(cfg, f"output.dir={json.dumps(str(tmp_path / 'ref'))}")
    out = tmp_path / "out"
    kill_after_first_part(["shards", "backtranslate", str(cfg)], out / "_parts", cwd=REPO)
    assert not (out / "_parts" / "shard-000001.json").exists(), "the kill came too late to test anything"
    assert not (out / "index.json").exists(), "a killed run left a set that looks complete"
    # Damage the finished shard too: a tar whose sha256 no longer matches its part is not complete.
    tar0 = out / "shard-000000.tar"
    tar0.write_bytes(tar0.read_bytes()[:1000])
    index = run(cfg)
    assert index is not None and index["total"] + index["rejected"] == len(keys)
    assert tree_bytes(out, "*.tar") == tree_bytes(tmp_path / "ref", "*.tar")
    assert (out / "rejects.jsonl").read_bytes() == (tmp_path / "ref" / "rejects.jsonl").read_bytes()
    assert not list(out.glob("*.tmp")) and not list((out / "_parts").glob("*.tmp"))


def test_bad_model_paths(tmp_path, input_set, model_dir):
    in_dir, _ = input_set
    cfg = write_config(tmp_path / "bt.toml", in_dir, tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ModelError, match=r"^model\.path: model directory .*nowhere not found"):
        run(cfg)
    with pytest.raises(ModelError, match=r"^model\.path: .* is not a diffusers model directory"):
        run(cfg, f"model.path={json.dumps(str(tmp_path))}")
    with pytest.raises(ModelError, match=r"^model\.tiny_vae: model directory .*nope not found"):
        run(cfg, f"model.path={json.dumps(str(model_dir))}", "model.tiny_vae=/nope")
    # A damaged model directory: diffusers' own error, cut to one line naming the key.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"^model\.path: diffusers cannot load .*broken: [^\n]*$"):
        run(cfg, f"model.path={json.dumps(str(broken))}")
    # Through the command: one line on stderr, exit code 2, no traceback.
    res = cli("shards", "backtranslate", str(cfg))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"mie: error: model.path: model directory {tmp_path / 'nowhere'} not found "
        "(build the tiny one with `mie shards tiny-diffusion`)"]


def test_shipped_configs_load():
    for rel in ("shards/backtranslate.toml", "shards/toy/backtranslate.toml"):
        cfg = config_lib.load(BacktranslateConfig, REPO / "configs" / rel)
        assert cfg.model.steps <= 4 and cfg.model.guidance_scale <= 1.0  # few-step, no CFG by default
    with pytest.raises(config_lib.ConfigError, match=r"prompt\.template: must contain only the field \{text\}"):
        config_lib.load(BacktranslateConfig, REPO / "configs/shards/toy/backtranslate.toml", ['prompt.template="{x}"'])


def test_tiny_pipeline_is_deterministic_and_kept(tmp_path, model_dir):
    cfg = {"out": str(tmp_path / "again")}
    tiny_diffusion.main(config_lib.from_dict(tiny_diffusion.TinyDiffusionConfig, cfg), DistEnv())
    assert tree_bytes(tmp_path / "again", "**/*.safetensors") == tree_bytes(model_dir, "**/*.safetensors")
    stamp = (tmp_path / "again" / tiny_diffusion.STAMP).stat().st_mtime_ns
    tiny_diffusion.main(config_lib.from_dict(tiny_diffusion.TinyDiffusionConfig, cfg), DistEnv())  # kept as is
    assert (tmp_path / "again" / tiny_diffusion.STAMP).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="holds another tiny-diffusion build"):
        tiny_diffusion.main(config_lib.from_dict(tiny_diffusion.TinyDiffusionConfig, {**cfg, "seed": 1}), DistEnv())


def test_sample_seed():
    assert sample_seed("a-train-1", 0) == sample_seed("a-train-1", 0)
    assert len({sample_seed(k, s) for k in ("a-train-1", "a-train-2") for s in (0, 1)}) == 4
    assert 0 <= sample_seed("a-train-1", 0) < 2 ** 63


# ---------------------------------------------------------------------------------------- prompts


def cleaner(tokenizer, **cfg) -> PromptCleaner:
    return PromptCleaner(config_lib.from_dict(PromptConfig, cfg), tokenizer, 77)


@pytest.mark.parametrize("text, want", [
    ("RT @quenvik : look at the red plint http://t.co/x8Yz", "look at the red plint"),
    ("RT @a : RT @b: nested retweets", "nested retweets"),
    ("so happy for @Mardo_T today 😀🎉 !", "so happy for Mardo_T today!"),
    ("family 👨‍👩‍👧 and flag 🇺🇸 and keycap 1️⃣ and ☀️ sun", "family and flag and keycap 1 and sun"),
    ("#tbt to the blue tessle #weekend", "tbt to the blue tessle weekend"),
    ("Vorra &amp; Skeel ( again ) , www.example.org/x lol", "Vorra & Skeel (again), lol"),
    ("mail me at a@b.com", "mail me at a@b.com"),
])
def test_prompt_cleaning(tokenizer, text, want):
    assert cleaner(tokenizer)(text) == want


def test_prompt_cleaning_options(tokenizer):
    assert cleaner(tokenizer, mentions="drop", hashtags="drop")("via @user #news : the plint") == "via: the plint"
    assert cleaner(tokenizer, mentions="keep", hashtags="keep", strip_urls=False, detokenize=False)(
        "@user #news http://t.co/x , ok") == "@user #news http://t.co/x , ok"
    assert cleaner(tokenizer, template="a photo of {text}")("the red plint") == "a photo of the red plint"
    for only_noise in ("http://t.co/x", "RT @user :", "😀 🎉", "   "):
        assert cleaner(tokenizer)(only_noise) is None


def test_prompt_cut_to_text_encoder_length(tokenizer):
    long = " ".join(f"{WORDS[i % len(WORDS)]}{i}" for i in range(200))
    for template in ("{text}", "a news photo: {text}, high detail"):
        prompt = cleaner(tokenizer, template=template)(long)
        ids = tokenizer(prompt).input_ids  # BOS/EOS included
        assert 70 <= len(ids) <= 77, len(ids)
        head, _, tail = template.partition("{text}")
        assert prompt.startswith(head) and prompt.endswith(tail)
        assert long.startswith(prompt[len(head):len(prompt) - len(tail)])
    short = cleaner(tokenizer, max_tokens=5)(long)
    assert len(tokenizer(short, add_special_tokens=False).input_ids) == 5

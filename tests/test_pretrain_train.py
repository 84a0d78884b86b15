"""``mie pretrain`` / ``mie export`` end to end on the CPU with DeepSpeed for real: exact resume after SIGKILL,
2-rank ZeRO-2 under torchrun, export → load_backbone → AutoModel, NaN stop, bad configs.

DeepSpeed compiles its shm op once per machine (~1 min, cached in TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions); every later start takes seconds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch

from conftest import REPO, clean_env
from test_pretrain_fixtures import tiny_model, toy_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return toy_shards(tmp_path_factory.getbasetemp() / "pretrain_shards")


def write_config(path: Path, shards: dict[str, Path], out: Path, **over) -> Path:
    cfg = {
        "out": str(out), "max_steps": 8, "seed": 5, "model": tiny_model(),
        "data": {"sets": [{"dir": str(shards["enriched"]), "weight": 2.0}, {"dir": str(shards["plain"]), "weight": 1.0}],
                 "batch_size": 4, "workers": 1},
        "loss": {"views": {"itc": ["jpg", "gen"], "itm": ["jpg", "gen"], "entity": ["jpg"], "relation": ["gen"]}},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "engine": {"zero_stage": 2},
        "checkpoint": {"every_steps": 2, "every_minutes": 0, "keep_last": 2},
        "log": {"every_steps": 1},
    }
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    return path


def env() -> dict[str, str]:
    return clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")


def mie(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mie.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=REPO)


def metrics(out: Path) -> dict[int, dict]:
    """step → the last metrics row logged for it (a resumed run logs the steps after its checkpoint again)."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def losses(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("time", "samples_per_s")}


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(shards, tmp_path):
    steps = 16
    ref = mie("pretrain", str(write_config(tmp_path / "ref.toml", shards, tmp_path / "ref", max_steps=steps)))
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = metrics(tmp_path / "ref")
    assert sorted(want) == list(range(1, steps + 1))
    assert (tmp_path / "ref" / "loss_curve.png").stat().st_size > 1000

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.toml", shards, out, max_steps=steps)
    proc = subprocess.Popen([sys.executable, "-m", "mie.launch.cli", "pretrain", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env(), cwd=REPO, start_new_session=True)
    deadline = time.time() + 180
    try:
        while not (out / "metrics.jsonl").is_file() or max(metrics(out), default=0) < 5:
            assert proc.poll() is None, "the run ended before step 5"
            assert time.time() < deadline, "no step 5 in 180 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader worker
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(metrics(out))
    assert killed_at < steps, "the kill did not land mid-run"
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest in {f"step_{s:08d}" for s in range(4, killed_at + 1, 2)}

    resumed = mie("pretrain", str(cfg))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / latest}" in resumed.stdout
    got = metrics(out)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):  # bit-identical: losses, learning rate, gradient norm
        assert losses(got[step]) == losses(want[step]), step
    # keep_last = 2 complete checkpoints; `latest` names the final one.
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == [f"step_{steps - 2:08d}", f"step_{steps:08d}"]
    assert (out / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"
    meta = json.loads((out / "checkpoints" / f"step_{steps:08d}" / "mie_meta.json").read_text())
    assert meta["step"] == steps and meta["config"]["max_steps"] == steps and meta["git"]
    assert meta["data"]["sets"][0]["drawn"] > 0 and meta["losses"]["loss"] == want[steps]["loss"]


def test_torchrun_zero2_two_ranks_then_export_round_trip(shards, tmp_path, capsys):
    out = tmp_path / "run"
    # Time-based checkpoints (rank 0's clock, broadcast) every ~0 minutes: a save after every step.
    cfg = write_config(tmp_path / "tr.toml", shards, out, max_steps=4, **{
        "engine.grad_accum": 2, "checkpoint.every_steps": 0, "checkpoint.every_minutes": 1e-6, "checkpoint.keep_last": 1})
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mie.launch.cli", "pretrain", str(cfg)], capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "pretraining" in proc.stdout and "on 2 × cpu" in proc.stdout
    rows = metrics(out)
    assert sorted(rows) == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows.values())
    # global batch = 4 per rank × 2 micro-batches × 2 ranks
    ckpt = out / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004"]
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(p.name for p in ckpt.glob("mie_rank*")) == ["mie_rank00000.pt", "mie_rank00001.pt"]
    ranks = [torch.load(ckpt / f"mie_rank{r:05d}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["loader"]["slot_states"] != ranks[1]["loader"]["slot_states"]  # each rank its own stream

    exported = tmp_path / "backbone"
    ex = mie("export", str(out), "--out", str(exported))
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "SHA256SUMS", "config.json", "model.safetensors", "text"]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=exported, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len([p for p in exported.rglob("*") if p.is_file()]) - 1
    card = (exported / "README.md").read_text()
    assert f"| loss | {rows[4]['loss']:.4f} |" in card and "zero_stage = 2" in card and "step 4" in card

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from mie.pretrain import load_backbone

    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000004")
    model = load_backbone(exported)
    state = model.state_dict()
    assert set(state) == {k.removeprefix("model.") for k in trained}
    for k, v in trained.items():
        assert torch.equal(state[k.removeprefix("model.")], v.float()), k
    text = AutoModel.from_pretrained(str(exported / "text"))
    for k, v in text.state_dict().items():
        assert torch.equal(v, state[f"text.{k}"]), k
    tokenizer = AutoTokenizer.from_pretrained(str(exported / "text"))
    assert tokenizer("a red circle")["input_ids"][0] == tokenizer.cls_token_id
    vision = load_backbone(exported, part="vision")
    assert all(torch.equal(v, state[f"vision.{k}"]) for k, v in vision.state_dict().items())
    assert type(load_backbone(exported, part="text")).__name__ == type(text).__name__
    # The backbone runs: a fused [CLS] for a post and an image.
    ids = tokenizer(["the red circle"], return_tensors="pt")
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    fused = model(ids["input_ids"], ids["attention_mask"], images, torch.tensor([[[0.1, 0.1, 0.6, 0.6]]]),
                  torch.tensor([[True]]))
    assert fused["cls"].shape == (1, 32) and torch.isfinite(fused["cls"]).all()
    # The weights file is plain safetensors (no pickle anywhere in the export).
    assert set(load_file(str(exported / "model.safetensors"))) == set(state)
    assert not list(exported.rglob("*.bin")) and not list(exported.rglob("*.pt"))
    # Exporting again over it needs --force; a run without checkpoints is refused in one line.
    from mie.launch.cli import main

    assert main(["export", str(out), "--out", str(exported)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mie: error: ") and "\n" not in err and "not a finished pretraining run" in err


def test_nan_loss_stops_naming_step_samples_and_checkpoint(shards, tmp_path):
    out = tmp_path / "nan"
    # An absurd learning rate blows the weights up after the warmup step: the loss turns non-finite.
    cfg = write_config(tmp_path / "nan.toml", shards, out, max_steps=10, **{
        "optim.lr": 1e30, "checkpoint.every_steps": 1, "data.workers": 0})
    proc = mie("pretrain", str(cfg))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mie: error: step ") and "loss is not finite on this rank" in line
    step = int(line.split("step ")[1].split(":")[0])
    assert f"last good checkpoint: {out / 'checkpoints' / f'step_{step - 1:08d}'}" in line
    assert "batch samples: toynews-train-" in line
    assert max(metrics(out)) == step - 1  # the bad step never reached the weights, nor the log


def test_bad_configs_are_one_line_errors(shards, tmp_path, capsys):
    from mie.launch.cli import main

    cases = [
        ({"model.text": {"dir": str(tmp_path / "no-model")}}, "model.text.dir: " + str(tmp_path / "no-model") + " not found"),
        ({"data.sets": [{"dir": str(tmp_path / "no-shards")}]}, f"{tmp_path / 'no-shards'}: shard set not found"),
        ({"engine.zero_stage": 3}, "key 'engine.zero_stage': expected one of 0|1|2"),
        ({"loss.views.itm": ["jpg", "jpg"]}, "loss.views.itm: list one or both"),
        ({"optim.sheduler": "cosine"}, "unknown key 'optim.sheduler'"),
    ]
    for i, (over, message) in enumerate(cases):
        cfg = write_config(tmp_path / f"bad{i}.toml", shards, tmp_path / f"out{i}", **over)
        assert main(["pretrain", str(cfg)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mie: error: ") and "\n" not in err and message in err, (message, err)
    # resume=never over a run that has checkpoints would mix two runs: refused.
    ckpts = tmp_path / "out0" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000002")
    cfg = write_config(tmp_path / "never.toml", shards, tmp_path / "out0", **{"checkpoint.resume": "never"})
    assert main(["pretrain", str(cfg)]) == 2
    assert "holds checkpoints (latest step_00000002)" in capsys.readouterr().err
    # resume=auto into a run of another model: refused, naming the difference.
    tag = ckpts / "step_00000002"
    tag.mkdir()
    (tag / "mie_rank00000.pt").write_bytes(b"")
    from mie.launch import config as config_lib
    from mie.pretrain.model import ModelConfig

    other = config_lib.to_dict(config_lib.from_dict(ModelConfig, {**tiny_model(), "embed_dim": 8}))
    (tag / "mie_meta.json").write_text(json.dumps({"world_size": 1, "config": {"model": other}}))
    cfg = write_config(tmp_path / "auto.toml", shards, tmp_path / "out0")
    assert main(["pretrain", str(cfg)]) == 2
    assert "holds another model (model.embed_dim: 8 then, 16 now)" in capsys.readouterr().err
    assert "RANK" not in os.environ  # all refused before DeepSpeed was set up in this process

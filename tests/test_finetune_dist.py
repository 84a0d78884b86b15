"""``mie finetune`` under preemption, SIGKILL and torchrun: a run stopped by SIGUSR1 (exit 75) or killed
outright, then re-run, ends with the same results, predictions, curve and best weights as an uninterrupted
run; two ranks under torchrun fine-tune with a DeepSpeed engine (gloo, CPU).

Runs are subprocesses (``mie finetune``), like a user's or a scheduler's; tiny BERT and toy world as in
test_finetune.py. DeepSpeed compiles its shm op once per machine (~1 min, cached in TORCH_EXTENSIONS_DIR).
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

from conftest import REPO, clean_env
from mie.finetune import evaluate as ev
from mie.finetune import loop
from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.launch.preempt import EXIT_PREEMPTED
from mie.pretrain.checkpoint import ResumeError
from mie.shards import build as build_mod
from mie.shards import toy
from mie.shards.build import BuildConfig
from test_finetune import tiny_text_encoder

TRAIN, STEPS_PER_EPOCH, EPOCHS = 24, 12, 2  # batch 2: a signal lands well inside an epoch
TIMING = ("training_minutes", "total_minutes")
TWO_RANKS = {"engine.zero_stage": 2, "optim.batch_size": 1, "optim.ema": 0.9}  # the torchrun runs' settings  # wall clock: the only fields a resumed run may change


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ftdist")
    toy.main(toy.ToyConfig(out=str(root / "toy"), image_size=64, name_pool=60, twitter=[TRAIN, 8, 8], gmner=[0, 0, 0],
                           mnre=[0, 0, 0], jmere=[0, 0, 0], newsclippings=[0, 0, 0]), DistEnv())
    cfg = config_lib.from_dict(BuildConfig, {
        "source": {"format": "twitter", "name": "toytwitter", "root": str(root / "toy" / "twitter"),
                   "image_dir": str(root / "toy" / "images"), "require_images": True},
        "output": {"dir": str(root / "shards"), "samples_per_shard": 10, "max_image_side": 128}})
    build_mod.main(cfg, DistEnv())
    return {"root": root, "toy": root / "toy", "shards": root / "shards", "bert": tiny_text_encoder(root / "bert")}


def write_cfg(world, path: Path, out: Path, **over) -> Path:
    d = {"task": "twitter_ner", "out": str(out), "threads": 1, "backbone": {"path": str(world["bert"])},
         "data": {"shards": str(world["shards"])},
         "optim": {"epochs": EPOCHS, "batch_size": 2, "eval_batch_size": 4, "lr": 1e-3, "head_lr": 5e-3,
                   "log_every": 1, "patience": 0}}
    for key, value in over.items():
        node = d
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    config_lib.save(config_lib.from_dict(loop.FinetuneConfig, d), path)
    return path


def env() -> dict[str, str]:
    return clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")


def finetune(cfg: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mie.launch.cli", "finetune", "twitter_ner", str(cfg)],
                          capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)


def last_step(out: Path) -> int:
    """The highest step in metrics.jsonl so far (0 before the first)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(x)["step"] for x in lines if x.endswith("}")), default=0)


def interrupt(cfg: Path, out: Path, sig: signal.Signals, ready) -> int:
    """Start ``mie finetune``, wait until ``ready(out)``, send ``sig`` to its process group; its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "mie.launch.cli", "finetune", "twitter_ner", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=REPO,
                            start_new_session=True)
    deadline = time.time() + 120
    try:
        while not ready(out):
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the signal"
            assert time.time() < deadline, "the run did not get there in 120 s"
            time.sleep(0.005)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def outputs(out: Path) -> dict[str, object]:
    """What a finished run must reproduce: results (but the wall clock and the out path), the logged
    metrics (but their time), and predictions, curve and best weights byte for byte."""
    results = json.loads((out / "results.json").read_text())
    for k in TIMING:
        results.pop(k)
    results["config"].pop("out")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"results": results, "metrics": [{k: v for k, v in r.items() if k != "time"} for r in rows],
            **{name: (out / name).read_bytes() for name in ("predictions.jsonl", "curve.png", "best/model.safetensors")}}


@pytest.fixture(scope="module")
def reference(world) -> dict[str, object]:
    """The uninterrupted run every interrupted one is compared with."""
    out = world["root"] / "ref"
    r = finetune(write_cfg(world, world["root"] / "ref.toml", out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / loop.LAST).exists()  # a finished run keeps no resume state
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == EPOCHS * STEPS_PER_EPOCH and res["epochs_run"] == EPOCHS
    return outputs(out)


def test_sigusr1_checkpoints_mid_epoch_exits_75_and_the_rerun_matches(world, reference, tmp_path):
    out = tmp_path / "run"
    cfg = write_cfg(world, tmp_path / "run.toml", out)
    rc = interrupt(cfg, out, signal.SIGUSR1, lambda o: last_step(o) >= STEPS_PER_EPOCH + 3)
    assert rc == EXIT_PREEMPTED
    assert not (out / "results.json").exists()
    meta = json.loads((out / loop.LAST / "meta.json").read_text())
    state = meta["progress"]
    # caught at the next step boundary, inside epoch 2: a mid-epoch checkpoint
    assert state["epoch"] == 1 and 0 < state["batch"] < STEPS_PER_EPOCH, state
    assert state["step"] == STEPS_PER_EPOCH + state["batch"] and len(state["losses"]) == state["step"]
    assert meta["world_size"] == 1 and meta["engine"] == "torch"
    # the checkpoint names its world: another world size (or engine) is refused in one line
    two = loop.config_lib.load(loop.FinetuneConfig, cfg)
    with pytest.raises(ResumeError, match="written by 1 rank"):
        loop.find_last(out, two, DistEnv(0, 2, 0, "torchrun"), "deepspeed")

    r = finetune(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / loop.LAST}: epoch 2, batch {state['batch']}" in r.stdout
    assert outputs(out) == reference


def test_weight_average_is_part_of_the_checkpoint(world, reference, tmp_path):
    """`optim.ema`: best/ is kept with the averaged weights, and a run stopped mid-epoch by SIGUSR1 continues
    its average from last/, ending exactly like an uninterrupted run. No dev set: the last epoch is kept, so
    best/ holds the average as training ends, which a restarted average would change."""
    over = {"optim.ema": 0.9, "data.dev": ""}
    ref = tmp_path / "ref"
    r = finetune(write_cfg(world, tmp_path / "ref.toml", ref, **over))
    assert r.returncode == 0, r.stderr[-3000:]
    averaged = outputs(ref)
    assert averaged["best/model.safetensors"] != reference["best/model.safetensors"]
    out = tmp_path / "run"
    cfg = write_cfg(world, tmp_path / "run.toml", out, **over)
    assert interrupt(cfg, out, signal.SIGUSR1, lambda o: last_step(o) >= STEPS_PER_EPOCH + 3) == EXIT_PREEMPTED
    assert (out / loop.LAST / "ema.safetensors").is_file()
    r = finetune(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert outputs(out) == averaged


def test_sigkill_mid_epoch_then_rerun_matches(world, reference, tmp_path):
    out = tmp_path / "run"
    cfg = write_cfg(world, tmp_path / "run.toml", out)
    rc = interrupt(cfg, out, signal.SIGKILL,
                   lambda o: (o / loop.LAST / "meta.json").is_file() and last_step(o) >= STEPS_PER_EPOCH + 2)
    assert rc == -signal.SIGKILL
    assert not (out / "results.json").exists()
    assert json.loads((out / loop.LAST / "meta.json").read_text())["progress"]["epoch"] == 1
    r = finetune(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / loop.LAST}: epoch 2, batch 0" in r.stdout
    assert outputs(out) == reference


def test_checkpoint_of_another_config_is_set_aside(world, tmp_path):
    out = tmp_path / "run"
    first = write_cfg(world, tmp_path / "a.toml", out)
    rc = interrupt(first, out, signal.SIGUSR1, lambda o: last_step(o) >= 1)
    assert rc == EXIT_PREEMPTED and (out / loop.LAST / "meta.json").is_file()
    second = write_cfg(world, tmp_path / "b.toml", out, seed=3, **{"optim.max_steps": 3, "optim.epochs": 1})
    r = finetune(second)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by another config" in r.stderr and "resumed from" not in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 3 and res["steps"] == 3


def torchrun_args(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "mie.launch.cli", "finetune", "twitter_ner", str(cfg)]


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun ``launcher``'s worker of ``rank`` (read from /proc), or None before it starts."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for pid in children:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    except OSError:
        return None
    return None


@pytest.fixture(scope="module")
def two_ranks(world) -> tuple[Path, str]:
    """An uninterrupted 2-rank DeepSpeed run (ZeRO-2, batch 1 per rank: 12 steps per epoch, a weight average):
    (out, stdout)."""
    out = world["root"] / "tr-ref"
    cfg = write_cfg(world, world["root"] / "tr-ref.toml", out, **TWO_RANKS)
    proc = subprocess.run(torchrun_args(cfg), capture_output=True, text=True, timeout=240, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_torchrun_two_ranks_deepspeed(world, two_ranks):
    out, stdout = two_ranks
    assert "2 × cpu (deepspeed)" in stdout
    res = json.loads((out / "results.json").read_text())
    # each rank trains on half of every epoch: 24 samples / 2 ranks / batch 1 = 12 steps per epoch
    assert res["steps"] == EPOCHS * TRAIN // 2 and res["epochs_run"] == EPOCHS
    assert res["config"]["engine"]["zero_stage"] == 2
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8  # the two ranks' shares, gathered once
    scored = ev.evaluate("twitter_ner", out / "predictions.jsonl", world["toy"] / "twitter" / "test.txt", "test")
    assert scored["missing"] == 0 and {k: v for k, v in scored.items() if k in res["test"]} == res["test"]
    assert (out / "best" / "model.safetensors").is_file() and not (out / loop.LAST).exists()


def test_torchrun_signal_to_one_rank_checkpoints_both_and_the_rerun_matches(world, two_ranks, tmp_path):
    out = tmp_path / "run"
    cfg = write_cfg(world, tmp_path / "tr.toml", out, **TWO_RANKS)
    proc = subprocess.Popen(torchrun_args(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            cwd=REPO, start_new_session=True)
    deadline = time.time() + 180
    try:
        while last_step(out) < STEPS_PER_EPOCH + 2:
            assert proc.poll() is None, f"torchrun ended (exit {proc.returncode}) before the signal"
            assert time.time() < deadline, "no step 14 in 180 s"
            time.sleep(0.005)
        os.kill(rank_pid(proc.pid, 1), signal.SIGUSR1)  # rank 1 only: the ranks must agree to stop
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0  # torchrun reports its workers' exit 75 as a failure
    last = out / loop.LAST
    state = json.loads((last / "meta.json").read_text())["progress"]
    assert state["epoch"] == 1 and 0 < state["batch"] <= STEPS_PER_EPOCH, state
    assert sorted(p.name for p in last.glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]
    assert (last / "ema.safetensors").is_file()
    assert sorted(p.name for p in (last / "engine").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    again = subprocess.run(torchrun_args(cfg), capture_output=True, text=True, timeout=240, env=env(), cwd=REPO)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert f"resumed from {last}: epoch 2, batch {state['batch']}" in again.stdout
    assert outputs(out) == outputs(two_ranks[0])

"""Resuming pretraining on another world size: the loader hands out the rest of each epoch over the new ranks
and workers (no sample twice within an epoch, none skipped), and a 2-rank ZeRO-2 run under torchrun resumes
on 1 rank, then on 2 again, through DeepSpeed's universal checkpoint, with its LR schedule and Adam state.

Which samples were seen is read from the loader's own record (``data.record_keys``): one line per batch
handed out to the training loop, with each sample's key, set and epoch.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_shards
from mie.launch.dist import DistEnv
from test_pretrain_data import make_data, shards, tokenizer  # noqa: F401  (the module-scoped fixtures)
from test_pretrain_train import env, metrics, mie, write_config


def all_keys(shards) -> list[set[str]]:
    return [{s["__key__"] for s in read_shards(shards[name])} for name in ("enriched", "plain")]


def recorded(keys_dir: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(keys_dir.glob("keys-rank*.jsonl")) for line in p.read_text().splitlines()]


def seen_per_epoch(lines: list[dict]) -> dict[tuple[int, int], Counter]:
    """(set, epoch) → how many times each key was handed out."""
    seen: dict[tuple[int, int], Counter] = {}
    for line in lines:
        for key, s, e in zip(line["keys"], line["sets"], line["epochs"]):
            seen.setdefault((s, e), Counter())[key] += 1
    return seen


def assert_epochs_exact(seen: dict[tuple[int, int], Counter], keys: list[set[str]], epochs: int) -> None:
    for s, want in enumerate(keys):
        for e in range(epochs):
            got = seen.get((s, e), Counter())
            twice = sorted(k for k, n in got.items() if n > 1)
            assert not twice, f"set {s} epoch {e}: seen more than once: {twice[:5]}"
            missing = sorted(want - set(got))
            assert not missing, f"set {s} epoch {e}: never seen: {missing[:5]}"
            assert set(got) == want


# Worlds one after the other, named ranks x slots: (world size, data.workers, batches rank r takes before the
# next change: takes[r]; None: until every slot has finished epoch 1 of every set). Uneven takes leave some
# old slots an epoch ahead of others when the world changes.
CHAINS = {
    "2x1->1x2": [(2, 0, [4, 11]), (1, 2, None)],
    "1x2->3x1": [(1, 2, [17]), (3, 0, None)],
    "2x1->3x1->1x1": [(2, 0, [9, 3]), (3, 0, [2, 5, 1]), (1, 0, None)],
    # Changed again before any slot reached the epoch that the first change planned: the plan carries over.
    "2x1->1x1 briefly->3x1": [(2, 0, [9, 3]), (1, 0, [1]), (3, 0, None)],
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_another_world_size_sees_every_sample_of_the_epoch_once(shards, tokenizer, tmp_path, chain):
    sets = [(shards["enriched"], 2.0), (shards["plain"], 1.0)]
    keys_dir = tmp_path / "keys"
    states = None
    uneven = False  # some set's slots were in different epochs at a change of world
    for stage, (world, workers, takes) in enumerate(CHAINS[chain]):
        loaders = [make_data(tokenizer, sets, env=DistEnv(rank, world, 0, "torchrun"), workers=workers,
                             record_keys=str(keys_dir / str(stage))).loader(states) for rank in range(world)]
        if takes is not None:
            for rank, loader in enumerate(loaders):
                for _ in range(takes[rank % len(takes)]):
                    next(loader)
        else:
            for _ in range(500):
                if all(c["epoch"] >= 2 for ld in loaders for st in ld.states for c in st["cursors"]):
                    break
                for ld in loaders:
                    next(ld)
            else:
                pytest.fail("the last world never finished epoch 1")
        states = [json.loads(json.dumps(ld.state_dict())) for ld in loaders]  # plain data, as in a checkpoint
        for ld in loaders:
            ld.close()
        cursors = [st["cursors"] for s in states for st in s["slot_states"]]
        uneven |= takes is not None and any(len({c[i]["epoch"] for c in cursors}) > 1 for i in range(len(sets)))
    assert uneven, "the chain never changed the world while slots were in different epochs"
    lines = [ln for d in sorted(keys_dir.iterdir()) for ln in recorded(d)]
    assert {ln["world_size"] for ln in lines} == {w for w, _, _ in CHAINS[chain]}
    assert_epochs_exact(seen_per_epoch(lines), all_keys(shards), epochs=2)


def torchrun(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mie.launch.cli", "pretrain", str(cfg)],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)


def test_torchrun_two_ranks_resume_on_one_rank_then_on_two(shards, tmp_path):
    out, keys_dir = tmp_path / "run", tmp_path / "run" / "keys"
    ckpts = out / "checkpoints"
    # checkpoint.* may change between the runs (it is not a setting of the run): keep the handover checkpoints.
    common = {"data.record_keys": str(keys_dir), "optim.schedule": "constant", "checkpoint.every_steps": 100,
              "checkpoint.keep_last": 4}
    proc = torchrun(write_config(tmp_path / "a.toml", shards, out, max_steps=3, **common))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    saved = ckpts / "step_00000003"
    assert json.loads((saved / "mie_meta.json").read_text())["world_size"] == 2
    assert sorted((ln["rank"], ln["world_size"]) for ln in recorded(keys_dir)) == [(0, 2)] * 3 + [(1, 2)] * 3

    # The same run on one rank with 2 loader workers: resume=auto finds the 2-rank checkpoint by itself.
    one = mie("pretrain", str(write_config(tmp_path / "b.toml", shards, out, max_steps=12, **common,
                                           **{"data.workers": 2})), timeout=300)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-4000:]
    assert f"checkpoint {saved} was written by 2 ranks, this run has 1: resuming through DeepSpeed's universal " \
           "checkpoint" in one.stderr and "global batch 8 → 4" in one.stderr
    assert f"resumed from {saved} (step 3, 2 → 1 ranks)" in one.stdout and "on 1 × cpu" in one.stdout
    assert (saved / "universal" / "zero" / "optimizer_state.pt").is_file() and not (saved / ".universal-partial").exists()

    # And back on two ranks, one worker each, until epoch 0 of both shard sets is over.
    steps = 30
    proc = torchrun(write_config(tmp_path / "c.toml", shards, out, max_steps=steps, **common))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"resumed from {ckpts / 'step_00000012'} (step 12, 1 → 2 ranks)" in proc.stdout
    assert "was written by 1 rank, this run has 2" in proc.stderr

    rows = metrics(out)
    assert sorted(rows) == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())
    # The LR schedule went on (a fresh one would warm up from 0 again after each change) ...
    assert rows[3]["lr"] == rows[4]["lr"] == rows[13]["lr"] == 1e-3
    # ... and so did Adam: its step count in every checkpoint is the run's step, across both changes.
    tags = sorted(p.name for p in ckpts.glob("step_*"))
    assert tags == ["step_00000003", "step_00000012", f"step_{steps:08d}"]
    for tag in tags:
        zero = torch.load(ckpts / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
        adam = zero["optimizer_state_dict"]["base_optimizer_state"]["state"]
        assert {int(v["step"]) for v in adam.values()} == {int(tag.split("_")[1])}, tag
    for rank in range(2):
        last = torch.load(ckpts / tags[-1] / f"mie_rank{rank:05d}.pt", weights_only=True)["loader"]
        assert last["world_size"] == 2 and last["slots"] == 1
        assert all(c["epoch"] >= 1 for st in last["slot_states"] for c in st["cursors"]), "epoch 0 not finished"
    lines = recorded(keys_dir)
    worlds = Counter((ln["world_size"], ln["rank"], ln["slot"]) for ln in lines)
    assert worlds == {(2, 0, 0): 3 + steps - 12, (2, 1, 0): 3 + steps - 12, (1, 0, 0): 5, (1, 0, 1): 4}
    # Over the three worlds, epoch 0 of each shard set: every sample exactly once.
    assert_epochs_exact(seen_per_epoch(lines), all_keys(shards), epochs=1)

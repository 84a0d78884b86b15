"""Preemption: SIGUSR1/SIGTERM → checkpoint at the next step boundary, ``scontrol requeue``, exit 75, exact
resume; DataLoader workers shielded from the signals; wandb continues the same run id after a restart.

The pretraining cases run ``mie pretrain`` for real on the CPU (DeepSpeed, gloo), as tests/test_pretrain_train.py
does: one uninterrupted reference, one SIGUSR1 under a fake SLURM job then its resume, one SIGTERM during
setup, and one 2-rank torchrun (through launch/torchrun.sh) where only rank 1's process group gets SIGTERM.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from mie.launch.dist import DistEnv
from mie.launch.log import RunLogger, WandbConfig
from mie.launch.preempt import EXIT_PREEMPTED, Preemption
from test_pretrain_train import env, losses, metrics, write_config
from test_pretrain_fixtures import toy_shards

STEPS = 12
# Only the preemption (and the final step) writes checkpoints, so a checkpoint at a mid-run step is its doing.
NO_PERIODIC = {"checkpoint.every_steps": 0, "checkpoint.every_minutes": 0}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return toy_shards(tmp_path_factory.getbasetemp() / "pretrain_shards")


def fake_scontrol(tmp_path: Path, rc: int = 0) -> tuple[dict[str, str], Path]:
    """A ``scontrol`` first on PATH that appends its arguments to a file; the env to use it, and the file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "scontrol.calls"
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n" + (f"echo 'scontrol: error: no' >&2\nexit {rc}\n" if rc else ""))
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def start(args: list[str], **extra: str) -> subprocess.Popen:
    """A run in its own process group (the group is what SLURM signals: every process of the step)."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env(), **extra},
                            cwd=REPO, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not (out / "metrics.jsonl").is_file() or max(metrics(out), default=0) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no step {step} in {timeout} s"
        time.sleep(0.005)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def group_gone(pgid: int, timeout: float = 10) -> bool:
    """No process of the group is left (the DataLoader workers exited with the run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def assert_complete_checkpoint(out: Path, step: int, ranks: int) -> Path:
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert (out / "checkpoints" / "latest").read_text() == ckpt.name
    meta = json.loads((ckpt / "mie_meta.json").read_text())
    assert meta["step"] == step and meta["world_size"] == ranks
    for r in range(ranks):
        state = torch.load(ckpt / f"mie_rank{r:05d}.pt", weights_only=True)
        assert state["step"] == step and state["loader"]["slot_states"]
        assert (ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file()
    assert (ckpt / "mp_rank_00_model_states.pt").is_file()
    assert not list(out.rglob("*.tmp"))
    return ckpt


def test_sigusr1_under_slurm_checkpoints_requeues_then_resumes_exactly(shards, tmp_path):
    ref = start([sys.executable, "-m", "mie.launch.cli", "pretrain",
                 str(write_config(tmp_path / "ref.toml", shards, tmp_path / "ref", max_steps=STEPS, **NO_PERIODIC))])
    _, err = finish(ref, timeout=300)
    assert ref.returncode == 0, err[-3000:]
    want = metrics(tmp_path / "ref")

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.toml", shards, out, max_steps=STEPS, **NO_PERIODIC)
    path_env, calls = fake_scontrol(tmp_path)
    proc = start([sys.executable, "-m", "mie.launch.cli", "pretrain", str(cfg)], SLURM_JOB_ID="31337", **path_env)
    wait_for_step(proc, out, 3)
    os.killpg(proc.pid, signal.SIGUSR1)  # the training process and its DataLoader worker, as SLURM signals a step
    stdout, stderr = finish(proc)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert group_gone(proc.pid)
    stopped = max(metrics(out))
    assert 3 <= stopped < STEPS, "the signal did not land mid-run"
    ckpt = assert_complete_checkpoint(out, stopped, ranks=1)
    assert f"preempted by SIGUSR1 at step {stopped}; checkpoint {ckpt}" in stdout
    assert "requeued SLURM job 31337" in stdout
    assert calls.read_text().splitlines() == ["requeue 31337"]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [ckpt.name]

    # The requeued job: the same command, resume=auto.
    resumed = start([sys.executable, "-m", "mie.launch.cli", "pretrain", str(cfg)])
    stdout, stderr = finish(resumed, timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resumed from {ckpt}" in stdout
    got = metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # bit-identical: losses, learning rate, gradient norm
        assert losses(got[step]) == losses(want[step]), step


def test_sigterm_during_setup_exits_at_step_0_without_a_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.toml", shards, out, max_steps=STEPS)
    path_env, calls = fake_scontrol(tmp_path, rc=1)
    proc = start([sys.executable, "-m", "mie.launch.cli", "pretrain", str(cfg)], SLURM_JOB_ID="8", **path_env)
    # As soon as the handler is installed (the first line of pretrain's main), long before the engine exists.
    deadline = time.time() + 120
    while not caught(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.time() < deadline, "the handler was never installed"
        time.sleep(0.002)
    assert not (out / "config.toml").exists()  # still setting up
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = finish(proc)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "preempted by SIGTERM at step 0; nothing trained yet, no checkpoint" in stdout
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    # A failed requeue is reported, not fatal: the process still exits 75.
    assert calls.read_text().splitlines() == ["requeue 8"]
    assert "could not requeue SLURM job 8: scontrol: error: no" in stdout


def test_torchrun_two_ranks_agree_when_only_one_is_signalled(shards, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.toml", shards, out, max_steps=30, **NO_PERIODIC)
    proc = start(["bash", str(REPO / "launch" / "torchrun.sh"), "2", str(cfg)],
                 TORCHRUN=str(Path(sys.executable).parent / "torchrun"), SHUTDOWN_TIMEOUT="60")
    wait_for_step(proc, out, 2)
    workers = {rank_of(pid): pid for pid in children(proc.pid)}  # torchrun.sh execs torchrun: proc is the agent
    assert sorted(workers) == ["0", "1"]
    # Rank 1 only (rank 0 learns of it through the all-reduce), to its process group as torchrun forwards a
    # signal: its DataLoader worker gets SIGTERM too.
    os.killpg(workers["1"], signal.SIGTERM)
    stdout, stderr = finish(proc)
    assert proc.returncode == 1, stderr[-3000:]  # torchrun counts exit 75 as a failed child
    assert stderr.count(f"exitcode  : {EXIT_PREEMPTED}") == 2, stderr[-3000:]
    stopped = max(metrics(out))
    assert 2 <= stopped < 30
    ckpt = assert_complete_checkpoint(out, stopped, ranks=2)
    assert f"preempted by SIGTERM at step {stopped}; checkpoint {ckpt}" in stdout  # printed by rank 0
    assert all(group_gone(pid) for pid in workers.values())  # each worker's session, DataLoader workers included


def children(pid: int) -> list[int]:
    return [int(c) for task in os.listdir(f"/proc/{pid}/task")
            for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]


def rank_of(pid: int) -> str | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in environ if b"=" in kv).get("RANK")


def caught(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (``SigCgt`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


# ---- in-process: the Preemption object itself -------------------------------------------------------


def test_signal_sets_a_flag_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption(DistEnv()) as pre:
        assert not pre.requested() and pre.signal_name == "none"
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert pre.requested() and pre.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.fixture
def keep_handlers():
    """finish() leaves SIGUSR1/SIGTERM ignored for the exiting process: give this one its handlers back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_finish_requeues_under_slurm_and_exits_75(tmp_path, monkeypatch, keep_handlers):
    path_env, calls = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", path_env["PATH"])
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    lines, barriers = [], []
    with Preemption(DistEnv(1, 2)) as pre, pytest.raises(SystemExit) as exit_:
        pre.finish(lines.append, barrier=lambda: barriers.append(1))
    assert exit_.value.code == EXIT_PREEMPTED and not calls.exists()  # rank 1 does not requeue, but waits
    assert barriers == [1]
    with Preemption(DistEnv(0, 2)) as pre, pytest.raises(SystemExit) as exit_:
        pre.finish(lines.append, barrier=lambda: barriers.append(0))
    assert exit_.value.code == EXIT_PREEMPTED and calls.read_text() == "requeue 123\n"
    assert lines == ["requeued SLURM job 123"] and barriers == [1, 0]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol at all: logged, still 75
    with Preemption(DistEnv()) as pre, pytest.raises(SystemExit) as exit_:
        pre.finish(lines.append)
    assert exit_.value.code == EXIT_PREEMPTED and lines[-1].startswith("could not requeue SLURM job 123: ")
    # On the way out a late signal (torchrun stopping the ranks still tearing down) cannot kill the process.
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


class _Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(10**6))


def test_shielded_dataloader_workers_survive_the_signals():
    """SLURM signals every process of a step. An unshielded DataLoader worker dies of SIGTERM (torch installs a
    handler in it that re-raises the default action) and the training process fails; a shielded one serves on."""
    with Preemption(DistEnv()) as pre:
        loader = torch.utils.data.DataLoader(_Numbers(), batch_size=4, num_workers=1, multiprocessing_context="fork")
        with pre.shielded():
            it = iter(loader)
        assert next(it).tolist() == [0, 1, 2, 3]
        [worker] = it._workers
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(worker.pid, sig)
        worker.join(0.5)
        assert worker.is_alive() and next(it).tolist() == [4, 5, 6, 7]
        assert pre.received is None  # the worker's signals are not this process's
        del it  # the DataLoader shuts its worker down itself
        assert not worker.is_alive()

        it = iter(loader)  # unshielded
        assert next(it).tolist() == [0, 1, 2, 3]
        [worker] = it._workers
        # torch's SIGCHLD handler raises in this process, wherever it is: during the join or the next batch.
        with pytest.raises(RuntimeError, match="DataLoader worker .*(killed by signal|exited unexpectedly)"):
            os.kill(worker.pid, signal.SIGTERM)
            worker.join(5)
            for _ in range(10**6):
                next(it)
        del it
    # A signal that arrives at this thread while shielded is delivered when the shield is lifted. (Sent to the
    # thread: one sent to the process may be taken by another thread of the test process, which is not masked.)
    with Preemption(DistEnv()) as pre:
        with pre.shielded():
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            assert pre.received is None
        assert pre.received == signal.SIGTERM


def test_wandb_offline_restart_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = WandbConfig(mode="offline", project="mie-test")
    ids = []
    for step in (1, 2):  # a first start, then the requeued job on the same run directory
        log = RunLogger(DistEnv(), tmp_path, cfg, config={"a": 1})
        ids.append(log._wandb.id)
        log.metrics(step, {"loss": 1.0 / step})
        log.close()
    run_id = (tmp_path / "wandb_id").read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum() and ids == [run_id, run_id]
    # offline-run-<start time to the second>-<id>, one per start (wandb appends -1 when both fell in one second).
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", r.name) for r in runs), runs
    assert all((r / f"run-{run_id}.wandb").is_file() for r in runs)
    # An explicit run id wins over the file (and leaves it alone); other ranks never touch wandb.
    other = tmp_path / "other"
    log = RunLogger(DistEnv(), other, WandbConfig(mode="offline", project="mie-test", run_id="given123"))
    log.close()
    assert [r.name.rsplit("-", 1)[1] for r in (other / "wandb").glob("offline-run-*")] == ["given123"]
    assert not (other / "wandb_id").exists()
    RunLogger(DistEnv(1, 2), tmp_path / "rank1", cfg).close()
    assert not (tmp_path / "rank1").exists()

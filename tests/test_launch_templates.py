"""launch/slurm/*.sbatch and launch/torchrun.sh, rendered by real bash with fake SLURM variables.

Fake ``srun`` / ``torchrun`` / ``scontrol`` / ``mie`` executables first on PATH record their arguments and
environment; ``srun`` also runs its command once per task with that task's SLURM variables, as the real one
does. The recorded command lines are then checked with the real parsers: torchrun's own argument parser,
``launch/dist.py``'s ``world_info_from_env`` for the ranks, and mie's config loader for the overrides.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from mie.launch import config as config_lib
from mie.launch.dist import DistEnv, world_info_from_env

SLURM = REPO / "launch" / "slurm"
TEMPLATES = [SLURM / "shards.sbatch", SLURM / "pretrain.sbatch", SLURM / "finetune.sbatch", REPO / "launch" / "torchrun.sh"]

RECORDER = f"""#!{sys.executable}
import json, os, subprocess, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"prog": name, "argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
"""

FAKES = {
    "mie": RECORDER,
    "torchrun": RECORDER,
    "scontrol": RECORDER + """
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(os.environ["FAKE_HOSTS"].split()))
""",
    # Options first (--name=value only), then the command; one run of it per task, as srun would.
    "srun": RECORDER + """
args = sys.argv[1:]
opts = {}
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).lstrip("-").partition("=")
    opts[key] = value
nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
if "ntasks-per-node" in opts:
    per_node = int(opts["ntasks-per-node"])
else:
    per_node = int(os.environ.get("SLURM_NTASKS", "1")) // nodes
rc = 0
for task in range(nodes * per_node):
    env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task % per_node),
               SLURM_NODEID=str(task // per_node), SLURM_NTASKS=str(nodes * per_node),
               SLURM_STEP_NUM_TASKS=str(nodes * per_node))
    rc = max(rc, subprocess.run(args, env=env).returncode)
sys.exit(rc)
""",
}


@pytest.fixture
def fake(tmp_path):
    """Run a template with bash: ``fake(script, *args, **env) -> (CompletedProcess, records)``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def run(script: Path, *args: str, **env: str):
        log.write_text("")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "WANDB_", "HF_"))
                and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS", "VIRTUAL_ENV")}
        base.update(PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_LOG=str(log), HOME=str(tmp_path), **env)
        proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=base, timeout=60)
        records = [json.loads(line) for line in log.read_text().splitlines()]
        return proc, records

    return run


def calls(records: list[dict], prog: str) -> list[dict]:
    return [r for r in records if r["prog"] == prog]


def directives(script: Path) -> list[str]:
    """The active ``#SBATCH`` options of a template (``##SBATCH`` lines are commented out)."""
    return [m.group(1) for m in re.finditer(r"^#SBATCH (\S+)", script.read_text(), re.M)]


def torchrun_args(argv: list[str]):
    """torchrun's own parser: an option it does not know fails here."""
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv)


@pytest.mark.parametrize("script", TEMPLATES, ids=lambda p: p.name)
def test_templates_are_valid_bash_and_commented(script):
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    assert text.startswith("#!") and os.access(script, os.X_OK)
    assert sum(line.startswith("#") and not line.startswith("#SBATCH") for line in text.splitlines()) >= 15


def test_shards_array_tasks_fold_into_one_world(fake):
    script = SLURM / "shards.sbatch"
    assert {"--requeue", "--ntasks=1", "--gpus-per-task=1"} <= set(directives(script))
    config = str(REPO / "configs" / "shards" / "pseudolabel.toml")
    over = ["input=/data/in/train", "output=/data/out/train"]
    envs = []
    # --array=10-13 (first index 10), two srun tasks per array task: 8 ranks.
    for task in range(10, 14):
        proc, records = fake(script, "pseudolabel", config, *over, SLURM_JOB_ID=str(900 + task), SLURM_ARRAY_JOB_ID="900",
                             SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="10", SLURM_ARRAY_TASK_MAX="13",
                             SLURM_ARRAY_TASK_COUNT="4", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
                             SLURM_CPUS_PER_TASK="8")
        assert proc.returncode == 0, proc.stderr
        assert f"array task {task} of 4 (first 10), 2 task(s) each" in proc.stdout
        [srun] = calls(records, "srun")
        assert srun["argv"] == ["mie", "shards", "pseudolabel", config, *over]
        mies = calls(records, "mie")
        assert [r["argv"] for r in mies] == [["shards", "pseudolabel", config, *over]] * 2
        for r in mies:
            assert r["env"]["HF_HUB_OFFLINE"] == "1" and r["env"]["YOLO_OFFLINE"] == "1"
            assert r["env"]["SRUN_CPUS_PER_TASK"] == "8" and r["env"]["OMP_NUM_THREADS"] == "8"
            envs.append(world_info_from_env(r["env"], use_array=True))
    assert sorted(envs, key=lambda e: e.rank) == [DistEnv(r, 8, r % 2, "slurm-array") for r in range(8)]
    # The stages split shards i % world == rank: every shard of a set is written by exactly one task.
    shards = 37
    owned = sorted(i for e in envs for i in range(e.rank, shards, e.world_size))
    assert owned == list(range(shards))
    # The overrides are real keys of the stage's config.
    from mie.shards.pseudolabel import PseudolabelConfig

    cfg = config_lib.load(PseudolabelConfig, config, over)
    assert cfg.input == "/data/in/train" and cfg.output == "/data/out/train"


def test_shards_bad_usage_is_one_line(fake):
    script = SLURM / "shards.sbatch"
    proc, records = fake(script, "detect", "x.toml")
    assert proc.returncode == 2 and "expected build, backtranslate or pseudolabel" in proc.stderr and not records
    proc, records = fake(script, "build")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: sbatch --array") and not records
    # Not an array: a warning, then the whole set in one job (world of srun's tasks).
    proc, records = fake(script, "build", "c.toml", SLURM_JOB_ID="5", SLURM_NTASKS="1")
    assert proc.returncode == 0 and "not an array job" in proc.stderr
    [r] = calls(records, "mie")
    assert world_info_from_env(r["env"], use_array=True) == DistEnv(0, 1, 0, "slurm")


PRETRAIN_ENV = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
                    SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="64", SLURM_RESTART_COUNT="1", FAKE_HOSTS="gpu01 gpu02")


def test_pretrain_srun_torchrun_rendezvous(fake):
    script = SLURM / "pretrain.sbatch"
    assert {"--signal=USR1@120", "--requeue", "--open-mode=append", "--ntasks-per-node=1"} <= set(directives(script))
    config = str(REPO / "configs" / "pretrain" / "base.toml")
    proc, records = fake(script, config, "out=/scratch/u/base", "max_steps=10", **PRETRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert "job 4242 (restart 1), 2 node(s) × 4 GPU(s), torchrun, rendezvous gpu01:24242" in proc.stdout
    assert [r["argv"] for r in calls(records, "scontrol")] == [["show", "hostnames", "gpu[01-02]"]]
    [srun] = calls(records, "srun")
    assert srun["argv"][:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "torchrun"]
    agents = calls(records, "torchrun")
    assert len(agents) == 2 and sorted(r["env"]["SLURM_NODEID"] for r in agents) == ["0", "1"]
    for agent in agents:
        assert agent["argv"] == agents[0]["argv"]  # the same line on every node: c10d assigns node ranks
        a = torchrun_args(agent["argv"])
        assert (a.nnodes, a.nproc_per_node, a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id) == (
            "2", "4", "c10d", "gpu01:24242", "4242")
        assert a.max_restarts == 0 and a.shutdown_timeout == 100 and not a.standalone
        assert "SIGUSR1" in a.signals_to_handle.split(",") and "SIGTERM" in a.signals_to_handle.split(",")
        assert a.module and a.training_script == "mie.launch.cli"
        assert a.training_script_args == ["pretrain", config, "checkpoint.resume=auto", "out=/scratch/u/base", "max_steps=10"]
        env = agent["env"]
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu01", "24242")
        assert env["HF_HUB_OFFLINE"] == "1" and env["WANDB_MODE"] == "offline" and env["SRUN_CPUS_PER_TASK"] == "64"
    from mie.pretrain.train import PretrainConfig

    cfg = config_lib.load(PretrainConfig, config, a.training_script_args[2:])
    assert cfg.checkpoint.resume == "auto" and cfg.out == "/scratch/u/base" and cfg.max_steps == 10
    # The user's overrides come after resume=auto, so they win.
    proc, records = fake(script, config, "checkpoint.resume=never", **PRETRAIN_ENV, MASTER_PORT="29999", GPUS_PER_NODE="2")
    [agent, _] = calls(records, "torchrun")
    a = torchrun_args(agent["argv"])
    assert a.rdzv_endpoint == "gpu01:29999" and a.nproc_per_node == "2"
    assert config_lib.load(PretrainConfig, config, a.training_script_args[2:]).checkpoint.resume == "never"


def test_pretrain_srun_native_ranks(fake):
    script = SLURM / "pretrain.sbatch"
    config = "configs/pretrain/base.toml"
    proc, records = fake(script, config, "seed=3", LAUNCHER="srun", SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4",
                         **PRETRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert not calls(records, "torchrun")
    [srun] = calls(records, "srun")
    assert srun["argv"] == ["--kill-on-bad-exit=1", "mie", "pretrain", config, "checkpoint.resume=auto", "seed=3"]
    workers = calls(records, "mie")
    assert all(r["argv"] == ["pretrain", config, "checkpoint.resume=auto", "seed=3"] for r in workers)
    ranks = sorted((world_info_from_env(r["env"]) for r in workers), key=lambda e: e.rank)
    assert ranks == [DistEnv(r, 8, r % 4, "slurm") for r in range(8)]
    assert {(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in workers} == {("gpu01", "24242")}
    proc, records = fake(script, config, LAUNCHER="mpirun", **PRETRAIN_ENV)
    assert proc.returncode == 2 and "expected torchrun or srun" in proc.stderr and not calls(records, "srun")
    proc, records = fake(script, **PRETRAIN_ENV)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: sbatch") and not records
    proc, records = fake(script, config, **{**PRETRAIN_ENV, "FAKE_HOSTS": ""})
    assert proc.returncode == 1 and "gave no host" in proc.stderr and not calls(records, "srun")


def test_finetune_one_node_ranks_and_resume(fake):
    script = SLURM / "finetune.sbatch"
    assert {"--signal=USR1@120", "--requeue", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1"} <= set(
        directives(script))
    config = str(REPO / "configs" / "finetune" / "gmner.toml")
    over = ["seed=2", "out=/scratch/u/ft"]
    proc, records = fake(script, "gmner", config, *over, SLURM_JOB_ID="77", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
                         SLURM_CPUS_PER_TASK="4")
    assert proc.returncode == 0, proc.stderr
    [srun] = calls(records, "srun")
    assert srun["argv"] == ["--kill-on-bad-exit=1", "mie", "finetune", "gmner", config, "resume=auto", *over]
    runs = calls(records, "mie")
    assert all(r["argv"] == ["finetune", "gmner", config, "resume=auto", *over] for r in runs)
    ranks = sorted((world_info_from_env(r["env"]) for r in runs), key=lambda e: e.rank)
    assert ranks == [DistEnv(0, 2, 0, "slurm"), DistEnv(1, 2, 1, "slurm")]
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert {(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in runs} == {(host, "20077")}
    assert all(r["env"]["SRUN_CPUS_PER_TASK"] == "4" and r["env"]["HF_HUB_OFFLINE"] == "1" for r in runs)
    # mie's own command-line parser takes the line (TASK is one of its choices), and the overrides are real keys.
    from mie.finetune.loop import FinetuneConfig
    from mie.launch.cli import build_parser

    args = build_parser().parse_args(runs[0]["argv"])
    assert args.task == "gmner" and args.args == [config, "resume=auto", *over]
    cfg = config_lib.load(FinetuneConfig, config, [*args.args[1:], "task=gmner"])
    assert cfg.resume == "auto" and cfg.seed == 2 and cfg.out == "/scratch/u/ft"
    proc, records = fake(script, "gmner")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: sbatch") and not records


def test_torchrun_sh_one_node(fake):
    script = REPO / "launch" / "torchrun.sh"
    proc, records = fake(script, "2", "configs/pretrain/toy.toml", "out=runs/x", "max_steps=5")
    assert proc.returncode == 0, proc.stderr
    [run] = calls(records, "torchrun")
    a = torchrun_args(run["argv"])
    assert a.standalone and a.nnodes == "1" and a.nproc_per_node == "2" and a.max_restarts == 0
    assert "SIGUSR1" in a.signals_to_handle.split(",") and a.shutdown_timeout == 110
    assert a.module and a.training_script == "mie.launch.cli"
    assert a.training_script_args == ["pretrain", "configs/pretrain/toy.toml", "out=runs/x", "max_steps=5"]
    assert run["env"]["OMP_NUM_THREADS"] == "1"
    for bad in ([], ["2"], ["two", "c.toml"], ["0", "c.toml"]):
        proc, records = fake(script, *bad)
        assert proc.returncode == 2 and proc.stderr.startswith("usage:") and not records, bad

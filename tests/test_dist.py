"""``world_info_from_env``: torchrun, srun, SLURM arrays, a single process, and bad values."""
from __future__ import annotations

import pytest

from mie.launch.dist import DistEnv, world_info_from_env


def test_single_process_when_no_launcher():
    env = world_info_from_env({})
    assert env == DistEnv(rank=0, world_size=1, local_rank=0, launcher="single")
    assert env.is_main
    assert world_info_from_env({"PATH": "/bin", "SLURM_JOB_ID": "12"}, use_array=True).launcher == "single"


def test_torchrun():
    env = world_info_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, launcher="torchrun")
    assert not env.is_main
    assert world_info_from_env({"RANK": "0", "WORLD_SIZE": "2"}).local_rank == 0  # LOCAL_RANK optional


def test_torchrun_under_srun_and_in_an_array_keeps_torchrun_ranks():
    environ = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
               "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
               "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}
    for use_array in (False, True):
        assert world_info_from_env(environ, use_array=use_array) == DistEnv(5, 8, 1, "torchrun")


def test_slurm_srun():
    env = world_info_from_env({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_JOB_ID": "9"})
    assert env == DistEnv(rank=6, world_size=8, local_rank=2, launcher="slurm")


def test_slurm_array_counts_as_one_world():
    # Array tasks 10..13 (min 10), this is task 12, one process each: rank 2 of 4.
    environ = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
               "SLURM_ARRAY_JOB_ID": "77"}
    assert world_info_from_env(environ, use_array=True) == DistEnv(2, 4, 0, "slurm-array")
    # Without use_array (training stages) the array is ignored: one single process.
    assert world_info_from_env(environ, use_array=False) == DistEnv(0, 1, 0, "single")


def test_slurm_array_of_srun_jobs():
    # Task 3 of an array of 4 (min 0), each running srun with 2 tasks; this is task 1 → rank 3*2+1 of 8.
    environ = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}
    assert world_info_from_env(environ, use_array=True) == DistEnv(7, 8, 1, "slurm-array")
    assert world_info_from_env(environ, use_array=False) == DistEnv(1, 2, 1, "slurm")


def test_slurm_array_min_defaults_to_zero():
    environ = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert world_info_from_env(environ, use_array=True) == DistEnv(1, 3, 0, "slurm-array")


def test_every_array_task_gets_a_distinct_rank():
    ranks = set()
    for task in range(5, 8):
        for proc in range(2):
            e = world_info_from_env({"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3",
                                     "SLURM_ARRAY_TASK_MIN": "5", "SLURM_PROCID": str(proc), "SLURM_NTASKS": "2"},
                                    use_array=True)
            assert e.world_size == 6
            ranks.add(e.rank)
    assert ranks == set(range(6))


def test_reads_os_environ_by_default(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert world_info_from_env() == DistEnv(1, 2, 0, "torchrun")


@pytest.mark.parametrize("environ, use_array, needle", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, False, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, False, "LOCAL_RANK"),
    ({"RANK": "", "WORLD_SIZE": "2"}, False, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, False, "outside"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, False, "outside"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"}, False, "SLURM_NTASKS"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, False, "outside"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, True, "SLURM_ARRAY_TASK_COUNT"),          # count missing
    ({"SLURM_ARRAY_TASK_ID": "a", "SLURM_ARRAY_TASK_COUNT": "2"}, True, "SLURM_ARRAY_TASK_ID"),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2"}, True, "outside"),  # id past count, min 0
])
def test_bad_values_raise_value_error(environ, use_array, needle):
    with pytest.raises(ValueError) as e:
        world_info_from_env(environ, use_array=use_array)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_reports_bad_launcher_env(tmp_path):
    from conftest import clean_env, cli, make_twitter_corpus, write_build_config

    root, _ = make_twitter_corpus(tmp_path / "c", {"train": 1}, images=False)
    cfg = write_build_config(tmp_path / "b.toml", {"format": "twitter", "root": str(root), "splits": ["train"]},
                             {"dir": str(tmp_path / "out")})
    proc = cli("shards", "build", str(cfg), env=clean_env(RANK="zero", WORLD_SIZE="2"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mie: error: ") and "RANK" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()

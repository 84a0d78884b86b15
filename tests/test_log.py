"""launch/log.py: metrics.jsonl on rank 0 only, and wandb offline with no network."""
from __future__ import annotations

import json

from mie.launch.dist import DistEnv
from mie.launch.log import RunLogger, WandbConfig, progress


def test_metrics_jsonl_on_rank0_only(tmp_path, capsys):
    main, other = RunLogger(DistEnv(0, 2), tmp_path / "a"), RunLogger(DistEnv(1, 2), tmp_path / "b")
    for log in (main, other):
        log.info("hello")
        log.metrics(3, {"loss": 1.5})
        log.close()
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 3 and rows[0]["loss"] == 1.5
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    assert capsys.readouterr().out.count("hello") == 1


def test_progress_is_silent_off_rank0(capsys):
    assert list(progress(range(3), DistEnv(1, 2), "x")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLogger(DistEnv(), tmp_path, WandbConfig(mode="offline", project="mie-test"), config={"a": 1})
    log.metrics(1, {"loss": 2.0})
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))

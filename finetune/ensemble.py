"""``mie ensemble RUN RUN... --out DIR``: predict with several finished fine-tuning runs at once.

Each RUN is a finished ``mie finetune`` run directory of one task, scored on the same split of the same
shards: typically one config trained with other seeds. Every member predicts the split with its best
checkpoint, from the inputs its own config builds (markers, modality, ...); the ensemble then takes, for
each example, the label with the highest mean probability over the members. ``DIR`` gets
``predictions.jsonl`` (the ``mie evaluate`` format) and ``results.json``: the members (run, seed, own
scores, training minutes), the ensemble's scores by the official rules, and ``training_minutes``, the
members' sum (they train one after another on the same machine).

Only a task whose head gives label probabilities per example (``scores`` and ``decode``) can be
ensembled: MNRE. A tagging head with a CRF decodes whole sequences, whose scores do not average.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mie.finetune import loop, metrics
from mie.finetune.backbone import VIEWS
from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.launch.errors import UserError
from mie.launch.log import RunLogger


class EnsembleError(UserError):
    """A run that cannot be a member (unfinished, another task or split, no label probabilities)."""


def member_config(run: Path, split: str) -> loop.FinetuneConfig:
    """The config of ``run``, once it is known to be a finished run that can be a member."""
    if not (run / "results.json").is_file():
        raise EnsembleError(f"{run}: not a finished `mie finetune` run (no results.json)")
    cfg = config_lib.load(loop.FinetuneConfig, run / "config.toml")
    if not hasattr(importlib.import_module(f"mie.finetune.tasks.{cfg.task}").Head, "scores"):
        raise EnsembleError(f"{run}: {cfg.task} predictions cannot be ensembled (its head gives no label "
                            "probabilities per example; mnre does)")
    if not getattr(cfg.data, split):
        raise EnsembleError(f"{run}: its config has no {split} split (data.{split} is empty)")
    return cfg


def member_scores(run: Path, split: str, batch_size: int, device: torch.device, log: RunLogger,
                  ) -> tuple[dict[str, Any], Any, list[loop.Example], dict[str, torch.Tensor]]:
    """One member's results, task, examples of ``split`` and label probabilities per example id."""
    cfg = member_config(run, split)
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    task_module = importlib.import_module(f"mie.finetune.tasks.{cfg.task}")
    split_name = getattr(cfg.data, split)
    meta = json.loads((run / "best" / "meta.json").read_text(encoding="utf-8"))
    task = task_module.Task(getattr(cfg, cfg.task), [], state=meta["task_state"])
    examples = loop.load_split(Path(cfg.data.shards) / split_name, VIEWS[cfg.modality], cfg.data.limit, log)
    for ex in examples:
        task.prepare(ex)
    model, collate_fn = loop.build_model(cfg, task, device)
    loop.load_checkpoint(model, run / "best")
    scores = loop.head_outputs(model, examples, collate_fn, batch_size, device, DistEnv(), f"{run.name} {split}",
                               output="scores")
    return {"cfg": cfg, "results": results, "task_state": task.state()}, (task, model.head), examples, scores


def main(runs: list[Path], out: Path, split: str = "test", batch_size: int = 64, device: str = "cpu") -> dict[str, Any]:
    """Predict ``split`` with the mean label probabilities of ``runs``; write and return the results."""
    if split not in ("dev", "test"):
        raise EnsembleError(f"--split: expected dev or test, got {split!r}")
    tasks = {member_config(run, split).task for run in runs}  # every run checked before any predicts
    if len(tasks) > 1:
        raise EnsembleError(f"the runs are of different tasks ({', '.join(sorted(tasks))}): one task per ensemble")
    log = RunLogger(DistEnv())
    on = torch.device(device)
    first: dict[str, Any] | None = None
    members, total = [], None
    for run in runs:
        info, (task, head), examples, scores = member_scores(run, split, batch_size, on, log)
        ids = [ex.id for ex in examples]
        if first is None:
            first = {**info, "task": task, "head": head, "examples": examples, "ids": ids}
            total = {i: torch.zeros_like(scores[i]) for i in ids}
        elif ids != first["ids"]:
            raise EnsembleError(f"{run}: its {split} split holds other examples than {runs[0]}'s")
        elif info["task_state"] != first["task_state"]:
            raise EnsembleError(f"{run}: its labels differ from {runs[0]}'s")
        for i in ids:
            total[i] += scores[i]
        res = info["results"]
        members.append({"run": str(run), "seed": res["seed"], "best_epoch": res["best_epoch"],
                        "training_minutes": res["training_minutes"], split: res[split]})
    assert first is not None and total is not None
    task, head, examples = first["task"], first["head"], first["examples"]
    mean = torch.stack([total[ex.id] for ex in examples]) / len(runs)
    rows = {ex.id: {"id": task.row_id(ex), **row} for ex, row in zip(examples, head.decode(mean))}
    name = first["cfg"].task
    results = {"task": name, "split": split, "members": members,
               "training_minutes": round(sum(m["training_minutes"] for m in members), 3),
               split: metrics.score(name, {ex.id: ex.labels for ex in examples}, rows)}
    out.mkdir(parents=True, exist_ok=True)
    loop._write_jsonl(out / "predictions.jsonl", [rows[ex.id] for ex in examples])
    loop._write_json(out / "results.json", results)
    log.info(f"ensemble of {len(runs)}: {split} {json.dumps(results[split])} → {out}")
    return results


def cli(argv: list[str]) -> dict[str, Any]:
    """``mie ensemble``: parse ``argv``, predict, print the results as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="mie ensemble", description="Predict with the mean label probabilities "
                                     "of finished fine-tuning runs (e.g. one config, several seeds).")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="finished `mie finetune` run directories")
    parser.add_argument("--out", required=True, type=Path, help="directory for predictions.jsonl and results.json")
    parser.add_argument("--split", default="test", help="dev or test (default test)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    results = main(args.runs, args.out, args.split, args.batch_size, args.device)
    print(json.dumps(results, indent=1), file=sys.stdout)
    return results

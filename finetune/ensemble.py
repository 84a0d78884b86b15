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


def member_scores(run: Path, cfg: loop.FinetuneConfig, split: str, batch_size: int, device: torch.device,
                  log: RunLogger) -> tuple[Any, Any, list[loop.Example], torch.Tensor]:
    """One member's task, head, examples of ``split`` and label probabilities (one row per example)."""
    meta = json.loads((run / "best" / "meta.json").read_text(encoding="utf-8"))
    task = importlib.import_module(f"mie.finetune.tasks.{cfg.task}").Task(getattr(cfg, cfg.task), [],
                                                                         state=meta["task_state"])
    examples = loop.load_split(Path(cfg.data.shards) / getattr(cfg.data, split), VIEWS[cfg.modality],
                               cfg.data.limit, log)
    for ex in examples:
        task.prepare(ex)
    model, collate_fn = loop.build_model(cfg, task, device)
    loop.load_checkpoint(model, run / "best")
    scores = loop.head_outputs(model, examples, collate_fn, batch_size, device, DistEnv(), f"{run.name} {split}",
                               output="scores")
    return task, model.head, examples, torch.stack([scores[ex.id] for ex in examples])


def main(runs: list[Path], out: Path, split: str = "test", batch_size: int = 64, device: str = "cpu") -> dict[str, Any]:
    """Predict ``split`` with the mean label probabilities of ``runs``; write and return the results."""
    if split not in ("dev", "test"):
        raise EnsembleError(f"--split: expected dev or test, got {split!r}")
    configs = [member_config(run, split) for run in runs]  # every run checked before any predicts
    tasks = {cfg.task for cfg in configs}
    if len(tasks) > 1:
        raise EnsembleError(f"the runs are of different tasks ({', '.join(sorted(tasks))}): one task per ensemble")
    log = RunLogger(DistEnv())
    first: tuple[Any, Any, list[loop.Example]] | None = None
    members, total = [], None
    for run, cfg in zip(runs, configs):
        task, head, examples, probs = member_scores(run, cfg, split, batch_size, torch.device(device), log)
        if first is None:
            first = task, head, examples
        elif [ex.id for ex in examples] != [ex.id for ex in first[2]]:
            raise EnsembleError(f"{run}: its {split} split holds other examples than {runs[0]}'s")
        elif task.state() != first[0].state():
            raise EnsembleError(f"{run}: its labels differ from {runs[0]}'s")
        total = probs if total is None else total + probs
        res = json.loads((run / "results.json").read_text(encoding="utf-8"))
        members.append({"run": str(run), "seed": res["seed"], "best_epoch": res["best_epoch"],
                        "training_minutes": res["training_minutes"], split: res[split]})
    assert first is not None and total is not None
    task, head, examples = first
    rows = {ex.id: {"id": task.row_id(ex), **row} for ex, row in zip(examples, head.decode(total / len(runs)))}
    name = configs[0].task
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

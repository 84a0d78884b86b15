"""Run logging: stdout, ``metrics.jsonl`` and optional wandb, plus rank-0 progress bars.

wandb is never required: ``mode = "disabled"`` (the default) does not import it, ``offline`` writes
a local run directory that ``wandb sync`` can upload later. A run directory keeps its wandb run id in
``<out_dir>/wandb_id`` (written on the first start), so a restarted or requeued job continues the same
wandb run (``resume="allow"``) instead of starting a new one.
"""
from __future__ import annotations

import json
import secrets
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar

from tqdm import tqdm

from mie.launch.dist import DistEnv

T = TypeVar("T")


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "mie"
    entity: str = ""
    name: str = ""
    run_id: str = ""  # a wandb run id to continue; empty: the one in <out>/wandb_id, created on the first start
    tags: list[str] = field(default_factory=list)


class RunLogger:
    """Prints on rank 0 and appends metrics to ``<out_dir>/metrics.jsonl``; mirrors them to wandb."""

    def __init__(self, env: DistEnv, out_dir: str | Path | None = None, wandb: WandbConfig | None = None,
                 config: dict[str, Any] | None = None):
        self.env = env
        self.active = env.is_main
        self.metrics_path = Path(out_dir) / "metrics.jsonl" if out_dir is not None else None
        self._wandb = None
        self._t0 = time.time()
        if self.active and wandb is not None and wandb.mode != "disabled":
            import wandb as wandb_lib  # only imported when asked for

            run_id = wandb.run_id or (wandb_run_id(Path(out_dir)) if out_dir is not None else "")
            self._wandb = wandb_lib.init(
                project=wandb.project, entity=wandb.entity or None, name=wandb.name or None,
                id=run_id or None, resume="allow" if run_id else None, tags=wandb.tags,
                mode=wandb.mode, dir=str(out_dir) if out_dir else None, config=config,
            )

    def info(self, msg: str) -> None:
        """A line on stdout, from rank 0 only."""
        if self.active:
            tqdm.write(f"[mie {time.time() - self._t0:7.1f}s] {msg}", file=sys.stdout)

    def warn(self, msg: str) -> None:
        """A line on stderr, from every rank (a problem on any rank matters)."""
        prefix = f"[mie rank {self.env.rank}]" if self.env.world_size > 1 else "[mie]"
        tqdm.write(f"{prefix} warning: {msg}", file=sys.stderr)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        """Record metrics at ``step``: one JSON line and, when enabled, a wandb point."""
        if not self.active:
            return
        row = {"step": step, "time": round(time.time() - self._t0, 3), **values}
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


WANDB_ID = "wandb_id"


def wandb_run_id(out_dir: Path) -> str:
    """The wandb run id of the run directory ``out_dir``: read from ``out_dir/wandb_id``, or made up and
    written there (atomically) on the first start."""
    path = out_dir / WANDB_ID
    if path.is_file():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    from mie.shards.writer import atomic_write_bytes  # here, not at the top: it imports webdataset

    # wandb's own id alphabet and length (its generator is not public API).
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (run_id + "\n").encode())
    return run_id


def progress(iterable: Iterable[T], env: DistEnv, desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """A tqdm bar on rank 0; other ranks iterate silently."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not env.is_main, dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr)

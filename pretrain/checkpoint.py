"""Checkpoints: DeepSpeed's own files plus what an exact resume needs, written so a kill never leaves a
checkpoint that looks complete but is not.

``<out>/checkpoints/step_%08d/`` holds, per save:

* DeepSpeed's files, written by ``engine.save_checkpoint`` on every rank (model states on rank 0, a ZeRO
  optimizer shard per rank);
* ``mie_rank%05d.pt`` per rank: the loader position and every RNG state (tensors and plain data only, read
  back with ``torch.load(weights_only=True)``);
* ``mie_meta.json``: step, resolved config, git revision, data stats, last losses.

``latest`` (DeepSpeed's file name, so ``engine.load_checkpoint`` finds it) is replaced by rename only after
every rank has finished writing; a save cut short is a directory ``latest`` never names, overwritten or
pruned later. The :class:`Checkpointer` decides itself when to save: every ``every_steps`` steps and every
``every_minutes`` minutes (rank 0's clock, broadcast, so every rank saves at the same step).

**Resuming on another world size** (``mie_meta.json`` names the ranks that wrote the checkpoint; ``resume=auto``
notices the difference itself and says so in a warning). A ZeRO-1/2 checkpoint's optimizer is sharded by
rank, so rank 0 first converts it with DeepSpeed's ``ds_to_universal`` into ``<checkpoint>/universal/``
(written under a temporary name, renamed when complete, reused by a later resume) and every rank loads that
with DeepSpeed's universal-checkpoint loader (``checkpoint.load_universal``), which re-partitions it for the
new world. A ZeRO-0 checkpoint holds the whole optimizer and loads as it is.

* Kept: the fp32 master weights, Adam's moments and step count per parameter, the parameter groups' settings,
  the LR schedule's position, the step, the data position (every rank's loader state, dealt out anew over the
  new ranks and workers by :meth:`mie.pretrain.data.PretrainData.redistribute`: the rest of the current
  epoch, none of it twice).
* Not kept: the RNG streams (dropout, negative sampling, the mixing of shard sets), which restart from
  ``(seed, rank, step)``; the batch composition, and with it the global batch size unless ``data.batch_size``
  or ``engine.grad_accum`` is changed to match. The run continues, but is not the run the old world would have
  made; an exact continuation needs the same world size.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mie.launch.dist import DistEnv, barrier
from mie.launch.errors import UserError
from mie.launch.log import RunLogger
from mie.shards.writer import atomic_write_bytes, atomic_write_json

LATEST = "latest"


class ResumeError(UserError):
    """A resume that cannot be done as asked, in one line."""


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0 = never by step count
    every_minutes: float = 30.0  # 0 = never by time
    keep_last: int = 3
    resume: str = "auto"  # auto: continue from `latest` if there is one | never | a checkpoint directory

    def validate(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0 or self.keep_last < 1:
            raise ValueError("every_steps/every_minutes: must be >= 0, keep_last >= 1")


def git_revision() -> str:
    """``<commit>[-dirty]`` of the checkout mie runs from, or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, as tensors and plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def seeded_rng_state(*entropy: int) -> dict[str, Any]:
    """The RNG states (as :func:`rng_state` gives them) of a process seeded from ``entropy``, made without
    touching this process's generators."""
    seed = int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])
    kind, keys, pos, has_gauss, gauss = np.random.RandomState(seed).get_state()
    return {"torch": torch.Generator().manual_seed(seed).get_state(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": random.Random(seed).getstate()}


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint that ``ckpt_dir/latest`` names, or None."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    return ckpt_dir / path.read_text(encoding="utf-8").strip()


def find_resume(cfg: CheckpointConfig, out: Path, env: DistEnv, config: dict[str, Any]) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start), checked before anything is built:
    ``auto`` takes ``latest`` if there is one, ``never`` refuses a directory that holds checkpoints, a path
    must be a complete checkpoint (every rank's files) of the same model config (``config`` is this run's,
    resolved). Its world size may differ from this run's (see the module docstring)."""
    found = latest_checkpoint(Path(out) / "checkpoints")
    if cfg.resume == "never":
        if found is not None:
            raise ResumeError(f"{out}/checkpoints: holds checkpoints (latest {found.name}); set checkpoint.resume=auto "
                              "to continue them, or use another out directory")
        return None
    path = found if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        return None
    if not (path / "mie_meta.json").is_file():
        raise ResumeError(f"checkpoint.resume: {path}: not a complete mie checkpoint (no mie_meta.json)")
    meta = json.loads((path / "mie_meta.json").read_text(encoding="utf-8"))
    world = meta.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise ResumeError(f"checkpoint.resume: {path}/mie_meta.json: no world_size")
    for need in (f"mie_rank{r:05d}.pt" for r in range(world)):
        if not (path / need).is_file():
            raise ResumeError(f"checkpoint.resume: {path}: not a complete mie checkpoint (no {need})")
    diff = _first_difference(meta.get("config", {}).get("model"), config.get("model"), "model")
    if diff:
        raise ResumeError(f"checkpoint.resume: {path} holds another model ({diff}); use another out directory")
    return path


def changed_settings(path: Path, config: dict[str, Any]) -> list[str]:
    """Settings (other than max_steps, checkpoint and log) that differ from the checkpoint's run: each one
    makes the resumed run something other than an exact continuation."""
    saved = json.loads((path / "mie_meta.json").read_text(encoding="utf-8")).get("config", {})
    keys = sorted((set(saved) | set(config)) - {"max_steps", "checkpoint", "log", "out"})
    return [d for k in keys if (d := _first_difference(saved.get(k), config.get(k), k))]


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{where}.{k}")
            if d:
                return d
        return None
    return None if a == b else f"{where}: {a!r} then, {b!r} now"


class Checkpointer:
    """Saves and restores a DeepSpeed engine with the loader position and RNG states."""

    def __init__(self, engine, cfg: CheckpointConfig, out: Path, env: DistEnv, log: RunLogger,
                 meta: dict[str, Any]):
        self.engine, self.cfg, self.env, self.log = engine, cfg, env, log
        self.dir = Path(out) / "checkpoints"
        self.meta = meta
        self.last: Path | None = None  # the last complete checkpoint
        self._since = time.monotonic()

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or None."""
        return latest_checkpoint(self.dir)

    def resume(self, path: Path | None) -> tuple[int, dict[str, Any] | list[dict[str, Any]] | None,
                                                 dict[str, Any] | None]:
        """Load checkpoint ``path`` (from :func:`find_resume`) into the engine: ``(step, loader state, RNG
        state)``, or ``(0, None, None)`` for a fresh start. From a checkpoint of another world size the loader
        state is every old rank's (a list, for :meth:`mie.pretrain.data.PretrainData.loader`)."""
        if path is None:
            return 0, None, None
        meta = json.loads((path / "mie_meta.json").read_text(encoding="utf-8"))
        if meta["world_size"] != self.env.world_size:
            return self._resume_resized(path, meta)
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise ResumeError(f"checkpoint.resume: DeepSpeed found no checkpoint in {path}")
        state = torch.load(path / f"mie_rank{self.env.rank:05d}.pt", map_location="cpu", weights_only=True)
        self.last = path
        self.log.info(f"resumed from {path} (step {state['step']})")
        return int(state["step"]), state["loader"], state["rng"]

    def _resume_resized(self, path: Path, meta: dict[str, Any]) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
        old, new = meta["world_size"], self.env.world_size
        sharded = bool(list(path.glob("*_optim_states.pt")))
        if self.env.is_main:
            batch = [c["data"]["batch_size"] * c["engine"]["grad_accum"] * w
                     for c, w in ((meta["config"], old), (self.meta["config"], new))]
            how = "DeepSpeed's universal checkpoint" if sharded else "its unsharded (ZeRO-0) optimizer state"
            self.log.warn(f"checkpoint {path} was written by {_ranks(old)}, this run has {new}: resuming through {how} "
                          "(weights, Adam moments, LR schedule and step kept); the rest of the epoch's samples are "
                          f"dealt out over the new ranks; RNG streams restart from the seed; global batch {batch[0]} "
                          f"→ {batch[1]}. Not an exact continuation.")
        if sharded:
            source = self._universal(path)
            config = self.engine._config  # the DS config flag `checkpoint.load_universal`, for this load only
            config.load_universal_checkpoint = True
            try:
                loaded, _ = self.engine.load_checkpoint(str(path), tag=source.name, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
            finally:
                config.load_universal_checkpoint = False
            self._load_buffers(source)
        else:
            loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if loaded is None:
            raise ResumeError(f"checkpoint.resume: DeepSpeed found no checkpoint in {path}")
        states = [torch.load(path / f"mie_rank{r:05d}.pt", map_location="cpu", weights_only=True) for r in range(old)]
        step = int(states[0]["step"])
        self.last = path
        self.log.info(f"resumed from {path} (step {step}, {old} → {new} ranks)")
        rng = seeded_rng_state(self.meta["config"].get("seed", 0), self.env.rank, step)
        return step, [s["loader"] for s in states], rng

    def _universal(self, path: Path) -> Path:
        """``path/universal``, DeepSpeed's universal form of ZeRO checkpoint ``path``: converted by rank 0
        (unless an earlier resume did) under a temporary name, renamed when complete."""
        done = path / "universal"
        if self.env.is_main and not done.is_dir():
            from deepspeed.checkpoint import ds_to_universal

            work = path / ".universal-partial"
            shutil.rmtree(work, ignore_errors=True)
            self.log.info(f"converting {path} to a universal checkpoint")
            args = argparse.Namespace(input_folder=str(path), output_folder=str(work / done.name),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(io.StringIO()):  # its progress prints; errors still raise
                ds_to_universal.main(args)
            (work / done.name).rename(done)
            shutil.rmtree(work)
        barrier()
        return done

    def _load_buffers(self, source: Path) -> None:
        """The module's persistent buffers from ``source``: the universal loader restores parameters only."""
        module = self.engine.module
        params = {n for n, _ in module.named_parameters()}
        buffers = [n for n in module.state_dict() if n not in params]
        if not buffers:
            return
        files = sorted(source.glob("mp_rank_*_model_states.pt"))
        saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]  # DeepSpeed's own file
        module.load_state_dict({n: saved[n] for n in buffers if n in saved}, strict=False)

    def due(self, step: int) -> bool:
        """Whether to save after ``step``: the same answer on every rank."""
        by_steps = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
        by_time = self.cfg.every_minutes > 0 and time.monotonic() - self._since >= 60 * self.cfg.every_minutes
        if self.env.world_size > 1 and self.cfg.every_minutes > 0:
            flag = torch.tensor([float(by_time)], device=_comm_device())
            dist.broadcast(flag, src=0)  # rank 0's clock decides, or ranks would disagree and hang
            by_time = bool(flag.item())
        return by_steps or by_time

    def save(self, step: int, loader_state: dict[str, Any], extra: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` on every rank, then (rank 0) point ``latest`` at it and prune old ones."""
        tag = tag_of(step)
        path = self.dir / tag
        path.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state={"step": step}, save_latest=False)
        rank_file = path / f"mie_rank{self.env.rank:05d}.pt"
        tmp = rank_file.with_name(rank_file.name + ".tmp")
        torch.save({"step": step, "loader": loader_state, "rng": rng_state()}, tmp)
        tmp.replace(rank_file)
        barrier()
        if self.env.is_main:
            atomic_write_json(path / "mie_meta.json", {**self.meta, **extra, "step": step,
                                                       "world_size": self.env.world_size, "time": time.time()})
            atomic_write_bytes(self.dir / LATEST, tag.encode())
            self._prune(keep=path)
        barrier()
        self.last = path
        self._since = time.monotonic()
        self.log.info(f"checkpoint {path}")
        return path

    def _prune(self, keep: Path) -> None:
        tags = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        complete = [p for p in tags if (p / "mie_meta.json").is_file()]
        for old in complete[: max(0, len(complete) - self.cfg.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        # Directories of saves that never completed and lie behind the newest complete one.
        for p in tags:
            if not (p / "mie_meta.json").is_file() and p.name < keep.name:
                shutil.rmtree(p, ignore_errors=True)


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")



"""Where this process sits in a job: torchrun, SLURM (srun and/or array) or a single process.

This is the one place that reads launcher environment variables. Everything else takes a
:class:`DistEnv`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size and local rank of this process, and which launcher set them."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # torchrun | slurm | slurm-array | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info_from_env(environ: Mapping[str, str] | None = None, use_array: bool = False) -> DistEnv:
    """Read torchrun's ``RANK/WORLD_SIZE/LOCAL_RANK``, else SLURM's ``SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID``, else a single process.

    With ``use_array`` (the offline shard stages), a SLURM array job counts as one world: array
    task ``a`` of ``A`` running ``n`` tasks each gives ranks ``a*n .. a*n+n-1`` of ``A*n``. Training
    stages leave it off, so a pretraining job that happens to be one member of an array sweep is not
    folded together with its siblings.
    """
    env = os.environ if environ is None else environ

    def num(name: str, default: int | None = None) -> int:
        raw = env.get(name)
        if raw is None or raw == "":
            if default is None:
                raise ValueError(f"environment variable {name} is not set")
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also when started under srun)
        info = DistEnv(num("RANK"), num("WORLD_SIZE"), num("LOCAL_RANK", 0), "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        info = DistEnv(num("SLURM_PROCID"), num("SLURM_NTASKS"), num("SLURM_LOCALID", 0), "slurm")
    else:
        info = DistEnv()
    if use_array and info.launcher != "torchrun" and env.get("SLURM_ARRAY_TASK_ID"):
        task = num("SLURM_ARRAY_TASK_ID") - num("SLURM_ARRAY_TASK_MIN", 0)
        count = num("SLURM_ARRAY_TASK_COUNT")
        info = DistEnv(task * info.world_size + info.rank, count * info.world_size, info.local_rank, "slurm-array")
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is outside world size {info.world_size} ({info.launcher})")
    return info


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group of more than one rank is up; else nothing."""
    import torch.distributed as dist  # here: this module is read by every command, most never need torch

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def max_over_ranks(value: int) -> int:
    """The maximum of ``value`` over all ranks: one tiny all-reduce on the process group's device (the current
    GPU under NCCL, else the CPU)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())

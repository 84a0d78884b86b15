"""Preemption: SIGUSR1 / SIGTERM become "checkpoint at the next step boundary, then exit".

SLURM sends SIGUSR1 ahead of the time limit when the job asks for it (``sbatch --signal=USR1@120``)
and SIGTERM on preemption or ``scancel``; torchrun forwards SIGTERM to its workers. A handler must not
save a checkpoint itself (the signal can land inside a collective or half-way through an optimizer
step), so it only raises a flag. The training loop asks :meth:`Preemption.requested` at each step
boundary; the ranks agree on the answer with one all-reduce, because a signal may reach some ranks
and not others, or reach them a step apart, and every rank must take part in the checkpoint.

After the checkpoint the stage calls :meth:`Preemption.finish`: under SLURM, rank 0 runs
``scontrol requeue $SLURM_JOB_ID`` (the requeued job resumes with ``resume=auto``), then the
process exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"), so neither a shell
``&&`` chain nor a scheduler mistakes a preempted run for a finished one.

Child processes forked inside :meth:`Preemption.shielded` (DataLoader workers) start with both signals
blocked. SLURM signals every process of a job step, and torchrun signals each worker's whole process
group; a DataLoader worker installs a SIGTERM handler that kills it, and the training process then
dies of "DataLoader worker killed" before it reaches the step boundary. Shielded workers ignore the
signals and are shut down by the training process itself (or notice that it has gone).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from types import FrameType
from typing import Callable, Iterator, NoReturn

from mie.launch.dist import DistEnv

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Turns SIGUSR1/SIGTERM into a flag read at step boundaries. Use as a context manager."""

    def __init__(self, env: DistEnv, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.env = env
        self.signals = signals
        self.received: int | None = None  # the signal number, once one arrived here
        self.agreed: int | None = None  # the largest signal number over ranks, once a boundary saw one
        self.finishing = False  # set by finish(): the process is on its way out with EXIT_PREEMPTED
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        # Leaving through finish(), the signals stay harmless until the process is gone: torchrun signals the
        # ranks that are still tearing down when the first one exits, which would turn exit 75 into a death.
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.finishing else handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self, all_reduce: Callable[[int], int] | None = None) -> bool:
        """Whether any rank has received a preemption signal.

        ``all_reduce`` maps this rank's value (0, or the number of the signal it received) to the
        maximum over ranks (the caller knows its process group and device); without it, or in a single
        process, only this rank's signal counts. Every rank must call it at the same step boundary.
        """
        flag = self.received or 0
        if all_reduce is not None and self.env.world_size > 1:
            flag = all_reduce(flag)
        if flag:
            self.agreed = flag
        return bool(flag)

    @property
    def signal_name(self) -> str:
        """The name of the signal the ranks agreed on (else this rank's), or ``none``."""
        num = self.agreed or self.received
        return signal.Signals(num).name if num else "none"

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Block the preemption signals in this thread for the duration: processes forked inside inherit
        the blocked mask and never act on them. A signal that arrives meanwhile is delivered on exit."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def finish(self, log: Callable[[str], None] = print, barrier: Callable[[], None] | None = None) -> NoReturn:
        """Requeue the SLURM job (rank 0 only) and exit with :data:`EXIT_PREEMPTED`.

        ``barrier`` (every rank calls it after the requeue) keeps the other ranks alive until rank 0 has
        requeued: torchrun and ``srun --kill-on-bad-exit`` tear the job down at the first rank that exits,
        which could otherwise kill rank 0 inside ``scontrol``."""
        job = os.environ.get("SLURM_JOB_ID")
        if job and self.env.is_main:
            requeue(job, log)
        if barrier is not None and self.env.world_size > 1:
            barrier()
        self.finishing = True
        sys.exit(EXIT_PREEMPTED)


def requeue(job_id: str, log: Callable[[str], None] = print) -> bool:
    """``scontrol requeue JOB``; a failure is logged, not raised: the checkpoint is already safe."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"could not requeue SLURM job {job_id}: {e}")
        return False
    if done.returncode != 0:
        log(f"could not requeue SLURM job {job_id}: {done.stderr.strip() or done.returncode}")
        return False
    log(f"requeued SLURM job {job_id}")
    return True

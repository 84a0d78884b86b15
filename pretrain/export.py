"""``mie export RUN --out DIR``: a pretraining run's checkpoint → a published backbone; and loading it back.

The export consolidates the ZeRO shards into fp32 weights with DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` (ZeRO 1/2; a ZeRO-0 checkpoint already holds them whole) and
writes, into a temp directory renamed to ``DIR`` at the end:

* ``model.safetensors``: every weight of the backbone (text, vision, fusion, heads);
* ``config.json``: the backbone config (``model_type: mie``), run step and git revision;
* ``text/``: the text encoder alone as a Hugging Face model (``config.json``, ``model.safetensors``) with its
  tokenizer files, so ``transformers.AutoModel.from_pretrained(DIR/"text")`` loads it;
* ``README.md``: a model card (training config, data stats, final losses, how to load);
* ``SHA256SUMS``: ``sha256sum -c`` checks every other file.

:func:`load_backbone` reads only JSON and safetensors: loading a backbone never unpickles.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from mie.launch import config as config_lib
from mie.launch.errors import UserError
from mie.shards.writer import replace_dir
from mie.pretrain.checkpoint import LATEST
from mie.pretrain.model import MieModel, model_from_skeleton

WEIGHTS = "model.safetensors"


class ExportError(UserError):
    """A run or backbone directory that cannot be exported or loaded, in one line."""


def load_backbone(path: str | os.PathLike, part: Literal["model", "text", "vision"] = "model") -> torch.nn.Module:
    """Load an exported backbone from ``path`` (a ``mie export`` directory), in eval mode, on the CPU.

    ``part``: ``"model"`` → the whole :class:`~mie.pretrain.model.MieModel` (``encode_text``,
    ``encode_image``, ``region_features``, ``fuse``, projections; ``model.config`` is its ModelConfig);
    ``"text"`` → the Hugging Face text encoder; ``"vision"`` → the timm vision encoder. The tokenizer is
    ``transformers.AutoTokenizer.from_pretrained(path / "text")``. Only JSON and safetensors are read."""
    from safetensors.torch import load_file

    path = Path(path)
    for need in ("config.json", WEIGHTS, "text/config.json"):
        if not (path / need).is_file():
            raise ExportError(f"{path}: not a mie backbone (no {need}); make one with `mie export RUN --out DIR`")
    if part == "text":
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(path / "text"), local_files_only=True, use_safetensors=True).eval()
    if part not in ("model", "vision"):
        raise ExportError(f"load_backbone: part must be model, text or vision, not {part!r}")
    model = model_from_skeleton(path)
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise ExportError(f"{path / WEIGHTS}: does not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model.vision if part == "vision" else model


def cli(argv: list[str]) -> Path:
    """``mie export RUN --out DIR [--tag step_00001000] [--force]``."""
    ap = argparse.ArgumentParser(prog="mie export", description="Publish a pretraining run's backbone: consolidate "
                                 "its ZeRO checkpoint to fp32 and write safetensors, config, tokenizer and a model card.")
    ap.add_argument("run", metavar="RUN", help="the pretraining run directory (its `out`)")
    ap.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    ap.add_argument("--tag", default=None, help="checkpoint to export (default: the one `latest` names)")
    ap.add_argument("--force", action="store_true", help="replace DIR if it exists")
    args = ap.parse_args(argv)
    return export(Path(args.run), Path(args.out), args.tag, args.force)


def export(run: Path, out: Path, tag: str | None = None, force: bool = False) -> Path:
    """Write the backbone of ``run``'s checkpoint ``tag`` (default: latest) to ``out``; returns ``out``."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from mie.pretrain.train import PretrainConfig

    ckpts = run / "checkpoints"
    for need in (run / "config.toml", run / "model" / "config.json", ckpts / LATEST):
        if not need.is_file():
            raise ExportError(f"{run}: not a finished pretraining run (no {need.relative_to(run)})")
    if out.exists() and not force:
        raise ExportError(f"{out}: exists; pass --force to replace it")
    tag = tag or (ckpts / LATEST).read_text(encoding="utf-8").strip()
    if not (ckpts / tag / "mie_meta.json").is_file():
        raise ExportError(f"{ckpts / tag}: not a complete checkpoint")
    cfg = config_lib.load(PretrainConfig, run / "config.toml")
    meta = json.loads((ckpts / tag / "mie_meta.json").read_text(encoding="utf-8"))

    state = consolidated_state_dict(ckpts, tag)
    model = model_from_skeleton(run / "model")
    weights = {k.removeprefix("model."): v.float() for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"{ckpts / tag}: does not fit {run / 'model'} (missing {missing[:3]}, unexpected {unexpected[:3]})")

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_backbone(model, run, tmp, meta)
    (tmp / "README.md").write_text(model_card(model, cfg, meta, tag), encoding="utf-8")
    write_sha256sums(tmp)
    replace_dir(tmp, out)
    print(f"exported {run} ({tag}) → {out}")
    return out


def consolidated_state_dict(ckpts: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint ``tag``: DeepSpeed's ZeRO consolidation, or the whole module of a ZeRO-0
    checkpoint (whose optimizer is not sharded)."""
    if list((ckpts / tag).glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=tag)
    files = sorted((ckpts / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ExportError(f"{ckpts / tag}: no DeepSpeed model states")
    # Our own run's DeepSpeed file: it holds DeepSpeed objects beside the tensors, so it needs full loading.
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


def _write_backbone(model: MieModel, run: Path, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "model_type": "mie"})
    config = json.loads((run / "model" / "config.json").read_text(encoding="utf-8"))
    config.update({"step": meta.get("step"), "git": meta.get("git")})
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    model.text.save_pretrained(str(out / "text"), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(run / "model" / "text"), local_files_only=True).save_pretrained(str(out / "text"))


def model_card(model: MieModel, cfg, meta: dict, tag: str) -> str:
    """The README.md of an export: what it is, how it was trained, on what, how far, how to load it."""
    n = sum(p.numel() for p in model.parameters())
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("text", "vision", "fusion")}
    losses = meta.get("losses") or {}
    data = meta.get("data") or {}
    loss_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in losses.items()
                          if k in ("loss", "itc", "itm", "entity", "relation") and isinstance(v, (int, float)))
    set_rows = "\n".join(f"| `{s['dir']}` | {s['drawn']} | {s['epoch']} |" for s in data.get("sets", []))
    global_batch = cfg.data.batch_size * cfg.engine.grad_accum * meta.get("world_size", 1)
    return f"""# mie pretrained backbone

Text encoder + vision encoder + {cfg.model.fusion_layers} fusion layer(s), pretrained with mie's alignment
objectives (ITC, ITM, entity–object and relation–image KL toward soft pseudo-labels).

- parameters: {n:,} (text {parts['text']:,}, vision {parts['vision']:,} `{cfg.model.vision.name}`, fusion {parts['fusion']:,})
- checkpoint: `{tag}` (step {meta.get('step')}), global batch {global_batch}, {meta.get('world_size', 1)} rank(s)
- samples seen: {meta.get('step', 0) * global_batch:,}
- git revision: `{meta.get('git', 'unknown')}`

## Load

```python
from mie.pretrain import load_backbone
model = load_backbone("DIR")                 # MieModel: encode_text, encode_image, region_features, fuse
text = load_backbone("DIR", part="text")     # the Hugging Face text encoder
vision = load_backbone("DIR", part="vision") # the timm vision encoder

from transformers import AutoModel, AutoTokenizer
text = AutoModel.from_pretrained("DIR/text"); tokenizer = AutoTokenizer.from_pretrained("DIR/text")
```

Images: {cfg.model.vision.image_size}×{cfg.model.vision.image_size} RGB, mean {[round(x, 4) for x in model.pixel_mean.flatten().div(255).tolist()]}, std {[round(x, 4) for x in model.pixel_std.flatten().div(255).tolist()]}
(`model.encode_image` takes uint8 tensors and normalises them itself).

## Final losses (last logged window, mean over ranks)

| objective | loss |
| --- | --- |
{loss_rows or '| (none logged) | |'}

## Data (rank 0's stream)

| shard set | samples drawn | epoch |
| --- | --- | --- |
{set_rows or '| (no stats) | | |'}

bad samples skipped: {data.get('bad_samples', 0)}

## Training config

```toml
{config_lib.dumps(cfg).strip()}
```

`SHA256SUMS` lists the sha256 of every file here (`sha256sum -c SHA256SUMS`).
"""


def write_sha256sums(root: Path) -> None:
    """``SHA256SUMS`` over every file under ``root`` (relative paths, ``sha256sum -c`` format)."""
    lines = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "SHA256SUMS":
            h = hashlib.sha256(p.read_bytes()).hexdigest()
            lines.append(f"{h}  {p.relative_to(root).as_posix()}\n")
    (root / "SHA256SUMS").write_text("".join(lines), encoding="utf-8")

"""``mie shards tiny-diffusion``: a Stable Diffusion pipeline built from configs, saved as a directory.

Back-translation loads every model with diffusers' ``from_pretrained`` from a local directory. Tests
and the quickstart cannot download SD-Turbo, so this module builds one from configs, with seeded
random weights, and ``save_pretrained``\\ s it: the stage then loads it through exactly the code path
a real model takes. Two sizes:

``tiny``
    a few-hundred-thousand-parameter UNet, VAE and 2-layer CLIP text encoder: a 64² image in a
    fraction of a second on the CPU. Its images are noise-like; it exists to exercise the machinery.
``sd21``
    the shapes of SD-2.1 / SD-Turbo (UNet 866 M parameters, the SD VAE, the 23-layer OpenCLIP-H
    text encoder, 512² images), random weights: for throughput measurements on a GPU.

The tokenizer is a real CLIP BPE tokenizer written from open_clip's bundled vocabulary (the same
49,408 tokens as OpenAI's CLIP), so prompt cutting at 77 tokens behaves as it does with SD.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mie.launch.dist import DistEnv
from mie.launch.errors import UserError
from mie.shards.writer import replace_dir
from mie.launch.log import RunLogger

Size = Literal["tiny", "sd21"]
STAMP = "mie_tiny_diffusion.json"  # what was built, so a re-run can tell "done" from "another model"
# Bump when the configs below change what a (size, seed) builds.
VERSION = 1

# SD-Turbo's scheduler (EulerDiscrete, "trailing" spacing, so that 1 step starts at t = 999).
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1, interpolation_type="linear",
                 use_karras_sigmas=False)

CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=8, norm_num_groups=32),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    norm_num_groups=32, sample_size=64),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=32, hidden_act="quick_gelu"),
    },
    # The component configs of stabilityai/sd-turbo (= SD-2.1-base shapes).
    "sd21": {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280, 1280),
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                     attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
                    scaling_factor=0.18215),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                     projection_dim=512, hidden_act="gelu"),
    },
}


@dataclass
class TinyDiffusionConfig:
    out: str = "runs/models/tiny-sd"  # the pipeline directory (model.path of a backtranslate config)
    size: Size = "tiny"
    seed: int = 0
    force: bool = False  # rebuild even when `out` holds another build


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` with OpenAI CLIP's BPE vocabulary, read from open_clip's bundled file.

    The vocabulary is laid out as open_clip's ``SimpleTokenizer`` lays it out (byte symbols, their
    end-of-word forms, the merges, then the two special tokens), which is also the id order of the
    Hugging Face CLIP tokenizers."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges,
                         pad_token=pad_token, model_max_length=77)


def build_pipeline(size: Size = "tiny", seed: int = 0, device: str | torch.device = "cpu"):
    """A ``StableDiffusionPipeline`` of ``size`` with random weights seeded by ``seed``, on ``device``.

    No safety checker (back-translation images are training signal, never shown to anyone)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CONFIGS[size]
    tokenizer = clip_tokenizer(pad_token="!" if size == "sd21" else "<|endoftext|>")
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **cfg["text"])
    device = torch.device(device)
    # Weights come from the global RNG: fork it so that building a model leaves the caller's state alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(text_cfg)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=EulerDiscreteScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_tiny_vae(size: Size = "tiny", seed: int = 0, device: str | torch.device = "cpu"):
    """An ``AutoencoderTiny`` that fits the pipeline of ``size``, with seeded random weights: for
    ``sd21`` the TAESD shape (diffusers' default config, 8× upsampling), for ``tiny`` a 2× one."""
    from diffusers import AutoencoderTiny

    cfg = {} if size == "sd21" else dict(encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32),
                                         num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        return AutoencoderTiny(**cfg).eval()


def main(cfg: TinyDiffusionConfig, env: DistEnv) -> Path:
    """Build and save the pipeline into ``cfg.out`` unless it already holds this exact build.

    Saved to a temp directory then renamed, so a killed run never leaves a half-written model."""
    log = RunLogger(env)
    out = Path(cfg.out)
    stamp = {"size": cfg.size, "seed": cfg.seed, "version": VERSION}
    if (out / STAMP).is_file() and not cfg.force:
        if json.loads((out / STAMP).read_text(encoding="utf-8")) == stamp:
            log.info(f"tiny-diffusion: {out} already holds this {cfg.size} pipeline (seed {cfg.seed})")
            return out
        raise UserError(f"out: {out} holds another tiny-diffusion build ({out / STAMP}); "
                        "set force=true to replace it or choose another out")
    if out.exists() and not (out / STAMP).is_file() and any(out.iterdir()):
        raise UserError(f"out: {out} exists and is not a tiny-diffusion build; choose another out")
    if not env.is_main:  # one writer; other ranks of an array have nothing to do
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_pipeline(cfg.size, cfg.seed).save_pretrained(tmp)
    (tmp / STAMP).write_text(json.dumps(stamp, sort_keys=True) + "\n", encoding="utf-8")
    replace_dir(tmp, out)
    log.info(f"tiny-diffusion: {cfg.size} pipeline (seed {cfg.seed}) → {out}")
    return out

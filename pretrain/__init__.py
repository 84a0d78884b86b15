"""Alignment pretraining: model, objectives, loader, DeepSpeed engine, checkpoints, export.

For downstream use, :func:`load_backbone` loads an exported backbone (``mie export RUN --out DIR``)::

    from mie.pretrain import load_backbone
    model = load_backbone(DIR)               # the whole MieModel
    text = load_backbone(DIR, part="text")   # the Hugging Face text encoder
"""
from mie.pretrain.export import load_backbone

__all__ = ["load_backbone"]

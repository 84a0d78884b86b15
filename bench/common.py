"""Helpers shared by the bench scripts (run as ``python bench/X.py``, so this folder is on sys.path)."""
from __future__ import annotations

import platform

import torch


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()

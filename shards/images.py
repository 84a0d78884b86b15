"""Image re-encoding for shards: decode, RGB, longest side ≤ ``max_side``, JPEG."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageFile


class ImageError(ValueError):
    """An image that cannot be decoded, with the reason."""


def reencode(path: Path, max_side: int, quality: int) -> tuple[bytes, list[int], list[int]]:
    """``(jpeg bytes, original [w, h], stored [w, h])``. Raises ImageError for undecodable files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                # Decode fully now, so a truncated file fails here and not in a later stage, whatever
                # another library in this process set PIL's global tolerance to.
                tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
                try:
                    im.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
                size = [im.width, im.height]
                rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"undecodable image {path}: {type(e).__name__}: {e}") from None
    if max(size) > max_side:
        scale = max_side / max(size)
        rgb = rgb.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), size, [rgb.width, rgb.height]

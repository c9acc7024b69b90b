"""Kept-token overlays: the image with the dropped patches dimmed (PIL only, no plotting backend).

>>> import numpy as np
>>> image = overlay(np.full((16, 16, 3), 200, np.uint8), kept=[0, 3], num_tokens=4, size=8)
>>> image.size, image.getpixel((0, 0)) != image.getpixel((0, 7))
((8, 8), True)
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

__all__ = ["overlay", "token_grid"]


def token_grid(num_tokens: int) -> Optional[tuple[int, int]]:
    """(rows, cols) when the tokens form a square patch grid (row-major), else None."""
    side = int(math.isqrt(num_tokens))
    return (side, side) if side * side == num_tokens and side > 0 else None


def overlay(image: Any, kept: Sequence[int], num_tokens: int, size: int = 224, dim: float = 0.25) -> Any:
    """The image (resized to ``size`` square, as a CLIP-style processor sees it) with every dropped
    token's patch darkened to ``dim`` of its brightness and a thin outline on kept patches.
    Returns None when the tokens are not a square patch grid (e.g. LLaVA-NeXT AnyRes)."""
    from PIL import Image, ImageDraw

    grid = token_grid(num_tokens)
    if grid is None:
        return None
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    picture = picture.convert("RGB").resize((size, size))
    rows, cols = grid
    keep = set(int(i) for i in kept)
    shade = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(shade)
    outline = []
    for index in range(num_tokens):
        r, c = divmod(index, cols)
        box = (c * size // cols, r * size // rows, (c + 1) * size // cols - 1, (r + 1) * size // rows - 1)
        if index in keep:
            outline.append(box)
        else:
            draw.rectangle(box, fill=int(255 * dim))
    dark = Image.new("RGB", (size, size), (0, 0, 0))
    result = Image.composite(picture, dark, shade)
    pen = ImageDraw.Draw(result)
    for box in outline:
        pen.rectangle(box, outline=(255, 210, 0))
    return result

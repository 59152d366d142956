"""LLaVA-1.5 image preprocessing (``image_aspect_ratio = "pad"``, SPEC §1).

Pad to a square with the CLIP-mean colour, centred, then CLIP preprocessing
(resize shortest side, bicubic; centre crop; rescale; normalise). The CLIP part
is transformers' PIL-based CLIP processor, which gives bit-identical pixels to
the 4.37 one the official code uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# round-down(255 * CLIP mean), as LLaVA computes it: tuple(int(x * 255) for x in mean).
BACKGROUND = (122, 116, 104)
# The padded square's side is bounded: a 162-byte 1x20000 PNG would otherwise become a
# 20000x20000 square (5.8 GB, 38 s). An image with a longer side than this is first shrunk
# (bicubic, aspect kept) to it; up to it, the pixels are exactly LLaVA's.
MAX_PADDED_SIDE = 4096


class ImageLoadError(ValueError):
    """An image file that is missing or cannot be decoded."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


def expand2square(pil_image: Image.Image, background=BACKGROUND) -> Image.Image:
    """Pad ``pil_image`` to a square with ``background``, the image centred (offset rounded down)."""
    width, height = pil_image.size
    if width == height:
        return pil_image
    side = max(width, height)
    result = Image.new(pil_image.mode, (side, side), background)
    result.paste(pil_image, ((side - width) // 2, (side - height) // 2))
    return result


def bound_size(pil_image: Image.Image, max_side: int = MAX_PADDED_SIDE) -> Image.Image:
    """``pil_image`` shrunk so that its longer side (the padded square's) is ``max_side``;
    unchanged when it already fits."""
    width, height = pil_image.size
    side = max(width, height)
    if side <= max_side:
        return pil_image
    size = (max(1, round(width * max_side / side)), max(1, round(height * max_side / side)))
    return pil_image.resize(size, Image.BICUBIC)


def _clip_processor_class():
    # transformers 5.23 names the PIL backend explicitly (plain CLIPImageProcessor
    # needs torchvision and otherwise falls back with a warning); earlier 5.x
    # releases have only CLIPImageProcessor, which is the PIL/numpy one there.
    try:
        from transformers.models.clip import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


class ImageProcessor:
    """PIL image -> ``float32 [3, S, S]`` pixels, as LLaVA's ``process_images`` with ``pad``."""

    def __init__(self, clip_processor):
        self._clip = clip_processor
        self.background = tuple(int(x * 255) for x in clip_processor.image_mean)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ImageProcessor":
        """Read ``preprocessor_config.json`` from ``path``."""
        path = Path(path)
        if not (path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"no preprocessor_config.json in {path}")
        return cls(_clip_processor_class().from_pretrained(str(path)))

    @property
    def image_size(self) -> int:
        """Side of the output square (the CLIP crop size)."""
        return int(self._clip.crop_size["height"])

    def __call__(self, pil_image: Image.Image) -> np.ndarray:
        image = expand2square(bound_size(pil_image.convert("RGB")), self.background)
        pixels = self._clip(image, return_tensors="np")["pixel_values"][0]
        return np.asarray(pixels, dtype=np.float32)

    def load(self, path: str | Path) -> np.ndarray:
        """Open, decode and preprocess an image file; ``ImageLoadError`` if that fails."""
        path = Path(path)
        if not path.is_file():
            raise ImageLoadError(path, "no such file")
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # forces the full decode inside the try
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError,
                Image.DecompressionBombError) as e:
            raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e
        return self(image)

"""LLaVA-1.5 image preprocessing (``image_aspect_ratio = "pad"``, SPEC §1).

Pad to a square with the CLIP-mean colour, centred, then CLIP preprocessing
(resize shortest side, bicubic; centre crop; rescale; normalise). The CLIP part is
our own PIL + NumPy code, step for step the arithmetic of transformers' PIL CLIP
processor (bit-identical pixels, tested), which gives the pixels of the 4.37 one
the official code uses. Not importing transformers here saves seconds at startup
(its image processors import torch).
"""

from __future__ import annotations

import dataclasses
import json
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


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """The fields of a CLIP ``preprocessor_config.json`` that LLaVA's preprocessing uses."""

    shortest_edge: int | None = 336      # resize the shorter side to this (keeping the aspect) ...
    resize_hw: tuple[int, int] | None = None  # ... or to exactly (height, width)
    crop_hw: tuple[int, int] = (336, 336)
    resample: int = 3                    # PIL.Image.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_config(cls, cfg: dict) -> "ClipSettings":
        """From a preprocessor config dict (also the older int forms of ``size``/``crop_size``)."""
        size, crop = cfg.get("size", {"shortest_edge": 336}), cfg.get("crop_size", 336)
        shortest, resize_hw = None, None
        if isinstance(size, int):
            shortest = size
        elif "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:
            resize_hw = (int(size["height"]), int(size["width"]))
        crop_hw = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        d = cls()
        return cls(shortest_edge=shortest, resize_hw=resize_hw, crop_hw=crop_hw,
                   resample=int(cfg.get("resample", d.resample)),
                   do_resize=bool(cfg.get("do_resize", True)),
                   do_center_crop=bool(cfg.get("do_center_crop", True)),
                   do_rescale=bool(cfg.get("do_rescale", True)),
                   rescale_factor=float(cfg.get("rescale_factor", d.rescale_factor)),
                   do_normalize=bool(cfg.get("do_normalize", True)),
                   image_mean=tuple(float(x) for x in cfg.get("image_mean", d.image_mean)),
                   image_std=tuple(float(x) for x in cfg.get("image_std", d.image_std)))


def _resized_hw(h: int, w: int, s: ClipSettings) -> tuple[int, int]:
    if s.resize_hw is not None:
        return s.resize_hw
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = s.shortest_edge, int(s.shortest_edge * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _center_crop(chw: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """Centre crop, zero-padding first where the image is smaller (transformers' rule)."""
    (ch, cw), (h, w) = crop_hw, chw.shape[1:]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return chw[:, top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    top_pad, left_pad = -(-(nh - h) // 2), -(-(nw - w) // 2)
    big = np.zeros((chw.shape[0], nh, nw), chw.dtype)
    big[:, top_pad:top_pad + h, left_pad:left_pad + w] = chw
    top, left = top + top_pad, left + left_pad
    return big[:, max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def clip_preprocess(image: Image.Image, s: ClipSettings) -> np.ndarray:
    """An RGB PIL image -> ``float32 [3, H, W]``, as transformers' PIL CLIP processor computes it."""
    if s.do_resize:
        h, w = _resized_hw(image.height, image.width, s)
        image = image.resize((w, h), resample=s.resample)
    chw = np.moveaxis(np.asarray(image), -1, 0)
    if s.do_center_crop:
        chw = _center_crop(chw, s.crop_hw)
    if s.do_rescale:  # float64 multiply, then float32: transformers' order
        chw = (chw.astype(np.float64) * s.rescale_factor).astype(np.float32)
    if s.do_normalize:
        x = chw if np.issubdtype(chw.dtype, np.floating) else chw.astype(np.float32)
        mean, std = np.array(s.image_mean, x.dtype), np.array(s.image_std, x.dtype)
        chw = ((x.T - mean) / std).T
    return np.ascontiguousarray(chw, dtype=np.float32)


class ImageProcessor:
    """PIL image -> ``float32 [3, S, S]`` pixels, as LLaVA's ``process_images`` with ``pad``."""

    def __init__(self, settings: ClipSettings):
        self.settings = settings
        self.background = tuple(int(x * 255) for x in settings.image_mean)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ImageProcessor":
        """Read ``preprocessor_config.json`` from ``path``."""
        path = Path(path)
        if not (path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"no preprocessor_config.json in {path}")
        return cls(ClipSettings.from_config(json.loads((path / "preprocessor_config.json").read_text())))

    @property
    def image_size(self) -> int:
        """Side of the output square (the CLIP crop size)."""
        return int(self.settings.crop_hw[0])

    def __call__(self, pil_image: Image.Image) -> np.ndarray:
        image = expand2square(bound_size(pil_image.convert("RGB")), self.background)
        return clip_preprocess(image, self.settings)

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

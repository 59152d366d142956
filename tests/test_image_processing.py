"""LLaVA "pad" preprocessing: square padding with the CLIP-mean colour, then CLIP."""

import numpy as np
import pytest
from PIL import Image

from dynllava_jax.image_processing import (BACKGROUND, ClipSettings, ImageLoadError, ImageProcessor,
                                           clip_preprocess, expand2square)


def _clip_processor_class():
    """transformers' PIL CLIP processor: the reference our own preprocessing must equal."""
    try:
        from transformers.models.clip import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:  # earlier 5.x: CLIPImageProcessor is the PIL/numpy one
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGES = ("gradient.jpg", "portrait.png", "small.png")


@pytest.fixture(scope="module")
def proc(fixtures_dir):
    return ImageProcessor.from_dir(fixtures_dir / "clip")


def test_background_is_floor_of_clip_mean(proc):
    assert BACKGROUND == tuple(int(255 * m) for m in CLIP_MEAN) == (122, 116, 104)
    assert proc.background == BACKGROUND


def test_expand2square_centres():
    img = Image.new("RGB", (10, 4), (255, 0, 0))
    sq = np.asarray(expand2square(img, BACKGROUND))
    assert sq.shape == (10, 10, 3)
    # (10 - 4) // 2 = 3 rows of padding above, 3 below.
    assert (sq[:3] == BACKGROUND).all() and (sq[7:] == BACKGROUND).all()
    assert (sq[3:7] == (255, 0, 0)).all()
    tall = np.asarray(expand2square(Image.new("RGB", (3, 8), (0, 0, 0)), BACKGROUND))
    assert (tall[:, :2] == BACKGROUND).all() and (tall[:, 2:5] == 0).all() and (tall[:, 5:] == BACKGROUND).all()
    assert expand2square(img.resize((5, 5))).size == (5, 5)


@pytest.mark.parametrize("name", IMAGES)
def test_shape_dtype_and_matches_clip_processor(proc, fixtures_dir, name):
    path = fixtures_dir / "images" / name
    pixels = proc.load(path)
    assert pixels.shape == (3, proc.image_size, proc.image_size) == (3, 112, 112)
    assert pixels.dtype == np.float32
    clip = _clip_processor_class().from_pretrained(str(fixtures_dir / "clip"))
    padded = expand2square(Image.open(path).convert("RGB"), BACKGROUND)
    direct = clip(padded, return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(pixels, direct)


def test_padding_colour_visible(proc, fixtures_dir):
    # portrait.png is 90 x 160: 35 columns of padding on the left, i.e. about
    # 24 of the 112 output columns.
    pixels = proc.load(fixtures_dir / "images" / "portrait.png")
    expected = (np.array(BACKGROUND) / 255.0 - CLIP_MEAN) / CLIP_STD
    for c in range(3):
        np.testing.assert_allclose(pixels[c, :, :20], expected[c], atol=1e-5)
        np.testing.assert_allclose(pixels[c, :, -20:], expected[c], atol=1e-5)


def test_non_rgb_input(proc):
    gray = Image.new("L", (30, 20), 200)
    rgba = Image.new("RGBA", (30, 20), (200, 200, 200, 0))
    np.testing.assert_array_equal(proc(gray), proc(rgba))
    assert proc(gray).shape == (3, 112, 112)


def test_load_errors(proc, fixtures_dir, tmp_path):
    with pytest.raises(ImageLoadError, match="no such file") as err:
        proc.load(tmp_path / "missing.png")
    assert isinstance(err.value, ValueError) and err.value.path.endswith("missing.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError):
        proc.load(corrupt)
    truncated = tmp_path / "truncated.jpg"
    data = (fixtures_dir / "images" / "gradient.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError):
        proc.load(truncated)
    with pytest.raises(ImageLoadError):
        proc.load(tmp_path)  # a directory
    with pytest.raises(FileNotFoundError):
        ImageProcessor.from_dir(tmp_path)


@pytest.mark.parametrize("cfg", [
    {"size": {"shortest_edge": 112}, "crop_size": {"height": 112, "width": 112}},
    {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 24}},
    {"size": {"shortest_edge": 20}, "crop_size": {"height": 36, "width": 30}},  # crop pads
    {"size": {"height": 50, "width": 30}, "crop_size": {"height": 40, "width": 30}, "resample": 2},
])
def test_own_clip_preprocessing_is_bit_identical_to_transformers(cfg):
    # Our PIL + NumPy CLIP step replaces transformers' processor (which imports torch): same
    # bits on unpadded, non-square images of odd sizes, for the settings LLaVA checkpoints use.
    full = {"do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
            "rescale_factor": 1 / 255, **cfg}
    ref = _clip_processor_class()(**full)
    ours = ClipSettings.from_config(full)
    rng = np.random.default_rng(0)
    for h, w in [(17, 33), (64, 64), (101, 47), (7, 250)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        expected = ref(img, return_tensors="np")["pixel_values"][0]
        got = clip_preprocess(img, ours)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_older_int_size_forms():
    s = ClipSettings.from_config({"size": 224, "crop_size": 224})
    assert (s.shortest_edge, s.crop_hw) == (224, (224, 224))


def test_padded_square_is_bounded(proc, monkeypatch, tmp_path):
    """A 1x20000 PNG (a few hundred bytes) must not become a 20000x20000 square (5.8 GB)."""
    from dynllava_jax import image_processing
    path = tmp_path / "strip.png"
    Image.new("RGB", (1, 20000), (200, 10, 10)).save(path)
    assert path.stat().st_size < 2000
    sides = []
    real = image_processing.expand2square
    monkeypatch.setattr(image_processing, "expand2square",
                        lambda im, bg=BACKGROUND: sides.append(max(im.size)) or real(im, bg))
    pixels = proc.load(path)
    assert sides == [image_processing.MAX_PADDED_SIDE]
    assert pixels.shape == (3, proc.image_size, proc.image_size) and np.isfinite(pixels).all()
    # The training data path (packed image bytes) goes through the same bound.
    from dynllava_jax.data.llava_json import RawRecord, _load_pixels
    raw = RawRecord(id="strip", conversations=None, image="strip.png", image_bytes=path.read_bytes())
    assert _load_pixels(proc, raw, None).shape == pixels.shape and len(sides) == 2
    # Images up to the bound are LLaVA's exactly: not resized first.
    small = Image.new("RGB", (30, 400))
    assert image_processing.bound_size(small) is small

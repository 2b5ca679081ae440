"""Decoding of every PIL image mode to 8-bit RGB (fastgen.data.folders, reused by the shards).

Each test writes a real PNG / TIFF / JPEG file, decodes it the way the datasets do and
compares the result with the 8-bit RGB that numpy arithmetic, done here in the test,
expects. The datasets give tensors in [-1, 1]; :func:`as_uint8_scale` maps them back to
the 0..255 scale so the expectations read in 8-bit terms.

Documented rules checked here:

* 16-bit greyscale (``I;16``, ``I;16B``, and ``I`` holding 16-bit data) -> ``value / 257``
  (= ``value * 255 / 65535``), rounded;
* ``F`` (float) -> ``value * 255`` when every value lies in [0, 1], else read on the
  0..255 scale; NaN -> 0;
* transparency (``LA``, ``RGBA``, ``PA``, ``P`` / ``L`` / ``RGB`` / ``I;16`` with a
  ``transparency`` entry) is composited over **white**;
* ``CMYK`` goes through PIL's own conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.data.folders import ImageCaptionFolder, decode_image, image_to_tensor
from fastgen.data.shards import ImageCaptionShards, write_shards


def as_uint8_scale(pixels: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [-1, 1] -> ``[H, W, 3]`` float on the 0..255 scale."""
    return ((pixels.double() + 1.0) * 127.5).permute(1, 2, 0).numpy()


def decoded(path: Path | bytes) -> np.ndarray:
    """The 8-bit RGB the datasets see for one file (no resize)."""
    img = decode_image(path)
    assert img.mode == "RGB"
    return as_uint8_scale(image_to_tensor(img))


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey, dtype=np.float64)[..., None], 3, axis=2)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite ``rgb`` (0..255) with ``alpha`` (0..255) over a white background."""
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255.0
    return np.asarray(rgb, dtype=np.float64) * a + 255.0 * (1.0 - a)


def assert_close(got: np.ndarray, want: np.ndarray, atol: float = 1.0) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    worst = float(np.abs(got - want).max())
    assert worst <= atol, f"max difference {worst:.2f} > {atol} (got {got.reshape(-1, 3)[:4]}, want {want.reshape(-1, 3)[:4]})"


# --------------------------------------------------------------------------- 16-bit greyscale


def test_16bit_png_mid_grey_is_128_not_white(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "grey.png")
    with Image.open(tmp_path / "grey.png") as im:
        assert im.mode == "I;16"  # the mode PIL reads a 16-bit greyscale PNG as
    got = decoded(tmp_path / "grey.png")
    assert_close(got, np.full((8, 8, 3), 128.0))

    # The same file through the folder dataset and through a webdataset shard.
    (tmp_path / "grey.txt").write_text("mid grey")
    item = ImageCaptionFolder(tmp_path, resolution=8)[0]
    assert_close(as_uint8_scale(item["pixels"]), np.full((8, 8, 3), 128.0))
    write_shards([((tmp_path / "grey.png").read_bytes(), "mid grey")], tmp_path / "shards", per_shard=1)
    (sample,) = list(ImageCaptionShards(tmp_path / "shards", resolution=8, rank=0, world_size=1))
    assert_close(as_uint8_scale(sample["pixels"]), np.full((8, 8, 3), 128.0))


def test_16bit_png_ramp_keeps_order_and_spread(tmp_path):
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (4, 1))).save(tmp_path / "ramp.png")
    got = decoded(tmp_path / "ramp.png")
    want = grey_to_rgb(np.tile(np.rint(ramp / 257.0), (4, 1)))
    assert_close(got, want)
    row = got[0, :, 0]
    assert np.all(np.diff(row) >= 0)  # order kept
    assert row[0] <= 0.5 and row[-1] >= 254.5  # full spread, from black to white
    assert len(np.unique(np.rint(row))) >= 60  # not collapsed to a few levels


def test_16bit_big_endian_tiff(tmp_path):
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(values.astype(">u2")).save(tmp_path / "be.tif")
    with Image.open(tmp_path / "be.tif") as im:
        assert im.mode == "I;16B"
    assert_close(decoded(tmp_path / "be.tif"), grey_to_rgb(np.rint(values / 257.0)))


def test_32bit_int_image_holding_16bit_data(tmp_path):
    values = np.array([[0, 4096, 32768, 65535], [255, 1000, 50000, 65000]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "int.tif")
    with Image.open(tmp_path / "int.tif") as im:
        assert im.mode == "I"
    assert_close(decoded(tmp_path / "int.tif"), grey_to_rgb(np.rint(values / 257.0)))


def test_16bit_png_with_transparent_value(tmp_path):
    values = np.array([[1000, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "t16.png", transparency=1000)
    alpha = np.where(values == 1000, 0, 255)
    want = over_white(grey_to_rgb(np.rint(values / 257.0)), alpha)
    assert_close(decoded(tmp_path / "t16.png"), want)


# --------------------------------------------------------------------------- float


def test_float_image_in_unit_range_and_on_8bit_scale(tmp_path):
    unit = np.array([[0.0, 0.25, 0.5, 1.0], [0.1, 0.2, 0.8, 0.9]], dtype=np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    with Image.open(tmp_path / "unit.tif") as im:
        assert im.mode == "F"
    assert_close(decoded(tmp_path / "unit.tif"), grey_to_rgb(np.rint(unit.astype(np.float64) * 255.0)))

    scaled = np.array([[0.0, 12.5, 128.0, 200.0], [255.0, 300.0, -4.0, 64.0]], dtype=np.float32)
    Image.fromarray(scaled).save(tmp_path / "scaled.tif")
    assert_close(decoded(tmp_path / "scaled.tif"), grey_to_rgb(np.clip(np.rint(scaled.astype(np.float64)), 0, 255)))


# --------------------------------------------------------------------------- palette


PALETTE = np.array([[255, 0, 0], [0, 0, 255], [10, 200, 30], [90, 90, 90]], dtype=np.uint8)
INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 0, 0]], dtype=np.uint8)


def _palette_image() -> Image.Image:
    img = Image.new("P", (4, 3))
    img.putdata(INDICES.reshape(-1).tolist())
    img.putpalette(PALETTE.reshape(-1).tolist())
    return img


def test_palette_png_without_transparency(tmp_path):
    _palette_image().save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P" and "transparency" not in im.info
    assert_close(decoded(tmp_path / "p.png"), PALETTE[INDICES].astype(np.float64), atol=1e-3)


def test_palette_png_with_transparent_index(tmp_path):
    _palette_image().save(tmp_path / "pt.png", transparency=1)
    alpha = np.where(INDICES == 1, 0, 255)
    assert_close(decoded(tmp_path / "pt.png"), over_white(PALETTE[INDICES], alpha))


def test_palette_png_with_partial_alpha_per_entry(tmp_path):
    entry_alpha = np.array([255, 0, 128, 64])
    _palette_image().save(tmp_path / "pa.png", transparency=bytes(entry_alpha.tolist()))
    with Image.open(tmp_path / "pa.png") as im:
        assert im.mode == "P" and isinstance(im.info["transparency"], bytes)
    assert_close(decoded(tmp_path / "pa.png"), over_white(PALETTE[INDICES], entry_alpha[INDICES]))


# --------------------------------------------------------------------------- CMYK


CMYK = np.array(
    [[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0]],
     [[0, 0, 0, 255], [10, 20, 30, 40], [200, 100, 50, 25], [128, 128, 128, 128]]],
    dtype=np.uint8,
)


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """R = (255 - C) * (255 - K) / 255 (and G, B alike): the conversion PIL documents."""
    c = cmyk.astype(np.float64)
    return (255.0 - c[..., :3]) * (255.0 - c[..., 3:4]) / 255.0


def test_cmyk_tiff_through_pils_conversion(tmp_path):
    Image.fromarray(CMYK, mode="CMYK").save(tmp_path / "c.tif")
    with Image.open(tmp_path / "c.tif") as im:
        assert im.mode == "CMYK"
    assert_close(decoded(tmp_path / "c.tif"), cmyk_to_rgb(CMYK))


def test_cmyk_jpeg(tmp_path):
    # Solid 8x8 blocks (one per JPEG block) so the lossy encoding keeps each colour.
    blocks = np.kron(CMYK, np.ones((8, 8, 1), dtype=np.uint8))
    Image.fromarray(blocks, mode="CMYK").save(tmp_path / "c.jpg", quality=100, subsampling=0)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
    got = decoded(tmp_path / "c.jpg")
    want = cmyk_to_rgb(blocks)
    assert_close(got[2:6, 2:6], want[2:6, 2:6], atol=4.0)  # block centres only (JPEG is lossy)
    assert_close(got[10:14, 10:14], want[10:14, 10:14], atol=4.0)


# --------------------------------------------------------------------------- alpha


def test_la_and_rgba_composite_over_white(tmp_path):
    rng = np.random.default_rng(0)
    la = rng.integers(0, 256, size=(5, 6, 2), dtype=np.uint8)
    la[0, 0, 1], la[0, 1, 1] = 0, 255  # one fully transparent, one opaque pixel
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    want = over_white(grey_to_rgb(la[..., 0]), la[..., 1])
    got = decoded(tmp_path / "la.png")
    assert_close(got, want)
    assert_close(got[0, 0], np.full(3, 255.0), atol=1e-3)  # transparent -> the white background

    rgba = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    got = decoded(tmp_path / "rgba.png")
    assert_close(got, over_white(rgba[..., :3], rgba[..., 3]))
    assert_close(got[0, 0], np.full(3, 255.0), atol=1e-3)


def test_rgb_and_grey_pngs_with_a_transparent_colour(tmp_path):
    rgb = np.array([[[10, 20, 30], [200, 100, 0]], [[10, 20, 30], [0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb_t.png", transparency=(10, 20, 30))
    alpha = np.where(np.all(rgb == (10, 20, 30), axis=-1), 0, 255)
    assert_close(decoded(tmp_path / "rgb_t.png"), over_white(rgb, alpha))

    grey = np.array([[7, 100], [7, 0]], dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "l_t.png", transparency=7)
    assert_close(decoded(tmp_path / "l_t.png"), over_white(grey_to_rgb(grey), np.where(grey == 7, 0, 255)))


# --------------------------------------------------------------------------- plain 8-bit


def test_greyscale_and_bilevel(tmp_path):
    grey = np.arange(0, 256, 8, dtype=np.uint8).reshape(4, 8)
    Image.fromarray(grey, mode="L").save(tmp_path / "l.png")
    assert_close(decoded(tmp_path / "l.png"), grey_to_rgb(grey), atol=1e-3)

    bits = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as im:
        assert im.mode == "1"
    assert_close(decoded(tmp_path / "b.png"), grey_to_rgb(bits * 255.0), atol=1e-3)


def test_plain_rgb_png_and_jpeg_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert_close(decoded(tmp_path / "rgb.png"), rgb.astype(np.float64), atol=1e-3)
    Image.fromarray(np.full((16, 16, 3), (40, 120, 220), dtype=np.uint8)).save(tmp_path / "rgb.jpg", quality=100)
    assert_close(decoded((tmp_path / "rgb.jpg").read_bytes()), np.full((16, 16, 3), (40.0, 120.0, 220.0)), atol=3.0)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "LA", "RGBA", "CMYK", "P", "1", "L"])
def test_image_to_tensor_accepts_any_mode_in_memory(mode):
    # A PIL image that never went through decode_image (e.g. built in memory) is converted
    # by the same rules: every mode gives a [3, H, W] tensor in [-1, 1].
    values = {"I;16": 32768, "I": 32768, "F": 0.5, "LA": (128, 255), "RGBA": (128, 128, 128, 255),
              "CMYK": (0, 0, 0, 127), "P": 0, "1": 1, "L": 128}
    img = Image.new(mode, (3, 2), values[mode])
    if mode == "P":
        img.putpalette([128, 128, 128] * 256)
    t = image_to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    want = 255.0 if mode == "1" else 128.0
    assert_close(as_uint8_scale(t), np.full((2, 3, 3), want))

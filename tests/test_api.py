"""The Python API (`upscale.load_model`, `upscale.upscale_image`) on arrays, PIL images and loaded files.

One small real model (AGDN x2, shipped weights) on ~20 x 24 px inputs keeps this fast on a CPU.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import imagecodecs
import numpy as np
import pytest
from conftest import REPO, half_precision_goes_non_finite
from PIL import Image

import upscale
from upscale.api import upscale_image_with_stats
from upscale.engine import RunStats
from upscale.imageio import LoadedImage, read_image, save_image

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU

EXAMPLES = REPO / "examples"
H, W = 24, 20


@pytest.fixture(scope="module")
def model():
    return upscale.load_model("agdn", 2, device="cpu")


class NearestModel:
    """A stand-in for an Upscaler (nearest-neighbour x2) for the tests of types, modes and layouts."""

    scale = 2

    def __init__(self):
        self.calls = 0

    def upscale_array(self, rgb: np.ndarray) -> tuple[np.ndarray, RunStats]:
        self.calls += 1
        return np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1).clip(0, 1).astype(np.float32), RunStats()


@pytest.fixture
def stub():
    return NearestModel()


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """A real photograph, H x W x 3 uint8."""
    with Image.open(EXAMPLES / "coffee.png") as im:
        return np.asarray(im.convert("RGB").crop((70, 40, 70 + W, 40 + H)))


def test_import_is_light():
    code = "import sys, upscale; assert 'torch' not in sys.modules; print(upscale.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == upscale.__version__


def test_load_model(model):
    assert model.scale == 2 and model.entry.name == "agdn" and str(model.device) == "cpu"
    assert upscale.load_model("agdn x2").entry.label == "agdn x2"
    from upscale.registry import UnknownModelError

    with pytest.raises(UnknownModelError, match="no x5"):
        upscale.load_model("agdn", 5)


@pytest.fixture(scope="module")
def engine_out(model, crop) -> np.ndarray:
    """What the engine (the CLI's code path) makes of the crop: float, clamped."""
    return model.upscale_array(crop.astype(np.float32) / 255)[0]


def test_uint8_rgb_matches_the_engine(model, crop, engine_out):
    out = upscale.upscale_image(model, crop)
    assert out.dtype == np.uint8 and out.shape == (2 * H, 2 * W, 3)
    from upscale.metrics import to_uint8

    np.testing.assert_array_equal(out, to_uint8(engine_out))  # the same engine as the CLI, the same rounding
    small = np.asarray(Image.fromarray(out).resize((W, H), Image.BICUBIC), np.float64)
    assert np.abs(small - crop).mean() < 6


@pytest.mark.parametrize("protocol", ["reference", "tiled"])
def test_engine_takes_read_only_strided_and_float64_arrays_as_they_are(model, crop, protocol):
    """The engine reads the caller's array through a CHW view (no second copy of a photo): read-only arrays
    (no warning from torch), reversed strides and float64 give what a fresh float32 copy gives, whole or tiled,
    and the caller's array is left as it was."""
    import warnings

    rgb = crop.astype(np.float32) / 255
    model.protocol, model.tile = protocol, (32 if protocol == "tiled" else None)
    try:
        want = model.upscale_array(rgb.copy())[0].copy()
        read_only = rgb.copy()
        read_only.flags.writeable = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(model.upscale_array(read_only)[0], want)
        np.testing.assert_array_equal(read_only, rgb)
        flipped = np.ascontiguousarray(rgb[:, ::-1])[:, ::-1]  # the same pixels through negative strides
        np.testing.assert_array_equal(model.upscale_array(flipped)[0], want)
        np.testing.assert_array_equal(model.upscale_array(rgb.astype(np.float64))[0], want)
    finally:
        model.protocol, model.tile = "auto", None


def test_float_and_uint16_inputs(model, crop, engine_out):
    f = crop.astype(np.float64) / 255
    out = upscale.upscale_image(model, f)
    assert out.dtype == np.float64 and out.shape == (2 * H, 2 * W, 3) and 0 <= out.min() and out.max() <= 1
    np.testing.assert_allclose(out, engine_out, atol=1e-6)
    u16 = np.round(f * 65535).astype(np.uint16)
    out16 = upscale.upscale_image(model, u16)
    assert out16.dtype == np.uint16 and out16.shape == (2 * H, 2 * W, 3)
    assert len(np.unique(out16)) > 256  # real 16-bit values, not 8-bit steps
    assert np.abs(out16 / 65535 - out).max() < 1e-3


def test_grey_arrays_stay_grey(model, crop):
    grey = np.asarray(Image.fromarray(crop).convert("L"))
    out = upscale.upscale_image(model, grey)
    assert out.shape == (2 * H, 2 * W) and out.dtype == np.uint8
    # the mean of the three output channels of the replicated grey image
    rgb, _ = model.upscale_array(np.repeat(grey[..., None].astype(np.float32) / 255, 3, axis=2))
    from upscale.metrics import to_uint8

    np.testing.assert_array_equal(out, to_uint8(rgb.mean(axis=2)))


def red_square(size=(H, W)) -> np.ndarray:
    """Red square on a transparent background whose hidden colour is black (as most editors store it)."""
    a = np.zeros((*size, 4), np.uint8)
    a[6:18, 5:15] = (255, 0, 0, 255)
    a[5, 5:15] = (255, 0, 0, 128)  # a soft, half-transparent top edge
    return a


def test_rgba_premultiplied_has_no_dark_fringe(model):
    src = red_square()
    out = upscale.upscale_image(model, src)
    assert out.shape == (2 * H, 2 * W, 4) and out.dtype == np.uint8
    alpha = out[..., 3].astype(np.float64) / 255
    edge = (alpha > 0.15) & (alpha < 0.85)
    assert edge.sum() >= 20
    red = out[..., 0].astype(np.float64)[edge]
    assert red.mean() > 220 and red.min() > 120  # stays red at the semi-transparent edge
    assert out[..., 1][edge].max() < 20 and out[..., 2][edge].max() < 20  # no other colour creeps in
    # what a naive upscale of the straight colour does: the black of the hidden pixels bleeds into the edge
    naive = model.upscale_array(src[..., :3].astype(np.float32) / 255)[0][..., 0][edge] * 255
    assert naive.mean() < red.mean() - 30
    # alpha itself: opaque inside, no ghost halo two low-resolution pixels away from the shape
    assert alpha[14:34, 12:28].min() > 0.99
    ghost = np.ones_like(alpha, bool)
    ghost[6:40, 6:34] = False  # the square (rows 10-35, cols 10-29 at 2x) grown by 2 LR pixels
    assert alpha[ghost].max() == 0


def test_opaque_alpha_skips_the_extra_pass(stub, crop):
    rgba = np.dstack([crop, np.full((H, W), 255, np.uint8)])
    out = upscale.upscale_image(stub, rgba)
    assert stub.calls == 1 and out.shape == (2 * H, 2 * W, 4) and (out[..., 3] == 255).all()
    np.testing.assert_array_equal(out[..., :3], np.repeat(np.repeat(crop, 2, 0), 2, 1))
    rgba[0, 0, 3] = 254
    upscale.upscale_image(stub, rgba)
    assert stub.calls == 3  # colour and alpha passes


@pytest.mark.parametrize("shape", [(H, W), (H, W, 1), (H, W, 2), (H, W, 3), (H, W, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_array_layouts_and_dtypes_are_kept(stub, shape, dtype):
    rng = np.random.default_rng(1)
    a = rng.random(shape)
    a = (a * np.iinfo(dtype).max).astype(dtype) if np.issubdtype(dtype, np.integer) else a.astype(dtype)
    out = upscale.upscale_image(stub, a)
    assert out.dtype == dtype and out.shape == (2 * H, 2 * W, *shape[2:])
    if len(shape) == 2 or shape[2] in (1, 3):  # no alpha: the stub's nearest upscale comes back
        expected = np.repeat(np.repeat(a, 2, 0), 2, 1)
        if np.issubdtype(dtype, np.integer):
            np.testing.assert_array_equal(out, expected)
        else:  # computed in float32
            np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("mode, out_mode", [("RGB", "RGB"), ("RGBA", "RGBA"), ("L", "L"), ("LA", "LA"),
                                            ("P", "RGB"), ("PT", "RGBA"), ("I;16", "I;16")])
def test_pil_images_keep_their_mode(stub, crop, mode, out_mode):
    im = Image.fromarray(crop)
    if mode == "RGBA":
        im = Image.fromarray(red_square())
    elif mode in ("L", "LA"):
        im = im.convert(mode)
    elif mode == "P":
        im = im.quantize(32)
    elif mode == "PT":
        im = Image.fromarray(red_square()).quantize(8)
        im.info["transparency"] = int(np.asarray(im)[0, 0])
    elif mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257))
    im.info["icc_profile"] = None
    out = upscale.upscale_image(stub, im)
    assert isinstance(out, Image.Image) and out.mode == out_mode and out.size == (2 * W, 2 * H)
    if out_mode == "RGBA":
        assert np.asarray(out)[0, 0, 3] < 10 and np.asarray(out)[24, 20, 3] > 245


def test_pil_rgba_through_the_real_model(model):
    out = upscale.upscale_image(model, Image.fromarray(red_square()))
    assert out.mode == "RGBA" and out.size == (2 * W, 2 * H)
    a = np.asarray(out)
    assert a[0, 0, 3] == 0 and a[24, 20, 3] > 250 and a[24, 20, 0] > 240


def test_pil_keeps_the_icc_profile(stub):
    with Image.open(EXAMPLES / "cat.png") as src:
        im = src.crop((0, 0, W, H))
        im.load()
    out = upscale.upscale_image(stub, im)
    assert out.info["icc_profile"] == im.info["icc_profile"]


def test_loaded_image_round_trip_keeps_metadata_and_16_bits(model, tmp_path):
    ramp = np.linspace(2000, 63000, H * W).reshape(H, W)
    a = np.round(np.dstack([ramp, ramp[::-1], np.full((H, W), 30000.0), ramp.T.reshape(H, W)])).astype(np.uint16)
    (tmp_path / "in.png").write_bytes(imagecodecs.png_encode(a))
    image = dataclasses.replace(read_image(tmp_path / "in.png"), text={"Title": "ramp"})
    big = upscale.upscale_image(model, image)
    assert isinstance(big, LoadedImage) and big.rgb.shape == (2 * H, 2 * W, 3) and big.alpha.shape == (2 * H, 2 * W)
    assert big.bit_depth == 16 and big.text == {"Title": "ramp"} and big.path == image.path
    save_image(big, tmp_path / "out.png", provenance={"model": model.entry.label})
    stored = imagecodecs.png_decode((tmp_path / "out.png").read_bytes())
    assert stored.dtype == np.uint16 and stored.shape == (2 * H, 2 * W, 4)
    assert len(np.unique(stored[..., 0])) > 256
    with Image.open(tmp_path / "out.png") as im:
        im.load()
        assert im.text["Title"] == "ramp" and im.text["upscale:model"] == "agdn x2"


def test_loaded_grey_with_alpha(stub, tmp_path):
    Image.fromarray(red_square()).convert("LA").save(tmp_path / "la.png")
    big = upscale.upscale_image(stub, read_image(tmp_path / "la.png"))
    assert big.grayscale and big.alpha is not None
    assert (big.rgb[..., 0] == big.rgb[..., 1]).all()
    save_image(big, tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").mode == "LA"


def test_bad_inputs(stub):
    with pytest.raises(TypeError, match="dtype"):
        upscale.upscale_image(stub, np.zeros((H, W, 3), np.int64))
    with pytest.raises(ValueError, match="shape"):
        upscale.upscale_image(stub, np.zeros((H, W, 5), np.uint8))
    with pytest.raises(TypeError, match="cannot upscale a str"):
        upscale.upscale_image(stub, "photo.png")


def test_fp32_fallbacks_of_both_passes_of_an_rgba_image_are_counted():
    # an RGBA image runs the network twice (colour, alpha): the count once kept only the last pass's
    model = upscale.load_model("agdn", 2, device="cpu", precision="bf16")
    rgba = np.random.default_rng(0).random((20, 24, 4)).astype(np.float32)
    rgba[..., 3] = 0.5  # not opaque: the alpha pass runs
    with half_precision_goes_non_finite(model.model.upsampler, on_call=1):  # the colour pass
        out, stats = upscale_image_with_stats(model, rgba)
    assert out.shape == (40, 48, 4) and np.isfinite(out).all()
    assert stats.fp32_fallbacks == 1 and stats.tiles == 2 and stats.notes == [
        "non-finite bf16 output, recomputed in fp32"]


@pytest.fixture(scope="module")
def tiled_model():
    return upscale.load_model("agdn", 2, device="cpu", protocol="tiled", tile=32)


@pytest.mark.parametrize("fmt,depth,grey", [("PNG", 8, False), ("PNG", 16, False), ("PNG", 8, True),
                                            ("PNG", 16, True), ("TIFF", 16, False), ("JPEG", 8, True),
                                            ("WEBP", 8, False), ("PNG", 8, None)])
def test_quantised_as_finished_writes_what_the_float_result_writes(tiled_model, fmt, depth, grey):
    # The command line asks for the colour quantised band by band as the engine finishes it (no float output
    # held whole); the file must be byte for byte the one the float result gives. Tiles of 32 px on 90 x 70:
    # several bands. None: an alpha plane, which keeps the float path.
    from upscale.imageio import encode_image, output_bits

    with Image.open(EXAMPLES / "coffee.png") as im:
        rgb = np.asarray(im.convert("RGB").crop((10, 10, 80, 100)), dtype=np.float32) / 255
    if grey:
        rgb = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2)
    alpha = np.linspace(0.2, 1, rgb.shape[0] * rgb.shape[1], dtype=np.float32).reshape(rgb.shape[:2])
    image = LoadedImage(rgb=rgb, grayscale=bool(grey), bit_depth=depth, alpha=alpha if grey is None else None)
    bits = output_bits(image, fmt)
    assert bits == (depth if fmt in ("PNG", "TIFF") else 8)
    floats, stats = upscale_image_with_stats(tiled_model, image)
    quantised, q_stats = upscale_image_with_stats(tiled_model, image, bits=bits)
    assert stats.tiles > 2 and q_stats.tiles == stats.tiles
    if grey is None:
        assert quantised.rgb.dtype == np.float32 and quantised.alpha is not None
    else:
        assert quantised.rgb.dtype == (np.uint16 if bits == 16 else np.uint8) and quantised.alpha is None
        assert quantised.rgb.shape == floats.rgb.shape
    assert encode_image(quantised, fmt) == encode_image(floats, fmt)


def test_encoders_take_quantised_colour_at_either_depth(tmp_path):
    from upscale.imageio import ImageError, encode_image

    eight = np.arange(24 * 20 * 3, dtype=np.uint32).reshape(24, 20, 3).astype(np.uint8)
    deep = imagecodecs.png_decode(encode_image(LoadedImage(rgb=eight, bit_depth=16), "PNG"))
    assert deep.dtype == np.uint16 and np.array_equal(deep, eight.astype(np.uint16) * 257)
    wide = eight.astype(np.uint16) * 257
    assert np.array_equal(imagecodecs.png_decode(encode_image(LoadedImage(rgb=wide), "PNG")), eight)
    with pytest.raises(ImageError, match="alpha"):
        encode_image(LoadedImage(rgb=eight, alpha=np.ones((24, 20), np.float32)), "PNG")

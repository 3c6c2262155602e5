"""Reading and writing images: modes, alpha, 16 bits, orientation, metadata, errors and atomic writes.

Every test builds real files (Pillow, or imagecodecs for 16 bits) in tmp_path; no network, no model.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import struct
import sys
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from conftest import REPO
from PIL import Image, ImageCms, JpegImagePlugin

from upscale import imageio
from upscale.imageio import (
    ImageError,
    LoadedImage,
    encode_image,
    read_image,
    save_image,
)
from upscale.imageio.encode import _tiff16
from upscale.imageio.image import _compose

EXAMPLES = REPO / "examples"
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
PROVENANCE = {"model": "agdn x2", "variant": "agdn", "scale": "2", "tile": "none", "precision": "fp32"}
XMP = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
    '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    'tiff:Orientation="6"><dc:title><rdf:Alt><rdf:li xml:lang="x-default">Harbour at dawn</rdf:li></rdf:Alt>'
    "</dc:title></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>"
).encode()


def camera_exif(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0110] = "Canon EOS R5"  # Model
    exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = "2021:06:01 12:34:56"  # DateTimeOriginal
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (48.0, 51.0, 24.0), "E", (2.0, 21.0, 3.0)
    return exif


def photo(size=(20, 24)) -> Image.Image:
    """A real photograph cropped to `size` (colourful, not a synthetic gradient)."""
    with Image.open(EXAMPLES / "cat.png") as im:
        return im.convert("RGB").crop((60, 30, 60 + size[0], 30 + size[1]))


def assert_exif_kept(exif: Image.Exif, software: bool = True):
    assert exif[0x010F] == "Canon" and exif[0x0110] == "Canon EOS R5"
    assert exif.get(0x0112, 1) == 1
    assert exif.get_ifd(0x8769)[0x9003] == "2021:06:01 12:34:56"
    gps = exif.get_ifd(0x8825)
    assert gps[1] == "N" and tuple(float(v) for v in gps[2]) == (48.0, 51.0, 24.0)
    if software:
        assert "model=agdn x2" in exif[0x0131] and exif[0x0131].startswith("upscale ")


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --------------------------------------------------------------------------------------------------
# Reading: modes
# --------------------------------------------------------------------------------------------------


def test_rgb_photo_reads_as_float_rgb_with_metadata():
    image = read_image(EXAMPLES / "cat.png")
    assert isinstance(image, LoadedImage)
    assert image.rgb.dtype == np.float32 and image.rgb.shape == (106, 160, 3)
    assert image.alpha is None and not image.grayscale and image.bit_depth == 8
    assert image.source_format == "PNG" and image.mode == "RGB" and image.path == EXAMPLES / "cat.png"
    assert image.icc_profile is not None  # the example carries one
    expected = np.asarray(Image.open(EXAMPLES / "cat.png").convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_array_equal(image.rgb, expected)


def test_rgba_keeps_straight_alpha(tmp_path):
    a = np.zeros((24, 20, 4), np.uint8)
    a[..., :3] = np.asarray(photo())
    a[..., 3] = np.linspace(0, 255, 20).astype(np.uint8)[None, :]
    Image.fromarray(a).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(image.alpha, a[..., 3] / np.float32(255))
    np.testing.assert_array_equal(image.rgb, a[..., :3] / np.float32(255))


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_grey_modes_read_as_grey(tmp_path, mode):
    grey = photo().convert("L")
    if mode == "LA":
        im = Image.merge("LA", (grey, grey.point(lambda v: 255 - v)))
    else:
        im = grey.convert(mode)
    im.save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.grayscale and image.bit_depth == 8
    assert (image.rgb[..., 0] == image.rgb[..., 1]).all() and (image.rgb[..., 1] == image.rgb[..., 2]).all()
    assert (image.alpha is not None) == (mode == "LA")


def test_palette_with_transparency_becomes_rgba(tmp_path):
    im = photo().quantize(16)
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    image = read_image(tmp_path / "p.png")
    indices = np.asarray(Image.open(tmp_path / "p.png"))
    assert image.alpha is not None and not image.grayscale
    np.testing.assert_array_equal(image.alpha == 0, indices == 0)
    im.save(tmp_path / "p.gif")
    assert read_image(tmp_path / "p.gif").alpha is not None


def test_palette_without_transparency_becomes_rgb(tmp_path):
    photo().quantize(16).save(tmp_path / "p.png")
    image = read_image(tmp_path / "p.png")
    assert image.alpha is None and image.rgb.shape == (24, 20, 3)


def test_cmyk_becomes_rgb(tmp_path):
    photo().convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    image = read_image(tmp_path / "c.jpg")
    assert image.mode == "CMYK" and image.rgb.shape == (24, 20, 3) and not image.grayscale
    assert np.abs(image.rgb - np.asarray(photo(), np.float32) / 255).mean() < 0.05


def test_32_bit_int_and_float_modes(tmp_path):
    values = np.linspace(0, 65535, 24 * 20).reshape(24, 20).astype(np.int32)
    Image.fromarray(values, "I").save(tmp_path / "i.tif")
    image = read_image(tmp_path / "i.tif")
    assert image.grayscale and image.bit_depth == 16
    np.testing.assert_allclose(image.rgb[..., 0], values / 65535, atol=1e-6)

    Image.fromarray((values * 100).astype(np.int32), "I").save(tmp_path / "big.tif")
    with pytest.raises(ImageError, match=r"big\.tif: unsupported image mode I") as e:
        read_image(tmp_path / "big.tif")
    assert "\n" not in str(e.value)

    Image.fromarray((values / 65535).astype(np.float32), "F").save(tmp_path / "f.tif")
    image = read_image(tmp_path / "f.tif")
    np.testing.assert_allclose(image.rgb[..., 0], values / 65535, atol=1e-6)


def test_unsupported_mode_is_refused_naming_file_and_mode(tmp_path):
    photo().convert("LAB").save(tmp_path / "lab.tif")
    with pytest.raises(ImageError, match=r"lab\.tif: unsupported image mode LAB"):
        read_image(tmp_path / "lab.tif")


def test_bytes_and_stream_sources(tmp_path):
    buf = io.BytesIO()
    photo().save(buf, "PNG")
    from_bytes = read_image(buf.getvalue())
    assert from_bytes.path is None and from_bytes.rgb.shape == (24, 20, 3)
    buf.seek(0)
    np.testing.assert_array_equal(read_image(buf).rgb, from_bytes.rgb)
    with pytest.raises(ImageError, match=r"^<stdin>: no image data"):
        read_image(b"")


# --------------------------------------------------------------------------------------------------
# Orientation and metadata on read
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tmp_path, orientation):
    im = photo()
    im.save(tmp_path / "o.png", exif=camera_exif(orientation))
    image = read_image(tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as src:
        from PIL import ImageOps

        expected = np.asarray(ImageOps.exif_transpose(src).convert("RGB"), np.float32) / 255
    np.testing.assert_array_equal(image.rgb, expected)
    if image.exif is not None:
        exif = Image.Exif()
        exif.load(image.exif)
        assert exif.get(0x0112, 1) == 1


def test_orientation_6_on_a_jpeg_rotates_pixels_and_resets_the_tag(tmp_path):
    im = photo((20, 24))
    im.save(tmp_path / "o.jpg", quality=100, exif=camera_exif(6), xmp=XMP)
    image = read_image(tmp_path / "o.jpg")
    assert image.rgb.shape == (20, 24, 3)  # rotated: 24 wide, 20 high
    upright = np.asarray(im.transpose(Image.Transpose.ROTATE_270), np.float32) / 255
    assert np.abs(image.rgb - upright).mean() < 0.02
    exif = Image.Exif()
    exif.load(image.exif)
    assert exif[0x0112] == 1
    assert b'tiff:Orientation="1"' in image.xmp and b"Harbour at dawn" in image.xmp


def test_orientation_from_xmp_when_exif_has_none(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    photo().save(tmp_path / "x.png", pnginfo=info)
    image = read_image(tmp_path / "x.png")
    assert image.rgb.shape == (20, 24, 3)
    assert b'tiff:Orientation="1"' in image.xmp


def test_png_text_chunks_are_read_but_not_the_xmp(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Title", "Harbour")
    info.add_itxt("Description", "Hafen im Morgenlicht, 5 °C")
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    photo().save(tmp_path / "t.png", pnginfo=info)
    image = read_image(tmp_path / "t.png")
    assert image.text == {"Title": "Harbour", "Description": "Hafen im Morgenlicht, 5 °C"}
    assert b"Harbour at dawn" in image.xmp


# --------------------------------------------------------------------------------------------------
# Errors on read
# --------------------------------------------------------------------------------------------------


def one_line_error(source, match: str, **kwargs) -> str:
    with pytest.raises(ImageError, match=match) as e:
        read_image(source, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_folder_empty_and_text_files(tmp_path):
    one_line_error(tmp_path / "nope.png", r"nope\.png: no such file")
    one_line_error(tmp_path, r": is a folder")
    (tmp_path / "empty.png").write_bytes(b"")
    one_line_error(tmp_path / "empty.png", r"empty\.png: empty file \(0 bytes\)")
    (tmp_path / "notes.png").write_text("these are my holiday notes, not a picture\n")
    one_line_error(tmp_path / "notes.png", r"notes\.png: not an image")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_truncated_image_fails_in_read_image(tmp_path, suffix):
    src = tmp_path / f"whole{suffix}"
    photo((64, 64)).save(src)
    data = src.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) * 2 // 3])
    one_line_error(tmp_path / f"cut{suffix}", rf"cut\{suffix}: truncated or corrupt image")


def test_truncated_16_bit_png(tmp_path):
    data = imagecodecs.png_encode((np.random.default_rng(0).random((40, 40, 3)) * 65535).astype(np.uint16), level=0)
    (tmp_path / "cut16.png").write_bytes(data[: len(data) // 2])
    one_line_error(tmp_path / "cut16.png", r"cut16\.png: truncated or corrupt image")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header that claims a huge image, followed by a tiny image stream."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_naming_the_setting(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(40000, 40000))
    message = one_line_error(bomb, r"bomb\.png: .*decompression bomb")
    assert "allow large images" in message and "--" not in message  # the library names the setting, not a flag
    with pytest.raises(imageio.TooLargeError) as e:
        read_image(bomb)
    assert e.value.remedy == "allow_large"
    # just above the limit (Pillow itself would only warn there) is refused as well
    bomb.write_bytes(png_claiming(10000, 9000))
    one_line_error(bomb, r"bomb\.png: 10000x9000 = 90,000,000 pixels .*allow large images")


def test_allow_large_and_set_max_pixels(tmp_path):
    photo().save(tmp_path / "p.png")
    imageio.set_max_pixels(100)
    try:
        assert imageio.max_pixels() == 100
        one_line_error(tmp_path / "p.png", r"p\.png: 20x24 = 480 pixels .*allow large images")
        assert read_image(tmp_path / "p.png", allow_large=True).rgb.shape == (24, 20, 3)
    finally:
        imageio.set_max_pixels(None)
    assert imageio.max_pixels() == Image.MAX_IMAGE_PIXELS
    assert read_image(tmp_path / "p.png").rgb.shape == (24, 20, 3)
    # allow_large lifts Pillow's own check too: the bomb gets past the size check and fails as corrupt
    (tmp_path / "bomb.png").write_bytes(png_claiming(20000, 20000))
    one_line_error(tmp_path / "bomb.png", r"bomb\.png: truncated or corrupt", allow_large=True)
    assert Image.MAX_IMAGE_PIXELS is not None  # restored


# --------------------------------------------------------------------------------------------------
# 16 bits
# --------------------------------------------------------------------------------------------------


def gradient16(channels: int) -> np.ndarray:
    """A smooth 16-bit image (2,000+ distinct levels in 24 x 20 pixels)."""
    h, w = 24, 20
    ramp = np.linspace(1000, 64000, h * w).reshape(h, w)
    planes = [ramp, ramp[::-1], np.full((h, w), 33333.0), np.linspace(0, 65535, w)[None, :].repeat(h, 0)]
    a = np.round(np.stack(planes[:channels], axis=2)).astype(np.uint16)
    return a[..., 0] if channels == 1 else a


def write16(path: Path, a: np.ndarray):
    if path.suffix == ".png":
        path.write_bytes(imagecodecs.png_encode(a))
    else:
        channels = 1 if a.ndim == 2 else a.shape[2]
        photometric = "rgb" if channels >= 3 else "minisblack"
        extra = 2 if channels in (2, 4) else None
        path.write_bytes(imagecodecs.tiff_encode(a, photometric=photometric, extrasample=extra))


def planes16(image: LoadedImage) -> np.ndarray:
    return imageio.quantise(_compose(image.rgb, image.alpha, image.grayscale), 16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_round_trip_is_exact(tmp_path, suffix, channels):
    a = gradient16(channels)
    src = tmp_path / f"in{suffix}"
    write16(src, a)
    image = read_image(src)
    assert image.bit_depth == 16 and image.grayscale == (channels <= 2) and image.has_alpha == (channels in (2, 4))
    assert len(np.unique(np.round(image.rgb[..., 0] * 65535))) > 256  # not squeezed through 8 bits
    expected = a if a.ndim == 3 else a[..., None]
    np.testing.assert_array_equal(planes16(image), expected)
    for out_suffix in (".png", ".tif"):
        dest = tmp_path / f"out{out_suffix}"
        save_image(image, dest, overwrite=True, provenance=PROVENANCE)
        back = read_image(dest)
        assert back.bit_depth == 16
        np.testing.assert_array_equal(planes16(back), expected)
        stored = (imagecodecs.png_decode if out_suffix == ".png" else imagecodecs.tiff_decode)(dest.read_bytes())
        assert stored.dtype == np.uint16
        np.testing.assert_array_equal(stored, a)


def test_16_bit_goes_to_8_bits_where_the_format_has_no_16(tmp_path):
    write16(tmp_path / "in.png", gradient16(3))
    image = read_image(tmp_path / "in.png")
    for name in ("out.jpg", "out.webp", "out.bmp"):
        save_image(image, tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.mode == "RGB" and im.size == (20, 24)
    save_image(dataclasses.replace(read_image(tmp_path / "in.png"), grayscale=True), tmp_path / "grey.jpg")
    assert Image.open(tmp_path / "grey.jpg").mode == "L"


def test_16_bit_outputs_carry_metadata(tmp_path):
    write16(tmp_path / "in.png", gradient16(4))
    image = dataclasses.replace(read_image(tmp_path / "in.png"), icc_profile=SRGB, exif=camera_exif(1).tobytes(), xmp=XMP,
                                                    text={"Title": "Harbour"})
    for name in ("out.png", "out.tif"):
        save_image(image, tmp_path / name, provenance=PROVENANCE)
        back = read_image(tmp_path / name)
        assert back.icc_profile == SRGB
        exif = Image.Exif()
        exif.load(back.exif)
        assert_exif_kept(exif)
        assert b"Harbour at dawn" in back.xmp and b'upscale:model="agdn x2"' in back.xmp
        if name == "out.png":
            assert back.text["Title"] == "Harbour" and back.text["upscale:model"] == "agdn x2"
            with Image.open(tmp_path / name) as im:  # Pillow agrees the chunks are well-formed
                im.load()
                assert im.info["icc_profile"] == SRGB and im.text["upscale:scale"] == "2"


# --------------------------------------------------------------------------------------------------
# Writing: modes and metadata per format
# --------------------------------------------------------------------------------------------------


def rich_image() -> LoadedImage:
    image = read_image(EXAMPLES / "coffee.png")
    return dataclasses.replace(image, rgb=image.rgb[:24, :20], icc_profile=SRGB, exif=camera_exif(1).tobytes(), xmp=XMP,
                         text={"Title": "Coffee", "Comment": "café"})


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_icc_exif_xmp_and_provenance_are_carried(tmp_path, suffix):
    dest = tmp_path / f"out{suffix}"
    save_image(rich_image(), dest, provenance=PROVENANCE)
    with Image.open(dest) as im:
        im.load()
        assert im.info["icc_profile"] == SRGB
        assert_exif_kept(im.getexif())
        xmp = im.info["xmp"]
        assert b"Harbour at dawn" in xmp and b'upscale:model="agdn x2"' in xmp and b'upscale:tile="none"' in xmp
        assert b"xmp:CreatorTool=\"upscale " in xmp
        if suffix == ".png":
            assert im.text["Title"] == "Coffee" and im.text["Comment"] == "café"
            assert im.text["Software"].startswith("upscale ")
            assert {im.text[f"upscale:{k}"] for k in PROVENANCE} == set(PROVENANCE.values())
        if suffix == ".jpg":
            assert im.info["comment"] == "café".encode()  # the source's comment wins over the provenance line
    back = read_image(dest)
    assert back.icc_profile == SRGB and b"Harbour at dawn" in back.xmp


def test_xmp_provenance_replaces_the_previous_run(tmp_path):
    save_image(rich_image(), tmp_path / "a.png", provenance=PROVENANCE)
    save_image(read_image(tmp_path / "a.png"), tmp_path / "b.png", provenance={**PROVENANCE, "model": "esc x4"})
    xmp = read_image(tmp_path / "b.png").xmp
    assert xmp.count(b"xmlns:upscale=") == 1 and b'upscale:model="esc x4"' in xmp
    assert xmp.count(b"xmp:CreatorTool") == 1


def test_jpeg_defaults_quality_95_and_444(tmp_path):
    img = read_image(EXAMPLES / "astronaut.jpg")
    save_image(img, tmp_path / "q95.jpg")
    save_image(img, tmp_path / "q95b.jpg", quality=95)
    save_image(img, tmp_path / "q50.jpg", quality=50)
    assert (tmp_path / "q95.jpg").read_bytes() == (tmp_path / "q95b.jpg").read_bytes()
    assert (tmp_path / "q50.jpg").stat().st_size < (tmp_path / "q95.jpg").stat().st_size
    with Image.open(tmp_path / "q95.jpg") as im:
        assert JpegImagePlugin.get_sampling(im) == 0
        tables = im.quantization
    reference = io.BytesIO()
    photo().save(reference, "JPEG", quality=95)
    with Image.open(reference) as im:
        assert tables == im.quantization  # the IJG tables of quality 95


def alpha_image() -> LoadedImage:
    rgb = np.zeros((24, 20, 3), np.float32)
    rgb[..., 0] = 1.0  # pure red
    alpha = np.zeros((24, 20), np.float32)
    alpha[6:18, 5:15] = 1.0
    alpha[5, 5:15] = 0.5
    return LoadedImage(rgb=rgb, alpha=alpha)


def test_rgba_png_webp_tiff_keep_alpha(tmp_path):
    for name in ("a.png", "a.webp", "a.tif"):
        save_image(alpha_image(), tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.mode == "RGBA"
            alpha = np.asarray(im)[..., 3]
        if name != "a.webp":  # WebP alpha is lossless too, but keep the check to the exact formats
            np.testing.assert_array_equal(alpha, imageio.quantise(alpha_image().alpha, 8))
        else:
            assert np.abs(alpha.astype(int) - imageio.quantise(alpha_image().alpha, 8)).max() <= 1


def test_jpeg_and_bmp_composite_alpha_over_white(tmp_path):
    for name in ("a.jpg", "a.bmp"):
        save_image(alpha_image(), tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.mode == "RGB"
            a = np.asarray(im).astype(int)
        tol = 8 if name == "a.jpg" else 0  # JPEG ringing at the sharp red edge
        assert (np.abs(a[0, 0] - [255, 255, 255]) <= tol).all()  # transparent -> white
        assert (np.abs(a[10, 10] - [255, 0, 0]) <= tol).all()  # opaque red stays red
        assert (np.abs(a[5, 10] - [255, 128, 128]) <= tol + 1).all()  # half-transparent red over white: pink


@pytest.mark.parametrize("suffix", [".png", ".tif", ".jpg", ".bmp"])
def test_grey_stays_grey(tmp_path, suffix):
    photo().convert("L").save(tmp_path / "g.png")
    save_image(read_image(tmp_path / "g.png"), tmp_path / f"out{suffix}")
    with Image.open(tmp_path / f"out{suffix}") as im:
        assert im.mode in ("L", "P") and im.size == (20, 24)
    photo().convert("LA").save(tmp_path / "la.png")
    if suffix in (".png", ".tif"):
        save_image(read_image(tmp_path / "la.png"), tmp_path / f"la_out{suffix}")
        assert Image.open(tmp_path / f"la_out{suffix}").mode == "LA"


def test_8_bit_rounding_is_half_to_even(tmp_path):
    rgb = np.full((4, 4, 3), 0.5, np.float32)  # 127.5 -> 128 (even)
    rgb[0, 0] = 2.5 / 255  # 2.5 -> 2
    save_image(rgb, tmp_path / "r.png")
    a = np.asarray(Image.open(tmp_path / "r.png"))
    assert a[1, 1, 0] == 128 and a[0, 0, 0] == 2


def test_arrays_can_be_saved_directly(tmp_path):
    u16 = gradient16(3)
    save_image(u16, tmp_path / "u16.png")
    np.testing.assert_array_equal(imagecodecs.png_decode((tmp_path / "u16.png").read_bytes()), u16)
    grey = np.asarray(photo().convert("L"))
    save_image(grey, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "L"


def test_encode_image_and_stdout(tmp_path, capsysbinary):
    data = encode_image(rich_image(), "png", provenance=PROVENANCE)
    assert data.startswith(b"\x89PNG")
    stream = io.BytesIO()
    assert save_image(rich_image(), stream, "jpeg") is None
    assert stream.getvalue().startswith(b"\xff\xd8")
    save_image(rich_image(), "-", "png")
    assert capsysbinary.readouterr().out.startswith(b"\x89PNG")
    with pytest.raises(ImageError, match="unknown output format"):
        encode_image(rich_image(), "pcx")


def test_webp_size_limit_is_a_clear_error(tmp_path):
    huge = LoadedImage(rgb=np.zeros((1, 17000, 3), np.float32))
    with pytest.raises(ImageError, match=r"wide\.webp: 17000x1 is too large for WEBP"):
        save_image(huge, tmp_path / "wide.webp")
    assert files_in(tmp_path) == set()


# --------------------------------------------------------------------------------------------------
# Writing: safety
# --------------------------------------------------------------------------------------------------


def test_never_over_existing_unless_overwrite(tmp_path):
    dest = tmp_path / "out.png"
    dest.write_bytes(b"precious")
    with pytest.raises(ImageError, match=r"out\.png: already exists \(use --overwrite"):
        save_image(rich_image(), dest)
    assert dest.read_bytes() == b"precious"
    save_image(rich_image(), dest, overwrite=True)
    assert dest.read_bytes().startswith(b"\x89PNG")
    assert files_in(tmp_path) == {"out.png"}


def test_never_over_a_protected_input_even_with_overwrite(tmp_path):
    src = tmp_path / "in.png"
    photo().save(src)
    before = src.read_bytes()
    for dest in (src, tmp_path / "." / "in.png", Path(os.path.relpath(src))):
        with pytest.raises(ImageError, match="refusing to write over the input"):
            save_image(read_image(src), dest, overwrite=True, protect=(src,))
    os.link(src, tmp_path / "hardlink.png")
    with pytest.raises(ImageError, match="refusing to write over the input"):
        save_image(read_image(src), tmp_path / "hardlink.png", overwrite=True, protect=[src])
    assert src.read_bytes() == before


def test_missing_folder_and_unknown_extension(tmp_path):
    with pytest.raises(ImageError, match=r"out\.png: output folder .*nope does not exist"):
        save_image(rich_image(), tmp_path / "nope" / "out.png")
    with pytest.raises(ImageError, match=r"out\.xyz: unknown output extension"):
        save_image(rich_image(), tmp_path / "out.xyz")
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "disk full"), (errno.EIO, "Input/output error")])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, code, message):
    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(ImageError, match=rf"out\.png: cannot write \({message}"):
        save_image(rich_image(), tmp_path / "out.png")
    assert files_in(tmp_path) == set()


def test_failed_encode_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    dest = tmp_path / "out.tif"
    dest.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise OSError("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(ImageError, match=r"out\.tif: cannot encode as TIFF \(encoder exploded\)"):
        save_image(rich_image(), dest, overwrite=True)
    assert files_in(tmp_path) == {"out.tif"} and dest.read_bytes() == b"old"


def test_interrupted_write_removes_the_temp_file(tmp_path, monkeypatch):
    real_replace = os.replace

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(rich_image(), tmp_path / "out.png", overwrite=True)
    assert files_in(tmp_path) == set()
    monkeypatch.setattr(os, "replace", real_replace)


def test_written_file_has_normal_permissions(tmp_path):
    save_image(rich_image(), tmp_path / "out.png")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o666 & ~mask


def test_stdin_dash(monkeypatch):
    buf = io.BytesIO()
    photo().save(buf, "PNG")

    class Stdin:
        buffer = io.BytesIO(buf.getvalue())

    monkeypatch.setattr(sys, "stdin", Stdin)
    image = read_image("-")
    assert image.path is None and image.rgb.shape == (24, 20, 3)


def test_tiff_layout_tags_do_not_leak_into_other_formats(tmp_path):
    exif = Image.Exif()
    exif.load(camera_exif(1).tobytes())  # Pillow's TIFF writer wants the sub-IFD pointers in the mapping
    photo().save(tmp_path / "in.tif", tiffinfo=exif)
    image = read_image(tmp_path / "in.tif")
    save_image(image, tmp_path / "out.jpg", provenance=PROVENANCE)
    with Image.open(tmp_path / "out.jpg") as im:
        tags = im.getexif()
        assert_exif_kept(tags)
        assert not {256, 257, 258, 259, 262, 273, 277, 278, 279, 284} & set(tags)


def test_large_16_bit_tiff_with_several_strips(tmp_path):
    rng = np.random.default_rng(3)
    a = (rng.random((300, 200, 3)) * 65535).astype(np.uint16)
    save_image(a, tmp_path / "big.tif", provenance=PROVENANCE)
    np.testing.assert_array_equal(imagecodecs.tiff_decode((tmp_path / "big.tif").read_bytes()), a)
    with Image.open(tmp_path / "big.tif") as im:
        assert len(im.tag_v2[273]) > 1 and "model=agdn x2" in im.tag_v2[305]


def test_tiff_orientation_8_and_16_bit(tmp_path):
    im = photo()
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "o8.tif", tiffinfo=exif)
    upright = np.asarray(im.transpose(Image.Transpose.ROTATE_270), np.float32) / 255
    np.testing.assert_array_equal(read_image(tmp_path / "o8.tif").rgb, upright)

    a16 = (np.asarray(im, np.uint16) * 257)[..., :3]
    tags = Image.Exif()
    tags.endian = "<"
    tags[0x0112] = 6
    (tmp_path / "o16.tif").write_bytes(_tiff16(a16, tags, None, None))
    image = read_image(tmp_path / "o16.tif")
    assert image.bit_depth == 16
    np.testing.assert_allclose(image.rgb, upright, atol=1e-6)
    exif = Image.Exif()
    exif.load(image.exif)
    assert exif.get(0x0112, 1) == 1

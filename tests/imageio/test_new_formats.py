"""HEIC/HEIF, AVIF and JPEG XL in and out: round trips made here from pixels (no binaries from elsewhere), with
size, mode, bit depth, ICC, an EXIF camera tag and the orientation checked; a missing codec is one line."""

import io

import numpy as np
import pytest
from conftest import photo_crop, run
from PIL import Image, ImageCms

from upscale.imageio import (
    ImageError,
    format_by_magic,
    format_support,
    read_image,
    save_image,
)
from upscale.imageio import image as image_module

NEW = {"AVIF": ".avif", "HEIF": ".heic", "JXL": ".jxl"}


def available(fmt: str) -> bool:
    return bool(format_support().get(fmt, {}).get("write"))


def source_png(path, orientation: int = 6):
    """A 40 x 24 photo crop with an sRGB ICC profile, a camera make and model, and an EXIF orientation."""
    rgb = np.asarray(Image.open(photo_crop(path.with_suffix(".src.png"), box=(10, 10, 50, 34))).convert("RGB"))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Canon", "EOS R5", orientation
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), icc_profile=icc)
    return path, icc


@pytest.mark.parametrize("fmt", list(NEW))
def test_round_trip_keeps_size_mode_icc_exif_and_orientation(tmp_path, fmt):
    if not available(fmt):
        pytest.skip(f"{fmt} codec not installed here: {format_support()[fmt]['via']}")
    src, icc = source_png(tmp_path / "src.png")
    loaded = read_image(src)
    assert loaded.rgb.shape[:2] == (40, 24)  # orientation 6 applied on reading: 24 wide, 40 high
    out = save_image(loaded, tmp_path / f"out{NEW[fmt]}", quality=95, provenance={"model": "agdn x2"})
    head = out.read_bytes()[:12]
    assert format_by_magic(head) == fmt
    back = read_image(out)
    assert back.source_format == fmt and back.rgb.shape == (40, 24, 3) and back.bit_depth == 8
    assert back.alpha is None and not back.grayscale
    if fmt == "JXL":  # libjxl stores a standard colour space as a code and gives back its own equal profile
        profile = ImageCms.ImageCmsProfile(io.BytesIO(back.icc_profile))
        assert ImageCms.getProfileDescription(profile).strip() == "sRGB"
    else:
        assert back.icc_profile == icc
    exif = Image.Exif()
    exif.load(back.exif)
    assert exif.get(0x010F) == "Canon" and exif.get(0x0110) == "EOS R5"
    assert exif.get(0x0112, 1) == 1  # the pixels are upright; the tag says so (no double rotation)
    assert np.abs(back.rgb - loaded.rgb).mean() < 0.03  # lossy at quality 95, but the same picture


@pytest.mark.parametrize("fmt", list(NEW))
def test_the_cli_writes_and_reads_each_new_format(tmp_path, fmt):
    if not available(fmt):
        pytest.skip(f"{fmt} codec not installed here")
    src = photo_crop(tmp_path / "p.png", box=(0, 0, 20, 16))
    out = tmp_path / f"p_x2{NEW[fmt]}"
    result = run(src, "-s", "2", "-o", out)
    assert result.returncode == 0, result.stderr
    result = run(out, "-s", "2", "-o", tmp_path / "again.png")  # read back: upscaled again
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "again.png").size == (80, 64)
    by_flag = run(src, "-s", "2", "--format", NEW[fmt].lstrip("."), "-o", tmp_path / "flagged")
    assert by_flag.returncode == 0, by_flag.stderr
    assert format_by_magic((tmp_path / "flagged").read_bytes()[:12]) == fmt


def test_a_missing_codec_is_one_line_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(image_module, "plugins", lambda: {"HEIF": "HEIC/HEIF needs pillow-heif (pip install "
                                                                  "pillow-heif): No module named 'pillow_heif'",
                                                          "JXL": None, "AVIF": None})
    from upscale.imageio import encode

    monkeypatch.setattr(encode, "plugins", image_module.plugins)
    with pytest.raises(ImageError, match=r"^out.heic: cannot write HEIF: HEIC/HEIF needs pillow-heif \(pip install"):
        encode.encode_image(np.zeros((4, 4, 3), np.float32), "HEIF", name="out.heic")
    assert "\n" not in str(pytest.raises(ImageError, encode.encode_image, np.zeros((4, 4, 3), np.float32),
                                         "HEIF", name="x").value)


def test_magic_numbers_of_the_new_formats():
    assert format_by_magic(b"\x00\x00\x00\x1cftypavif") == "AVIF"
    assert format_by_magic(b"\x00\x00\x00\x18ftypheic") == "HEIF"
    assert format_by_magic(b"\x00\x00\x00\x18ftypmif1") == "HEIF"
    assert format_by_magic(b"\x00\x00\x00\x18ftypisom") is None  # an MP4 video is not an image
    assert format_by_magic(b"\xff\x0a\x00\x00") == "JXL"
    assert format_by_magic(b"\x00\x00\x00\x0cJXL \r\n\x87\n") == "JXL"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    assert format_by_magic(buf.getvalue()[:12]) == "PNG"


# -- more than 8 bits: 10/12-bit HEIC and AVIF, 16-bit JPEG XL ----------------------------------------------------

def gradient(bits: int, alpha: bool = False) -> np.ndarray:
    """A smooth 48 x 40 colour ramp with more levels than 8 bits hold, as unsigned integers of `bits` bits."""
    y, x = np.mgrid[0:48, 0:40].astype(np.float64)
    ramp = (40 * y + x) / 1919  # 1920 levels in raster order
    planes = [ramp, 1 - ramp, (x + y) / 86] + ([1 - x / 78] if alpha else [])
    return np.round(np.stack(planes, 2) * (2**bits - 1)).astype(np.uint16)


def deep_file(fmt: str, bits: int, alpha: bool = False) -> bytes:
    """A file of `fmt` at `bits` per sample, made by a codec library that writes that depth."""
    a = gradient(bits, alpha)
    if fmt == "HEIF":
        import pillow_heif

        scaled = (a.astype(np.uint32) << (16 - bits)).astype(np.uint16)  # pillow-heif takes 16-bit samples
        heif = pillow_heif.from_bytes(mode="RGBA;16" if alpha else "RGB;16", size=(40, 48), data=scaled.tobytes())
        buf = io.BytesIO()
        heif.save(buf, quality=-1)  # lossless
        return buf.getvalue()
    import imagecodecs

    if fmt == "AVIF":
        return imagecodecs.avif_encode(a, level=100, bitspersample=bits)
    return imagecodecs.jpegxl_encode(a, lossless=True)


def levels(image) -> int:
    return len(np.unique(np.round(image.rgb[..., 0] * 65535)))


@pytest.mark.parametrize("fmt,bits", [("HEIF", 10), ("AVIF", 10), ("AVIF", 12), ("JXL", 16)])
@pytest.mark.parametrize("alpha", [False, True], ids=["rgb", "rgba"])
def test_deep_files_are_read_at_their_depth(fmt, bits, alpha):
    if not available(fmt):
        pytest.skip(f"{fmt} codec not installed here")
    image = read_image(deep_file(fmt, bits, alpha))
    assert image.bit_depth == 16 and image.mode == ("RGBA;16" if alpha else "RGB;16") and image.size == (40, 48)
    assert levels(image) > 256  # 8 bits hold 256 levels; the ramp has 1920 (10 bits keep 1024 of them)
    exact = gradient(bits, alpha).astype(np.float32) / (2**bits - 1)
    assert np.abs(image.rgb - exact[..., :3]).max() < 0.02  # HEIC's colour conversion rounds a little
    if alpha:
        assert np.abs(image.alpha - exact[..., 3]).max() < 0.01


def deep_image(icc: bytes | None = None, alpha: bool = False):
    from upscale.imageio import LoadedImage

    a = gradient(16, alpha).astype(np.float32) / 65535
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS R5"
    return LoadedImage(rgb=a[..., :3], alpha=a[..., 3] if alpha else None, bit_depth=16, exif=exif.tobytes(),
                       icc_profile=icc, xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.'
                                           b'org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>')


@pytest.mark.parametrize("fmt,stored", [("HEIF", 10), ("JXL", 16), ("AVIF", 10)])
@pytest.mark.parametrize("alpha", [False, True], ids=["rgb", "rgba"])
def test_deep_images_are_written_deep_with_their_metadata(tmp_path, fmt, stored, alpha):
    if not available(fmt):
        pytest.skip(f"{fmt} codec not installed here")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = save_image(deep_image(icc, alpha), tmp_path / f"deep{NEW[fmt]}", quality=95, provenance={"model": "agdn"})
    data = out.read_bytes()
    if fmt == "HEIF":
        import pillow_heif

        assert pillow_heif.open_heif(data, convert_hdr_to_8bit=False).info["bit_depth"] == 10
    if fmt == "AVIF":  # the metadata we add to libavif's file are where other readers look: Pillow's own codec
        with Image.open(out) as im:
            im.load()
            assert {"exif", "xmp", "icc_profile"} <= set(im.info) and im.size == (40, 48)
    back = read_image(out)
    assert back.bit_depth == (16 if stored > 8 else 8) and back.has_alpha == alpha
    if stored > 8:
        assert levels(back) > 256
    exif = Image.Exif()
    exif.load(back.exif)
    assert exif.get(0x010F) == "Canon" and exif.get(0x0110) == "EOS R5"
    assert back.icc_profile is not None and back.xmp is not None and b"upscale" in back.xmp


def test_a_jpeg_xl_with_a_profile_other_than_srgb_keeps_the_profile_at_8_bits(tmp_path):
    if not available("JXL"):
        pytest.skip("JXL codec not installed here")
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # any profile that is not sRGB
    adobe_like = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()
    for icc in (lab, adobe_like):
        out = save_image(deep_image(icc), tmp_path / "p.jxl", overwrite=True)
        assert read_image(out).bit_depth == 8  # libjxl through imagecodecs would write sRGB: colour comes first


def test_a_10_bit_heic_through_the_command_line_gives_a_16_bit_png(tmp_path):
    if not available("HEIF"):
        pytest.skip("HEIF codec not installed here")
    (tmp_path / "phone.heic").write_bytes(deep_file("HEIF", 10))
    result = run(tmp_path / "phone.heic", "-s", "2", "--json")
    assert result.returncode == 0, result.stderr
    out = read_image(tmp_path / "phone_x2.png")
    assert out.bit_depth == 16 and out.size == (80, 96) and levels(out) > 256

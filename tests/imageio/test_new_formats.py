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

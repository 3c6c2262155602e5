"""The PNG writer (`imageio.encode._encode_png`): every depth and channel count, any image height against the
deflate bands (one band, several, a band per row), decoded back bit for bit by two decoders; the metadata chunks
ahead of the pixels; and the Adler-32 of joined bands."""

from __future__ import annotations

import io
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from upscale.imageio import encode as png
from upscale.imageio import encode_image, read_image


def _pixels(h, w, c, bits, seed):
    rng = np.random.default_rng(seed)
    if bits == 16:
        return rng.integers(0, 65536, (h, w, c)).astype(np.uint16)
    return rng.integers(0, 256, (h, w, c)).astype(np.uint8)


class _Bare:  # an image without metadata
    exif = xmp = None
    text: dict = {}


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == png.PNG_SIGNATURE
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        out.append((kind, body))
        pos += 12 + length
    return out


@pytest.mark.parametrize("band_bytes", [1 << 22, 997, 1])
@pytest.mark.parametrize("h,w,c,bits", [(1, 1, 3, 8), (7, 13, 1, 8), (50, 33, 4, 8), (31, 40, 2, 8), (40, 30, 3, 16),
                                        (64, 9, 2, 16), (3, 5, 1, 16), (33, 17, 4, 16), (300, 200, 3, 8)])
def test_png_round_trips_at_every_depth_channel_count_and_band_size(monkeypatch, band_bytes, h, w, c, bits):
    monkeypatch.setattr(png, "_PNG_BAND_BYTES", band_bytes)
    pixels = _pixels(h, w, c, bits, h * w + c + bits)
    data = png._encode_png(pixels, bits, _Bare(), None, None)
    assert np.array_equal(imagecodecs.png_decode(data).reshape(h, w, c), pixels)
    kinds = [k for k, _ in _chunks(data)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    several = h > max(1, band_bytes // (w * c * bits // 8 + 1))  # rows per band: at least one
    assert (kinds.count(b"IDAT") > 1) == several  # the bands, each its own IDAT
    if bits == 8:
        decoded = np.asarray(Image.open(io.BytesIO(data)))
        assert np.array_equal(decoded.reshape(h, w, c), pixels)


def test_banded_stream_is_about_as_small_as_one_pass(monkeypatch):
    """Each band is primed with the 32 KiB before it: cutting a smooth image into many bands costs little."""
    y, x = np.mgrid[0:400, 0:300]
    pixels = np.stack([(x + y) % 256, (x * 2) % 256, (y // 3) % 256], axis=2).astype(np.uint8)
    one = png._encode_png(pixels, 8, _Bare(), None, None)
    monkeypatch.setattr(png, "_PNG_BAND_BYTES", 40000)
    banded = png._encode_png(pixels, 8, _Bare(), None, None)
    assert sum(k == b"IDAT" for k, _ in _chunks(banded)) == -(-400 // (40000 // 901))  # 44 rows of 901 bytes each
    assert np.array_equal(imagecodecs.png_decode(banded), pixels)
    assert len(banded) < 1.05 * len(one) + 200


def test_adler32_of_joined_strings():
    rng = np.random.default_rng(1)
    for n1, n2 in [(0, 0), (0, 5), (5, 0), (1, 1), (70000, 3), (5552, 5553), (123456, 654321)]:
        a, b = rng.integers(0, 256, n1, dtype=np.uint8).tobytes(), rng.integers(0, 256, n2, dtype=np.uint8).tobytes()
        assert png._adler32_joined(zlib.adler32(a), zlib.adler32(b), n2) == zlib.adler32(a + b)
    ones = b"\xff" * 100000  # sums that wrap the modulus many times
    assert png._adler32_joined(zlib.adler32(ones), zlib.adler32(ones), len(ones)) == zlib.adler32(ones + ones)


@pytest.mark.parametrize("bits", [8, 16])
def test_metadata_chunks_come_before_the_pixels_and_read_back(tmp_path, bits):
    src = tmp_path / "in.png"
    base = Image.fromarray(_pixels(20, 24, 3, 8, 3))
    info = PngInfo()
    info.add_text("Title", "a title")
    info.add_text("Comment", "ünïcode ✓")
    if bits == 8:
        base.save(src, pnginfo=info)
    else:
        src.write_bytes(imagecodecs.png_encode(_pixels(20, 24, 3, 16, 4)))
    img = read_image(src)
    data = encode_image(img, "png", provenance={"model": "agdn x4"})
    kinds = [k for k, _ in _chunks(data)]
    first_idat = kinds.index(b"IDAT")
    assert all(k == b"IDAT" for k in kinds[first_idat:-1]) and kinds[-1] == b"IEND"
    assert struct.unpack(">IIBB", _chunks(data)[0][1][:10])[2] == bits
    back = Image.open(io.BytesIO(data))
    back.load()
    if bits == 8:
        assert back.text["Title"] == "a title" and back.text["Comment"] == "ünïcode ✓"
    assert any("agdn" in v for v in back.text.values())  # provenance
    decoded = imagecodecs.png_decode(data)
    assert decoded.dtype == (np.uint16 if bits == 16 else np.uint8)

"""Encoding a `LoadedImage` (or planes) to the bytes of PNG, JPEG, WebP, TIFF or BMP, with their metadata."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any, Mapping

import numpy as np
from PIL import Image

from .image import (
    EXTENSIONS,
    SIXTEEN_BIT_FORMATS,
    WRITE_CHOICES,
    ImageError,
    LoadedImage,
    _as_image,
    _compose,
    _one_line,
    format_for,
    plugins,
    quantise,
)
from .metadata import (
    _EXIF_IFD,
    _exif_bytes,
    _exif_out,
    _icc_fits,
    _png_text,
    _provenance,
    _software_line,
    _xmp_out,
)


def encode_image(image: Any, fmt: str = "PNG", *, quality: int = 95, provenance: Mapping[str, Any] | None = None,
                 name: str = "<output>") -> bytes:
    """The encoded file (see the module docstring for what each format keeps). `image` is a LoadedImage
    (e.g. from :func:`upscale.upscale_image`), a NumPy array (H x W x 3 float in [0, 1], or any layout
    :func:`array_planes` reads) or a PIL image. `name` labels error messages."""
    fmt_name = format_for(None, fmt) or (fmt.upper() if fmt and fmt.upper() in EXTENSIONS else None)
    if fmt_name is None:
        raise ImageError(f"{name}: unknown output format {fmt!r}; use one of {WRITE_CHOICES}")
    if (why := plugins().get(fmt_name)) is not None:
        raise ImageError(f"{name}: cannot write {fmt_name}: {why}")
    img = _as_image(image)
    h, w = img.rgb.shape[:2]
    limits = {"WEBP": 16383, "JPEG": 65535, "PNG": 2**31 - 1, "TIFF": 2**31 - 1, "BMP": 2**31 - 1, "AVIF": 65535,
              "HEIF": 65535, "JXL": 2**30 - 1}
    if max(h, w) > limits[fmt_name]:
        raise ImageError(f"{name}: {w}x{h} is too large for {fmt_name} (at most {limits[fmt_name]} pixels a side); "
                         "choose png or tiff")
    prov = _provenance(provenance)
    bits = 16 if (img.bit_depth == 16 and fmt_name in SIXTEEN_BIT_FORMATS) else 8
    rgb, alpha, grey = img.rgb, img.alpha, img.grayscale
    if alpha is not None and fmt_name in ("JPEG", "BMP"):  # no alpha: composite over white
        a = np.clip(alpha, 0.0, 1.0)[..., None]
        rgb, alpha = rgb * a + (1.0 - a), None
    if fmt_name in ("WEBP", "AVIF", "HEIF", "JXL"):
        grey = False  # written as colour (their Pillow encoders take RGB/RGBA)
    pixels = quantise(_compose(rgb, alpha, grey), bits)
    if pixels.shape[2] == 3 and grey:
        pixels = pixels[..., :1]
    icc = _icc_fits(img.icc_profile, grey)
    try:
        if fmt_name == "PNG":
            return _encode_png(pixels, bits, img, icc, prov)
        if fmt_name == "TIFF":
            return _encode_tiff(pixels, bits, img, icc, prov)
        return _encode_other(pixels, fmt_name, img, icc, prov, quality)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to encode the image") from None
    except (OSError, ValueError, RuntimeError, struct.error, KeyError, TypeError) as e:
        raise ImageError(f"{name}: cannot encode as {fmt_name} ({_one_line(e)})") from None


def _to_pillow(pixels: np.ndarray) -> Image.Image:
    channels = pixels.shape[2]
    if pixels.dtype == np.uint16:
        assert channels == 1
        return Image.fromarray(np.ascontiguousarray(pixels[..., 0]))  # I;16
    return Image.fromarray(np.ascontiguousarray(pixels[..., 0] if channels == 1 else pixels))


# zlib level for PNG output. Pillow's default (6) spends 1.3-3x the time of level 4 for files 0.7-3.3% smaller
# (measured on AGDN x4 outputs and Set14 images: cat_x4 640x424 89 ms -> 31 ms, +3.3%; baboon 40 -> 30 ms,
# +0.7%); in a folder run on a fast device the encoder is the bottleneck, so 4 it is. Lossless either way.
PNG_COMPRESS_LEVEL = 4


def _encode_png(pixels: np.ndarray, bits: int, img: LoadedImage, icc, prov) -> bytes:
    size = (pixels.shape[1], pixels.shape[0])
    exif = _exif_out(img.exif, _software_line(prov) if prov else None, size, create=False)
    exif_bytes = _exif_bytes(exif) if exif is not None else None
    xmp = _xmp_out(img.xmp, prov, size)
    text = _png_text(img.text, prov)
    if bits == 8:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
        if xmp:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
        buf = io.BytesIO()
        options: dict[str, Any] = {"pnginfo": info, "compress_level": PNG_COMPRESS_LEVEL}
        if icc:
            options["icc_profile"] = icc
        if exif_bytes:
            options["exif"] = exif_bytes
        _to_pillow(pixels).save(buf, format="PNG", **options)
        return buf.getvalue()
    import imagecodecs

    data = imagecodecs.png_encode(np.ascontiguousarray(pixels if pixels.shape[2] > 1 else pixels[..., 0]),
                                  level=PNG_COMPRESS_LEVEL)
    chunks = []
    if icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    if exif_bytes:
        chunks.append(_png_chunk(b"eXIf", exif_bytes[6:] if exif_bytes.startswith(b"Exif\x00\x00") else exif_bytes))
    if xmp:
        chunks.append(_png_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace")))
    for k, v in text.items():
        try:
            chunks.append(_png_chunk(b"tEXt", k.encode("latin-1") + b"\x00" + v.encode("latin-1")))
        except UnicodeEncodeError:
            chunks.append(_png_itxt(k, v))
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR (length, type, 13 bytes, CRC)
    if data[12:16] != b"IHDR":
        raise ImageError("unexpected PNG layout from the encoder")
    return data[:ihdr_end] + b"".join(chunks) + data[ihdr_end:]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_itxt(key: str, value: str) -> bytes:
    return _png_chunk(b"iTXt", key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + value.encode("utf-8"))


def _encode_tiff(pixels: np.ndarray, bits: int, img: LoadedImage, icc, prov) -> bytes:
    size = (pixels.shape[1], pixels.shape[0])
    tags = _exif_out(img.exif, _software_line(prov) if prov else None, size, create=True)
    if tags is None:
        tags = Image.Exif()
        tags.endian = "<"
    xmp = _xmp_out(img.xmp, prov, size)
    if bits == 8:
        if xmp:
            tags[700] = xmp
        buf = io.BytesIO()
        options: dict[str, Any] = {"tiffinfo": tags}
        if icc:
            options["icc_profile"] = icc
        _to_pillow(pixels).save(buf, format="TIFF", **options)
        return buf.getvalue()
    return _tiff16(pixels, tags, icc, xmp)


def _tiff16(pixels: np.ndarray, tags: Image.Exif, icc: bytes | None, xmp: bytes | None) -> bytes:
    """An uncompressed 16-bit TIFF with the metadata in `tags` (Pillow lays out the IFDs)."""
    h, w, channels = pixels.shape
    row_bytes = w * channels * 2
    rows_per_strip = max(1, min(h, (1 << 18) // max(row_bytes, 1)))
    strips = (h + rows_per_strip - 1) // rows_per_strip
    counts = tuple(min(rows_per_strip, h - i * rows_per_strip) * row_bytes for i in range(strips))
    tags[256], tags[257] = w, h
    tags[258] = (16,) * channels
    tags[259] = 1
    tags[262] = 1 if channels <= 2 else 2
    tags[277] = channels
    tags[278] = rows_per_strip
    tags[279] = counts
    tags[284] = 1
    tags[339] = (1,) * channels
    if channels in (2, 4):
        tags[338] = (2,)  # unassociated alpha
    for tag, value in ((282, 72.0), (283, 72.0), (296, 2)):
        if tag not in tags:
            tags[tag] = value
    if icc:
        tags[34675] = icc
    if xmp:
        tags[700] = xmp
    # Pillow writes StripOffsets relative to the end of the IFDs and their data, where the pixels follow
    tags[273] = tuple(sum(counts[:i]) for i in range(strips))
    head = tags.tobytes(8)[6:]  # TIFF header + IFD0 (+ Exif and GPS IFDs)
    order = ">" if head[:2] == b"MM" else "<"
    body = np.ascontiguousarray(pixels.astype(np.dtype(np.uint16).newbyteorder(order))).tobytes()
    return head + body


def _encode_other(pixels: np.ndarray, fmt: str, img: LoadedImage, icc, prov, quality: int) -> bytes:
    size = (pixels.shape[1], pixels.shape[0])
    im = _to_pillow(pixels)
    options: dict[str, Any] = {}
    if fmt == "BMP":
        buf = io.BytesIO()
        im.save(buf, format="BMP")
        return buf.getvalue()
    if icc:
        options["icc_profile"] = icc
    exif = _exif_out(img.exif, _software_line(prov) if prov else None, size, create=True)
    exif_bytes = _exif_bytes(exif) if exif is not None else None
    xmp = _xmp_out(img.xmp, prov, size)
    if fmt == "JPEG":
        options.update(quality=quality, subsampling=0)
        comment = img.text.get("Comment") or (_software_line(prov) if prov is not None else None)
        if comment:
            options["comment"] = comment.encode("utf-8")[:65000]
        if exif_bytes and len(exif_bytes) > 65000:  # one APP1 segment: drop the maker note, else all but Software
            exif.get_ifd(_EXIF_IFD).pop(0x927C, None)
            exif_bytes = exif.tobytes()
            if len(exif_bytes) > 65000:
                small = _exif_out(None, _software_line(prov) if prov else None, size, create=True)
                exif_bytes = small.tobytes() if small is not None else None
        if xmp and len(xmp) > 65000:
            xmp = _xmp_out(None, prov, size)
    else:  # WEBP, AVIF, HEIF, JXL: lossy at `quality`
        options.update(quality=quality)
    if exif_bytes:
        options["exif"] = exif_bytes
    if xmp:
        options["xmp"] = xmp
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()

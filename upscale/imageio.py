"""Reading and writing images: modes, alpha, bit depth, metadata, stdin/stdout and atomic writes.

Reading (:func:`read_image`) turns a file, raw bytes (stdin) or a binary stream into a :class:`LoadedImage`:
colour as H x W x 3 float32 in [0, 1] (grey replicated into three channels), a separate straight (not
premultiplied) alpha plane, and the metadata worth keeping (ICC profile, EXIF, XMP, PNG text). The EXIF
orientation is applied to the pixels first and reset to 1 in the EXIF and XMP kept. Every problem is an
:class:`ImageError` whose one-line message starts with the file name.

Input modes: 1, L, LA, P, PA (palette, with or without transparency), RGB (with or without a tRNS colour
key), RGBA, RGBX, RGBa/La (premultiplied, un-premultiplied by Pillow), YCbCr, CMYK (converted to sRGB through
its ICC profile when it has one), I;16 (16-bit grey), I (32-bit integers: accepted when the values fit in
0..65535, read as 16-bit grey), F (32-bit float: accepted when the values lie in 0..1, 0..255 or 0..65535,
read as 16-bit grey). Other modes (LAB, HSV, ...) are refused with a message naming the mode.

16-bit images: Pillow has no 16-bit RGB or RGBA mode (it truncates such PNG and TIFF files to 8 bits), so
16-bit PNG and TIFF files are decoded with `imagecodecs` (libpng and libtiff, from the author of tifffile,
binary wheels; the one dependency that covers 16-bit PNG *and* TIFF), and 16-bit PNGs are encoded with it
(the metadata chunks are added here, as its encoder writes none). 16-bit TIFFs are written here: plain
uncompressed strips behind an IFD that Pillow's TIFF directory code lays out, so the EXIF, GPS, ICC and XMP
tags come along. Pillow still parses all metadata and does everything else. A 16-bit input keeps 16 bits
through the float pipeline and is written with 16 bits where the format allows it (PNG, TIFF); JPEG, WebP
and BMP get 8 bits. A value ``x`` in [0, 1] is stored as ``round(x * 65535)`` in 16 bits; 8-bit output
uses :func:`upscale.metrics.to_uint8` (round half to even), the rounding of the evaluation protocol.

What each output format carries (``provenance`` is the dict given to :func:`save_image`, e.g. model,
scale, tile, precision, version):

======  =======================================================================================
PNG     RGB/RGBA/L/LA, 8 or 16 bits; iCCP; eXIf; iTXt ``XML:com.adobe.xmp``; the source's text
        chunks; provenance as text chunks ``Software`` and ``upscale:<key>`` and in the XMP.
JPEG    RGB/L, 8 bits, quality 95 and 4:4:4 chroma by default; ICC; EXIF (``Software`` holds the
        provenance); XMP; a COM comment (the source's ``Comment``, else the provenance). EXIF and XMP
        must each fit one 64 KB segment: a larger maker note / XMP packet is left out. JPEG has no
        alpha: a transparent image is composited over **white** (what it shows in most viewers and
        documents; dropping alpha instead would reveal the arbitrary colour of hidden pixels).
WebP    RGB/RGBA (grey is stored as RGB), 8 bits, quality 95; ICC; EXIF; XMP.
TIFF    RGB/RGBA/L/LA, 8 or 16 bits, uncompressed; ICC; EXIF tags (IFD0, Exif and GPS IFDs);
        XMP (tag 700); ``Software`` holds the provenance.
BMP     RGB/L, 8 bits, no metadata; alpha composited over white as for JPEG (Pillow's BMP
        reader, like many others, ignores a BMP alpha channel).
======  =======================================================================================

Writing (:func:`save_image`) is atomic: the encoded bytes go to a temporary file in the target folder, are
flushed and fsynced, and the file is moved into place (``os.replace``, or a hard link that cannot clobber
a file created meanwhile when overwriting is not allowed). On any error the temporary file is removed and an
:class:`ImageError` names the destination. A destination that is one of the ``protect`` paths (the inputs) is
refused even with ``overwrite``. ``dest="-"`` or a binary stream gets the bytes directly
(:func:`encode_image` makes them).

Decompression bombs: an image with more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` (or the limit set
with :func:`set_max_pixels`) is refused unless ``allow_large=True`` (the CLI's ``--allow-large``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import re
import struct
import sys
import socket
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from . import __version__

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "tif": "TIFF", "bmp": "BMP"}
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}
SIXTEEN_BIT_FORMATS = ("PNG", "TIFF")
ALLOW_LARGE_FLAG = "--allow-large"

__all__ = [
    "FORMATS",
    "EXTENSIONS",
    "ImageError",
    "LoadedImage",
    "read_image",
    "save_image",
    "encode_image",
    "output_path_for",
    "set_max_pixels",
    "max_pixels",
]


class ImageError(RuntimeError):
    """An input that cannot be read or an output that cannot be written; the message names the file."""


@dataclass
class LoadedImage:
    """A decoded image and the metadata worth carrying to the output.

    ``rgb`` is H x W x 3 float32 in [0, 1] with the EXIF orientation applied (grey images hold three equal
    channels and ``grayscale=True``); ``alpha`` is H x W float32 in [0, 1] (straight, not premultiplied) or
    None. ``exif`` is EXIF as Pillow writes it (``b"Exif\\0\\0"`` + TIFF data) with the Orientation reset to 1
    and the layout tags of a TIFF source removed. ``text`` holds the PNG text chunks (and a JPEG comment as
    ``Comment``), without the XMP, which is in ``xmp``. ``mode`` is the Pillow mode of the source.
    """

    rgb: np.ndarray
    path: Path | None = None
    mode: str = "RGB"
    alpha: np.ndarray | None = None
    grayscale: bool = False
    bit_depth: int = 8
    icc_profile: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    text: dict[str, str] = field(default_factory=dict)
    source_format: str | None = None
    frames: int = 1  # frames of an animation or pages of a document; only the first is read

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow says it."""
        return self.rgb.shape[1], self.rgb.shape[0]

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None

    def replace(self, **changes: Any) -> "LoadedImage":
        """A copy with some fields changed (e.g. upscaled ``rgb`` and ``alpha``), metadata kept."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# Decompression-bomb limit
# --------------------------------------------------------------------------------------------------

_max_pixels_override: int | None = None
_pillow_limit_lock = threading.Lock()


def set_max_pixels(n: int | None) -> None:
    """Set the most pixels :func:`read_image` accepts without ``allow_large``; None restores the default
    (Pillow's ``Image.MAX_IMAGE_PIXELS``, about 89 million)."""
    global _max_pixels_override
    if n is not None and n < 1:
        raise ValueError("the pixel limit must be a positive number (use allow_large=True for no limit)")
    _max_pixels_override = n


def max_pixels() -> int | None:
    """The pixel limit in force (None: no limit)."""
    return _max_pixels_override if _max_pixels_override is not None else Image.MAX_IMAGE_PIXELS


#: Pillow's limits on PNG text chunks (1 MB decompressed each, 64 MB in all) guard against zip bombs in
#: metadata; with no pixel limit (allow_large) they are lifted too, to this
_LARGE_TEXT = 2**31 - 1


@contextlib.contextmanager
def _pillow_guard(limit: int | None) -> Iterator[None]:
    """Silence Pillow's warnings while decoding; lift Pillow's own bomb check when our limit is higher, and
    its text-chunk limits when there is no limit. Pillow's limits are module globals: changed under a lock
    and restored, so that other reads keep theirs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pillow = Image.MAX_IMAGE_PIXELS
        lift_pixels = pillow is not None and (limit is None or limit > pillow)
        if not lift_pixels and limit is not None:
            yield
            return
        with _pillow_limit_lock:
            saved = Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY
            if lift_pixels:
                Image.MAX_IMAGE_PIXELS = None
            if limit is None:
                PngImagePlugin.MAX_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_MEMORY = _LARGE_TEXT
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = saved


def _check_pixels(label: str, width: int, height: int, limit: int | None) -> None:
    if limit is not None and width * height > limit:
        raise ImageError(
            f"{label}: {width}x{height} = {width * height:,} pixels is more than the {limit:,}-pixel safety limit "
            f"(a possible decompression bomb); pass {ALLOW_LARGE_FLAG} to read it anyway"
        )


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# leading bytes of the formats we read (BMP's two-letter "BM" left out: a text file may start with it)
_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"GIF87a": "GIF",
          b"GIF89a": "GIF"}


def format_by_magic(head: bytes) -> str | None:
    """The format an image file's first 12 bytes announce, however broken the rest; None if none of ours."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)

# Tags of a TIFF file's IFD0 that describe the pixel layout of *that* file: never carried to an output.
_LAYOUT_TAGS = frozenset({
    254, 255, 256, 257, 258, 259, 262, 263, 264, 265, 266, 273, 277, 278, 279, 280, 281, 284, 288, 289, 290, 291,
    292, 293, 317, 318, 319, 320, 321, 322, 323, 324, 325, 330, 332, 338, 339, 340, 341, 347, 512, 513, 514, 515,
    517, 518, 519, 520, 521, 529, 530, 531, 532, 700, 34377, 34675, 37724,
})
_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 0x8769, 0x8825, 0xA005
_ORIENTATION, _SOFTWARE = 0x0112, 0x0131


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _source_bytes(source: Any, name: str | None) -> tuple[bytes, Path | None, str]:
    """The encoded bytes of `source`, its path (if a file) and the label for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<stdin>"
        data = bytes(source)
        if not data:
            raise ImageError(f"{label}: no image data (0 bytes)")
        return data, None, label
    if hasattr(source, "read"):
        label = name or str(getattr(source, "name", "<stream>"))
        try:
            data = source.read()
        except OSError as e:
            raise ImageError(f"{label}: cannot read ({e.strerror or _one_line(e)})") from None
        if isinstance(data, str):
            raise ImageError(f"{label}: a text stream, not binary image data")
        if not data:
            raise ImageError(f"{label}: no image data (0 bytes)")
        return bytes(data), None, label
    if str(source) == "-":
        return _source_bytes(sys.stdin.buffer, name or "<stdin>")
    path = Path(source)
    label = name or str(path)
    if not path.exists():
        raise ImageError(f"{label}: no such file")
    if path.is_dir():
        raise ImageError(f"{label}: is a folder, not an image")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{label}: cannot read ({e.strerror or _one_line(e)})") from None
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes)")
    return data, path, label


def read_image(source: str | os.PathLike | bytes | BinaryIO, *, allow_large: bool = False,
               name: str | None = None) -> LoadedImage:
    """Decode an image fully (a truncated file fails here), apply its EXIF orientation, keep its metadata.

    `source` is a path ("-" reads stdin), raw bytes (e.g. read from stdin) or a binary stream; `name` is the
    label for messages (default: the path, or ``<stdin>``). Images with more pixels than :func:`max_pixels`
    are refused unless `allow_large`.
    """
    data, path, label = _source_bytes(source, name)
    limit = None if allow_large else max_pixels()
    try:
        with _pillow_guard(limit):
            image = _decode(data, label, limit)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: more pixels than the safety limit (a possible decompression bomb); "
                         f"pass {ALLOW_LARGE_FLAG} to read it anyway") from None
    except UnidentifiedImageError:
        if (kind := format_by_magic(data[:12])) is not None:  # e.g. a PNG whose header chunk fails its CRC
            raise ImageError(f"{label}: corrupt {kind} image (its header is damaged or cut short)") from None
        raise ImageError(f"{label}: not an image (unrecognised content)") from None
    except MemoryError:
        raise ImageError(f"{label}: not enough memory to decode this image") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input, reported in one line
        if "MAX_TEXT_CHUNK" in str(e) or "text chunks" in str(e):
            raise ImageError(f"{label}: a text chunk (metadata) larger than the safety limit (possibly a zip bomb); "
                             f"pass {ALLOW_LARGE_FLAG} to read it anyway") from None
        raise ImageError(f"{label}: truncated or corrupt image ({_one_line(e)})") from None
    image.path = path
    return image


def _decode(data: bytes, label: str, limit: int | None) -> LoadedImage:
    if data[:4] in _TIFF_MAGIC:
        tiff16 = _decode_tiff16(data, label, limit)
        if tiff16 is not None:
            return tiff16
    im = Image.open(io.BytesIO(data))
    _check_pixels(label, *im.size, limit)
    frames = int(getattr(im, "n_frames", 1) or 1)
    fmt = im.format or ""
    sixteen = fmt == "PNG" and data.startswith(_PNG_MAGIC) and len(data) > 24 and data[24] == 16
    im.load()  # also reads the PNG text chunks after the image data
    meta = _pillow_metadata(im)
    mode = im.mode
    if sixteen:
        rgb, alpha, grey, depth = _png16_planes(data, im)
        mode = ("LA;16" if alpha is not None else "I;16") if grey else ("RGBA;16" if alpha is not None else "RGB;16")
    else:
        rgb, alpha, grey, depth, icc_changed = _pillow_planes(im, label)
        if icc_changed:
            meta["icc_profile"] = None
    image = _finish(rgb, alpha, grey, depth, meta, mode, fmt)
    image.frames = frames
    return image


def _finish(rgb, alpha, grey, depth, meta, mode, fmt) -> LoadedImage:
    orientation = meta.pop("orientation")
    rgb = np.ascontiguousarray(_orient(rgb, orientation), dtype=np.float32)
    if alpha is not None:
        alpha = np.ascontiguousarray(_orient(alpha, orientation), dtype=np.float32)
    return LoadedImage(rgb=rgb, alpha=alpha, grayscale=grey, bit_depth=depth, mode=mode, source_format=fmt, **meta)


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels as a viewer shows them for an EXIF orientation (the transposes of ImageOps.exif_transpose)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(a, -1)
    if orientation == 7:
        return a.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(a, 1)
    return a


# ---- pixels ----------------------------------------------------------------------------------------


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _pillow_planes(im: Image.Image, label: str) -> tuple[np.ndarray, np.ndarray | None, bool, int, bool]:
    """(rgb, alpha, grayscale, bit depth, icc_dropped) of a loaded Pillow image."""
    mode = im.mode
    transparency = "transparency" in im.info
    icc_dropped = False
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if (transparency or mode == "PA") else "RGB")
        mode = im.mode
    elif mode in ("L", "RGB") and transparency:
        im = im.convert("LA" if mode == "L" else "RGBA")
        mode = im.mode
    elif mode in ("RGBX", "YCbCr"):
        im, mode = im.convert("RGB"), "RGB"
    elif mode in ("RGBa", "La"):
        im = im.convert("RGBA" if mode == "RGBa" else "LA")
        mode = im.mode
    elif mode == "CMYK":
        im, mode, icc_dropped = _cmyk_to_rgb(im), "RGB", True

    if mode in ("L", "LA", "RGB", "RGBA"):
        a = np.asarray(im, dtype=np.float32) / 255.0
        if mode == "L":
            return _grey_to_rgb(a), None, True, 8, icc_dropped
        if mode == "LA":
            return _grey_to_rgb(a[..., 0]), a[..., 1], True, 8, icc_dropped
        if mode == "RGB":
            return a, None, False, 8, icc_dropped
        return a[..., :3], a[..., 3], False, 8, icc_dropped
    if mode.startswith("I;16"):
        grey = np.asarray(im).astype(np.float32) / 65535.0
        return _grey_to_rgb(grey), None, True, 16, icc_dropped
    if mode == "I":
        values = np.asarray(im)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageError(f"{label}: unsupported image mode I (32-bit integers) with values {lo}..{hi}; "
                             "only values within 0..65535 are supported")
        return _grey_to_rgb(values.astype(np.float32) / 65535.0), None, True, 16, icc_dropped
    if mode == "F":
        values = np.asarray(im, dtype=np.float32)
        if not np.isfinite(values).all() or (values.size and values.min() < 0):
            raise ImageError(f"{label}: unsupported image mode F (32-bit float) with negative or non-finite values")
        hi = float(values.max()) if values.size else 0.0
        top = next((t for t in (1.0, 255.0, 65535.0) if hi <= t), None)
        if top is None:
            raise ImageError(f"{label}: unsupported image mode F (32-bit float) with values up to {hi:g}; "
                             "expected values within 0..1, 0..255 or 0..65535")
        return _grey_to_rgb(values / top), None, True, 16, icc_dropped
    raise ImageError(f"{label}: unsupported image mode {mode}; convert it to RGB, RGBA or grey first")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile: fall back to Pillow's naive conversion
            pass
    return im.convert("RGB")


def _png16_planes(data: bytes, im: Image.Image) -> tuple[np.ndarray, np.ndarray | None, bool, int]:
    """A 16-bit PNG decoded by libpng (imagecodecs) instead of Pillow, which would truncate it to 8 bits."""
    import imagecodecs

    a = imagecodecs.png_decode(data)
    if a.dtype != np.uint16:  # not what the header said: trust the decoder
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    else:
        a = a.astype(np.float32) / 65535.0
    key = im.info.get("transparency")
    if a.ndim == 2:
        alpha = None
        if isinstance(key, int):
            alpha = (a != key / 65535.0).astype(np.float32)
        return _grey_to_rgb(a), alpha, True, 16
    channels = a.shape[2]
    if channels == 2:
        return _grey_to_rgb(a[..., 0]), a[..., 1], True, 16
    if channels == 4:
        return a[..., :3], a[..., 3], False, 16
    alpha = None
    if isinstance(key, tuple) and len(key) == 3:
        alpha = (~np.all(a == np.asarray(key, np.float32) / 65535.0, axis=2)).astype(np.float32)
    return a, alpha, False, 16


def _decode_tiff16(data: bytes, label: str, limit: int | None) -> LoadedImage | None:
    """A 16-bit unsigned TIFF decoded by libtiff (imagecodecs); None when the file is not one."""
    tags = Image.Exif()
    try:
        tags.load(data)
    except Exception:  # noqa: BLE001 - not a classic TIFF Pillow can parse: leave it to Image.open
        return None
    bits = tags.get(258)
    bits = bits if isinstance(bits, tuple) else (bits,)
    fmt = tags.get(339, 1)
    fmt = fmt if isinstance(fmt, tuple) else (fmt,)
    if not bits or any(b != 16 for b in bits) or any(f != 1 for f in fmt):
        return None
    width, height = int(tags.get(256, 0)), int(tags.get(257, 0))
    _check_pixels(label, width, height, limit)
    photometric = tags.get(262, 1)
    if photometric not in (0, 1, 2):
        kind = {3: "palette", 5: "CMYK", 6: "YCbCr", 8: "CIELab"}.get(photometric, f"photometric {photometric}")
        raise ImageError(f"{label}: unsupported image mode: 16-bit {kind} TIFF")
    import imagecodecs

    a = imagecodecs.tiff_decode(data)
    samples = int(tags.get(277, 1))
    if a.ndim == 3 and tags.get(284, 1) == 2 and a.shape[0] == samples:  # planar: channels first
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[:2] != (height, width) or a.shape[2] > 4:
        raise ImageError(f"{label}: unsupported TIFF layout (decoded shape {a.shape})")
    a = a.astype(np.float32) / 65535.0
    extra = tags.get(338, ())
    extra = extra if isinstance(extra, tuple) else (extra,)
    colour_channels = 3 if photometric == 2 else 1
    if a.shape[2] < colour_channels:
        raise ImageError(f"{label}: unsupported TIFF layout ({a.shape[2]} samples for photometric {photometric})")
    colour = a[..., :colour_channels]
    alpha = a[..., colour_channels] if a.shape[2] > colour_channels else None
    if alpha is not None and extra and extra[0] == 1:  # associated (premultiplied) alpha
        colour = np.where(alpha[..., None] > 0, colour / np.maximum(alpha[..., None], 1e-12), 0.0).clip(0, 1)
    if photometric == 0:  # min-is-white
        colour = 1.0 - colour
    grey = colour_channels == 1
    rgb = _grey_to_rgb(colour[..., 0]) if grey else colour
    meta = _exif_metadata(tags)
    icc = tags.get(34675)
    meta["icc_profile"] = bytes(icc) if isinstance(icc, (bytes, bytearray)) and icc else None
    xmp = tags.get(700)
    xmp = bytes(xmp) if isinstance(xmp, (bytes, bytearray)) and xmp else None
    meta.update(_xmp_metadata(xmp, meta, orient=False))  # the EXIF tag of the TIFF itself rules
    mode = {1: "I;16", 2: "LA;16", 3: "RGB;16", 4: "RGBA;16"}[a.shape[2]]
    image = _finish(rgb, alpha, grey, 16, meta, mode, "TIFF")
    with contextlib.suppress(Exception):  # pages, as Pillow counts them (it reads the IFD chain only)
        image.frames = int(getattr(Image.open(io.BytesIO(data)), "n_frames", 1) or 1)
    return image


# ---- metadata --------------------------------------------------------------------------------------


def _pillow_metadata(im: Image.Image) -> dict[str, Any]:
    """icc_profile, exif, xmp, text and the orientation of a loaded Pillow image."""
    try:
        exif = im.getexif()
    except Exception:  # noqa: BLE001 - corrupt EXIF never stops an image from being read
        exif = Image.Exif()
    meta = _exif_metadata(exif)
    icc = im.info.get("icc_profile")
    meta["icc_profile"] = bytes(icc) if icc else None
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if not xmp and im.format == "TIFF":  # older Pillow does not copy tag 700 into info
        xmp = getattr(im, "tag_v2", {}).get(700)
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    # XMP's tiff:Orientation counts only for PNG, as in Pillow (Pillow's TIFF loader has already turned the
    # pixels upright by the EXIF tag, and a JPEG's XMP merely mirrors its EXIF)
    meta.update(_xmp_metadata(bytes(xmp) if xmp else None, meta, orient=im.format == "PNG"))
    text: dict[str, str] = {}
    if im.format == "PNG":
        for key, value in getattr(im, "text", {}).items():
            if key == "XML:com.adobe.xmp" or (key.startswith("Raw profile type") and key[17:] in ("exif", "xmp")):
                continue  # carried as EXIF / XMP instead
            text[key] = str(value)
    elif im.info.get("comment"):
        comment = im.info["comment"]
        text["Comment"] = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
    meta["text"] = text
    return meta


def _exif_metadata(exif: Image.Exif) -> dict[str, Any]:
    """{"exif": cleaned bytes or None, "orientation": int} from a Pillow Exif (of any source format)."""
    orientation = exif.get(_ORIENTATION, 1)
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
    return {"exif": _clean_exif(exif), "orientation": orientation}


def _clean_exif(src: Image.Exif) -> bytes | None:
    """EXIF without the source file's layout tags and thumbnail, Orientation reset to 1; None when empty."""
    try:
        out = Image.Exif()
        out.endian = "<"
        useful = False
        for tag, value in src.items():
            if tag in _LAYOUT_TAGS or tag in (_EXIF_IFD, _GPS_IFD, _INTEROP_IFD):
                continue
            out[tag] = value
            useful = useful or tag != _ORIENTATION
        for pointer in (_EXIF_IFD, _GPS_IFD):
            try:
                sub = dict(src.get_ifd(pointer))
            except Exception:  # noqa: BLE001 - a broken sub-IFD is dropped, the rest kept
                sub = {}
            if pointer == _EXIF_IFD and _INTEROP_IFD in sub:
                interop = sub.pop(_INTEROP_IFD)
                if not isinstance(interop, dict):
                    try:
                        interop = dict(src.get_ifd(_INTEROP_IFD))
                    except Exception:  # noqa: BLE001
                        interop = {}
                if interop:
                    sub[_INTEROP_IFD] = interop
            if sub:
                out.get_ifd(pointer).update(sub)
                useful = True
        if _ORIENTATION in out:
            out[_ORIENTATION] = 1
        return _exif_bytes(out) if useful else None
    except Exception:  # noqa: BLE001 - EXIF Pillow cannot re-encode is dropped rather than failing the read
        return None


def _exif_bytes(exif: Image.Exif) -> bytes | None:
    """``exif.tobytes()``, leaving out the entries Pillow cannot write (odd types in camera files)."""
    try:
        return exif.tobytes()
    except Exception:  # noqa: BLE001
        pass

    def writable(tag: int, value: Any, pointer: int | None) -> bool:
        probe = Image.Exif()
        probe.endian = exif.endian
        if pointer is None:
            probe[tag] = value
        else:
            probe.get_ifd(pointer)[tag] = value
        try:
            probe.tobytes()
            return True
        except Exception:  # noqa: BLE001
            return False

    for tag in list(exif):
        if tag not in (_EXIF_IFD, _GPS_IFD) and not writable(tag, exif[tag], None):
            del exif[tag]
    for pointer in (_EXIF_IFD, _GPS_IFD):
        sub = exif.get_ifd(pointer)
        for tag in list(sub):
            if not writable(tag, sub[tag], pointer):
                del sub[tag]
    try:
        return exif.tobytes()
    except Exception:  # noqa: BLE001
        return None


_XMP_RE_CACHE: dict[str, tuple[re.Pattern, re.Pattern]] = {}


def _xmp_patterns(prop: str) -> tuple[re.Pattern, re.Pattern]:
    if prop not in _XMP_RE_CACHE:
        p = re.escape(prop)
        _XMP_RE_CACHE[prop] = (re.compile(rf"(\s{p}\s*=\s*)([\"'])(.*?)\2", re.S),
                               re.compile(rf"(<{p}>)(.*?)(</{p}>)", re.S))
    return _XMP_RE_CACHE[prop]


def _xmp_get(text: str, prop: str) -> str | None:
    attr, elem = _xmp_patterns(prop)
    m = attr.search(text)
    if m:
        return m.group(3)
    m = elem.search(text)
    return m.group(2) if m else None


def _xmp_set(text: str, prop: str, value: str) -> str:
    """Replace the value of an XMP property where it is present (attribute or element form)."""
    attr, elem = _xmp_patterns(prop)
    text = attr.sub(lambda m: f"{m.group(1)}{m.group(2)}{value}{m.group(2)}", text)
    return elem.sub(lambda m: f"{m.group(1)}{value}{m.group(3)}", text)


def _xmp_metadata(xmp: bytes | None, meta: dict[str, Any], orient: bool = True) -> dict[str, Any]:
    """{"xmp": bytes with tiff:Orientation reset to 1} and the orientation from XMP when EXIF has none."""
    if not xmp:
        return {"xmp": None}
    try:
        text = xmp.decode("utf-8")
    except UnicodeDecodeError:
        return {"xmp": xmp}
    found = _xmp_get(text, "tiff:Orientation")
    result: dict[str, Any] = {}
    if found is not None:
        if orient and meta.get("orientation", 1) == 1 and found.strip() in tuple("2345678"):
            result["orientation"] = int(found.strip())
        text = _xmp_set(text, "tiff:Orientation", "1")
    result["xmp"] = text.encode("utf-8")
    return result


# --------------------------------------------------------------------------------------------------
# Arrays <-> planes (shared with the Python API)
# --------------------------------------------------------------------------------------------------


def array_planes(a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, bool, int]:
    """(rgb float32 H x W x 3, alpha or None, grayscale, bit depth) of an H x W (x 1|2|3|4) array.

    uint8 is read as 8-bit, uint16 as 16-bit, floats as [0, 1] values (bit depth 8 for writing): a float array
    beyond [0, 1] by more than rounding (8-bit values in a float array, say) or holding NaN is refused, as is
    an empty one, with a ValueError saying what is expected.
    """
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an H x W, H x W x 1, 2, 3 or 4 image array, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty image array (shape {a.shape}): nothing to upscale")
    if a.dtype == np.uint8:
        f, depth = a.astype(np.float32) / 255.0, 8
    elif a.dtype == np.uint16:
        f, depth = a.astype(np.float32) / 65535.0, 16
    elif np.issubdtype(a.dtype, np.floating):
        f, depth = unit_floats(a), 8
    else:
        raise TypeError(f"unsupported image array dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")
    channels = a.shape[2]
    if channels <= 2:
        return _grey_to_rgb(f[..., 0]), (f[..., 1] if channels == 2 else None), True, depth
    return f[..., :3], (f[..., 3] if channels == 4 else None), False, depth


#: how far float pixel values may stray outside [0, 1] (rounding in the caller's own arithmetic) before
#: they are taken for another scale, such as 0-255, and refused
FLOAT_RANGE_TOLERANCE = 1e-3


def unit_floats(a: np.ndarray) -> np.ndarray:
    """A float array as float32 in [0, 1]: values within the tolerance outside are clipped; NaN, Inf or values
    further out raise ValueError (a silent clip turned 0-255 data white)."""
    f = np.asarray(a, dtype=np.float32)
    if f.size and not np.isfinite(f).all():
        raise ValueError("the image array holds NaN or Inf; float images take values in [0, 1]")
    low, high = (float(f.min()), float(f.max())) if f.size else (0.0, 0.0)
    if low < -FLOAT_RANGE_TOLERANCE or high > 1 + FLOAT_RANGE_TOLERANCE:
        raise ValueError(f"float image values must lie in [0, 1], these run from {low:g} to {high:g}; divide "
                         "0-255 data by 255, or pass uint8 (0-255) or uint16 (0-65535) arrays")
    return f.clip(0.0, 1.0)


def pillow_planes(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None, bool, int]:
    """(rgb, alpha, grayscale, bit depth) of a Pillow image (no orientation applied, no metadata)."""
    im.load()
    rgb, alpha, grey, depth, _ = _pillow_planes(im, "image")
    return rgb, alpha, grey, depth


def quantise(x: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] floats to uint8 (metrics.to_uint8: half-to-even) or uint16 (round(x * 65535))."""
    if bits == 16:
        out = np.empty(x.shape, dtype=np.uint16)
        for start in range(0, max(1, x.shape[0]), 256):  # row blocks keep temporaries small
            block = np.clip(x[start : start + 256], 0.0, 1.0) * 65535.0
            out[start : start + 256] = np.round(block, out=block)
        return out
    from .metrics import to_uint8

    return to_uint8(np.asarray(x, dtype=np.float32))


def _compose(rgb: np.ndarray, alpha: np.ndarray | None, grey: bool) -> np.ndarray:
    """Float H x W x C (C = 1, 2, 3 or 4) in output channel order."""
    base = rgb.mean(axis=2, keepdims=True) if grey else rgb
    if alpha is not None:
        base = np.concatenate([base, alpha[..., None].astype(base.dtype)], axis=2)
    return base


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def output_path_for(src: Path, scale: int, suffix: str | None = None, ext: str = ".png") -> Path:
    """`photo.jpg` -> `photo_x4.png` beside it."""
    src = Path(src)
    return src.with_name(f"{src.stem}{suffix if suffix is not None else f'_x{scale}'}{ext}")


def format_for(dest: str | os.PathLike | None, fmt: str | None = None) -> str | None:
    """The Pillow format name for an explicit `fmt` ("png", "jpg", "JPEG"...) or the extension of `dest`."""
    if fmt:
        return FORMATS.get(fmt.lower().lstrip("."))
    if dest is None:
        return None
    return FORMATS.get(Path(dest).suffix.lower().lstrip("."))


def _as_image(image: Any) -> LoadedImage:
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, np.ndarray):
        rgb, alpha, grey, depth = array_planes(image)
        return LoadedImage(rgb=rgb, alpha=alpha, grayscale=grey, bit_depth=depth, mode="array")
    if isinstance(image, Image.Image):
        rgb, alpha, grey, depth = pillow_planes(image)
        icc = image.info.get("icc_profile")
        return LoadedImage(rgb=rgb, alpha=alpha, grayscale=grey, bit_depth=depth, mode=image.mode,
                           icc_profile=icc or None)
    if hasattr(image, "rgb"):  # a LoadedImage-like object
        return LoadedImage(
            rgb=np.asarray(image.rgb, dtype=np.float32), alpha=getattr(image, "alpha", None),
            grayscale=bool(getattr(image, "grayscale", False)), bit_depth=int(getattr(image, "bit_depth", 8)),
            icc_profile=getattr(image, "icc_profile", None), exif=getattr(image, "exif", None),
            xmp=getattr(image, "xmp", None), text=dict(getattr(image, "text", {}) or {}),
        )
    raise TypeError(f"cannot save a {type(image).__name__}; pass a LoadedImage, a NumPy array or a PIL image")


def _provenance(provenance: Mapping[str, Any] | None) -> tuple[str, list[tuple[str, str]]] | None:
    """(Software string, [(key, value)]) from a provenance dict; keys lose a leading ``upscale:``."""
    if not provenance:
        return None
    software = str(provenance.get("Software") or f"upscale {__version__}")
    items = [(k[len("upscale:"):] if k.startswith("upscale:") else k, str(v))
             for k, v in provenance.items() if k != "Software" and v is not None]
    return software, items


def _software_line(prov: tuple[str, list[tuple[str, str]]]) -> str:
    software, items = prov
    return f"{software} ({'; '.join(f'{k}={v}' for k, v in items)})" if items else software


_UPSCALE_NS = "https://github.com/upscale/upscale/ns/provenance/1.0/"
_XMP_HEAD = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/">\n' \
            ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
_XMP_TAIL = ' </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end="w"?>'


def _xmp_name(key: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


def _xmp_out(xmp: bytes | None, prov, size: tuple[int, int]) -> bytes | None:
    """The source XMP with stale sizes updated and a provenance description added (or a new packet)."""
    text = None
    if xmp:
        try:
            text = xmp.decode("utf-8")
        except UnicodeDecodeError:
            return xmp if prov is None else None
        for prop, value in (("tiff:ImageWidth", size[0]), ("tiff:ImageLength", size[1]),
                            ("exif:PixelXDimension", size[0]), ("exif:PixelYDimension", size[1])):
            text = _xmp_set(text, prop, str(value))
    if prov is None:
        return text.encode("utf-8") if text is not None else None
    software, items = prov
    attrs = "".join(f"\n    upscale:{_xmp_name(k)}={quoteattr(v)}" for k, v in items)
    block = (f'  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
             f'xmlns:upscale="{_UPSCALE_NS}"\n    xmp:CreatorTool={quoteattr(software)}{attrs}/>\n')
    if text is None:
        return (_XMP_HEAD + block + _XMP_TAIL).encode("utf-8")
    # drop an older provenance block and CreatorTool: both are replaced by this run's
    text = re.sub(rf'\s*<rdf:Description[^>]*xmlns:upscale="{re.escape(_UPSCALE_NS)}"[^>]*/>', "", text, flags=re.S)
    text = re.sub(r'\sxmp:CreatorTool\s*=\s*(["\']).*?\1', "", text, flags=re.S)
    text = re.sub(r"<xmp:CreatorTool>.*?</xmp:CreatorTool>", "", text, flags=re.S)
    end = text.rfind("</rdf:RDF>")
    if end < 0:
        return (_XMP_HEAD + block + _XMP_TAIL).encode("utf-8")
    return (text[:end] + block + text[end:]).encode("utf-8")


def _exif_out(exif: bytes | None, software: str | None, size: tuple[int, int], create: bool) -> Image.Exif | None:
    """The EXIF to write: orientation 1, pixel dimensions updated, Software set (created only if `create`)."""
    out = Image.Exif()
    if exif:
        try:
            out.load(exif)
        except Exception:  # noqa: BLE001
            out = Image.Exif()
            exif = None
    if not exif and not (create and software):
        return None
    if out.endian is None:
        out.endian = "<"  # little-endian ("II") like most writers
    if _ORIENTATION in out:
        out[_ORIENTATION] = 1
    if software:
        out[_SOFTWARE] = software
    if exif and _EXIF_IFD in out:
        sub = out.get_ifd(_EXIF_IFD)
        if 0xA002 in sub:
            sub[0xA002] = size[0]
        if 0xA003 in sub:
            sub[0xA003] = size[1]
    return out


def _icc_fits(icc: bytes | None, grey: bool) -> bytes | None:
    """The ICC profile if its colour space matches the output's (GRAY for grey, RGB for colour)."""
    if not icc or len(icc) < 128:
        return None
    space = icc[16:20]
    return icc if space == (b"GRAY" if grey else b"RGB ") else None


def _png_key_ok(key: str) -> bool:
    try:
        key.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return 0 < len(key) < 80 and key == key.strip() and "\x00" not in key


_PNG_KEYWORDS = frozenset({"Title", "Author", "Description", "Copyright", "Creation Time", "Software", "Disclaimer",
                           "Warning", "Source", "Comment"})


def _png_text(text: Mapping[str, str], prov) -> dict[str, str]:
    out = {k: str(v) for k, v in text.items() if _png_key_ok(k)}
    if prov is not None:
        for k in [k for k in out if k.startswith("upscale:")]:
            del out[k]
        software, items = prov
        out["Software"] = software
        for k, v in items:
            key = k if (":" in k or k in _PNG_KEYWORDS) else f"upscale:{k}"
            if _png_key_ok(key):
                out[key] = v
    return out


def encode_image(image: Any, fmt: str = "PNG", *, quality: int = 95, provenance: Mapping[str, Any] | None = None,
                 name: str = "<output>") -> bytes:
    """The encoded file (see the module docstring for what each format keeps). `image` is a LoadedImage
    (e.g. from :func:`upscale.upscale_image`), a NumPy array (H x W x 3 float in [0, 1], or any layout
    :func:`array_planes` reads) or a PIL image. `name` labels error messages."""
    fmt_name = format_for(None, fmt) or (fmt.upper() if fmt and fmt.upper() in EXTENSIONS else None)
    if fmt_name is None:
        raise ImageError(f"{name}: unknown output format {fmt!r}; use one of png, jpeg, webp, tiff, bmp")
    img = _as_image(image)
    h, w = img.rgb.shape[:2]
    limits = {"WEBP": 16383, "JPEG": 65535, "PNG": 2**31 - 1, "TIFF": 2**31 - 1, "BMP": 2**31 - 1}
    if max(h, w) > limits[fmt_name]:
        raise ImageError(f"{name}: {w}x{h} is too large for {fmt_name} (at most {limits[fmt_name]} pixels a side); "
                         "choose png or tiff")
    prov = _provenance(provenance)
    bits = 16 if (img.bit_depth == 16 and fmt_name in SIXTEEN_BIT_FORMATS) else 8
    rgb, alpha, grey = img.rgb, img.alpha, img.grayscale
    if alpha is not None and fmt_name in ("JPEG", "BMP"):  # no alpha: composite over white
        a = np.clip(alpha, 0.0, 1.0)[..., None]
        rgb, alpha = rgb * a + (1.0 - a), None
    if fmt_name == "WEBP":
        grey = False  # WebP is always colour
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
    else:  # WEBP
        options.update(quality=quality)
    if exif_bytes:
        options["exif"] = exif_bytes
    if xmp:
        options["xmp"] = xmp
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _os_problem(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or _one_line(e)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_image(image: Any, dest: str | os.PathLike | BinaryIO, fmt: str | None = None, *, quality: int = 95,
               overwrite: bool = False, protect: tuple[str | os.PathLike, ...] | list = (),
               provenance: Mapping[str, Any] | None = None, pnginfo: Mapping[str, str] | None = None) -> Path | None:
    """Encode `image` (see :func:`encode_image`) and write it to `dest` atomically; returns the path written.

    `dest` may be "-" (stdout) or a binary stream (`fmt` then defaults to PNG). Never writes over a path in
    `protect` (the inputs, even with `overwrite`), nor over an existing file unless `overwrite`.
    `pnginfo` is the older name of `provenance` (merged into it).
    """
    if pnginfo:
        provenance = {**pnginfo, **(provenance or {})}
    if isinstance(dest, str) and dest == "-" or hasattr(dest, "write"):
        stream = sys.stdout.buffer if isinstance(dest, str) else dest
        label = "<stdout>" if isinstance(dest, str) else str(getattr(dest, "name", "<stream>"))
        fmt_name = format_for(None, fmt) if fmt else "PNG"
        if fmt_name is None:
            raise ImageError(f"{label}: unknown output format {fmt!r}; use one of png, jpeg, webp, tiff, bmp")
        data = encode_image(image, fmt_name, quality=quality, provenance=provenance, name=label)
        try:
            _write_all(stream, data)
        except OSError as e:
            raise ImageError(f"{label}: cannot write ({_os_problem(e)})") from None
        return None

    dest = Path(dest)
    fmt_name = format_for(dest, fmt)
    if fmt_name is None:
        what = f"format {fmt!r}" if fmt else f"extension {dest.suffix or '(none)'!r}"
        raise ImageError(f"{dest}: unknown output {what}; use one of png, jpeg, webp, tiff, bmp")
    for p in protect:
        if _same_file(Path(p), dest):
            raise ImageError(f"{dest}: refusing to write over the input image")
    if dest.is_dir():
        raise ImageError(f"{dest}: is a folder")
    if dest.exists() and not overwrite:
        raise ImageError(f"{dest}: already exists (use --overwrite to replace it)")
    folder = dest.parent
    if not folder.is_dir():
        raise ImageError(f"{dest}: output folder {folder} does not exist")
    data = encode_image(image, fmt_name, quality=quality, provenance=provenance, name=str(dest))
    _write_atomic(dest, data, overwrite)
    return dest


def _write_all(stream: BinaryIO, data: bytes) -> None:
    """Write every byte or raise. A pipe whose reader has gone (`| head -c 100`) can take part of a write and
    report the short count instead of failing; ignoring it would end in exit 0 with the image cut short."""
    view = memoryview(data)
    while view:
        written = stream.write(view)
        if not written:
            raise OSError(errno.EPIPE, "Broken pipe")
        view = view[written:]
    stream.flush()


# Temporary files of atomic writes: `.NAME.upscale-HOST-PID-XXXXXXXX.part` beside NAME, HOST a short hash of
# the machine's name. A run killed with SIGKILL leaves its temporary behind; the next run writing into that
# folder removes those whose writer is gone: on this machine, a PID that no longer runs and a file older than
# this run; from another machine sharing the folder, a file a day old. Names written by earlier versions
# (`.NAME.XXXXXXXX.part`) go once a day old too. Nothing else is touched.
_HOST = format(zlib.crc32(socket.gethostname().encode()), "08x")[:6]
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?:upscale-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-)?[a-z0-9_]{8}\.part")
_RUN_STARTED = time.time()
_STALE_ELSEWHERE_S = 24 * 3600
_cleaned_folders: set[str] = set()
_cleaning_lock = threading.Lock()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or cannot tell: leave its file alone
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries of our own killed writes in `folder` (see above); returns what was removed.
    Done once per folder per process, before the first write there."""
    key = os.path.realpath(folder)
    with _cleaning_lock:
        if key in _cleaned_folders:
            return []
        _cleaned_folders.add(key)
    removed = []
    with contextlib.suppress(OSError):
        with os.scandir(folder) as entries:
            for entry in entries:
                m = _TEMP_NAME.fullmatch(entry.name)
                if m is None or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    age = _RUN_STARTED - entry.stat(follow_symlinks=False).st_mtime
                    if m["pid"] is not None and m["host"] == _HOST:
                        stale = age > 0 and int(m["pid"]) != os.getpid() and not _pid_running(int(m["pid"]))
                    else:
                        stale = age > _STALE_ELSEWHERE_S
                    if stale:
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
                except OSError:
                    continue
    return removed


def _write_atomic(dest: Path, data: bytes, overwrite: bool) -> None:
    folder = dest.parent
    remove_stale_temporaries(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.upscale-{_HOST}-{os.getpid()}-", suffix=".part",
                                   dir=folder)
    except OSError as e:
        raise ImageError(f"{dest}: cannot write in {folder} ({_os_problem(e)})") from None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                if hasattr(os, "fchmod"):
                    os.fchmod(f.fileno(), 0o666 & ~_umask())
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, dest)
            else:
                _link_no_clobber(tmp, dest)
        except FileExistsError:
            raise ImageError(f"{dest}: already exists (use --overwrite to replace it)") from None
        except OSError as e:
            raise ImageError(f"{dest}: cannot write ({_os_problem(e)})") from None
        _fsync_folder(folder)
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _link_no_clobber(tmp: str, dest: Path) -> None:
    """Move `tmp` to `dest` unless `dest` exists (a hard link fails on an existing name: no race)."""
    try:
        os.link(tmp, dest)
        return
    except FileExistsError:
        raise
    except (OSError, NotImplementedError):
        pass  # file systems without hard links
    if dest.exists():
        raise FileExistsError(errno.EEXIST, "File exists", str(dest))
    os.replace(tmp, dest)


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

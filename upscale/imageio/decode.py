"""Reading: bytes, a path or a stream into a `LoadedImage` (8- and 16-bit, every Pillow mode we accept, EXIF
orientation applied), with the decompression-bomb limits."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .image import (
    ImageError,
    LoadedImage,
    TooLargeError,
    _grey_to_rgb,
    _one_line,
    _pillow_planes,
    format_by_magic,
    plugins,
)
from .metadata import _exif_metadata, _pillow_metadata, _xmp_metadata

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


def _check_pixels(label: str, width: int, height: int, limit: int | None, frames: int = 1) -> None:
    """Refuse more pixels than `limit`; `height` counts every frame's rows (`frames` of them), since all are
    held at once."""
    if limit is not None and width * height > limit:
        size = f"{width}x{height}" if frames == 1 else f"{frames} frames of {width}x{height // frames}"
        raise TooLargeError(
            f"{label}: {size} = {width * height:,} pixels is more than the {limit:,}-pixel safety limit "
            "(a possible decompression bomb); allow large images to read it anyway"
        )


_MULTI_FRAME_FORMATS = ("GIF", "PNG", "WEBP", "TIFF", "AVIF")  # AVIF: an image sequence
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
        raise TooLargeError(f"{label}: more pixels than the safety limit (a possible decompression bomb); "
                            "allow large images to read it anyway") from None
    except UnidentifiedImageError:
        if (kind := format_by_magic(data[:12])) is not None:  # e.g. a PNG whose header chunk fails its CRC
            raise ImageError(f"{label}: corrupt {kind} image (its header is damaged or cut short)") from None
        raise ImageError(f"{label}: not an image (unrecognised content)") from None
    except MemoryError:
        raise ImageError(f"{label}: not enough memory to decode this image") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input, reported in one line
        if "MAX_TEXT_CHUNK" in str(e) or "text chunks" in str(e):
            raise TooLargeError(f"{label}: a text chunk (metadata) larger than the safety limit (possibly a zip "
                                "bomb); allow large images to read it anyway") from None
        raise ImageError(f"{label}: truncated or corrupt image ({_one_line(e)})") from None
    image.path = path
    return image


def _decode(data: bytes, label: str, limit: int | None) -> LoadedImage:
    tiff16 = _decode_tiff16(data, _tiff_tags(data), label, limit) if data[:4] in _TIFF_MAGIC else None
    plugins()  # HEIC/HEIF and JPEG XL codecs, registered once
    try:
        im = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - a 16-bit TIFF layout Pillow cannot open: its first page is what we have
        if tiff16 is None:
            raise
        return tiff16
    # frames of an animation or pages of a scan; not the extra images some formats carry (a phone JPEG's
    # MPO preview, a PSD's layers): those are not what the file shows
    frames = int(getattr(im, "n_frames", 1) or 1) if im.format in _MULTI_FRAME_FORMATS else 1
    _check_pixels(label, im.size[0], im.size[1] * frames, limit, frames)
    image = tiff16 if tiff16 is not None else _decode_first(data, im, label)
    if frames > 1:
        _read_more_frames(image, im, data, frames, label, limit)
    return image


def _decode_first(data: bytes, im: Image.Image, label: str) -> LoadedImage:
    fmt = im.format or ""
    sixteen = fmt == "PNG" and data.startswith(_PNG_MAGIC) and len(data) > 24 and data[24] == 16
    deep = _deep_planes(data, fmt, im.size) if fmt in ("HEIF", "AVIF", "JXL") else None
    if deep is None:  # a deep file's pixels come from its own decoder, its metadata with Image.open
        im.load()  # also reads the PNG text chunks after the image data
    meta = _pillow_metadata(im)
    mode = im.mode
    if fmt == "JXL" and not meta.get("xmp"):  # pillow-jxl-plugin reads the EXIF box only
        meta["xmp"] = _jxl_box(data, b"xml ")
    if sixteen or deep is not None:
        rgb, alpha, grey, depth = deep or _png16_planes(data, im)
        mode = ("LA;16" if alpha is not None else "I;16") if grey else ("RGBA;16" if alpha is not None else "RGB;16")
    else:
        rgb, alpha, grey, depth, icc_changed = _pillow_planes(im, label)
        if icc_changed:
            meta["icc_profile"] = None
    image = _finish(rgb, alpha, grey, depth, meta, mode, fmt)
    image.duration = _duration(im)
    image.loop = im.info.get("loop") if isinstance(im.info.get("loop"), int) else None
    return image


def _deep_planes(data: bytes, fmt: str, size: tuple[int, int]):
    """(rgb, alpha, grey, 16) of a HEIC or AVIF of 10 or 12 bits or a JPEG XL of more than 8, from decoders that
    keep the depth (Pillow's codecs give 8 bits); None for an 8-bit file, or when that decoder disagrees with
    Pillow's on the size (then Pillow's 8 bits are what we have)."""
    try:
        if fmt == "HEIF":
            import pillow_heif

            heif = pillow_heif.open_heif(data, convert_hdr_to_8bit=False)
            if heif.info.get("bit_depth", 8) <= 8:
                return None
            a, full = np.asarray(heif), 65535.0  # pillow-heif scales 10 and 12 bits up to 16
        elif fmt == "AVIF":
            bits = _avif_bits(data)
            if bits <= 8:
                return None
            import imagecodecs

            a, full = imagecodecs.avif_decode(data), float(2**bits - 1)  # libavif: samples as stored
        else:
            import imagecodecs

            a, full = imagecodecs.jpegxl_decode(data), 65535.0  # libjxl: uint16 for more than 8 bits
            if a.dtype != np.uint16:
                return None
    except Exception:  # noqa: BLE001 - a decoder missing or refusing: Pillow's 8 bits
        return None
    if a.dtype != np.uint16 or a.shape[:2] != (size[1], size[0]):
        return None
    f = np.clip(a.astype(np.float32) / full, 0.0, 1.0)
    if f.ndim == 2 or f.shape[2] <= 2:
        grey = f if f.ndim == 2 else f[..., 0]
        return _grey_to_rgb(grey), (f[..., 1] if f.ndim == 3 and f.shape[2] == 2 else None), True, 16
    return f[..., :3], (f[..., 3] if f.shape[2] == 4 else None), False, 16


def _jxl_box(data: bytes, kind: bytes) -> bytes | None:
    """The content of a JPEG XL container's first box of `kind`; None in a bare codestream or without one."""
    at = 0
    while data[:4] == b"\0\0\0\x0c" and at + 8 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        if data[at + 4 : at + 8] == kind:
            return data[at + 8 : at + size] or None
        if size < 8:
            return None
        at += size
    return None


def _avif_bits(data: bytes) -> int:
    """Bits per sample an AVIF declares (its `pixi` property); 8 when it says nothing."""
    at = data.find(b"pixi", 0, 1 << 16)  # in the meta box, at the start of the file
    return data[at + 9] if at >= 0 and len(data) > at + 9 and data[at + 8] >= 1 else 8


def _duration(im: Image.Image) -> float | None:
    value = im.info.get("duration")
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None


def _read_more_frames(first: LoadedImage, im: Image.Image, data: bytes, frames: int, label: str,
                      limit: int | None) -> None:
    """The frames after the first, as a viewer shows them (Pillow applies each frame's disposal and blending
    to the canvas), into `first.pages`. An animation's frames share the first frame's metadata and
    orientation; a TIFF's pages each keep their own (size, mode, bit depth, ICC, EXIF, XMP)."""
    pages = first.source_format == "TIFF"
    orientation = first.orientation
    total = first.size[0] * first.size[1]
    for k in range(1, frames):
        try:
            im.seek(k)
            total += im.size[0] * im.size[1]  # a TIFF's pages may each be larger than the first
            if limit is not None and total > limit:
                raise TooLargeError(f"{label}: {frames} {'pages' if pages else 'frames'} hold more than the "
                                    f"{limit:,}-pixel safety limit (a possible decompression bomb); allow large "
                                    "images to read it anyway")
            if pages:
                frame = _decode_tiff16(data, im.getexif(), label, limit, index=k) or _decode_first(data, im, label)
            else:
                im.load()
                rgb, alpha, grey, depth, _ = _pillow_planes(im, label)
                frame = _finish(rgb, alpha, grey, depth, {"orientation": orientation}, im.mode, first.source_format)
                frame.duration = _duration(im)
        except TooLargeError:
            raise
        except ImageError as e:  # the same kind of error (a pixel limit keeps its remedy), naming the frame
            raise type(e)(f"{e} ({'page' if pages else 'frame'} {k + 1} of {frames})") from None
        except Exception as e:  # noqa: BLE001 - a broken later frame fails the file, in one line
            raise ImageError(f"{label}: truncated or corrupt {'page' if pages else 'frame'} {k + 1} of {frames} "
                             f"({_one_line(e)})") from None
        first.pages.append(frame)
    if not pages and first.alpha is None and all(f.alpha is None or f.alpha.min() >= 1.0 for f in first.pages):
        for f in first.pages:  # Pillow composes later GIF frames as RGBA; an opaque animation stays opaque
            f.alpha = None


def _finish(rgb, alpha, grey, depth, meta, mode, fmt) -> LoadedImage:
    orientation = meta.pop("orientation")
    rgb = np.ascontiguousarray(_orient(rgb, orientation), dtype=np.float32)
    if alpha is not None:
        alpha = np.ascontiguousarray(_orient(alpha, orientation), dtype=np.float32)
    image = LoadedImage(rgb=rgb, alpha=alpha, grayscale=grey, bit_depth=depth, mode=mode, source_format=fmt, **meta)
    image.orientation = orientation
    return image


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


def _tiff_tags(data: bytes) -> Image.Exif | None:
    """The first page's TIFF tags; None when Pillow cannot parse them (then Image.open decides)."""
    tags = Image.Exif()
    try:
        tags.load(data)
    except Exception:  # noqa: BLE001 - not a classic TIFF Pillow can parse: leave it to Image.open
        return None
    return tags


def _decode_tiff16(data: bytes, tags: Image.Exif | None, label: str, limit: int | None,
                   index: int = 0) -> LoadedImage | None:
    """Page `index` (its `tags`) when it is a 16-bit unsigned TIFF page, decoded by libtiff (imagecodecs);
    None when it is not one."""
    if tags is None:
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

    a = imagecodecs.tiff_decode(data, index)
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
    return _finish(rgb, alpha, grey, 16, meta, mode, "TIFF")

"""Encoding a `LoadedImage` (or planes) to the bytes of each format we write, with their metadata; an animation's
frames or a document's pages to one GIF, APNG, animated WebP or multi-page TIFF."""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import Any, Mapping

import numpy as np
from PIL import Image

from .image import (
    EXTENSIONS,
    MULTI_FRAME_FORMATS,
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
    frames = getattr(img, "all_frames", [img])
    if len(frames) > 1 and fmt_name not in MULTI_FRAME_FORMATS:
        raise ImageError(f"{name}: {fmt_name} holds one image and this one has {len(frames)} frames; write "
                         f"{', '.join(EXTENSIONS[f].lstrip('.') for f in MULTI_FRAME_FORMATS)}, or keep the first frame")
    limits = {"WEBP": 16383, "JPEG": 65535, "PNG": 2**31 - 1, "TIFF": 2**31 - 1, "BMP": 2**31 - 1, "AVIF": 65535,
              "HEIF": 65535, "JXL": 2**30 - 1, "GIF": 65535}
    for frame in frames:
        h, w = frame.rgb.shape[:2]
        if max(h, w) > limits[fmt_name]:
            raise ImageError(f"{name}: {w}x{h} is too large for {fmt_name} (at most {limits[fmt_name]} pixels a side); "
                             "choose png or tiff")
    prov = _provenance(provenance)
    try:
        if len(frames) > 1 or fmt_name == "GIF":
            return _encode_frames(frames, fmt_name, prov, quality)
        pixels, bits, grey = _output_pixels(img, fmt_name)
        icc = _icc_fits(img.icc_profile, grey)
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


def _output_pixels(img: LoadedImage, fmt_name: str, bits: int | None = None,
                   grey: bool | None = None) -> tuple[np.ndarray, int, bool]:
    """(H x W x C integer pixels in output channel order, bits, grey) of one image or frame for `fmt_name`;
    `bits` and `grey` force a depth or colour (the frames of one animation share them)."""
    bits = output_bits(img, fmt_name) if bits is None else bits
    rgb, alpha = img.rgb, img.alpha
    grey = img.grayscale if grey is None else grey
    if np.issubdtype(rgb.dtype, np.integer):  # quantised as the engine finished it (`output_bits` at hand)
        if alpha is not None:
            raise ValueError("quantised colour with a float alpha plane: pass both as floats")
        if rgb.dtype != (np.uint16 if bits == 16 else np.uint8):  # another depth: through floats, as from floats
            rgb = rgb.astype(np.float32) / float(np.iinfo(rgb.dtype).max)
        else:
            return (rgb[..., :1] if grey else rgb), bits, grey  # a grey image's three channels are equal
    if alpha is not None and fmt_name in ("JPEG", "BMP"):  # no alpha: composite over white
        a = np.clip(alpha, 0.0, 1.0)[..., None]
        rgb, alpha = rgb * a + (1.0 - a), None
    if fmt_name in ("WEBP", "AVIF", "HEIF", "JXL", "GIF"):
        grey = False  # written as colour (their Pillow encoders take RGB/RGBA)
    pixels = quantise(_compose(rgb, alpha, grey), bits)
    if pixels.shape[2] == 3 and grey:
        pixels = pixels[..., :1]
    return pixels, bits, grey


def output_bits(img: LoadedImage, fmt_name: str) -> int:
    """The bits per sample `img` is written with in `fmt_name`: 16 from a 16-bit source into a format that holds
    them, else 8."""
    deep = (fmt_name in SIXTEEN_BIT_FORMATS or fmt_name in ("HEIF", "AVIF")
            or (fmt_name == "JXL" and _srgb(img.icc_profile)))
    return 16 if img.bit_depth == 16 and deep else 8


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
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Bytes of filtered rows per deflate band: a larger image is compressed band by band on every core
_PNG_BAND_BYTES = 4 << 20
_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey + alpha, RGB, RGBA


def _png_samples(pixels: np.ndarray, bits: int) -> np.ndarray:
    """The rows of a PNG's samples as bytes (big-endian at 16 bits), (rows, bytes per row)."""
    samples = pixels.astype(">u2", copy=False) if bits == 16 else pixels
    return np.ascontiguousarray(samples).view(np.uint8).reshape(pixels.shape[0], -1)


def _png_filtered(rows: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a PNG's image data: each after its filter byte, filtered with Up (the difference from the
    row above, byte by byte, modulo 256; above the first row are zeros). One fixed filter costs a subtraction,
    and on upscaled photos it gave smaller files than Pillow's choice per row (a 5120x3840 AGDN output at level
    4: 15.3 MB against 16.2 MB)."""
    out = np.empty((r1 - r0, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = 2
    if r0 == 0:
        out[0, 1:] = rows[0]
        np.subtract(rows[1:r1], rows[: r1 - 1], out=out[1:, 1:])  # uint8 arithmetic wraps: the filter's modulo
    else:
        np.subtract(rows[r0:r1], rows[r0 - 1 : r1 - 1], out=out[:, 1:])
    return out


def _adler32_joined(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings joined, from theirs: A = 1 + the sum of the bytes, B = the sum of A after
    each byte, so A = A1 + A2 - 1 and B = B1 + B2 + n2 (A1 - 1), modulo 65521."""
    base = 65521
    a1, b1, a2, b2 = first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16
    return (a1 + a2 - 1) % base | (b1 + b2 + second_length * (a1 - 1)) % base << 16


def _png_idat(pixels: np.ndarray, bits: int, level: int) -> list[bytes]:
    """The zlib stream of a PNG's image data, in pieces to concatenate. Bands of about _PNG_BAND_BYTES are
    filtered and compressed on all cores at once (zlib lets go of the GIL), each as raw deflate primed with the
    32 KiB before it (so its matches reach back across the seam as in one pass) and ended on a byte boundary by
    a sync flush; one zlib header goes before them and the Adler-32 of the whole after. No filtered copy of the
    whole image is made (16-bit samples are byte-swapped into one big-endian copy first)."""
    rows = _png_samples(pixels, bits)
    h, row_bytes = rows.shape[0], rows.shape[1] + 1
    per_band = max(1, _PNG_BAND_BYTES // row_bytes)
    if h <= per_band:
        return [zlib.compress(_png_filtered(rows, 0, h), level)]
    starts = list(range(0, h, per_band))
    primer_rows = -(-32768 // row_bytes)

    def band(i: int) -> tuple[bytes, int, int]:
        r0, r1 = starts[i], min(h, starts[i] + per_band)
        data = _png_filtered(rows, r0, r1)
        primer = {"zdict": _png_filtered(rows, max(0, r0 - primer_rows), r0).tobytes()[-32768:]} if r0 else {}
        c = zlib.compressobj(level, zlib.DEFLATED, -15, **primer)
        piece = c.compress(data) + c.flush(zlib.Z_FINISH if r1 == h else zlib.Z_SYNC_FLUSH)
        return piece, zlib.adler32(data), data.size

    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(min(len(starts), cores, 8)) as pool:
        bands = list(pool.map(band, range(len(starts))))
    adler = bands[0][1]
    for _, band_adler, length in bands[1:]:
        adler = _adler32_joined(adler, band_adler, length)
    pieces = [piece for piece, _, _ in bands]
    pieces[0] = b"\x78\x5e" + pieces[0]  # deflate, 32 KiB window, the "fast" levels; check bits: 0x785e % 31 == 0
    pieces[-1] += struct.pack(">I", adler)
    return pieces


def _png_options(img: LoadedImage, icc, prov, size: tuple[int, int]) -> dict[str, Any]:
    """Pillow's PNG save options carrying the metadata (text, XMP, ICC, EXIF) and our compression level."""
    from PIL.PngImagePlugin import PngInfo

    exif = _exif_out(img.exif, _software_line(prov) if prov else None, size, create=False)
    exif_bytes = _exif_bytes(exif) if exif is not None else None
    xmp = _xmp_out(img.xmp, prov, size)
    info = PngInfo()
    for k, v in _png_text(img.text, prov).items():
        info.add_text(k, v)
    if xmp:
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
    options: dict[str, Any] = {"pnginfo": info, "compress_level": PNG_COMPRESS_LEVEL}
    if icc:
        options["icc_profile"] = icc
    if exif_bytes:
        options["exif"] = exif_bytes
    return options


def _encode_png(pixels: np.ndarray, bits: int, img: LoadedImage, icc, prov) -> bytes:
    """Our own PNG writer, 8 and 16 bits alike: the metadata chunks (ICC, EXIF, XMP, text) after IHDR, then the
    pixels filtered and compressed by `_png_idat` on every core (Pillow's encoder runs on one: a
    20 MP output took 1.6 s)."""
    h, w, channels = pixels.shape
    size = (w, h)
    exif = _exif_out(img.exif, _software_line(prov) if prov else None, size, create=False)
    exif_bytes = _exif_bytes(exif) if exif is not None else None
    xmp = _xmp_out(img.xmp, prov, size)
    text = _png_text(img.text, prov)
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, _PNG_COLOUR_TYPE[channels], 0, 0, 0))]
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
    chunks += [_png_chunk(b"IDAT", piece) for piece in _png_idat(pixels, bits, PNG_COMPRESS_LEVEL)]
    chunks.append(_png_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_itxt(key: str, value: str) -> bytes:
    return _png_chunk(b"iTXt", key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + value.encode("utf-8"))


def _encode_tiff(pixels: np.ndarray, bits: int, img: LoadedImage, icc, prov) -> bytes:
    size = (pixels.shape[1], pixels.shape[0])
    tags = _exif_out(img.exif, _software_line(prov) if prov else None, size, create=True)
    if tags is None:
        tags = Image.Exif()
    tags.endian = "<"  # little-endian whatever the source's EXIF was, as Pillow's writer is: pages join alike
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
    options: dict[str, Any] = {}
    if fmt == "BMP":
        buf = io.BytesIO()
        _to_pillow(pixels).save(buf, format="BMP")
        return buf.getvalue()
    if icc:
        options["icc_profile"] = icc
    exif = _exif_out(img.exif, _software_line(prov) if prov else None, size, create=True)
    exif_bytes = _exif_bytes(exif) if exif is not None else None
    xmp = _xmp_out(img.xmp, prov, size)
    if pixels.dtype == np.uint16:  # HEIF at 10 bits, JPEG XL at 16
        return _encode_deep(pixels, fmt, icc, exif_bytes, xmp, quality)
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
    _to_pillow(pixels).save(buf, format=fmt, **options)
    return buf.getvalue()


def _srgb(icc: bytes | None) -> bool:
    """No profile (sRGB assumed) or an sRGB one: what a JPEG XL written without a profile says."""
    if not icc:
        return True
    try:
        from PIL import ImageCms

        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip().startswith("sRGB")
    except Exception:  # noqa: BLE001 - an unreadable profile is kept as it is, through the 8-bit writer
        return False


def _encode_deep(pixels: np.ndarray, fmt: str, icc: bytes | None, exif: bytes | None, xmp: bytes | None,
                 quality: int) -> bytes:
    """16-bit RGB(A) pixels as a 10-bit AVIF (libavif through imagecodecs, the metadata added here), a 10-bit
    HEIC (pillow-heif: libheif and x265) or a 16-bit JPEG XL (libjxl through imagecodecs, in a JPEG XL container
    that we write with the EXIF and XMP boxes; its colour space is sRGB, so only images without a profile or
    with an sRGB one come here)."""
    h, w, channels = pixels.shape
    data = np.ascontiguousarray(pixels)
    if fmt == "AVIF":  # libavif through imagecodecs writes the depth; the metadata are added here
        import imagecodecs

        ten = (data.astype(np.uint32) * 1023 + 32767) // 65535  # 16 bits to 10, rounded
        return _avif_with_metadata(imagecodecs.avif_encode(ten.astype(np.uint16), level=quality, bitspersample=10),
                                   icc, exif, xmp)
    if fmt == "HEIF":
        import pillow_heif

        heif = pillow_heif.from_bytes(mode="RGBA;16" if channels == 4 else "RGB;16", size=(w, h), data=data.tobytes())
        if icc:
            heif.info["icc_profile"] = icc
        buf = io.BytesIO()
        heif.save(buf, quality=quality, exif=exif, xmp=xmp)
        return buf.getvalue()
    import imagecodecs

    metadata = []
    if exif:  # the box holds the offset of the TIFF header (0), then the TIFF data
        metadata.append(_box(b"Exif", b"\0\0\0\0" + exif.removeprefix(b"Exif\x00\x00")))
    if xmp:
        metadata.append(_box(b"xml ", xmp))
    stream = imagecodecs.jpegxl_encode(data, level=quality, usecontainer=False)
    if stream[:2] == b"\xff\x0a":  # a bare codestream: into a container of ours
        return b"".join([_box(b"JXL ", b"\r\n\x87\n"), _box(b"ftyp", b"jxl \0\0\0\0jxl "), *metadata,
                         _box(b"jxlc", stream)])
    # libjxl wrote a container itself (16-bit alpha needs its level box): ours go before the codestream's boxes
    at = 0
    while at + 8 <= len(stream) and stream[at + 4 : at + 8] not in (b"jxlc", b"jxlp"):
        size = struct.unpack_from(">I", stream, at)[0]
        if size < 8:
            raise ImageError("unexpected JPEG XL container from the encoder")
        at += size
    return stream[:at] + b"".join(metadata) + stream[at:]


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def _children(data: bytes, start: int, end: int) -> list[tuple[bytes, bytes]]:
    """The ISO-BMFF boxes between `start` and `end`, as (type, whole box); 64-bit and to-the-end sizes refused."""
    out = []
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        if size < 8 or start + size > end:
            raise ImageError(f"unexpected {kind!r} box from the AVIF encoder")
        out.append((kind, data[start : start + size]))
        start += size
    return out


def _avif_with_metadata(data: bytes, icc: bytes | None, exif: bytes | None, xmp: bytes | None) -> bytes:
    """An AVIF from libavif with an ICC profile (a `colr` property of type `prof` on the primary item) and EXIF
    and XMP items (each described by `infe`, located by `iloc`, and linked to the primary item by a `cdsc`
    reference), their bytes in an `mdat` box at the end. Every offset into the file moves by what the `meta`
    box grows. Only the layout libavif writes is handled: a `meta` box before the image data, `iloc` with no
    base offsets."""
    top = _children(data, 0, len(data))
    kinds = [kind for kind, _ in top]
    if b"meta" not in kinds or not (icc or exif or xmp):
        return data
    at = kinds.index(b"meta")
    meta = top[at][1]
    head, children = meta[8:12], dict(_children(meta, 12, len(meta)))
    primary = struct.unpack_from(">H", children[b"pitm"], 12)[0] if children[b"pitm"][8] == 0 else \
        struct.unpack_from(">I", children[b"pitm"], 12)[0]
    items = _iloc_items(children[b"iloc"])
    new_id = max([primary, *(item[0] for item in items)]) + 1
    payloads = []  # (item id, item type, content type, bytes)
    if exif:  # the item holds the offset of the TIFF header (0), then the TIFF data
        payloads.append((new_id, b"Exif", b"", b"\0\0\0\0" + exif.removeprefix(b"Exif\x00\x00")))
    if xmp:
        payloads.append((new_id + len(payloads), b"mime", b"application/rdf+xml", xmp))
    # iinf: the new items' entries (infe version 2)
    iinf = children[b"iinf"]
    version = iinf[8]
    count_size = 2 if version == 0 else 4
    count = int.from_bytes(iinf[12 : 12 + count_size], "big") + len(payloads)
    entries = iinf[12 + count_size :] + b"".join(
        _box(b"infe", b"\x02\0\0\0" + struct.pack(">HH", item, 0) + kind + b"\0" + (content + b"\0" if content else b""))
        for item, kind, content, _ in payloads)
    children[b"iinf"] = _box(b"iinf", iinf[8:12] + count.to_bytes(count_size, "big") + entries)
    # iref: each metadata item describes (cdsc) the primary item
    if payloads:
        old = children.get(b"iref", _box(b"iref", b"\0\0\0\0"))
        if old[8] != 0:
            return data  # 32-bit item ids: a layout libavif does not write
        refs = b"".join(_box(b"cdsc", struct.pack(">HHH", item, 1, primary)) for item, *_ in payloads)
        children[b"iref"] = _box(b"iref", old[8:] + refs)
    # iprp: the ICC profile as a property of the primary item
    if icc:
        iprp = dict(_children(children[b"iprp"], 8, len(children[b"iprp"])))
        ipco, ipma = iprp[b"ipco"], iprp[b"ipma"]
        index = len(_children(ipco, 8, len(ipco))) + 1
        wide = ipma[11] & 1  # 15-bit property indices
        if ipma[8] != 0 or (index > 127 and not wide):
            return data
        ipco = _box(b"ipco", ipco[8:] + _box(b"colr", b"prof" + icc))
        entry_count = struct.unpack_from(">I", ipma, 12)[0]
        body, pos, found = bytearray(ipma[8:16]), 16, False
        for _ in range(entry_count):
            item, n = struct.unpack_from(">HB", ipma, pos)
            size = 3 + n * (2 if wide else 1)
            entry = bytearray(ipma[pos : pos + size])
            if item == primary:
                entry[2] = n + 1
                entry += struct.pack(">H", index) if wide else bytes([index])
                found = True
            body += entry
            pos += size
        if not found:
            return data
        children[b"iprp"] = _box(b"iprp", ipco + _box(b"ipma", bytes(body)))

    def build(shift: int, extra_at: int) -> bytes:
        entries = [(item, method, [(offset + shift if method == 0 else offset, length) for offset, length in extents])
                   for item, method, extents in items]
        position = extra_at
        for item, _, _, payload in payloads:
            entries.append((item, 0, [(position, len(payload))]))
            position += len(payload)
        children[b"iloc"] = _iloc(children[b"iloc"], entries)
        return _box(b"meta", head + b"".join(children.values()))

    before = sum(len(box) for _, box in top[:at])
    after = b"".join(box for _, box in top[at + 1 :])
    grown = len(build(0, 0)) - len(meta)
    extra_at = before + len(meta) + grown + len(after) + 8  # the appended mdat's content
    new_meta = build(grown, extra_at)
    tail = _box(b"mdat", b"".join(payload for *_, payload in payloads)) if payloads else b""
    return data[:before] + new_meta + after + tail


def _iloc_items(iloc: bytes) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """(item id, construction method, [(offset, length)]) of each item of an `iloc` box without base offsets."""
    version = iloc[8]
    offset_size, length_size = iloc[12] >> 4, iloc[12] & 15
    base_size, index_size = iloc[13] >> 4, (iloc[13] & 15) if version in (1, 2) else 0
    if base_size or index_size or offset_size not in (4, 8) or length_size not in (4, 8) or version > 2:
        raise ImageError("unexpected iloc layout from the AVIF encoder")
    pos = 14
    count = struct.unpack_from(">H" if version < 2 else ">I", iloc, pos)[0]
    pos += 2 if version < 2 else 4
    items = []
    for _ in range(count):
        item = struct.unpack_from(">H" if version < 2 else ">I", iloc, pos)[0]
        pos += 2 if version < 2 else 4
        method = 0
        if version in (1, 2):
            method = struct.unpack_from(">H", iloc, pos)[0] & 15
            pos += 2
        pos += 2  # data reference index
        extents = []
        for _ in range(struct.unpack_from(">H", iloc, pos)[0]):
            offset = int.from_bytes(iloc[pos + 2 : pos + 2 + offset_size], "big")
            length = int.from_bytes(iloc[pos + 2 + offset_size : pos + 2 + offset_size + length_size], "big")
            extents.append((offset, length))
            pos += offset_size + length_size
        pos += 2
        items.append((item, method, extents))
    return items


def _iloc(old: bytes, items: list[tuple[int, int, list[tuple[int, int]]]]) -> bytes:
    """An `iloc` box like `old` (its version and field sizes) holding `items`."""
    version = old[8]
    offset_size, length_size = old[12] >> 4, old[12] & 15
    wide = version == 2
    body = bytearray(old[8:14]) + struct.pack(">I" if wide else ">H", len(items))
    for item, method, extents in items:
        body += struct.pack(">I" if wide else ">H", item)
        if version in (1, 2):
            body += struct.pack(">H", method)
        body += struct.pack(">HH", 0, len(extents))
        for offset, length in extents:
            body += offset.to_bytes(offset_size, "big") + length.to_bytes(length_size, "big")
    return _box(b"iloc", bytes(body))


# -- several frames: an animation (GIF, APNG, WebP) or the pages of a TIFF -------------------------------------------

#: how long a frame shows when its source said nothing (a TIFF's pages written as an animation), in ms
DEFAULT_FRAME_MS = 100


def _encode_frames(frames: list[LoadedImage], fmt: str, prov, quality: int) -> bytes:
    """Every frame, as the same kind of file. Frames are whole pictures as a viewer shows them (the reader
    applied the source's disposal and blending), so each is written to replace the canvas: what every frame
    shows is kept exactly, whatever the source's disposal codes were."""
    first = frames[0]
    if fmt == "TIFF":  # pages: each with its own depth and metadata
        pages = []
        for page in frames:
            pixels, bits, grey = _output_pixels(page, fmt)
            pages.append(_encode_tiff(pixels, bits, page, _icc_fits(page.icc_profile, grey), prov))
        return _join_tiff_pages(pages)
    # one mode for the whole animation: colour if any frame is, alpha if any frame has it, 8 bits (Pillow
    # writes neither a 16-bit APNG nor a deeper GIF or WebP)
    grey = all(f.grayscale for f in frames) and fmt == "PNG"
    alpha = any(f.alpha is not None for f in frames)
    images = []
    for frame in frames:
        if alpha and frame.alpha is None:
            frame = LoadedImage(rgb=frame.rgb, alpha=np.ones(frame.rgb.shape[:2], np.float32),
                                grayscale=frame.grayscale)
        pixels, _, _ = _output_pixels(frame, fmt, bits=8, grey=grey)
        images.append(_gif_frame(pixels) if fmt == "GIF" else _to_pillow(pixels))
    durations = [f.duration if f.duration is not None else DEFAULT_FRAME_MS for f in frames]
    size = (frames[0].rgb.shape[1], frames[0].rgb.shape[0])
    options: dict[str, Any] = {"save_all": len(frames) > 1, "append_images": images[1:]}
    if len(frames) > 1:
        options["duration"] = durations
    icc = _icc_fits(first.icc_profile, grey)
    if fmt == "GIF":
        # disposal 2 clears each frame's area before the next, so transparent pixels never show the last frame;
        # an opaque animation keeps disposal 1 (each whole frame covers the last: nothing to clear)
        options.update(disposal=2 if alpha else 1, optimize=False)
        if alpha:  # the background a frame is cleared to is the transparent index: what browsers clear to too
            options.update(transparency=_GIF_TRANSPARENT, background=_GIF_TRANSPARENT)
        if first.loop is not None:
            options["loop"] = first.loop
        options["comment"] = (first.text.get("Comment") or (_software_line(prov) if prov else "")).encode()[:255]
        buf = io.BytesIO()
        images[0].save(buf, format="GIF", **options)
        return buf.getvalue()
    # a source that did not say loops plays once (a GIF without a loop count); APNG and WebP say it explicitly
    options["loop"] = 1 if first.loop is None else first.loop
    if fmt == "PNG":
        from PIL import PngImagePlugin

        options.update(_png_options(first, icc, prov, size), disposal=PngImagePlugin.Disposal.OP_BACKGROUND,
                       blend=PngImagePlugin.Blend.OP_SOURCE, default_image=False)
        buf = io.BytesIO()
        images[0].save(buf, format="PNG", **options)
        return buf.getvalue()
    exif = _exif_out(first.exif, _software_line(prov) if prov else None, size, create=True)  # WEBP
    options.update(quality=quality, exif=_exif_bytes(exif) if exif is not None else b"",
                   xmp=_xmp_out(first.xmp, prov, size) or b"")
    if icc:
        options["icc_profile"] = icc
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", **options)
    return buf.getvalue()


_GIF_TRANSPARENT = 255  # the palette index of transparent pixels (the palette's other 255 are the frame's colours)


def _gif_frame(pixels: np.ndarray) -> Image.Image:
    """One frame as a palette image with its own palette (median cut over the frame's colours, Floyd-Steinberg
    dithering); pixels under half opacity become the transparent index (GIF has no partial transparency)."""
    colours = Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
    if pixels.shape[2] == 3:
        return colours.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    frame = colours.quantize(255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    index = np.asarray(frame).copy()
    index[pixels[..., 3] < 128] = _GIF_TRANSPARENT
    palette = frame.getpalette()[: 3 * 255]
    out = Image.fromarray(index, "P")
    out.putpalette(palette + [0] * (768 - len(palette)))
    out.info["transparency"] = _GIF_TRANSPARENT
    return out


# TIFF field types -> bytes per value (1 BYTE, 2 ASCII, 3 SHORT, 4 LONG, 5 RATIONAL, 6 SBYTE, 7 UNDEFINED,
# 8 SSHORT, 9 SLONG, 10 SRATIONAL, 11 FLOAT, 12 DOUBLE, 13 IFD)
_TIFF_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_TIFF_OFFSET_TAGS = {273, 324, 513}  # StripOffsets, TileOffsets, JPEGInterchangeFormat: values point into the file
_TIFF_IFD_TAGS = {330, 34665, 34853, 40965}  # SubIFDs, Exif, GPS, Interoperability: values point to IFDs


def _join_tiff_pages(pages: list[bytes]) -> bytes:
    """One multi-page TIFF from complete single-page TIFFs (each written by `_encode_tiff`, with its own
    metadata): each page's content is appended and every offset in it (IFD entries, strips, the Exif and GPS
    IFDs) moved by where it now starts; each page's IFD then links to the next."""
    out = bytearray(pages[0])
    order = "<" if out[:2] == b"II" else ">"
    link = _last_ifd_link(out, order)
    for data in pages[1:]:
        if data[:2] != out[:2]:
            raise ImageError("pages with different byte orders")
        if len(out) % 2:
            out += b"\0"  # IFDs and values start on a word boundary
        shift = len(out) - 8  # the page's byte at offset o (past its 8-byte header) lands at o + shift
        body = bytearray(data)
        first_ifd = struct.unpack_from(order + "I", body, 4)[0]
        _move_ifd(body, first_ifd, shift, order, set())
        out += body[8:]
        struct.pack_into(order + "I", out, link, first_ifd + shift)
        link = _last_ifd_link(out, order)
    return bytes(out)


def _last_ifd_link(data: bytearray, order: str) -> int:
    """Where the chain of main IFDs ends: the position of the last one's next-IFD offset (zero)."""
    offset, link = struct.unpack_from(order + "I", data, 4)[0], 4
    while offset:
        count = struct.unpack_from(order + "H", data, offset)[0]
        link = offset + 2 + 12 * count
        offset = struct.unpack_from(order + "I", data, link)[0]
    return link


def _move_ifd(body: bytearray, offset: int, shift: int, order: str, seen: set[int]) -> None:
    """Add `shift` to every file offset in the IFD at `offset` of `body` (positions in `body` stay as they are)
    and in the IFDs it points to."""
    if offset in seen or not 8 <= offset < len(body):
        return
    seen.add(offset)
    count = struct.unpack_from(order + "H", body, offset)[0]
    for i in range(count):
        entry = offset + 2 + 12 * i
        tag, kind, n = struct.unpack_from(order + "HHI", body, entry)
        size = _TIFF_SIZES.get(kind, 1) * n
        where = entry + 8  # the value itself, or the offset of the values when they do not fit in 4 bytes
        if size > 4:
            values_at = struct.unpack_from(order + "I", body, where)[0]
            struct.pack_into(order + "I", body, where, values_at + shift)
            where = values_at
        if tag in _TIFF_OFFSET_TAGS | _TIFF_IFD_TAGS and kind in (3, 4, 13):
            fmt = order + ("H" if kind == 3 else "I")
            step = 2 if kind == 3 else 4
            for j in range(n):
                old = struct.unpack_from(fmt, body, where + j * step)[0]
                if tag in _TIFF_IFD_TAGS:
                    _move_ifd(body, old, shift, order, seen)
                struct.pack_into(fmt, body, where + j * step, old + shift)
    link = offset + 2 + 12 * count
    following = struct.unpack_from(order + "I", body, link)[0]
    if following:
        _move_ifd(body, following, shift, order, seen)
        struct.pack_into(order + "I", body, link, following + shift)

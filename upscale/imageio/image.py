"""The image model and the format table: `LoadedImage`, `ImageError`, the formats we read and write (by
name and by leading bytes), and conversions between arrays and colour/alpha planes (shared with the API)."""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# The one table of formats: every other list of names or extensions in the project is derived from these.
#: formats we write, by the names and extensions that select them (--format, -o's extension) -> Pillow's name
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "tif": "TIFF", "bmp": "BMP",
           "avif": "AVIF", "heic": "HEIF", "heif": "HEIF", "jxl": "JXL", "gif": "GIF"}
#: the extension each written format gets
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "AVIF": ".avif",
              "HEIF": ".heic", "JXL": ".jxl", "GIF": ".gif"}
#: formats that hold several frames (GIF, APNG, WebP: an animation) or pages (TIFF); the others get the first
MULTI_FRAME_FORMATS = ("GIF", "PNG", "WEBP", "TIFF")
#: inputs written as their own kind by default (others become PNG, lossless): a TIFF's pages have no home in a
#: PNG, and a GIF stays a GIF (an animation re-quantised, a palette per frame)
KEEP_KIND = {".gif": ".gif", ".tif": ".tif", ".tiff": ".tif"}
#: the names to offer in messages, one per written format
WRITE_CHOICES = ", ".join(dict.fromkeys(ext.lstrip(".") for ext in EXTENSIONS.values()))
#: formats whose codec is a plug-in package, and the package (`plugins()` registers them with Pillow)
PLUGIN_FORMATS = {"HEIF": "pillow-heif", "JXL": "pillow-jxl-plugin"}
#: extensions of the files we read, with the dot
READ_EXTENSIONS = tuple(f".{name}" for name in FORMATS)
#: formats written with 16 bits per sample when the image has them
SIXTEEN_BIT_FORMATS = ("PNG", "TIFF")
#: formats written with more than 8 bits per sample when the image has them, and how
DEEP_FORMATS = {"PNG": "16-bit (imagecodecs)", "TIFF": "16-bit", "HEIF": "10-bit (pillow-heif)",
                "AVIF": "10-bit (imagecodecs: libavif; the metadata added by upscale)",
                "JXL": "16-bit (imagecodecs; 8-bit when an ICC profile other than sRGB must be kept)"}


@functools.cache
def plugins() -> dict[str, str | None]:
    """Register the plug-in codecs with Pillow (once); per format, None when available, else why not (one
    line: a platform without the package's wheel reports the format unavailable, never an import traceback)."""
    missing: dict[str, str | None] = {}
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        missing["HEIF"] = None
    except Exception as e:  # noqa: BLE001 - an absent or broken plug-in only disables its format
        missing["HEIF"] = f"HEIC/HEIF needs pillow-heif (pip install pillow-heif): {_one_line(e)}"
    try:
        import pillow_jxl  # noqa: F401 - registers the JXL codec on import

        missing["JXL"] = None
    except Exception as e:  # noqa: BLE001
        missing["JXL"] = f"JPEG XL needs pillow-jxl-plugin (pip install pillow-jxl-plugin): {_one_line(e)}"
    from PIL import features

    missing["AVIF"] = None if features.check("avif") else "this Pillow was built without AVIF"
    return missing


def format_support() -> dict[str, dict[str, bool | str]]:
    """Each format this installation reads and writes (for `upscale doctor`): the formats of the table above,
    and the ones Pillow can decode here that we do not write yet, with what provides them."""
    from PIL import Image

    unavailable = plugins()
    Image.init()
    readable = set(Image.OPEN)
    support: dict[str, dict[str, bool | str]] = {}
    for name in dict.fromkeys(FORMATS.values()):
        ok = unavailable.get(name) is None
        via = PLUGIN_FORMATS.get(name, "Pillow's own codec" if name == "AVIF" else "Pillow")
        support[name] = {"read": ok and name in readable, "write": ok and name in EXTENSIONS,
                         "via": via if ok else unavailable[name]}
    for name, how in DEEP_FORMATS.items():
        if name in support:
            support[name]["deep"] = how
    for name in ("HEIF", "AVIF", "JXL"):  # read at their full depth where the file has more than 8 bits
        if name in support:
            support[name]["deep_read"] = "10/12-bit" if name != "JXL" else "16-bit"
    return support




class ImageError(RuntimeError):
    """An input that cannot be read or an output that cannot be written; the message names the file.

    `remedy` names, where there is one, the setting that would let it through ("allow_large"): messages here
    speak of the concept, and the command line adds its flag."""

    remedy: str | None = None


class TooLargeError(ImageError):
    """More pixels, or larger metadata, than the safety limits allow (a possible decompression bomb)."""

    remedy = "allow_large"


@dataclass
class LoadedImage:
    """A decoded image and the metadata worth carrying to the output.

    ``rgb`` is H x W x 3 float32 in [0, 1] with the EXIF orientation applied (grey images hold three equal
    channels and ``grayscale=True``); ``alpha`` is H x W float32 in [0, 1] (straight, not premultiplied) or
    None. An upscaled result may hold ``rgb`` already quantised instead (uint8 or uint16 at the depth it will
    be written with, no alpha; see `upscale.api.upscale_image_with_stats`). ``exif`` is EXIF as Pillow writes it (``b"Exif\\0\\0"`` + TIFF data) with the Orientation reset to 1
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
    duration: float | None = None  # how long this frame shows, in ms (an animation's frames)
    loop: int | None = None  # how many times an animation plays (0: for ever; None: not said)
    #: the frames of an animation or the pages of a document after this, the first (each its own LoadedImage:
    #: pixels as a viewer shows that frame, its duration; a TIFF page its own metadata too)
    pages: list[LoadedImage] = field(default_factory=list)
    orientation: int = field(default=1, repr=False)  # the EXIF orientation the pixels were turned by

    @property
    def frames(self) -> int:
        """Frames (or pages) in all."""
        return 1 + len(self.pages)

    @property
    def all_frames(self) -> list[LoadedImage]:
        return [self, *self.pages]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow says it."""
        return self.rgb.shape[1], self.rgb.shape[0]

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None



# leading bytes of the formats we read (BMP's two-letter "BM" left out: a text file may start with it)
_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"GIF87a": "GIF",
          b"GIF89a": "GIF"}


_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def format_by_magic(head: bytes) -> str | None:
    """The format an image file's first 12 bytes announce, however broken the rest; None if none of ours."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":  # ISO base media: AVIF and HEIF say which by their brand
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIF" if head[8:12] in _HEIF_BRANDS else None
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JXL"
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


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


def quantise(x: np.ndarray, bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """[0, 1] floats to uint8 (metrics.to_uint8: half-to-even) or uint16 (round(x * 65535)); into `out` (of x's
    shape and that depth) when given."""
    if bits == 16:
        out = np.empty(x.shape, dtype=np.uint16) if out is None else out
        for start in range(0, max(1, x.shape[0]), 256):  # row blocks keep temporaries small
            block = np.clip(x[start : start + 256], 0.0, 1.0) * 65535.0
            out[start : start + 256] = np.round(block, out=block)
        return out
    from ..metrics import to_uint8

    return to_uint8(np.asarray(x, dtype=np.float32), out)


def _compose(rgb: np.ndarray, alpha: np.ndarray | None, grey: bool) -> np.ndarray:
    """Float H x W x C (C = 1, 2, 3 or 4) in output channel order."""
    base = rgb.mean(axis=2, keepdims=True) if grey else rgb
    if alpha is not None:
        base = np.concatenate([base, alpha[..., None].astype(base.dtype)], axis=2)
    return base


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
        # one pass from the 8-bit samples (the same float32 division): asarray to float32 and then dividing made
        # two passes and a temporary, 0.84 s of a 12 MP photo's decode against 0.13
        a = np.divide(np.asarray(im), np.float32(255), dtype=np.float32)
        if mode == "L":
            return _grey_to_rgb(a), None, True, 8, icc_dropped
        if mode == "LA":
            return _grey_to_rgb(a[..., 0]), a[..., 1], True, 8, icc_dropped
        if mode == "RGB":
            return a, None, False, 8, icc_dropped
        return a[..., :3], a[..., 3], False, 8, icc_dropped
    if mode.startswith("I;16"):
        grey = np.divide(np.asarray(im), np.float32(65535), dtype=np.float32)
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

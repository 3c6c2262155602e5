"""Reading and writing images with Pillow, and the atomic file writes that never lose a user's file."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .metrics import to_uint8

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "tif": "TIFF", "bmp": "BMP"}


class ImageError(RuntimeError):
    """An input that cannot be read or an output that cannot be written; the message names the file."""


@dataclass
class LoadedImage:
    rgb: np.ndarray  # H x W x 3 float32 in [0, 1], EXIF orientation applied
    path: Path | None
    mode: str  # Pillow mode of the source


def read_image(path: str | Path) -> LoadedImage:
    """Decode fully (so a truncated file fails here, not half-way through), apply EXIF orientation."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb_array(im)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None
    return LoadedImage(rgb, path, mode)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def output_path_for(src: Path, scale: int, suffix: str | None = None, ext: str = ".png") -> Path:
    """`photo.jpg` -> `photo_x4.png` beside it."""
    return src.with_name(f"{src.stem}{suffix if suffix is not None else f'_x{scale}'}{ext}")


def save_image(rgb: np.ndarray, dest: Path, fmt: str | None = None, overwrite: bool = False,
               protect: tuple[Path, ...] = (), quality: int = 95, pnginfo: dict[str, str] | None = None) -> Path:
    """Write atomically: a temporary file in the target folder, renamed into place when complete.

    Never writes over a path in `protect` (the inputs), nor over an existing file unless `overwrite`.
    """
    dest = Path(dest)
    fmt = fmt or FORMATS.get(dest.suffix.lower().lstrip("."))
    if fmt is None:
        raise ImageError(f"{dest}: unknown output format; use one of {', '.join(sorted(set(FORMATS)))}")
    for p in protect:
        if p.exists() and dest.exists() and os.path.samefile(p, dest):
            raise ImageError(f"{dest}: refusing to write over the input image")
    if dest.exists() and not overwrite:
        raise ImageError(f"{dest}: already exists (use --overwrite to replace it)")
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise ImageError(f"{dest}: output folder {folder} does not exist")
    image = Image.fromarray(to_uint8(rgb), "RGB")
    options: dict = {}
    if fmt == "JPEG":
        options = {"quality": quality, "subsampling": 0}
    elif fmt == "WEBP":
        options = {"quality": quality}
    elif fmt == "PNG" and pnginfo:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in pnginfo.items():
            info.add_text(k, v)
        options = {"pnginfo": info}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise ImageError(f"{dest}: cannot write in {folder} ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and dest.exists():
            raise ImageError(f"{dest}: already exists (use --overwrite to replace it)")
        os.replace(tmp, dest)
    except OSError as e:
        raise ImageError(f"{dest}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest

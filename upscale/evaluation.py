"""`upscale eval`: PSNR/SSIM of a model against a folder of HR images, as the SR papers measure them.

LR images come from `--lr` (matched by name: `baby.png` <-> `baby.png`, `babyx4.png`, `baby_x4.png`) or are
made from the HR images with MATLAB-style bicubic (`metrics.bicubic_downscale_uint8`). The protocol is the
papers' (see `metrics.py`): Y channel, `scale` border pixels cropped, SR clamped and rounded to uint8 first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import metrics
from .engine import Upscaler
from .imageio import READ_EXTENSIONS, ImageError


@dataclass
class ImageScore:
    name: str
    psnr: float
    ssim: float
    lr_size: tuple[int, int]


@dataclass
class EvalResult:
    model: str
    scale: int
    protocol: str
    hr_dir: str
    lr_source: str
    images: list[ImageScore] = field(default_factory=list)

    @property
    def psnr(self) -> float:
        return float(np.mean([s.psnr for s in self.images]))

    @property
    def ssim(self) -> float:
        return float(np.mean([s.ssim for s in self.images]))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_psnr": self.psnr, "mean_ssim": self.ssim}


def _read_rgb_uint8(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e})") from None


def find_lr(lr_dir: Path, hr_path: Path, scale: int) -> Path:
    stem = hr_path.stem
    for name in (stem, f"{stem}x{scale}", f"{stem}_x{scale}", f"{stem}X{scale}"):
        for suffix in (hr_path.suffix, *READ_EXTENSIONS):
            candidate = lr_dir / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    raise ImageError(f"{hr_path}: no matching LR image in {lr_dir}")


def evaluate(upscaler: Upscaler, hr_dir: str | Path, lr_dir: str | Path | None = None) -> EvalResult:
    hr_dir = Path(hr_dir)
    hr_paths = sorted(p for p in hr_dir.iterdir() if p.suffix.lower() in READ_EXTENSIONS)
    if not hr_paths:
        raise ImageError(f"{hr_dir}: no images found")
    s = upscaler.scale
    result = EvalResult(upscaler.entry.name, s, upscaler.protocol, str(hr_dir),
                        str(lr_dir) if lr_dir else "bicubic (MATLAB imresize) from HR")
    for hr_path in hr_paths:
        hr = metrics.mod_crop(_read_rgb_uint8(hr_path), s)
        if lr_dir is not None:
            lr = _read_rgb_uint8(find_lr(Path(lr_dir), hr_path, s))
        else:
            lr = metrics.bicubic_downscale_uint8(hr, s)
        sr, _ = upscaler.upscale_array(lr.astype(np.float32) / 255.0)
        sr_u8 = metrics.to_uint8(sr)
        h, w = sr_u8.shape[:2]
        hr = hr[:h, :w]
        if hr.shape != sr_u8.shape:
            raise ImageError(f"{hr_path}: HR {hr.shape[:2]} is smaller than the SR output {sr_u8.shape[:2]}")
        result.images.append(ImageScore(
            hr_path.stem, metrics.psnr_y(sr_u8, hr, s), metrics.ssim_y(sr_u8, hr, s), tuple(lr.shape[:2])))
    return result

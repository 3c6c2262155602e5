"""Evaluation metrics and the image operations of the super-resolution test protocol.

The protocol, which is how the SR papers report numbers (the project spec's evaluation section):

* the SR output is clamped to [0, 1], scaled by 255 and rounded half-to-even to uint8 (:func:`to_uint8`);
* the HR image is cropped top-left to a multiple of the scale (:func:`mod_crop`);
* both are converted to BT.601 luma Y on the 0-255 scale, in float64 (:func:`rgb_to_y`);
* ``scale`` pixels are cut from every border (:func:`shave`);
* PSNR uses a peak of 255 (:func:`psnr_y`); SSIM uses an 11x11 Gaussian window with sigma 1.5, the
  usual constants C1 = (0.01*255)^2 and C2 = (0.03*255)^2, only fully covered positions ("valid"
  filtering) and the mean of the SSIM map (:func:`ssim_y`);
* LR inputs are made with MATLAB's ``imresize(hr, 1/s, 'bicubic')`` on the uint8 HR image
  (:func:`bicubic_downscale_uint8`, which rounds to uint8 after each axis pass as MATLAB does; the float
  resampler alone is :func:`imresize`).

Arrays are NumPy, channels last (H x W or H x W x C), RGB order. Only NumPy and torch are used.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

__all__ = [
    "rgb_to_y",
    "mod_crop",
    "shave",
    "to_uint8",
    "psnr_y",
    "ssim_y",
    "imresize",
    "bicubic_downscale_uint8",
]

# BT.601 "studio swing" luma coefficients for R, G, B in 0-255 (MATLAB's rgb2ycbcr), and its offset.
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0
_Y_OFFSET = 16.0

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 255.0) ** 2
_SSIM_C2 = (0.03 * 255.0) ** 2


# --------------------------------------------------------------------------------------------------
# Colour, cropping, quantisation
# --------------------------------------------------------------------------------------------------


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma ("MATLAB" ``rgb2ycbcr`` Y) of an image with values on the 0-255 scale.

    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255``, computed in float64 and returned as an H x W
    float64 array in [16, 235] for inputs in [0, 255]. ``img`` may be uint8 or float, H x W x 3 (RGB) or
    H x W x 4 (RGBA: alpha ignored). Grayscale input (H x W or H x W x 1) is treated as R = G = B = grey,
    so ``Y = 16 + 219 * grey / 255``: the same value an RGB copy of that grey image would give.
    """
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return _Y_OFFSET + a.astype(np.float64) * _Y_WEIGHTS.sum()
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"rgb_to_y expects H x W, H x W x 1, H x W x 3 or H x W x 4, got shape {a.shape}")
    rgb = a[:, :, :3].astype(np.float64)
    return _Y_OFFSET + rgb @ _Y_WEIGHTS


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom and right edges so that height and width are multiples of ``scale``."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale, ...]


def shave(img: np.ndarray, border: int) -> np.ndarray:
    """Remove ``border`` pixels from every side (top, bottom, left, right). ``border = 0`` is a no-op."""
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return img
    h, w = img.shape[:2]
    if 2 * border >= h or 2 * border >= w:
        raise ValueError(f"cannot shave {border} px from every side of a {h}x{w} image")
    return img[border : h - border, border : w - border, ...]


ROWS_PER_BLOCK = 256


def to_uint8(img: torch.Tensor | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Quantise a [0, 1] float image the way the SR papers quantise their outputs.

    Clamp to [0, 1], multiply by 255, round half-to-even (NumPy's rounding), cast to uint8. The arithmetic
    runs in float32 for float32 / float16 / bfloat16 input (as the official test code does it after
    ``.float()``) and in float64 for float64 input.

    A torch tensor is taken to be in torch layout, (1, C, H, W), (C, H, W) or (H, W), and is returned as a
    channels-last NumPy array (H x W x C, or H x W): the layout every other function here uses. A NumPy
    array keeps its layout. `out`: a uint8 array of that shape to write into (and return) instead of a new one.
    """
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dtype != torch.float64:
            t = t.float()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"to_uint8 takes one image; got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        elif t.ndim != 2:
            raise ValueError(f"to_uint8 expects a (1,C,H,W), (C,H,W) or (H,W) tensor, got {tuple(img.shape)}")
        a = t.contiguous().numpy()
    else:
        a = np.asarray(img)
    if out is None:
        out = np.empty(a.shape, dtype=np.uint8)
    elif out.shape != a.shape or out.dtype != np.uint8:
        raise ValueError(f"to_uint8: out must be uint8 of shape {a.shape}, got {out.dtype} {out.shape}")
    if a.dtype in (np.float32, np.float16) and a.dtype.isnative and min(a.strides + out.strides, default=0) >= 0:
        # the same float32 steps in PyTorch, on every core: an upscaled photo's 59 M values, often a
        # channels-last view of planar rows, took 3x as long in NumPy
        with warnings.catch_warnings():  # a read-only array is only read
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(a)
        dst = torch.from_numpy(out)
        for start in range(0, max(1, a.shape[0]), ROWS_PER_BLOCK):
            block = src[start : start + ROWS_PER_BLOCK].float().clamp(0.0, 1.0)
            dst[start : start + ROWS_PER_BLOCK] = block.mul_(255.0).round_()  # half-to-even, as NumPy rounds
        return out
    work = np.float64 if a.dtype == np.float64 else np.float32
    # row blocks: an upscaled photo is gigabytes of floats; whole-array temporaries would multiply that
    for start in range(0, max(1, a.shape[0]), ROWS_PER_BLOCK):
        block = np.clip(a[start : start + ROWS_PER_BLOCK].astype(work, copy=False), 0.0, 1.0)
        block *= work(255.0)
        np.round(block, out=block)
        out[start : start + ROWS_PER_BLOCK] = block
    return out


# --------------------------------------------------------------------------------------------------
# PSNR and SSIM on Y
# --------------------------------------------------------------------------------------------------


def _y_pair(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    sr = np.asarray(sr)
    hr = np.asarray(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR shapes differ: {sr.shape} vs {hr.shape}")
    return shave(rgb_to_y(sr), crop_border), shave(rgb_to_y(hr), crop_border)


def psnr_y(sr_uint8: np.ndarray, hr_uint8: np.ndarray, crop_border: int) -> float:
    """PSNR (dB) between two 0-255 images on the luma channel, ``crop_border`` pixels cut from every side.

    ``10 log10(255^2 / MSE)`` with the MSE over the cropped Y planes (float64); ``inf`` when they are equal.
    Inputs are normally uint8 H x W x 3 RGB (see :func:`rgb_to_y` for the other accepted shapes).
    """
    y1, y2 = _y_pair(sr_uint8, hr_uint8, crop_border)
    mse = float(np.mean((y1 - y2) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(255.0**2 / mse)


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with ``outer(taps, taps)``, keeping only fully covered positions."""
    k = taps.size
    h, w = img.shape
    rows = sum(taps[i] * img[i : h - k + 1 + i, :] for i in range(k))
    return sum(taps[j] * rows[:, j : w - k + 1 + j] for j in range(k))


def _ssim_plane(a: np.ndarray, b: np.ndarray) -> float:
    taps = _gaussian_taps(_SSIM_WINDOW, _SSIM_SIGMA)
    mu_a = _filter_valid(a, taps)
    mu_b = _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a * mu_a
    var_b = _filter_valid(b * b, taps) - mu_b * mu_b
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + _SSIM_C1) * (2.0 * cov + _SSIM_C2)
    den = (mu_a * mu_a + mu_b * mu_b + _SSIM_C1) * (var_a + var_b + _SSIM_C2)
    return float(np.mean(num / den))


def ssim_y(sr_uint8: np.ndarray, hr_uint8: np.ndarray, crop_border: int) -> float:
    """SSIM between two 0-255 images on the luma channel, ``crop_border`` pixels cut from every side.

    Gaussian window 11 x 11 (sigma 1.5, normalised), C1 = (0.01*255)^2, C2 = (0.03*255)^2, statistics
    only where the window lies fully inside the cropped image (no padding), result = mean of the SSIM map.
    The cropped image must be at least 11 x 11.
    """
    y1, y2 = _y_pair(sr_uint8, hr_uint8, crop_border)
    if min(y1.shape) < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {_SSIM_WINDOW}x{_SSIM_WINDOW} px after cropping, got {y1.shape}")
    return _ssim_plane(y1, y2)


# --------------------------------------------------------------------------------------------------
# MATLAB-compatible bicubic imresize
# --------------------------------------------------------------------------------------------------


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'), support [-2, 2]."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0))
    return near + far


def _resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """The (out_len x in_len) float64 matrix that resamples one axis, MATLAB style.

    Output pixel ``x`` (1-based) sits at input coordinate ``u = x / scale + (1 - 1 / scale) / 2``. When
    shrinking with antialiasing the kernel is stretched by ``1 / scale`` (``scale * cubic(scale * d)``),
    so its support grows to ``4 / scale`` input pixels. Every output pixel takes the ``ceil(width) + 2``
    input positions from ``floor(u - width / 2)`` on, its weights are normalised to sum to 1, and positions
    outside ``1..in_len`` are mirrored back symmetrically (edge pixel repeated: 0 -> 1, -1 -> 2, n+1 -> n).
    """
    shrink = scale < 1.0 and antialias
    width = 4.0 / scale if shrink else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based input positions
    d = u[:, None] - idx
    w = scale * _cubic(scale * d) if shrink else _cubic(d)
    w = w / w.sum(axis=1, keepdims=True)
    # symmetric mirroring: the sequence 1..n, n..1 repeated, indexed 1-based
    period = 2 * in_len
    m = np.mod(idx.astype(np.int64) - 1, period)
    src = np.where(m < in_len, m, period - 1 - m)  # 0-based
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_len)[:, None], src.shape)
    np.add.at(mat, (rows, src), w)
    return mat


def _output_size(in_len: int, scale: float) -> int:
    return int(math.ceil(in_len * scale))


def _resize_rows(a: np.ndarray, mat: np.ndarray) -> np.ndarray:
    return np.tensordot(mat, a, axes=(1, 0))  # (H', W[, C])


def _resize_cols(a: np.ndarray, mat: np.ndarray) -> np.ndarray:
    return np.swapaxes(np.tensordot(mat, a, axes=(1, 1)), 0, 1)  # (H, W'[, C])


def _axis_matrices(shape: tuple[int, ...], scale: float, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if len(shape) not in (2, 3):
        raise ValueError(f"expected an H x W or H x W x C image, got shape {shape}")
    h, w = shape[:2]
    return (
        _resize_matrix(h, _output_size(h, scale), scale, antialias),
        _resize_matrix(w, _output_size(w, scale), scale, antialias),
    )


def imresize(img: np.ndarray, scale: float, *, antialias: bool = True) -> np.ndarray:
    """Resize like MATLAB's ``imresize(img, scale, 'bicubic')`` on a double image (antialiased when shrinking).

    ``img`` is H x W or H x W x C; it is converted to float64 and the result is float64 with shape
    ``(ceil(H * scale), ceil(W * scale)[, C])``, values not clipped. For ``imresize(I, 1/s, 'bicubic')``
    pass ``scale = 1 / s``. Rows (height) are resampled first, then columns, as MATLAB does when both
    factors are equal; each axis is one matrix product.

    This is MATLAB's result for *double* input. For uint8 input MATLAB stores the intermediate image
    (after the first axis) as uint8, i.e. rounds twice; use :func:`bicubic_downscale_uint8` for that.
    """
    a = np.asarray(img, dtype=np.float64)
    mh, mw = _axis_matrices(a.shape, scale, antialias)
    return np.ascontiguousarray(_resize_cols(_resize_rows(a, mh), mw))


def _matlab_round_uint8(a: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8 conversion: round half away from zero, saturate to [0, 255]."""
    return np.clip(np.floor(np.abs(a) + 0.5) * np.sign(a), 0, 255).astype(np.uint8)


def bicubic_downscale_uint8(hr_uint8: np.ndarray, s: int) -> np.ndarray:
    """The benchmark LR image: MATLAB ``imresize(hr, 1/s, 'bicubic')`` on a uint8 image, bit for bit.

    Like MATLAB with uint8 input, the two axis passes each end in a conversion to uint8 (round half away
    from zero, saturate): rows (height) are resized in float64 and rounded, then columns are resized from
    those uint8 values and rounded again. Resizing both axes in float and rounding once differs from the
    published LR images by up to 12 grey levels on ~10-14% of the pixels (Set5/Set14); the two-pass
    rounding reproduces them exactly. Mod-crop the HR image to a multiple of ``s`` first
    (:func:`mod_crop`) to get exactly ``H / s x W / s``. Input H x W or H x W x C uint8; output uint8.
    """
    a = np.asarray(hr_uint8)
    if a.dtype != np.uint8:
        raise ValueError(f"bicubic_downscale_uint8 expects uint8, got {a.dtype}")
    mh, mw = _axis_matrices(a.shape, 1.0 / s, True)
    half = _matlab_round_uint8(_resize_rows(a.astype(np.float64), mh))
    return np.ascontiguousarray(_matlab_round_uint8(_resize_cols(half.astype(np.float64), mw)))

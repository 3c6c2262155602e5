"""The Python API: load a model, upscale an array, a PIL image or a :class:`~upscale.imageio.LoadedImage`.

    import upscale
    model = upscale.load_model("agdn", scale=4)
    big = upscale.upscale_image(model, pil_image)        # same mode out: RGB, RGBA, L, LA, I;16
    big = upscale.upscale_image(model, uint8_array)      # H x W (x 1|2|3|4), same dtype and layout out
    image = upscale.read_image("photo.png")              # pixels + metadata
    upscale.save_image(upscale.upscale_image(model, image), "photo_x4.png", provenance={"model": "agdn x4"})

Everything runs through :class:`upscale.engine.Upscaler` (the engine the CLI uses), so results match the CLI.

Alpha: the colour is premultiplied by alpha before upscaling and divided back afterwards, so transparent
pixels (whatever colour they hold, often black) do not bleed into the edges as dark fringes. The alpha
plane is upscaled on its own, through the same network as a grey image (the mean of the three output
channels), then clamped to the range of the input alpha around each pixel (its 3 x 3 low-resolution
neighbourhood): the network's ringing would otherwise put faint ghost halos around hard-edged shapes. An
alpha plane that is fully opaque skips that extra pass.

Dividing by a small alpha amplifies any disagreement between the colour pass and the alpha pass (the
network treats a red-only image and a grey one slightly differently), so below an upscaled alpha of 1/2 the
colour blends linearly, as alpha goes to 0, towards the alpha-weighted mean colour of the input's 3 x 3
neighbourhood. At alpha >= 1/2 the colour is exactly the premultiplied result divided by alpha.

Grey images run through the network as RGB (the grey replicated) and come back as the mean of the three
output channels.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import TYPE_CHECKING, Any, Callable, overload

import numpy as np

from .imageio import LoadedImage, array_planes, pillow_planes, quantise, unit_floats

if TYPE_CHECKING:
    from PIL import Image

    from .engine import RunStats, Upscaler

__all__ = ["load_model", "upscale_image", "upscale_image_with_stats", "upscale_planes"]

# At and above this upscaled alpha the colour is the premultiplied result divided by alpha; below, it blends
# towards the input's neighbourhood colour (see the module docstring).
_TRUSTED_ALPHA = 0.5


def load_model(model: str = "agdn", scale: int | None = None, weights: str | None = None, device: str | None = None,
               protocol: str = "auto", offline: bool = False, precision: str = "auto", tile: int | None = None,
               overlap: int | None = None) -> "Upscaler":
    """A ready-to-run :class:`~upscale.engine.Upscaler` for a zoo model ("agdn", "esc-light", "agdn x2"...),
    with the options the command line has (`upscale.engine.EngineOptions` checks them the same way).

    `scale` defaults to x4 where the model has it; `weights` is a .safetensors file to use instead of the
    resolved one; `device` is "cpu", "cuda", "cuda:1" or None (CUDA when present); `protocol` is "auto"
    (the official procedure when the image fits the memory budget, else tiles), "reference", "whole" or
    "tiled"; `precision` "auto", "fp32", "fp16" or "bf16"; `tile` and `overlap` in LR pixels.
    """
    from . import registry
    from .engine import DEFAULT_OVERLAP, EngineOptions, Upscaler

    m = re.fullmatch(r"\s*(.+?)\s+x(\d+)\s*", model)
    if m:
        name, named_scale = m.group(1), int(m.group(2))
        if scale is not None and scale != named_scale:
            raise registry.UnknownModelError(f"model {model!r} asks for x{named_scale}, but scale={scale} was given")
        model, scale = name, named_scale
    entry = registry.resolve(model, scale)
    options = EngineOptions(protocol, precision, tile, DEFAULT_OVERLAP if overlap is None else overlap, device)
    return Upscaler.load(entry, weights, options, offline=offline)


def upscale_planes(model: "Upscaler", rgb: np.ndarray, alpha: np.ndarray | None = None,
                   grayscale: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Upscale H x W x 3 float colour (straight, not premultiplied) and an optional H x W alpha plane.

    Returns (s*H x s*W x 3 float32 in [0, 1], s*H x s*W float32 alpha or None). Grey colour (three equal
    channels, `grayscale=True`) comes back as three equal channels.
    """
    out, out_alpha, _ = _planes(model, rgb, alpha, grayscale)
    return out, out_alpha


def _planes(model: "Upscaler", rgb: np.ndarray, alpha: np.ndarray | None, grayscale: bool,
            bits: int | None = None) -> tuple[np.ndarray, np.ndarray | None, "RunStats"]:
    """`upscale_planes` with what the engine did, summed over the colour and alpha passes. With `bits` (8 or 16)
    and no alpha, the colour comes back quantised instead (see `_quantised`)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"expected a non-empty H x W x 3 colour array, got shape {rgb.shape}")
    rgb = np.ascontiguousarray(unit_floats(rgb))
    if alpha is not None:
        alpha = unit_floats(alpha)
    if bits is not None and alpha is None:
        out, stats = _quantised(model, rgb, grayscale, bits)
        return out, None, stats
    if alpha is None or bool((alpha >= 1.0).all()):
        out, stats = model.upscale_array(rgb)
        out_alpha = None if alpha is None else np.ones(out.shape[:2], np.float32)
    else:
        premultiplied, stats = model.upscale_array(np.ascontiguousarray(rgb * alpha[..., None]))
        grey_alpha, alpha_stats = model.upscale_array(np.ascontiguousarray(np.repeat(alpha[..., None], 3, axis=2)))
        grey_alpha, stats = grey_alpha.mean(axis=2), stats + alpha_stats
        s = premultiplied.shape[0] // rgb.shape[0]
        low, high = _neighbourhood_range(alpha)
        out_alpha = np.clip(grey_alpha, _nearest(low, s), _nearest(high, s)).astype(np.float32)
        a = out_alpha[..., None]
        divided = np.clip(premultiplied / np.maximum(a, 1e-6), 0.0, 1.0)
        weight = np.clip(a / _TRUSTED_ALPHA, 0.0, 1.0)
        out = weight * divided + (1.0 - weight) * _nearest(_neighbourhood_colour(rgb, alpha), s)
    if grayscale:
        out = np.repeat(out.mean(axis=2, keepdims=True), 3, axis=2)
    return out.astype(np.float32, copy=False), out_alpha, stats


def _quantised(model: "Upscaler", rgb: np.ndarray, grey: bool, bits: int) -> tuple[np.ndarray, "RunStats"]:
    """The upscaled colour as it will be written, `bits` per sample (uint8 or uint16, three channels, equal for a
    grey image), quantised band by band as the engine finishes them: the float output (a 12 MP photo at x2:
    576 MB) is never held whole. Each pixel gets exactly what quantising the float result would give."""
    s = model.scale
    out = np.empty((rgb.shape[0] * s, rgb.shape[1] * s, 3), np.uint16 if bits == 16 else np.uint8)

    def store(top: int, rows: np.ndarray) -> None:
        band = out[top : top + rows.shape[0]]
        if grey:  # as the float path gives the encoders that keep grey: the mean, replicated, then their mean
            rows = np.repeat(rows.mean(axis=2, keepdims=True), 3, axis=2).mean(axis=2, keepdims=True)
            quantise(rows.astype(np.float32, copy=False), bits, band[..., :1])
            band[..., 1:] = band[..., :1]
        else:  # straight into the output's rows: no temporary of the band's size
            quantise(rows.astype(np.float32, copy=False), bits, band)

    _, stats = model.upscale_array(rgb, on_rows=store)
    return out, stats


def _nearest(x: np.ndarray, s: int) -> np.ndarray:
    """Nearest-neighbour upsampling by an integer factor (rows and columns)."""
    return np.repeat(np.repeat(x, s, axis=0), s, axis=1)


def _windows(x: np.ndarray) -> list[np.ndarray]:
    """The nine 3 x 3-neighbourhood shifts of an H x W (x C) array, edges replicated."""
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2)
    p = np.pad(x, pad, mode="edge")
    h, w = x.shape[:2]
    return [p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]


def _neighbourhood_range(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shifted = _windows(alpha)
    return functools.reduce(np.minimum, shifted), functools.reduce(np.maximum, shifted)


def _neighbourhood_colour(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The alpha-weighted mean colour over each pixel's 3 x 3 neighbourhood (0 where all is transparent)."""
    weighted = sum(_windows(rgb * alpha[..., None]))
    total = sum(_windows(alpha))[..., None]
    return np.where(total > 0, weighted / np.maximum(total, 1e-12), 0.0).astype(np.float32)


@overload
def upscale_image(model: "Upscaler", image: np.ndarray) -> np.ndarray: ...
@overload
def upscale_image(model: "Upscaler", image: "Image.Image") -> "Image.Image": ...
@overload
def upscale_image(model: "Upscaler", image: LoadedImage) -> LoadedImage: ...


def upscale_image(model: "Upscaler", image: Any) -> Any:
    """Upscale `image` with a model from :func:`load_model`; the result has the type of the input.

    - NumPy array, H x W, H x W x 1 (grey), x 2 (grey + alpha), x 3 (RGB), x 4 (RGBA): uint8 in gives uint8
      out, uint16 gives uint16, float (values in [0, 1]) gives the same float dtype.
    - PIL image: RGB, RGBA, L, LA, I;16 give the same mode; P and PA give RGB or RGBA (RGBA when the palette
      has transparency); 1 gives L; CMYK, YCbCr, RGBX give RGB. The ICC profile in ``info`` is kept.
    - :class:`~upscale.imageio.LoadedImage` (from :func:`upscale.imageio.read_image`): a LoadedImage with
      the upscaled pixels and the same metadata, ready for :func:`upscale.imageio.save_image`; every frame of
      an animation or page of a TIFF is upscaled.
    """
    return upscale_image_with_stats(model, image)[0]


def upscale_image_with_stats(model: "Upscaler", image: Any, on_frame: Callable[[int, int], None] | None = None,
                             bits: int | None = None) -> tuple[Any, "RunStats"]:
    """:func:`upscale_image`, and what the engine did (protocol, tiles, precision, fp32 fallbacks, notes).

    A LoadedImage with several frames (an animation, a multi-page TIFF) has every frame upscaled;
    `on_frame(done, total)` is called after each (progress on long files), and the stats add up over them.
    `bits` (8 or 16; LoadedImage of one frame without alpha only, else ignored): the result's ``rgb`` comes
    back quantised to that depth, ready for an encoder that writes it (`upscale.imageio.output_bits`), and the
    float output is never held whole (see `_quantised`)."""
    if isinstance(image, LoadedImage) or (dataclasses.is_dataclass(image) and hasattr(image, "rgb")
                                          and hasattr(image, "alpha")):
        frames = getattr(image, "pages", [])
        rgb, alpha, stats = _planes(model, image.rgb, image.alpha, bool(getattr(image, "grayscale", False)),
                                    None if frames else bits)
        done = []
        if on_frame is not None and frames:
            on_frame(1, 1 + len(frames))
        for k, frame in enumerate(frames, start=2):
            f_rgb, f_alpha, f_stats = _planes(model, frame.rgb, frame.alpha, frame.grayscale)
            done.append(dataclasses.replace(frame, rgb=f_rgb, alpha=f_alpha))
            stats = stats + f_stats
            if on_frame is not None:
                on_frame(k, 1 + len(frames))
        if frames:
            return dataclasses.replace(image, rgb=rgb, alpha=alpha, pages=done), stats
        return dataclasses.replace(image, rgb=rgb, alpha=alpha), stats
    if isinstance(image, np.ndarray):
        return _upscale_array(model, image)
    from PIL import Image

    if isinstance(image, Image.Image):
        return _upscale_pillow(model, image)
    raise TypeError(f"cannot upscale a {type(image).__name__}; pass a NumPy array, a PIL image or a LoadedImage")


def _upscale_array(model: "Upscaler", a: np.ndarray) -> tuple[np.ndarray, "RunStats"]:
    rgb, alpha, grey, _ = array_planes(a)
    out, out_alpha, stats = _planes(model, rgb, alpha, grey)
    planes = out[..., :1] if grey else out
    if out_alpha is not None:
        planes = np.concatenate([planes, out_alpha[..., None]], axis=2)
    if a.dtype == np.uint8:
        result = quantise(planes, 8)
    elif a.dtype == np.uint16:
        result = quantise(planes, 16)
    else:
        result = planes.astype(a.dtype, copy=False)
    return (result[..., 0] if a.ndim == 2 else result), stats


def _upscale_pillow(model: "Upscaler", im: "Image.Image") -> tuple["Image.Image", "RunStats"]:
    from PIL import Image

    rgb, alpha, grey, depth = pillow_planes(im)
    if depth == 16 and im.mode not in ("I;16", "I;16L", "I;16B", "I;16N"):
        raise ValueError(f"PIL mode {im.mode} is not supported by upscale_image; use RGB, RGBA, L, LA or I;16")
    out, out_alpha, stats = _planes(model, rgb, alpha, grey)
    planes = out[..., :1] if grey else out
    if out_alpha is not None:
        planes = np.concatenate([planes, out_alpha[..., None]], axis=2)
    pixels = quantise(planes, depth)
    if pixels.shape[2] == 1:
        result = Image.fromarray(np.ascontiguousarray(pixels[..., 0]))
    else:
        result = Image.fromarray(np.ascontiguousarray(pixels))
    icc = im.info.get("icc_profile")
    if icc:
        result.info["icc_profile"] = icc
    return result, stats

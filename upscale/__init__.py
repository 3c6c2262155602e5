"""upscale: command-line super-resolution with AGDN, ESC and ASID.

Library use::

    import upscale
    model = upscale.load_model("agdn", scale=4)
    big = upscale.upscale_image(model, image)   # NumPy array, PIL image or upscale.read_image(...) result
    upscale.save_image(upscale.upscale_image(model, upscale.read_image("in.png")), "out.png")

The names below are imported on first use, so ``import upscale`` stays light (no torch until a model loads).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "upscale_image", "read_image", "save_image", "LoadedImage", "ImageError"]

_LAZY = {
    "load_model": "api",
    "upscale_image": "api",
    "read_image": "imageio",
    "save_image": "imageio",
    "LoadedImage": "imageio",
    "ImageError": "imageio",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

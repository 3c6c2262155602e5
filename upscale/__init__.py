"""upscale: command-line super-resolution with AGDN, ESC and ASID."""

__version__ = "0.1.0"

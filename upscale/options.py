"""The engine's options, and their checks: one object that the command line, the Python API and `upscale
bench` all build, so that each validates them alike. No torch here: the CLI reads these choices to build its
options without paying torch's import time.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("auto", "reference", "whole", "tiled")
PRECISIONS = ("auto", "fp32", "tf32", "fp16", "bf16")
DEFAULT_OVERLAP = 16
MIN_TILE = 32


class OptionError(ValueError):
    """An engine option with a value it cannot take; `option` names it (the CLI shows it as its flag)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.problem = option, message


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs a network, validated once for every caller (the CLI, the Python API, bench).

    `protocol`: see the module docstring; a `tile` with protocol "auto" means "tiled" (tiles were asked for),
    with "reference" or "whole" it is a contradiction. `tile`: LR pixels per tile core (None: from the memory
    budget). `overlap`: blend width across tile seams, LR pixels. `device`: "cpu", "cuda", "cuda:N" or
    None/"auto" (CUDA when present)."""

    protocol: str = "auto"
    precision: str = "auto"
    tile: int | None = None
    overlap: int = DEFAULT_OVERLAP
    device: str | None = None

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise OptionError("protocol", f"unknown protocol {self.protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"unknown precision {self.precision!r}; choose one of: "
                                           f"{', '.join(PRECISIONS)}")
        if self.tile is not None and self.tile < MIN_TILE:
            raise OptionError("tile", f"must be at least {MIN_TILE} LR pixels, got {self.tile}")
        if self.overlap < 0:
            raise OptionError("overlap", f"must be >= 0, got {self.overlap}")
        if self.tile is not None:
            if self.protocol in ("reference", "whole"):
                raise OptionError("tile", f"tiles contradict the {self.protocol!r} protocol (one pass over the "
                                          "whole image); use protocol 'tiled' or 'auto'")
            object.__setattr__(self, "protocol", "tiled")

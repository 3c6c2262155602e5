"""The model zoo: `weights.toml` read into typed entries, and names such as "agdn x4" resolved to one."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import tomllib

DEFAULT_MODEL = "agdn"
DEFAULT_SCALE = 4


class UnknownModelError(ValueError):
    """A model name or scale that the zoo does not have; the message lists the valid choices."""


@dataclass(frozen=True)
class ModelEntry:
    """One published network: a variant of a family at one scale, with where its weights come from."""

    name: str  # the variant's CLI name, e.g. "agdn", "esc-xl", "asid-d8"
    family: str
    title: str
    scale: int
    hparams: Mapping[str, Any]
    params: int
    file: str  # converted .safetensors file name
    key: str  # entry of the official .pth holding the state dict ("" = the whole file)
    url: str | None = None
    sha256: str | None = None
    license: str = ""
    paper: str = ""
    repository: str = ""
    note: str = ""
    psnr: Mapping[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} x{self.scale}"


@functools.cache
def _zoo() -> dict[str, dict[int, ModelEntry]]:
    text = resources.files("upscale").joinpath("weights.toml").read_text(encoding="utf-8")
    zoo: dict[str, dict[int, ModelEntry]] = {}
    for name, variant in tomllib.loads(text)["variants"].items():
        common = {k: v for k, v in variant.items() if k != "scales"}
        zoo[name] = {
            int(scale): ModelEntry(name=name, scale=int(scale), **common, **per_scale)
            for scale, per_scale in variant["scales"].items()
        }
    return zoo


def all_entries() -> list[ModelEntry]:
    return [entry for scales in _zoo().values() for entry in scales.values()]


def variant_names() -> list[str]:
    return list(_zoo())


def scales_of(name: str) -> list[int]:
    return sorted(_zoo()[_canonical(name)])


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key not in _zoo():
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(_zoo())}")
    return key


def resolve(name: str = DEFAULT_MODEL, scale: int | None = None) -> ModelEntry:
    """The entry for a model name and scale. Without a scale: x4 if the model has it, else its only scale."""
    scales = _zoo()[_canonical(name)]
    if scale is None:
        scale = DEFAULT_SCALE if DEFAULT_SCALE in scales else max(scales)
    if scale not in scales:
        valid = ", ".join(f"x{s}" for s in sorted(scales))
        raise UnknownModelError(f"model {name!r} has no x{scale} weights; valid scales: {valid}")
    return scales[scale]


def match(family: str, scale: int, facts: Mapping[str, Any]) -> list[ModelEntry]:
    """The zoo entries of a family and scale whose hyper-parameters agree with `facts` (what a family's
    `describe` read off a state dict), in the zoo's order. A fact the entry does not list never matches,
    except a false flag (ESC's `use_ln` is off unless listed)."""
    return [entry for entry in all_entries()
            if entry.family == family and entry.scale == scale
            and all(entry.hparams.get(k, False if v is False else None) == v for k, v in facts.items())]

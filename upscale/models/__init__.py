"""Model families, one module each; see `base.Architecture` for the contract they share."""

from __future__ import annotations

import importlib

from .base import Architecture

FAMILIES = ("agdn", "esc", "asid")


def get_architecture(family: str) -> Architecture:
    """The `ARCHITECTURE` object of a family module (imported on first use to keep start-up fast)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{family}").ARCHITECTURE


__all__ = ["Architecture", "FAMILIES", "get_architecture"]

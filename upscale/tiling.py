"""Tiled inference: run a super-resolution network over overlapping tiles and assemble the result.

This module knows nothing about model families. A *network function* is any callable that maps a float batch
(N, C, h, w) to (N, C_out, s*h, s*w); the tiler cuts the input into tiles, calls the function on each tile and
writes the outputs into one preallocated (N, C_out, s*H, s*W) tensor.

Two pieces, kept separate so that other planners and blend modes can be added without touching callers:

- **Planning** (where the tiles go). `grid_origins` is the grid used by several official test scripts
  (ASID / Omni-SR `tester_Matlab.py` among them): with `stride = tile - overlap`, the starts along one axis are
  `list(range(0, size - tile, stride)) + [size - tile]`, so the last tile is flush with the far edge and no start
  is repeated. `plan_tiles` combines the two axes into row-major (top, left) origins.
- **Assembly** (how overlapping outputs are combined). `blend="uniform"` is the plain average of every tile
  output covering an output pixel: each tile is added into the output buffer in row-major tile order and every
  covered pixel gets +1 in a count map; at the end the sum is divided by the count. This reproduces the official
  ASID procedure bit for bit (same additions, same order, same division).

The function does not pad, clamp or change the value range: callers that need a minimum size, an input
mapping (e.g. [0, 1] -> [-1, 1]) or clipping do it around `tiled_forward`. Tiles are run one at a time (batch
dimension = the caller's N), which keeps peak memory at one tile and keeps results identical to a loop over
single tiles.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["BLEND_MODES", "grid_origins", "plan_tiles", "tiled_forward"]

#: assembly modes `tiled_forward` understands
BLEND_MODES: tuple[str, ...] = ("uniform",)

NetworkFn = Callable[[torch.Tensor], torch.Tensor]


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"{what} must be an int or a (height, width) pair, got {value!r}")
    return int(value[0]), int(value[1])


def grid_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis of length `size` in the official grid.

    `list(range(0, size - tile, tile - overlap)) + [size - tile]`: regular steps of `tile - overlap`, then one
    tile flush with the end (only once, even when the steps land on it). A tile as long as the axis gives [0].

    Raises ValueError when the tile is longer than the axis or when the stride `tile - overlap` is not positive
    for an axis that needs more than one tile (the official script would fail or leave pixels uncovered there).
    """
    if size <= 0 or tile <= 0:
        raise ValueError(f"size and tile must be positive (size={size}, tile={tile})")
    if tile > size:
        raise ValueError(f"tile {tile} is longer than the axis ({size}); pad the input or use a smaller tile")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if tile == size:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile {tile} with overlap {overlap} leaves no stride (tile must exceed the overlap)")
    return list(range(0, size - tile, stride)) + [size - tile]


def plan_tiles(
    height: int, width: int, tile: int | tuple[int, int], overlap: int | tuple[int, int]
) -> list[tuple[int, int]]:
    """(top, left) of every tile of the official grid, row-major (rows outer, columns inner)."""
    tile_h, tile_w = _pair(tile, "tile")
    overlap_h, overlap_w = _pair(overlap, "overlap")
    rows = grid_origins(height, tile_h, overlap_h)
    cols = grid_origins(width, tile_w, overlap_w)
    return [(top, left) for top in rows for left in cols]


def tiled_forward(
    fn: NetworkFn,
    x: torch.Tensor,
    scale: int,
    tile: int | tuple[int, int],
    overlap: int | tuple[int, int],
    blend: str = "uniform",
) -> torch.Tensor:
    """Run `fn` over overlapping tiles of `x` (N, C, H, W) and assemble an (N, C_out, scale*H, scale*W) result.

    `tile` and `overlap` are in input pixels, an int (square) or a (height, width) pair; each tile side must not
    exceed the matching image side (see `grid_origins`). `fn` gets (N, C, tile_h, tile_w) slices and must return
    (N, C_out, scale*tile_h, scale*tile_w). `blend="uniform"` averages overlapping outputs with equal weight.
    Values are passed through untouched: no range mapping, no clamping.
    """
    if blend not in BLEND_MODES:
        raise ValueError(f"unknown blend mode {blend!r}; known: {', '.join(BLEND_MODES)}")
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    n, _, height, width = x.shape
    tile_h, tile_w = _pair(tile, "tile")
    origins = plan_tiles(height, width, (tile_h, tile_w), overlap)
    out_th, out_tw = tile_h * scale, tile_w * scale

    out: torch.Tensor | None = None
    count: torch.Tensor | None = None
    for top, left in origins:
        y = fn(x[..., top : top + tile_h, left : left + tile_w])
        if y.dim() != 4 or y.shape[0] != n or y.shape[-2:] != (out_th, out_tw):
            raise ValueError(
                f"network returned shape {tuple(y.shape)} for a {tile_h}x{tile_w} tile; "
                f"expected ({n}, C, {out_th}, {out_tw}) at scale {scale}"
            )
        if out is None:
            out = y.new_zeros((n, y.shape[1], height * scale, width * scale))
            count = y.new_zeros((1, 1, height * scale, width * scale))
        r, c = top * scale, left * scale
        out[..., r : r + out_th, c : c + out_tw] += y
        count[..., r : r + out_th, c : c + out_tw] += 1
    assert out is not None and count is not None  # plan_tiles always yields at least one tile
    return out / count

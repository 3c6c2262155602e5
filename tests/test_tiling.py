"""Tiled inference: quality against the reference protocol, tile-size invariance, seams, precision, sizes."""

import pytest
import torch
from conftest import (
    agdn_eval,
    example_tensor,
    half_precision_goes_non_finite,
    load_golden,
)

from upscale import memory, registry
from upscale.engine import MIN_TILE, EngineOptions, Upscaler, _all_finite
from upscale.models.base import Placement
from upscale.tiling import (
    Tile,
    fit_halo_tiles,
    plan_blocks,
    plan_halo_tiles,
    ramp,
    run_tiles,
)
from upscale.weights import build_model

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def photo(name="coffee.png", box=None) -> torch.Tensor:
    x = example_tensor(name)
    return x if box is None else x[..., box[0] : box[1], box[2] : box[3]]


@pytest.fixture(scope="module")
def agdn2():
    return Upscaler.load(registry.resolve("agdn", 2), options=EngineOptions("reference", device="cpu"))


# -- planning and blending ---------------------------------------------------------------------------------

def test_halo_tiles_partition_the_image_and_start_on_the_alignment():
    tiles = plan_halo_tiles(130, 101, 48, 36, 6)
    covered = torch.zeros(130, 101, dtype=torch.int32)
    for t in tiles:
        covered[t.core[0] : t.core[1], t.core[2] : t.core[3]] += 1
        assert t.input[0] % 6 == 0 and t.input[2] % 6 == 0
        assert t.input[0] <= max(0, t.core[0] - 36) and t.input[1] >= min(130, t.core[1] + 36)
    assert bool((covered == 1).all())


@pytest.mark.parametrize("tile", [(48, 20), (33, 101), (130, 7)])
def test_rectangular_halo_tiles_partition_the_image_and_start_on_the_alignment(tile):
    tiles = plan_halo_tiles(130, 101, tile, 36, 6)
    covered = torch.zeros(130, 101, dtype=torch.int32)
    for t in tiles:
        covered[t.core[0] : t.core[1], t.core[2] : t.core[3]] += 1
        assert t.core[1] - t.core[0] <= tile[0] and t.core[3] - t.core[2] <= tile[1]
        assert t.input[0] % 6 == 0 and t.input[2] % 6 == 0
        assert t.input[0] <= max(0, t.core[0] - 36) and t.input[1] >= min(130, t.core[1] + 36)
        assert t.input[2] <= max(0, t.core[2] - 36) and t.input[3] >= min(101, t.core[3] + 36)
    assert bool((covered == 1).all())


def _inputs(tiles):
    areas = [(t.input[1] - t.input[0]) * (t.input[3] - t.input[2]) for t in tiles]
    return max(areas), sum(areas)


@pytest.mark.parametrize("size", [(960, 1280), (1280, 960), (3000, 4000), (600, 2000), (97, 130), (40, 900)])
@pytest.mark.parametrize("budget", [20_000, 120_000, 308_000, 2_000_000])
def test_fitted_halo_tiles_fit_the_budget_and_compute_no_more_than_any_square(size, budget):
    """The planned grid's largest input fits the budget, and it computes no more pixels than square tiles of any
    side that fits (the old plan: the largest such square)."""
    halo, align = 48, 4
    rows, cols = fit_halo_tiles(*size, budget, halo, align, min_side=32, max_side=1024)
    largest, computed = _inputs(plan_halo_tiles(*size, (rows, cols), halo, align))
    assert largest <= budget
    for side in range(32, 1025, 7):
        square_largest, square_computed = _inputs(plan_halo_tiles(*size, side, halo, align))
        if square_largest <= budget:
            assert computed <= square_computed, (side, square_computed, computed)


def test_fitted_halo_tiles_of_a_photo():
    # 1280 x 960 at ~300 K px a tile: 3 x 2 tiles of 480 x 428 (1.27x computed), where the largest fitting
    # square, 458, cuts 3 x 3 (1.39x)
    rows, cols = fit_halo_tiles(960, 1280, 308_000, 48, 4, min_side=32, max_side=1024)
    tiles = plan_halo_tiles(960, 1280, (rows, cols), 48, 4)
    assert (rows, cols) == (480, 428) and len(tiles) == 6
    assert _inputs(tiles)[1] / (960 * 1280) < 1.28


def test_blocks_sit_on_a_grid_anchored_at_the_origin():
    tiles = plan_blocks(200, 64, 64, 24)
    assert sorted({t.input[0] for t in tiles}) == [0, 40, 80, 120, 136]
    assert all(t.input[1] - t.input[0] == 64 for t in tiles)


def test_blend_weights_sum_to_one_across_a_seam():
    a = Tile((0, 48, 0, 10), (0, 60, 0, 10))
    b = Tile((48, 100, 0, 10), (36, 100, 0, 10))
    total = torch.zeros(200, dtype=torch.float64)
    for t in (a, b):
        total[t.input[0] * 2 : t.input[1] * 2] += ramp(t.core[:2], t.input[:2], 100, 2, 16)
    assert torch.allclose(total, torch.ones(200, dtype=torch.float64))


def test_run_tiles_reproduces_a_pointwise_network_exactly():
    x = torch.rand(1, 3, 70, 90)
    fn = lambda inputs, chunk: torch.nn.functional.interpolate(inputs, scale_factor=2, mode="nearest")  # noqa: E731
    y = run_tiles(fn, x, plan_halo_tiles(70, 90, 32, 8, 1), 2, blend=8)
    assert torch.allclose(y, fn(x, None), atol=1e-6)


@pytest.mark.parametrize("size", [(15, 20), (40, 97), (48, 48), (61, 130)])
@pytest.mark.parametrize("halo,blend", [(48, 16), (48, 0), (8, 16), (30, 64)])
def test_run_tiles_is_exact_for_a_pointwise_network_at_every_tile_size(size, halo, blend):
    # Images below, at and above the tile and the TLC window (48): neighbouring cores whose inputs clip to the
    # same span once divided their shared pixels by too small a weight total (a white image at tiles 32-48).
    x = torch.rand(1, 3, *size)
    fn = lambda inputs, chunk: torch.nn.functional.interpolate(inputs, scale_factor=2, mode="nearest")  # noqa: E731
    expected = fn(x, None)
    for tile in range(MIN_TILE, 2 * 48 + 1):
        y = run_tiles(fn, x, plan_halo_tiles(*size, tile, halo, 6), 2, blend=blend)
        assert torch.allclose(y, expected, atol=1e-6), f"tile {tile}"


def _positional(inputs: torch.Tensor, chunk: list[Tile]) -> torch.Tensor:
    """A stand-in network whose tiles disagree (each adds its own offset), so that blending order shows."""
    y = torch.nn.functional.interpolate(inputs, scale_factor=2, mode="nearest")
    offsets = torch.tensor([1e-3 * (t.input[0] + 3 * t.input[2] + 1) for t in chunk]).repeat_interleave(
        inputs.shape[0] // len(chunk))
    return y + offsets[:, None, None, None]


@pytest.mark.parametrize("size,n", [((15, 20), 1), ((40, 97), 2), ((61, 130), 1), ((130, 61), 1)])
@pytest.mark.parametrize("plan", ["halo", "blocks"])
def test_streamed_rows_are_the_buffered_output_and_leave_as_soon_as_they_are_finished(size, n, plan):
    # Every tile size and batch: the bands, put together, are the whole buffer bit for bit; they come from the
    # top down, each row once; and when a tile is computed, every row above the input of the call before it
    # has already been handed over (only the rows later tiles reach are held).
    x = torch.rand(n, 3, *size)
    for tile in range(MIN_TILE, 70, 7):
        tiles = plan_halo_tiles(*size, tile, 12, 4) if plan == "halo" else plan_blocks(*size, tile, 6)
        for batch in (1, 2, 5):
            expected = run_tiles(_positional, x, tiles, 2, blend=8, batch=batch)
            got = torch.full_like(expected, float("nan"))
            handed, tops_when_called, previous_top = [0], [], [0]

            def fn(inputs, chunk):
                tops_when_called.append((previous_top[0], handed[0]))
                previous_top[0] = chunk[0].input[0]
                return _positional(inputs, chunk)

            def on_rows(top, band):
                assert top == handed[0] and band.shape[-2] > 0, "rows out of order, or twice"
                got[..., top : top + band.shape[-2], :] = band
                handed[0] = top + band.shape[-2]

            assert run_tiles(fn, x, tiles, 2, blend=8, batch=batch, on_rows=on_rows) is None
            assert handed[0] == 2 * size[0] and torch.equal(got, expected), f"tile {tile}, batch {batch}"
            assert all(done >= 2 * before for before, done in tops_when_called[1:]), f"tile {tile}, batch {batch}"


# -- quality against the reference protocol (the measurement `upscale eval --tile 64 --overlap 16` prints) --

@pytest.mark.parametrize("dataset,scale", [("Set5", 2), ("Set5", 4), ("Set14", 2), ("Set14", 4)])
def test_tiled_agdn_matches_the_reference_protocol(dataset, scale):
    reference = agdn_eval(dataset, scale)
    tiled = agdn_eval(dataset, scale, protocol="tiled", tile=64, overlap=16)
    deltas = {a.name: b.psnr - a.psnr for a, b in zip(reference.images, tiled.images)}
    print(f"AGDN x{scale} {dataset}: tiled {tiled.psnr:.4f} vs reference {reference.psnr:.4f} dB; "
          f"worst image {min(deltas, key=deltas.get)} {min(deltas.values()):+.4f} dB")
    assert abs(tiled.psnr - reference.psnr) <= 0.02
    assert min(deltas.values()) >= -0.05


# -- invariance: a pixel gets the same result whichever tile computes it ---------------------------------------

def test_agdn_tile_size_does_not_change_the_output(agdn2):
    x = photo()  # 107 x 160 real photograph
    whole_local = agdn2.model(x, Placement(tuple(x.shape[-2:])))
    outputs = []
    for tile in (48, 96):
        agdn2.protocol, agdn2.tile = "tiled", tile
        outputs.append(agdn2.run(x)[0])
    agdn2.protocol, agdn2.tile = "reference", None
    assert psnr(outputs[0], outputs[1]) >= 50
    assert psnr(outputs[0], whole_local) >= 50 and psnr(outputs[1], whole_local) >= 50


@pytest.mark.parametrize("size", [(40, 97), (61, 48), (90, 66)])
def test_agdn_tiled_equals_whole_at_every_tile_size(agdn2, size):
    # every tile the CLI accepts up to twice the TLC window, on sides below, at and above tile and window
    x = photo(box=(0, size[0], 0, size[1]))
    whole_local = agdn2.model(x, Placement(size))
    agdn2.protocol = "tiled"
    worst = {}
    try:
        for tile in [*range(MIN_TILE, 2 * agdn2.model.tlc_window + 1), (32, 80), (96, 40), (50, 33)]:
            agdn2.tile = tile
            worst[tile] = psnr(agdn2.run(x)[0], whole_local)
    finally:
        agdn2.protocol, agdn2.tile = "reference", None
    bad = {tile: round(db, 1) for tile, db in worst.items() if db < 50}
    assert not bad, f"tiled vs whole below 50 dB at tiles {bad}"


@pytest.mark.parametrize("pixels", [30_000, 45_000, 60_000])
def test_agdn_auto_tiles_fit_the_budget_and_equal_whole(agdn2, monkeypatch, pixels):
    """Without --tile the engine fits the grid to the image and the memory budget (`fit_halo_tiles`): every
    tile input within the budget, and the output that of the whole image with local statistics."""
    x = torch.nn.functional.interpolate(photo(), size=(214, 320), mode="bilinear", align_corners=False)
    whole_local = agdn2.model(x, Placement(tuple(x.shape[-2:])))
    estimate_bytes = memory.budget(torch.device("cpu")) // pixels
    monkeypatch.setenv("UPSCALE_BYTES_PER_PIXEL", str(estimate_bytes))
    agdn2.protocol = "tiled"
    try:
        y, stats = agdn2.run(x)
        tiles, _, _ = agdn2.tile_plan(*x.shape[-2:], stats.tile)
    finally:
        agdn2.protocol = "reference"
    largest = max((t.input[1] - t.input[0]) * (t.input[3] - t.input[2]) for t in tiles)
    assert stats.tiles == len(tiles) > 1 and largest * estimate_bytes <= memory.budget(torch.device("cpu"))
    assert psnr(y, whole_local) >= 50


@pytest.mark.parametrize("family,case,name", [("esc", "esc_x2", "esc"), ("asid", "asid_x2", "asid")])
def test_block_families_same_output_at_every_tile_size_and_batch(family, case, name):
    # Their blocks are fixed by the family; --tile only sets how many blocks run per forward (CUDA batches
    # them). Every tile size gives the same plan, and batched blocks give what one block at a time gives.
    golden = load_golden(family, case)
    model = build_model(registry.resolve(name, 2))
    model.load_state_dict(golden.weights)
    up = Upscaler(registry.resolve(name, 2), model, protocol="tiled", tile=MIN_TILE)
    x = photo(box=(0, 70, 0, 150))
    plans = {str(up.tile_plan(72, 160, tile)[0]) for tile in range(MIN_TILE, 2 * 48 + 1)}
    assert len(plans) == 1
    one, stats = up.run(x)
    tiles = stats.tiles
    assert tiles > 1 and one.shape == (1, 3, 140, 300) and torch.isfinite(one).all()
    for batch in range(2, tiles + 1):
        up.tile_batch = batch
        assert psnr(up.run(x)[0], one) >= 50, f"{tiles} blocks, {batch} per forward"


def test_no_seam_along_tile_boundaries(agdn2):
    x = photo()
    whole_local = agdn2.model(x, Placement(tuple(x.shape[-2:])))
    agdn2.protocol, agdn2.tile = "tiled", 48
    tiled, _ = agdn2.run(x)
    agdn2.protocol, agdn2.tile = "reference", None
    diff = (tiled - whole_local).abs().mean(dim=(0, 1))
    band = torch.zeros_like(diff, dtype=torch.bool)
    for cut in range(48, x.shape[-2], 48):
        band[cut * 2 - 2 : cut * 2 + 2, :] = True
    for cut in range(48, x.shape[-1], 48):
        band[:, cut * 2 - 2 : cut * 2 + 2] = True
    assert diff[band].mean() <= 1.5 * diff[~band].mean()


# -- precision --------------------------------------------------------------------------------------------

def test_non_finite_tile_is_recomputed_in_fp32(agdn2):
    x = photo(box=(0, 100, 0, 100))
    agdn2.protocol, agdn2.tile, agdn2.precision = "tiled", 48, "bf16"
    try:
        with half_precision_goes_non_finite(agdn2.model.upsampler, on_call=2):
            y, stats = agdn2.run(x)
    finally:
        agdn2.protocol, agdn2.tile, agdn2.precision = "reference", None, "auto"
    assert torch.isfinite(y).all()
    assert stats.fp32_fallbacks == 1 and stats.precision == "bf16" and "recomputed in fp32" in stats.notes[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_bad_value_anywhere_makes_an_output_non_finite(dtype):
    for n in (1, 7, 64, 100_003):
        y = torch.rand(n).to(dtype)
        assert _all_finite(y) and _all_finite(y[:0])
        for pos in {0, n // 2, n - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                z = y.clone()
                z[pos] = bad
                assert not _all_finite(z) and not _all_finite(z.view(1, 1, 1, n)), (n, pos, bad)


def test_bf16_on_cpu_runs_close_to_fp32(agdn2):
    x = photo(box=(0, 40, 0, 48))
    agdn2.precision = "bf16"
    try:
        half, _ = agdn2.run(x)
    finally:
        agdn2.precision = "auto"
    full, _ = agdn2.run(x)
    assert torch.isfinite(half).all() and (half - full).abs().mean() < 2e-2


# -- sizes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(20, 30), (16, 300), (300, 17)])
def test_small_and_thin_images_tile(agdn2, size):
    x = photo(box=(0, size[0], 0, size[1])) if size[0] <= 107 and size[1] <= 160 else torch.rand(1, 3, *size)
    agdn2.protocol, agdn2.tile = "tiled", 64
    try:
        y, _ = agdn2.run(x)
    finally:
        agdn2.protocol, agdn2.tile = "reference", None
    assert y.shape == (1, 3, size[0] * 2, size[1] * 2) and torch.isfinite(y).all()

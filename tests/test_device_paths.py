"""The GPU code paths, run on the CPU by forcing them: the out-of-memory ladder (an injected OOM), batched
tiles, the float32/TF32 switch, blending on the device or on the host. Each is compared against the plain
path's output (fp32, one tile per forward). The same tests on a real GPU are in test_cuda.py."""

import importlib.util

import pytest
import torch
from conftest import example_tensor, golden_case_names, load_golden

from upscale import memory, registry
from upscale.engine import EngineOptions, Upscaler, tile_text
from upscale.models.base import Placement
from upscale.options import MIN_TILE
from upscale.weights import build_model, detect

pytestmark = pytest.mark.usefixtures("cpu_kernels")

OOM_ERRORS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 9663676416 bytes"),
]


def photo(h: int, w: int) -> torch.Tensor:
    x = example_tensor("cat.png")  # 106 x 160: resampled when a test needs more pixels
    if h > x.shape[-2] or w > x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return x[..., :h, :w].contiguous()


def fail_above(model: torch.nn.Module, pixels: int, error: BaseException, counter: dict | None = None):
    """Make `model` raise `error` for an input (batch included) of more than `pixels` pixels."""

    def hook(module, args):
        x = args[0]
        if counter is not None:
            counter["calls"] = counter.get("calls", 0) + 1
        if x.shape[0] * x.shape[-2] * x.shape[-1] > pixels:
            raise error

    return model.register_forward_pre_hook(hook)


def agdn(scale: int = 2, **kw) -> Upscaler:
    return Upscaler.load(registry.resolve("agdn", scale), options=EngineOptions(device="cpu", **kw))


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["torch", "cudnn", "cublas", "cpu"])
def test_out_of_memory_in_the_whole_image_pass_finishes_in_tiles_as_a_direct_tiled_run(error):
    x = photo(200, 260)
    up = agdn()
    assert memory.is_out_of_memory(error)
    handle = fail_above(up.model, 150 * 150, error)
    try:
        y, stats = up.run(x)
    finally:
        handle.remove()
    sides = (stats.tile, stats.tile) if isinstance(stats.tile, int) else stats.tile
    assert stats.protocol == "tiled" and MIN_TILE <= min(sides) and max(sides) < 150
    assert len(stats.notes) == 1, stats.notes  # said once, whatever the number of retries
    assert stats.notes[0].startswith("out of memory with the whole image (reference); finished with tiles of "
                                     f"{tile_text(stats.tile)}")
    direct, direct_stats = Upscaler(up.entry, up.model, up.device, "tiled", tile=stats.tile).run(x)
    assert direct_stats.notes == [] and torch.equal(y, direct)


def test_out_of_memory_at_the_smallest_tile_still_fails_and_other_errors_are_not_retried():
    up = agdn(tile=64)
    x = photo(96, 96)
    handle = fail_above(up.model, 0, torch.OutOfMemoryError("CUDA out of memory"))
    try:
        with pytest.raises(torch.OutOfMemoryError):
            up.run(x)
    finally:
        handle.remove()
    calls = {}
    handle = fail_above(up.model, 0, RuntimeError("Expected all tensors to be on the same device"), calls)
    try:
        with pytest.raises(RuntimeError, match="same device"):
            up.run(x)
    finally:
        handle.remove()
    assert calls["calls"] == 1  # not retried


def asid_upscaler(protocol: str, name: str = "asid", scale: int = 2) -> Upscaler:
    golden = load_golden("asid", f"{name}_x{scale}")
    model = build_model(registry.resolve(name, scale))
    model.load_state_dict(golden.weights)
    return Upscaler(registry.resolve(name, scale), model, protocol=protocol)


def test_block_mode_out_of_memory_halves_the_batch_first():
    up = asid_upscaler("tiled")
    up.tile_batch = 8
    x = photo(150, 170)
    one, _ = asid_upscaler("tiled").run(x)
    handle = fail_above(up.model, 2 * 64 * 64, torch.OutOfMemoryError("CUDA out of memory"))
    try:
        y, stats = up.run(x)
    finally:
        handle.remove()
    assert stats.tiles_per_forward == 2
    assert stats.notes == ["out of memory with tiles of 64, 8 per call; finished with tiles of 64, 2 per call"]
    assert (y - one).abs().max() <= 1e-5


def test_asid_reference_batches_its_official_tiles_into_few_forward_calls():
    # 256 x 256: the official tiler's 6 x 6 = 36 tiles of 64 px. One per call (the official script, and our
    # CPU default) is 36 calls; 64 per call is one. The average is formed in the same order: same result up
    # to the network's own rounding on a batch.
    x = photo(256, 256)
    calls = []
    results = {}
    for batch in (1, 8, 64):
        up = asid_upscaler("reference")
        up.tile_batch = batch
        raw = up.model.forward_raw
        up.model.forward_raw = lambda t, raw=raw: calls.append(t.shape[0]) or raw(t)
        calls.clear()
        results[batch], stats = up.run(x)
        assert sum(calls) == 36 and len(calls) == -(-36 // batch) and stats.tiles_per_forward == batch
    golden = load_golden("asid", "asid_x2")
    atol = golden.tolerance[0]
    for batch in (8, 64):
        assert (results[batch] - results[1]).abs().max() <= atol


def test_fp32_means_ieee_float32_and_tf32_is_asked_for():
    seen = []

    class Probe(torch.nn.Module):
        scale = 2

        def forward(self, x):
            seen.append(torch.backends.cuda.matmul.fp32_precision)
            seen.append(torch.backends.cudnn.conv.fp32_precision)
            return torch.nn.functional.interpolate(x, scale_factor=2)

    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    for precision, expected in (("fp32", "ieee"), ("tf32", "tf32")):
        seen.clear()
        up = Upscaler(registry.resolve("esc", 2), Probe(), protocol="whole", precision=precision)
        _, stats = up.run(torch.rand(1, 3, 8, 8))
        assert seen == [expected, expected] and stats.precision == precision
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before


@pytest.mark.parametrize("family", ["agdn", "asid"])
def test_blending_on_the_device_or_on_the_host_gives_the_same_image(family):
    x = photo(100, 140)
    up = agdn(tile=48) if family == "agdn" else asid_upscaler("tiled")
    outputs = []
    for on_device in (True, False):
        up.blend_on_device = on_device
        outputs.append(up.run(x)[0])
    assert torch.equal(*outputs)


def test_free_cache_and_budget_work_on_the_cpu():
    memory.free_cache(torch.device("cpu"))
    assert 0 < memory.budget(torch.device("cpu")) <= 768 << 20
    assert not memory.is_out_of_memory(ValueError("out of memory"))  # only runtime errors are allocation failures


def test_default_tiles_per_call_follow_the_device_and_the_tile_size():
    # on the CPU: about 16 K pixels per call (ASID's 64 px tiles 4 at a time: 9 calls for 256 x 256, measured
    # faster), ESC's 128 px blocks one at a time (a batch is no faster there)
    up = asid_upscaler("auto")
    calls = []
    raw = up.model.forward_raw
    up.model.forward_raw = lambda t: calls.append(t.shape[0]) or raw(t)
    _, stats = up.run(photo(256, 256))
    assert stats.protocol == "reference" and stats.tiles_per_forward == 4 and calls == [4] * 9
    esc = Upscaler(registry.resolve("esc", 2), build_model(registry.resolve("esc", 2)).eval(), protocol="tiled")
    assert esc.tile_plan(256, 256, 128)[1] == 1


def test_esc_says_once_when_flex_attention_cannot_run_for_want_of_triton(monkeypatch):
    from upscale.models import esc

    model = build_model(registry.resolve("esc", 2)).eval()
    arch = esc.ARCHITECTURE
    assert arch.device_warning(model, torch.device("cpu")) is None  # sdpa is the CPU's choice anyway
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "needs Triton" in arch.device_warning(model, torch.device("cuda"))
    assert esc.resolve_backend("auto", torch.device("cuda")) == "sdpa"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("size", [(61, 48), (100, 140), (150, 97)])
def test_agdn_gathered_tlc_windows_equal_the_window_loop(precision, size):
    # the GPU's attention (windows gathered by index, a group per call) against the reference loop over
    # windows, on the straight modules, whole image and tiles (a placement clips the windows)
    golden = load_golden("agdn", "agdn_x2")
    entry = registry.resolve("agdn", 2)
    model = build_model(entry)
    model.load_state_dict(golden.weights)
    model.fast = False  # the straight modules, as off the CPU
    x = photo(*size)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    outputs = {}
    for gathered in (False, True):
        model.gathered_windows = gathered
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            whole = model(x).float()
            tile = model(x[..., 12:, 18:], Placement(size, (12, 18))).float()
        outputs[gathered] = whole, tile
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    for a, b in zip(outputs[False], outputs[True]):
        assert (a - b).abs().max() <= tolerance, (a - b).abs().max()


@pytest.mark.parametrize("case", golden_case_names("agdn"))
def test_agdn_gathered_tlc_windows_match_the_official_outputs(case):
    golden = load_golden("agdn", case)
    entry = detect(golden.weights)
    model = build_model(entry)
    model.load_state_dict(golden.weights)
    model.fast, model.gathered_windows = False, True
    with torch.inference_mode():
        y = model(golden.io["lr_protocol"])
    diff = (y - golden.io["sr_protocol"]).abs()
    assert diff.max() <= golden.tolerance[0] and diff.mean() <= golden.tolerance[1]


def test_agdn_runs_gathered_windows_off_the_cpu_and_the_loop_on_it():
    model = build_model(registry.resolve("agdn", 2))
    model.fast = False
    seen = []
    attn = model.B1.ea.restormer_attn
    attn.register_forward_hook(lambda m, a, o: seen.append(m.gathered_windows))
    model(torch.rand(1, 3, 32, 32))
    assert seen == [False]


@pytest.mark.parametrize("path", ["straight, gathered windows", "cpu kernels"])
def test_agdn_batched_tiles_equal_one_tile_at_a_time(path):
    # tiles of one shape in a grid row share a forward call, each with its own placement (the GPU's way);
    # against one tile per call, within the golden tolerance
    up = agdn(tile=48)
    if path.startswith("straight"):  # slow on the CPU: the same code on a 2-block network, random weights
        from upscale.models.agdn import AGDN

        torch.manual_seed(0)
        up.model = AGDN(2, num_block=2, tlc_window=48).eval()
        up.model.fast, up.model.gathered_windows = False, True
    x = photo(240, 300)  # 5 x 7 tiles: the inner ones share a shape
    one, stats_one = up.run(x)
    assert stats_one.tiles_per_forward == 1 and stats_one.forward_calls == stats_one.tiles == 35
    up.tile_batch = 4
    batched, stats = up.run(x)
    # a grid row at a time (so that finished rows can leave): per row its first and last tiles alone, its five
    # inner ones in calls of 4 and 1
    assert stats.tiles_per_forward == 4 and stats.forward_calls == 5 * (1 + 2 + 1)
    assert (batched - one).abs().max() <= 1e-4 and (batched - one).abs().mean() <= 2e-6


def test_asid_reference_out_of_memory_first_takes_fewer_tiles_per_call_and_stays_official():
    x = photo(150, 170)
    one = asid_upscaler("reference")
    one.tile_batch = 1
    expected, _ = one.run(x)
    up = asid_upscaler("reference")
    up.tile_batch = 8
    raw = up.model.forward_raw

    def limited(t):
        if t.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return raw(t)

    up.model.forward_raw = limited
    y, stats = up.run(x)
    assert stats.protocol == "reference" and stats.tiles_per_forward == 2
    assert stats.notes == ["out of memory with 8 of its 64-px tiles per call; finished with 2"]
    assert (y - expected).abs().max() <= load_golden("asid", "asid_x2").tolerance[0]
    up.model.forward_raw = lambda t: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):  # the tiled fallback runs the network too: nothing fits
        up.run(x)


def streamed(up: Upscaler, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """`up.run(x, on_rows)`'s bands put together at their rows, and the top of every band in order."""
    out = torch.full((x.shape[0], 3, x.shape[-2] * up.scale, x.shape[-1] * up.scale), float("nan"))
    tops = []

    def on_rows(top, band):
        assert band.device.type == "cpu" and band.dtype == torch.float32
        out[..., top : top + band.shape[-2], :] = band
        tops.append(top)

    assert up.run(x, on_rows)[0] is None
    return out, tops


@pytest.mark.parametrize("family,protocol,tile,size,several", [
    ("agdn", "tiled", 48, (100, 140), True), ("agdn", "tiled", (40, 64), (61, 97), False),
    ("agdn", "reference", None, (61, 97), False), ("asid", "tiled", None, (150, 97), True),
    ("asid", "reference", None, (70, 90), False), ("esc", "tiled", None, (70, 150), False)])
def test_rows_handed_over_as_they_are_finished_make_the_same_image(family, protocol, tile, size, several):
    # `several`: a tile row whose input starts below the top (AGDN's halo is 48 px; ESC's 70 px are one row
    # of blocks), so the rows above it leave before the rest is computed
    if family == "agdn":
        up = agdn(protocol=protocol)
        up.tile = tile  # (rows, columns) too, as the auto tiler picks
    elif family == "asid":
        up = asid_upscaler(protocol)
    else:
        golden = load_golden("esc", "esc_x2")
        model = build_model(registry.resolve("esc", 2))
        model.load_state_dict(golden.weights)
        up = Upscaler(registry.resolve("esc", 2), model, protocol=protocol)
    x = photo(*size)
    whole, stats = up.run(x)
    got, tops = streamed(up, x)
    assert torch.equal(got, whole)
    assert tops == sorted(set(tops)) and (len(tops) > 1) == several


def test_rows_are_handed_over_again_from_the_top_when_tiles_run_out_of_memory_halfway():
    up = agdn(protocol="tiled", tile=64)
    x = photo(200, 260)
    calls = {"n": 0}

    def tenth_call_fails_once(module, args):
        calls["n"] += 1
        if calls["n"] == 10:  # the second row of 64-px tiles: the first rows are out
            raise torch.OutOfMemoryError("CUDA out of memory")

    handle = up.model.register_forward_pre_hook(tenth_call_fails_once)
    try:
        got, tops = streamed(up, x)
    finally:
        handle.remove()
    assert calls["n"] > 10 and tops[0] == 0 and 0 in tops[1:]  # bands before the failure, then all again
    direct, _ = Upscaler(up.entry, up.model, up.device, "tiled", tile=32).run(x)
    assert torch.equal(got, direct)
